"""Photo-z difficulty check: one random forest on real catalogue photometry and on rendered synthetic cutouts.

The same regressor (200 trees, min leaf 3, 5 magnitudes + 4 adjacent colours) is cross-validated on the
real MGS model magnitudes and on aperture photometry of a generated file (a 6-pixel-radius circle on the
cutout centre, dereddened with the file's ``e_bv``); sigma_MAD and the outlier rate (|dz| > 0.05) come
from ``photoz_hpc.metrics.photoz_metrics`` overall and per z bin. A synthetic survey that is easier or
harder than SDSS shows up as a ratio away from 1.

    python -m photoz_hpc.sim.difficulty --file synth.h5 --catalogue /work/shared/data/mlz_SDSS_MGS.train
"""

from __future__ import annotations

import argparse
import json
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from photoz_hpc.constants import CUTOUT_SIZE, NMGY_ZEROPOINT
from photoz_hpc.metrics import photoz_metrics

APERTURE_RADIUS_PX = 6.0
N_TREES, MIN_LEAF, N_FOLDS = 200, 3, 5
#: difficulty z bins; the last one (z >= 0.2) holds ~3% of the MGS.
Z_EDGES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.4)
#: a bin's ratios count towards the goal only with at least this many real galaxies.
MIN_REAL_PER_BIN = 100


@lru_cache(maxsize=2)
def aperture_weights(radius: float = APERTURE_RADIUS_PX, size: int = CUTOUT_SIZE, sub: int = 8) -> np.ndarray:
    """Fraction of each pixel inside a circle of ``radius`` pixels about the cutout centre (sub x sub sampling)."""
    c = (size - 1) / 2
    s = (np.arange(sub) + 0.5) / sub - 0.5
    x = (np.arange(size)[:, None] + s[None, :]).ravel() - c
    inside = (x[:, None] ** 2 + x[None, :] ** 2) <= radius**2
    return inside.reshape(size, sub, size, sub).mean(axis=(1, 3))


def aperture_photometry(path: str | Path, max_n: int | None = None, radius: float = APERTURE_RADIUS_PX,
                        block: int = 256) -> dict[str, np.ndarray]:
    """Dereddened aperture magnitudes (n, 5) and spec-z of a labeled generated file."""
    w = aperture_weights(radius)
    with h5py.File(path, "r") as fh:
        n = fh["images"].shape[0] if max_n is None else min(max_n, fh["images"].shape[0])
        flux = np.concatenate([np.einsum("nbhw,hw->nb", fh["images"][s:min(s + block, n)].astype(np.float64), w)
                               for s in range(0, n, block)])
        mag = NMGY_ZEROPOINT - 2.5 * np.log10(np.clip(flux, 1e-3, None)) - fh["e_bv"][:n]
        return {"z": fh["specz_redshift"][:n].astype(float), "mag": mag}


def features(mag: np.ndarray) -> np.ndarray:
    """5 magnitudes + 4 adjacent colours (u-g, g-r, r-i, i-z)."""
    return np.hstack([mag, mag[:, :-1] - mag[:, 1:]])


