"""Photo-z difficulty check: one random forest on real catalogue photometry and on rendered synthetic cutouts.

The same regressor (200 trees, min leaf 3, 5 magnitudes + 4 adjacent colours) is cross-validated on the
real MGS model magnitudes and on aperture photometry of a generated file (a 6-pixel-radius circle on the
cutout centre, dereddened with the file's ``e_bv``); sigma_MAD and the outlier rate (|dz| > 0.05) come
from ``photoz_hpc.metrics.photoz_metrics`` overall and per z bin. A synthetic survey that is easier or
harder than SDSS shows up as a ratio away from 1.

    python -m photoz_hpc.sim.difficulty --file synth.h5 --catalogue /work/shared/data/mlz_SDSS_MGS.train
    python -m photoz_hpc.sim.difficulty --file s7.h5 s8.h5 s9.h5 s10.h5 --catalogue ... --bootstrap 2000

The real catalogue holds only 5000 galaxies (8-17 outliers per z bin), so a per-bin outlier ratio of one
5000-galaxy survey swings by +-30-50 %. Several files (or one large file) are therefore cut into blocks of the
real catalogue's size, each block cross-validated on its own (every forest trains on as many galaxies as the
real one), the out-of-fold predictions pooled; ``--bootstrap`` then resamples galaxies of both sides to give
intervals of every ratio, which show how much of a deviation the real sample can resolve.
"""

from __future__ import annotations

import argparse
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from photoz_hpc.io_utils import atomic_write_json
from photoz_hpc.metrics import photoz_metrics
from photoz_hpc.sim.camera import sdss_camera
from photoz_hpc.sim.compare import read_catalogue

APERTURE_RADIUS_PX = 6.0
N_TREES, MIN_LEAF, N_FOLDS = 200, 3, 5
#: difficulty z bins; the last one (z >= 0.2) holds ~3% of the MGS.
Z_EDGES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.4)
#: a bin's ratios count towards the goal only with at least this many real galaxies.
MIN_REAL_PER_BIN = 100
#: the goal band of every synthetic/real ratio (sigma_MAD and outlier rate, overall and per bin).
GOAL_BAND = (0.8, 1.25)


@lru_cache(maxsize=2)
def aperture_weights(radius: float = APERTURE_RADIUS_PX, size: int | None = None, sub: int = 8) -> np.ndarray:
    """Fraction of each pixel inside a circle of ``radius`` pixels about the cutout centre (sub x sub sampling);
    ``size`` defaults to the SDSS cutout (the check compares with the SDSS MGS)."""
    size = sdss_camera().size if size is None else size
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
        mag = sdss_camera().zeropoint - 2.5 * np.log10(np.clip(flux, 1e-3, None)) - fh["e_bv"][:n]
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


def pooled_predict(mag: np.ndarray, z: np.ndarray, block: int, seed: int = 0, n_jobs: int = 2) -> np.ndarray:
    """Out-of-fold redshifts with every consecutive block of ``block`` galaxies cross-validated on its own.

    The forest improves with training-set size, so a survey larger than the real catalogue is scored as several
    real-sized surveys (a last block shorter than half of ``block`` joins the one before it).
    """
    starts = list(range(0, len(z), block))
    if len(starts) > 1 and len(z) - starts[-1] < block // 2:
        starts.pop()
    bounds = starts[1:] + [len(z)]
    return np.concatenate([cv_predict(mag[a:b], z[a:b], seed + i, n_jobs)
                           for i, (a, b) in enumerate(zip(starts, bounds, strict=True))])


def bootstrap_ratios(synth: tuple[np.ndarray, np.ndarray], real: tuple[np.ndarray, np.ndarray],
                     n_boot: int = 1000, seed: int = 0, min_real: int = MIN_REAL_PER_BIN) -> dict:
    """Percentile intervals (68 % and 95 %) of the synthetic/real ratios, resampling galaxies of both sides.

    ``synth`` and ``real`` are (z_phot, z_spec) of out-of-fold predictions; the forests are not refitted, so
    the intervals carry the sampling noise of both galaxy samples, not the forest's own randomness.
    """
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        s = rng.integers(0, len(synth[1]), len(synth[1]))
        r = rng.integers(0, len(real[1]), len(real[1]))
        draws.append(ratios(photoz_metrics(synth[0][s], synth[1][s], Z_EDGES),
                            photoz_metrics(real[0][r], real[1][r], Z_EDGES), min_real))

    def interval(pick) -> dict:
        v = np.array([pick(d) for d in draws], dtype=float)
        v = v[np.isfinite(v)]
        if v.size < n_boot // 2:
            return {"p16": float("nan"), "p84": float("nan"), "p2.5": float("nan"), "p97.5": float("nan")}
        q = np.percentile(v, [16, 84, 2.5, 97.5])
        return dict(zip(("p16", "p84", "p2.5", "p97.5"), map(float, q), strict=True))

    keys = ("sigma_mad", "eta")
    return {"n_boot": n_boot,
            "overall": {k: interval(lambda d, k=k: d["overall"][k]) for k in keys},
            "per_bin": [{k: interval(lambda d, j=j, k=k: d["per_bin"][j][k]) for k in keys}
                        for j in range(len(Z_EDGES) - 1)]}


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


