"""Command ``synth``: generate a synthetic SDSS survey in the public release HDF5 layout."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="generate a synthetic SDSS survey (release HDF5 layout)",
        description="Render realistic 5-band SDSS-like galaxy cutouts calibrated on the SDSS Main Galaxy Sample.",
    )
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--n", type=int, required=True, help="number of galaxies")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic for a seed)")
    p.add_argument("--labeled", action="store_true", help="write specz_redshift and specz_redshift_err")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from photoz_hpc.errors import PhotozError
    from photoz_hpc.sim import generate_survey

    if args.n < 1:
        raise PhotozError(f"--n must be >= 1, got {args.n}")
    if args.workers is not None and args.workers < 1:
        raise PhotozError(f"--workers must be >= 1, got {args.workers}")
    print(generate_survey(args.out, n=args.n, seed=args.seed, labeled=args.labeled, workers=args.workers))
    return 0