def cv_predict(mag: np.ndarray, z: np.ndarray, seed: int = 0, n_jobs: int = 2) -> np.ndarray:
    """Out-of-fold random-forest redshifts (N_FOLDS-fold cross-validation, shuffled with ``seed``)."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.model_selection import KFold

    x, zp = features(mag), np.empty(len(z))
    for train, test in KFold(N_FOLDS, shuffle=True, random_state=seed).split(x):
        rf = RandomForestRegressor(n_estimators=N_TREES, min_samples_leaf=MIN_LEAF, random_state=seed, n_jobs=n_jobs)
        zp[test] = rf.fit(x[train], z[train]).predict(x[test])
    return zp


def difficulty(mag: np.ndarray, z: np.ndarray, seed: int = 0, n_jobs: int = 2) -> dict:
    """``photoz_metrics`` (overall and per ``Z_EDGES`` bin) of the cross-validated forest."""
    return photoz_metrics(cv_predict(mag, z, seed, n_jobs), z, z_bins=Z_EDGES)


def subsample_difficulty(mag: np.ndarray, z: np.ndarray, n: int, repeats: int, seed: int = 0) -> dict:
    """Mean sigma_MAD and outlier rate (overall) of the forest on ``repeats`` random subsets of ``n`` galaxies.

    The forest improves with training-set size, so a small rendered sample is compared with the real
    catalogue cut to the same size (the reference of the regression test).
    """
    rng = np.random.default_rng(seed)
    runs = []
    for r in range(repeats):
        pick = rng.choice(len(z), n, replace=False)
        runs.append(difficulty(mag[pick], z[pick], seed=r))
    return {"n": n, "repeats": repeats, "sigma_mad": float(np.mean([m["sigma_mad"] for m in runs])),
            "sigma_mad_sd": float(np.std([m["sigma_mad"] for m in runs])),
            "eta": float(np.mean([m["eta"] for m in runs])), "eta_sd": float(np.std([m["eta"] for m in runs]))}


def ratios(synth: dict, real: dict, min_real: int = MIN_REAL_PER_BIN) -> dict:
    """synthetic / real sigma_MAD and outlier rate, overall and per bin (NaN where the real bin is too small)."""
    def one(s, r):
        ok = r["n"] >= min_real and r["eta"] > 0
        return {"sigma_mad": s["sigma_mad"] / r["sigma_mad"] if ok else float("nan"),
                "eta": s["eta"] / r["eta"] if ok else float("nan")}

    return {"overall": one(synth, real), "per_bin": [one(s, r) for s, r in zip(synth["per_bin"], real["per_bin"],
                                                                                 strict=True)]}


def markdown_table(synth: dict, real: dict) -> str:
    """Per-bin sigma_MAD and outlier rate, synthetic vs real, with their ratios."""
    rat = ratios(synth, real)
    lines = ["| z bin | N synth / real | sigma_MAD synth / real (ratio) | outliers % synth / real (ratio) |",
             "|---|---|---|---|"]
    rows = [("all", synth, real, rat["overall"])]
    rows += [(f"{s['z_lo']:.2f}-{s['z_hi']:.2f}", s, r, q)
             for s, r, q in zip(synth["per_bin"], real["per_bin"], rat["per_bin"], strict=True)]
    for name, s, r, q in rows:
        lines.append(f"| {name} | {s['n']} / {r['n']} | {s['sigma_mad']:.4f} / {r['sigma_mad']:.4f} "
                     f"({q['sigma_mad']:.2f}) | {100 * s['eta']:.2f} / {100 * r['eta']:.2f} ({q['eta']:.2f}) |")
    return "\n".join(lines)


def plot_dz(results: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """z_phot vs z_spec panels (one per entry of ``results``: name -> (z_spec, z_phot)), outliers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, (name, (zs, zp)) in zip(axes[0], results.items(), strict=True):
        out = np.abs((zp - zs) / (1 + zs)) > 0.05
        ax.scatter(zs[~out], zp[~out], s=2, alpha=0.3, color="C0")
        ax.scatter(zs[out], zp[out], s=6, color="C3", label=f"|dz| > 0.05: {100 * out.mean():.1f}%")
        ax.plot([0, 0.35], [0, 0.35], "k-", lw=0.8)
        ax.set_xlim(0, 0.35)
        ax.set_ylim(0, 0.35)
        ax.set_xlabel("z_spec")
        ax.set_ylabel("z_phot (random forest, 5-fold CV)")
        ax.set_title(name)
        ax.legend(loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", required=True, help="labeled generated HDF5 file")
    ap.add_argument("--catalogue", required=True, help="real MGS catalogue (mlz_SDSS_MGS.train)")
    ap.add_argument("--max-n", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON with both metric sets")
    ap.add_argument("--figure", default=None, help="z_phot-vs-z_spec PNG")
    args = ap.parse_args(argv)
    from photoz_hpc.sim.calibrate import read_catalogue

    cat, syn = read_catalogue(args.catalogue), aperture_photometry(args.file, args.max_n)
    zp_real, zp_syn = cv_predict(cat["mag"], cat["z"]), cv_predict(syn["mag"], syn["z"])
    real, synth = photoz_metrics(zp_real, cat["z"], Z_EDGES), photoz_metrics(zp_syn, syn["z"], Z_EDGES)
    print(markdown_table(synth, real))
    if args.out:
        Path(args.out).write_text(json.dumps({"synth": synth, "real": real, "ratios": ratios(synth, real)}, indent=1))
    if args.figure:
        plot_dz({"SDSS MGS (model magnitudes)": (cat["z"], zp_real),
                 "synthetic (6 px aperture)": (syn["z"], zp_syn)}, args.figure)


if __name__ == "__main__":
    main()