def verdict(ratio: float, interval: dict | None, band: tuple[float, float] = GOAL_BAND) -> str:
    """The goal verdict of one ratio: 'meets' (inside ``band``), 'consistent' (outside, but its 95 % interval
    overlaps the band: the real sample cannot tell it from a ratio inside) or 'misses' (the whole 95 % interval
    outside); '' for a ratio not measured (NaN)."""
    if not np.isfinite(ratio):
        return ""
    if band[0] <= ratio <= band[1]:
        return "meets"
    if interval is None:
        return "misses"
    return "consistent" if interval["p2.5"] <= band[1] and interval["p97.5"] >= band[0] else "misses"


def _rows(tree: dict) -> list:
    """The overall entry, then the per-bin ones, of a ``ratios`` / ``bootstrap_ratios`` / ``verdicts`` tree."""
    return [tree["overall"], *tree["per_bin"]]


def _interval_rows(rat: dict, boot: dict | None) -> list:
    """``_rows`` of ``boot`` beside those of ``rat``: None in every row without a bootstrap."""
    return [None] * len(_rows(rat)) if boot is None else _rows(boot)


def verdicts(rat: dict, boot: dict | None) -> dict:
    """``verdict`` of every ratio of ``ratios`` (overall and per bin), with the intervals of ``bootstrap_ratios``."""
    out = [{k: verdict(q[k], b and b[k]) for k in ("sigma_mad", "eta")}
           for q, b in zip(_rows(rat), _interval_rows(rat, boot), strict=True)]
    return {"overall": out[0], "per_bin": out[1:]}


def markdown_table(synth: dict, real: dict, boot: dict | None = None) -> str:
    """Per-bin sigma_MAD and outlier rate, synthetic vs real, with their ratios (and 68 % intervals of ``boot``)."""
    rat = ratios(synth, real)
    boots = _interval_rows(rat, boot)
    verdict_rows = _rows(verdicts(rat, boot))

    def ci(b: dict | None, key: str, v: dict) -> str:
        return "" if b is None else f" [{b[key]['p16']:.2f}-{b[key]['p84']:.2f}] {v[key]}"

    unit = "ratio" if boot is None else "ratio [68 % interval] verdict"
    lines = [f"| z bin | N synth / real | sigma_MAD synth / real ({unit}) | outliers % synth / real ({unit}) |",
             "|---|---|---|---|"]
    names = ["all"] + [f"{s['z_lo']:.2f}-{s['z_hi']:.2f}" for s in synth["per_bin"]]
    metric_rows = [[m, *m["per_bin"]] for m in (synth, real)]  # photoz_metrics: overall at the top level
    for name, s, r, q, b, v in zip(names, *metric_rows, _rows(rat), boots, verdict_rows, strict=True):
        lines.append(f"| {name} | {s['n']} / {r['n']} | {s['sigma_mad']:.4f} / {r['sigma_mad']:.4f} "
                     f"({q['sigma_mad']:.2f}{ci(b, 'sigma_mad', v)}) | {100 * s['eta']:.2f} / {100 * r['eta']:.2f} "
                     f"({q['eta']:.2f}{ci(b, 'eta', v)}) |")
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
    ap.add_argument("--file", required=True, nargs="+", help="labeled generated HDF5 file(s), pooled")
    ap.add_argument("--catalogue", required=True, help="real MGS catalogue (mlz_SDSS_MGS.train)")
    ap.add_argument("--max-n", type=int, default=None, help="galaxies read from each file")
    ap.add_argument("--block", type=int, default=None,
                    help="galaxies per cross-validated block of the synthetic sample (default: the catalogue's size)")
    ap.add_argument("--bootstrap", type=int, default=0, help="resamples for the ratio intervals (0: none)")
    ap.add_argument("--out", default=None, help="JSON with both metric sets")
    ap.add_argument("--figure", default=None, help="z_phot-vs-z_spec PNG")
    args = ap.parse_args(argv)
    cat = read_catalogue(args.catalogue)
    phot = [aperture_photometry(f, args.max_n) for f in args.file]
    syn = {k: np.concatenate([p[k] for p in phot]) for k in ("z", "mag")}
    zp_real = cv_predict(cat["mag"], cat["z"])
    zp_syn = pooled_predict(syn["mag"], syn["z"], args.block or len(cat["z"]))
    real, synth = photoz_metrics(zp_real, cat["z"], Z_EDGES), photoz_metrics(zp_syn, syn["z"], Z_EDGES)
    boot = (bootstrap_ratios((zp_syn, syn["z"]), (zp_real, cat["z"]), args.bootstrap) if args.bootstrap > 0
            else None)
    print(markdown_table(synth, real, boot))
    if args.out:
        rat = ratios(synth, real)
        atomic_write_json(args.out, {"files": [str(f) for f in args.file], "synth": synth, "real": real,
                                     "ratios": rat, "bootstrap": boot, "goal_band": list(GOAL_BAND),
                                     "verdicts": verdicts(rat, boot)}, indent=1)
    if args.figure:
        plot_dz({"SDSS MGS (model magnitudes)": (cat["z"], zp_real),
                 "synthetic (6 px aperture)": (syn["z"], zp_syn)}, args.figure)


if __name__ == "__main__":
    main()
