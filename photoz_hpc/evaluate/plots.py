"""Diagnostic PNGs of photo-z predictions: z_phot vs z_spec, dz vs z_spec, and a few pdfs.

Each figure shows the numbers of ``photoz_hpc.metrics`` it illustrates (the same function computes
them), so a plot and the metrics table of a run never disagree. Axis ranges follow the network's redshift
grid (``RedshiftGrid``), widened upwards to every galaxy shown. Written atomically, Agg backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from photoz_hpc.evaluate.pdfs import check_probs
from photoz_hpc.io_utils import atomic_path
from photoz_hpc.metrics import ETA_THRESHOLD, grid_z_bins, photoz_metrics
from photoz_hpc.survey import RedshiftGrid

#: z_spec bins of the running median and sigma_MAD band of ``dz_vs_zspec.png``.
RUNNING_BINS = 16
#: bins with fewer galaxies are left out of the running median (too noisy to draw).
RUNNING_MIN_N = 10
#: how many galaxies ``pdfs.png`` shows, picked at evenly spaced z_spec quantiles.
N_PDFS = 6


def _save(fig, path: Path, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def _metrics_text(m: dict) -> str:
    return (f"N = {m['n']}\n$\\sigma_{{MAD}}$ = {m['sigma_mad']:.4f}\n$\\eta$ = {100 * m['eta']:.2f}%\n"
            f"bias = {m['bias']:+.5f}\nLSST outliers = {100 * m['outlier_rate_lsst']:.2f}%")


def _count_colorbar(fig, mappable, ax):
    """A colour bar of galaxy counts on a log scale, ticked with plain integers (1, 2, 5, 10, ...) rather than
    matplotlib's default 1x10^0 ... 4x10^0 for a log norm."""
    from matplotlib import ticker

    bar = fig.colorbar(mappable, ax=ax, label="galaxies")
    bar.ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.0f}"))
    bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    return bar


def _zphot_vs_zspec(plt, path: Path, z_phot: np.ndarray, z_spec: np.ndarray, m: dict, title: str,
                    grid: RedshiftGrid) -> Path:
    lo = grid.z_min
    hi = max(grid.z_max, float(z_spec.max()), float(z_phot.max()))
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    hb = ax.hexbin(z_spec, z_phot, gridsize=60, extent=(lo, hi, lo, hi), mincnt=1, bins="log", cmap="viridis")
    _count_colorbar(fig, hb, ax)
    z = np.linspace(lo, hi, 2)
    ax.plot(z, z, color="k", lw=1, label="1:1")
    for sign in (1, -1):
        ax.plot(z, z + sign * ETA_THRESHOLD * (1 + z), color="r", lw=0.8, ls="--",
                label=f"$|\\Delta z| = {ETA_THRESHOLD}(1+z)$" if sign > 0 else None)
    ax.text(0.03, 0.97, _metrics_text(m), transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="$z_{spec}$", ylabel="$z_{phot}$", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def _dz_vs_zspec(plt, path: Path, z_phot: np.ndarray, z_spec: np.ndarray, title: str, grid: RedshiftGrid) -> Path:
    dz = (z_phot - z_spec) / (1 + z_spec)
    edges = np.linspace(grid.z_min, max(grid.z_max, float(z_spec.max()) + 1e-9), RUNNING_BINS + 1)
    rows = [r for r in photoz_metrics(z_phot, z_spec, z_bins=edges)["per_bin"] if r["n"] >= RUNNING_MIN_N]
    mid = np.array([0.5 * (r["z_lo"] + r["z_hi"]) for r in rows])
    med = np.array([r["bias_median"] for r in rows])
    sig = np.array([r["sigma_mad"] for r in rows])
    lim = max(0.15, 4 * ETA_THRESHOLD)
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    # points beyond the y range are drawn on its edge, so catastrophic outliers stay visible
    ax.hexbin(z_spec, np.clip(dz, -lim, lim), gridsize=(60, 30), extent=(edges[0], edges[-1], -lim, lim),
              mincnt=1, bins="log", cmap="Greys")
    ax.fill_between(mid, med - sig, med + sig, color="C0", alpha=0.3, label="median $\\pm\\ \\sigma_{MAD}$")
    ax.plot(mid, med, color="C0", marker="o", ms=3, label="running median")
    ax.axhline(0, color="k", lw=0.8)
    for sign in (1, -1):
        ax.axhline(sign * ETA_THRESHOLD, color="r", lw=0.8, ls="--",
                   label=f"$|\\Delta z| = {ETA_THRESHOLD}$" if sign > 0 else None)
    ax.set(xlim=(edges[0], edges[-1]), ylim=(-lim, lim), xlabel="$z_{spec}$",
           ylabel="$\\Delta z = (z_{phot} - z_{spec}) / (1 + z_{spec})$", title=title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def _pdfs(plt, path: Path, z_phot: np.ndarray, z_spec: np.ndarray, probs: np.ndarray, title: str,
          grid: RedshiftGrid) -> Path:
    edges = grid.edges()
    # the galaxies nearest to evenly spaced redshifts across the bulk (2nd-98th percentile) of z_spec
    targets = np.linspace(*np.percentile(z_spec, [2.0, 98.0]), N_PDFS)
    picks = list(dict.fromkeys(int(np.argmin(np.abs(z_spec - t))) for t in targets))
    ncols = min(3, len(picks))
    nrows = int(np.ceil(len(picks) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows), squeeze=False)
    for ax in axes.ravel()[len(picks):]:
        ax.axis("off")
    for ax, i in zip(axes.ravel(), picks, strict=False):
        ax.stairs(probs[i] / np.diff(edges), edges, color="C0", fill=True, alpha=0.6)
        ax.axvline(z_spec[i], color="r", lw=1, label="$z_{spec}$")
        ax.axvline(z_phot[i], color="k", lw=1, ls="--", label="$z_{phot}$")
        ax.set_xlim(edges[0], edges[-1])
        ax.set_title(f"#{i}: $z_{{spec}}$ = {z_spec[i]:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_ylabel("p(z)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_evaluation(out_dir: str | os.PathLike, z_phot, z_spec, probs, title: str, grid: RedshiftGrid) -> list[Path]:
    """Write ``zphot_vs_zspec.png``, ``dz_vs_zspec.png`` and (when ``probs`` is not None) ``pdfs.png``
    under ``out_dir``; return their paths. ``grid``: the network's redshift grid (axis ranges, the metrics'
    z bins); ``probs`` is (N, grid.n_bins) over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z_phot = np.asarray(z_phot, dtype=np.float64).ravel()
    z_spec = np.asarray(z_spec, dtype=np.float64).ravel()
    m = photoz_metrics(z_phot, z_spec, z_bins=grid_z_bins(grid))  # validates shapes and finiteness
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_zphot_vs_zspec(plt, out_dir / "zphot_vs_zspec.png", z_phot, z_spec, m, title, grid),
             _dz_vs_zspec(plt, out_dir / "dz_vs_zspec.png", z_phot, z_spec, title, grid)]
    if probs is not None:
        p = check_probs(probs, grid)
        if p.shape[0] != z_spec.size:
            raise ValueError(f"probs has {p.shape[0]} rows for {z_spec.size} galaxies")
        paths.append(_pdfs(plt, out_dir / "pdfs.png", z_phot, z_spec, p, title, grid))
    return paths
