"""Synthetic-vs-real comparison statistics and figures (n(z), colour-z and r-z relations).

Shared by calibrate.py (population model vs the MGS catalogue), difficulty.py and by ``measure_file`` checks of a
generated HDF5 file, so the report's numbers and plots come from one implementation. ``read_catalogue`` (the real
MGS table) lives here so that calibrate.py and difficulty.py, which both need it, do not import each other.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from scipy import stats

from photoz_hpc.errors import InputDataError
from photoz_hpc.sim.camera import sdss_camera

Z_EDGES = np.array([0.0, 0.05, 0.08, 0.11, 0.14, 0.18, 0.25, 0.4])
COLOURS = (("u", "g"), ("g", "r"), ("r", "i"), ("i", "z"))
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
#: the calibrated survey's bands: the MGS catalogue's ugriz model magnitudes.
BANDS = ("u", "g", "r", "i", "z")


def read_catalogue(path: str | Path) -> dict[str, np.ndarray]:
    """MLZ MGS table: zs, ugriz model mags (dereddened), colours, then errors eu..ez (cols 10-14)."""
    try:
        data = np.loadtxt(path, comments="#")
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{path}: cannot read catalogue ({exc})") from exc
    if data.ndim != 2 or data.shape[1] < 15:
        raise InputDataError(f"{path}: expected >= 15 columns, got shape {data.shape}")
    return {"z": data[:, 0], "mag": data[:, 1:6], "err": data[:, 10:15]}


def binned(z: np.ndarray, y: np.ndarray, edges: np.ndarray = Z_EDGES) -> dict[str, list[float]]:
    """Median and robust scatter (half the 16-84 range) of ``y`` in z bins; NaN where < 5 objects."""
    med, sig, cnt = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (z >= lo) & (z < hi) & np.isfinite(y)
        cnt.append(int(sel.sum()))
        if sel.sum() < 5:
            med.append(float("nan"))
            sig.append(float("nan"))
            continue
        p16, p50, p84 = np.percentile(y[sel], [16, 50, 84])
        med.append(float(p50))
        sig.append(float(0.5 * (p84 - p16)))
    return {"median": med, "sigma68": sig, "count": cnt}


def observe(mag: np.ndarray, phot_errors: dict, rng: np.random.Generator) -> np.ndarray:
    """Noiseless magnitudes -> catalogue-like measured ones: Gaussian errors from the catalogue's err(m) relation."""
    a, b, s = (np.asarray(phot_errors[k]) for k in ("a", "b", "scatter_dex"))
    err = 10 ** (a + b * (mag - phot_errors["pivot"]) + s * rng.standard_normal(mag.shape))
    return mag + err * rng.standard_normal(mag.shape)


def colour(mag: np.ndarray, a: str, b: str) -> np.ndarray:
    return mag[:, BANDS.index(a)] - mag[:, BANDS.index(b)]


def compare(synth: dict, real: dict) -> dict:
    """Numbers for the report: n(z) quantiles and KS, r KS, and binned colour/r-z relations."""
    out = {
        "n_synth": int(len(synth["z"])),
        "n_real": int(len(real["z"])),
        "z_quantiles": {"q": list(QUANTILES), "synth": np.quantile(synth["z"], QUANTILES).tolist(),
                        "real": np.quantile(real["z"], QUANTILES).tolist()},
        "ks_z": float(stats.ks_2samp(synth["z"], real["z"]).statistic),
        "ks_r": float(stats.ks_2samp(synth["mag"][:, 2], real["mag"][:, 2]).statistic),
        "z_edges": Z_EDGES.tolist(),
        "r_vs_z": {"synth": binned(synth["z"], synth["mag"][:, 2]), "real": binned(real["z"], real["mag"][:, 2])},
    }
    for a, b in COLOURS:
        key = f"{a}-{b}"
        out[f"{key}_vs_z"] = {"synth": binned(synth["z"], colour(synth["mag"], a, b)),
                              "real": binned(real["z"], colour(real["mag"], a, b))}
        out[f"ks_{key}"] = float(stats.ks_2samp(colour(synth["mag"], a, b), colour(real["mag"], a, b)).statistic)
    return out


