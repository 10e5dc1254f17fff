"""Command ``synth``: generate a synthetic survey (SDSS: release HDF5 layout; others: Multimodal Universe layout)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="generate a synthetic survey (SDSS release layout, or legacy/hsc/lsst in the Multimodal Universe layout)",
        description="Render realistic galaxy cutouts from a population calibrated on the SDSS Main Galaxy Sample: "
                    "SDSS ugriz (default, the release HDF5 layout) or any survey with a synthetic section "
                    "(legacy, hsc, lsst or a survey YAML: its filters, PSFs, depths, pixel grid and selection; "
                    "Multimodal Universe HDF5 layout, read by prepare). See docs/synthetic_survey.md.",
    )
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--n", type=int, required=True, help="number of galaxies")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic for a seed)")
    p.add_argument("--labeled", action="store_true",
                   help="write spectroscopic redshifts (SDSS: specz_redshift(_err); other surveys: z_spec)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--survey", default="sdss",
                   help="survey name (sdss, legacy, hsc, lsst) or path to a survey YAML file (default: sdss)")
    p.add_argument("--bands", default=None,
                   help="comma-separated bands to render, e.g. g,r,z (other surveys only; default: the survey's "
                        "default_bands, else all)")
    p.add_argument("--cutout-size", type=int, default=None,
                   help="cutout side in pixels (other surveys only; default: the survey's cutout_size; small values "
                        "make quick test files)")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from photoz_hpc.errors import PhotozError
    from photoz_hpc.sim import generate_survey

    if args.n < 1:
        raise PhotozError(f"--n must be >= 1, got {args.n}")
    if args.workers is not None and args.workers < 1:
        raise PhotozError(f"--workers must be >= 1, got {args.workers}")
    bands = [b.strip() for b in args.bands.split(",") if b.strip()] if args.bands else None
    print(generate_survey(args.out, n=args.n, seed=args.seed, labeled=args.labeled, workers=args.workers,
                          survey=args.survey, bands=bands, cutout_size=args.cutout_size))
    return 0
