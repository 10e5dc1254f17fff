"""Times generate_survey and renders the report's rendered-file figures (galaxy grid, pixel-photometry check).

    python benchmarks/synth_speed.py --n 2000 --workers 2 --out /tmp/synth.h5 \
        [--catalogue /work/shared/data/mlz_SDSS_MGS.train --figures docs/figures]
"""

from __future__ import annotations

import argparse
import json
import time

import h5py
import numpy as np

from photoz_hpc.logs import setup_logging
from photoz_hpc.sim import generate_survey
from photoz_hpc.viz import save_grid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--out", default="/tmp/synth_bench.h5")
    ap.add_argument("--catalogue", default=None)
    ap.add_argument("--figures", default=None)
    args = ap.parse_args()
    setup_logging("WARNING")
    t0 = time.perf_counter()
    generate_survey(args.out, n=args.n, seed=args.seed, workers=args.workers, chunk=args.chunk)
    dt = time.perf_counter() - t0
    print(json.dumps({"n": args.n, "workers": args.workers, "seconds": round(dt, 1),
                      "galaxies_per_min": round(60 * args.n / dt)}))
    if args.figures:
        with h5py.File(args.out, "r") as fh:
            z = fh["specz_redshift"][:]
            order = np.argsort(z[:36])
            imgs = fh["images"][:36][order]
            save_grid(imgs, [f"z={v:.3f}" for v in z[:36][order]], f"{args.figures}/galaxy_grid.png", ncols=6,
                      dpi=90, crop=81)
    if args.figures and args.catalogue:
        from photoz_hpc.sim.calibrate import read_catalogue
        from photoz_hpc.sim.compare import compare, measure_file, plot_comparison

        synth, real = measure_file(args.out), read_catalogue(args.catalogue)
        plot_comparison(synth, real, args.figures, tag="_rendered")
        s = compare(synth, real)
        print(json.dumps({k: s[k] for k in s if k.startswith("ks_")}))
        print(json.dumps({k: s[k] for k in ("g-r_vs_z", "r-i_vs_z", "r_vs_z")}))


if __name__ == "__main__":
    main()