def plot_comparison(synth: dict, real: dict, figdir: str | Path, tag: str = "") -> list[Path]:
    """n(z), colour-z (4 colours) and r-z figures, synthetic over real."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = Path(figdir)
    figdir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.6))
    bins = np.linspace(0, 0.4, 41)
    ax.hist(real["z"], bins, density=True, histtype="stepfilled", alpha=0.4, label=f"SDSS MGS (N={len(real['z'])})")
    ax.hist(synth["z"], bins, density=True, histtype="step", lw=2, label=f"synthetic (N={len(synth['z'])})")
    ax.set_xlabel("redshift")
    ax.set_ylabel("n(z)")
    ax.legend()
    fig.tight_layout()
    paths.append(figdir / f"nz{tag}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    panels = [(f"{a}-{b}", colour(synth["mag"], a, b), colour(real["mag"], a, b)) for a, b in COLOURS]
    panels.append(("r", synth["mag"][:, 2], real["mag"][:, 2]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    centres = 0.5 * (Z_EDGES[1:] + Z_EDGES[:-1])
    for ax, (name, ys, yr) in zip(axes, panels, strict=True):
        ax.scatter(real["z"], yr, s=2, alpha=0.25, color="C0", label="SDSS MGS")
        ax.scatter(synth["z"], ys, s=2, alpha=0.25, color="C1", label="synthetic")
        for y, z, c in ((yr, real["z"], "C0"), (ys, synth["z"], "C1")):
            b = binned(z, y)
            ax.errorbar(centres, b["median"], yerr=b["sigma68"], color=c, marker="o", lw=2, capsize=3,
                        markeredgecolor="k")
        lo, hi = np.nanpercentile(np.concatenate([yr, ys]), [0.5, 99.5])
        ax.set_ylim(lo, hi)
        ax.set_xlim(0, 0.35)
        ax.set_xlabel("redshift")
        ax.set_ylabel(name)
    axes[0].legend(markerscale=4, loc="upper left")
    fig.tight_layout()
    paths.append(figdir / f"colours_vs_z{tag}.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def measure_file(path: str | Path, max_n: int | None = None) -> dict[str, np.ndarray]:
    """Pixel-sum magnitudes of a generated file, dereddened with its own ``e_bv`` (labeled files only)."""
    with h5py.File(path, "r") as fh:
        n = fh["images"].shape[0] if max_n is None else min(max_n, fh["images"].shape[0])
        flux = np.stack([fh["images"][i].sum(axis=(1, 2)) for i in range(n)])
        mag = sdss_camera().zeropoint - 2.5 * np.log10(np.clip(flux, 1e-3, None)) - fh["e_bv"][:n]
        return {"z": fh["specz_redshift"][:n].astype(float), "mag": mag}


def markdown_tables(stats_: dict) -> str:
    """The report's tables (n(z) quantiles, KS, per-z-bin median / sigma68 of r and colours) from ``compare``."""
    q = stats_["z_quantiles"]
    lines = ["| n(z) quantile | " + " | ".join(f"{v:g}" for v in q["q"]) + " |", "|---" * (len(q["q"]) + 1) + "|"]
    for who in ("synth", "real"):
        lines.append(f"| {who} | " + " | ".join(f"{v:.4f}" for v in q[who]) + " |")
    ks = ", ".join(f"{k[3:]} {stats_[k]:.3f}" for k in stats_ if k.startswith("ks_"))
    lines += ["", f"KS statistics ({stats_['n_synth']} synthetic vs {stats_['n_real']} real): {ks}", ""]
    edges = stats_["z_edges"]
    head = "| z bin | " + " | ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(edges[:-1], edges[1:], strict=True))
    for key in ("r", "g-r", "r-i", "u-g", "i-z"):
        b = stats_[f"{key}_vs_z"]
        lines += [f"**{key} vs z** (median / sigma68; synthetic vs real; N real per bin "
                  + ", ".join(str(c) for c in b["real"]["count"]) + ")", "", head + " |", "|---" * len(edges) + "|"]
        for who in ("synth", "real"):
            lines.append(f"| {who} | " + " | ".join(f"{m:.3f} / {s:.3f}" for m, s in
                                                    zip(b[who]["median"], b[who]["sigma68"], strict=True)) + " |")
        diff = np.array(b["synth"]["median"]) - np.array(b["real"]["median"])
        lines.append("| synth - real | " + " | ".join(f"{d:+.3f}" for d in diff) + " |")
        lines.append("")
    return "\n".join(lines)
