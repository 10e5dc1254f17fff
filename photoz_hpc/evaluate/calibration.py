"""Are the pdfs honest? PIT, interval coverage and reliability on labeled galaxies, and a post-hoc temperature.

* PIT_i = CDF_i(z_spec,i) of the piecewise-constant pdf (``pdfs.pdf_cdf_at``). Pdfs that are exactly
  right give PIT ~ U(0, 1): a flat histogram; overconfident ones pile up at 0 and 1 (U shape),
  underconfident ones in the middle. ``ks`` = max |ECDF(PIT) - u|.
* Coverage: the fraction of galaxies whose z_spec lies in the central 68% (95%) interval, i.e. with
  PIT in [0.16, 0.84] ([0.025, 0.975]); nominal is 0.68 (0.95).
* Reliability: the coverage of the central interval at every credibility level c (honest: on the
  diagonal), and the catalogue's ``odds`` against the fraction of galaxies whose z_spec lies in the
  odds window (per odds bin; honest: on the diagonal).
* Temperature: p_T proportional to p^(1/T) (logits / T; T < 1 sharpens, T > 1 widens), one scalar fitted on a
  calibration split by bringing the coverage of the central intervals at every credibility level 0.02 ... 0.98
  closest to nominal (mean squared difference: the reliability curve onto its diagonal), then reported on a
  disjoint evaluation split. Not by the NLL of the z_spec bin: a few catastrophic outliers far in the tails
  dominate the mean NLL and pull T up, so on underconfident pdfs with 10% outliers (68% coverage 0.88) the
  NLL-optimal T widened them further (T = 1.2, coverage 0.89); the coverage fit sharpens them (T = 0.33,
  coverage 0.68). The NLL before and after is still reported.

Everything here works on log-probabilities (N, n_bins): a float32 softmax underflows to 0 far from
the peak, and a temperature > 1 must see those tails. The pdfs live on the network's own redshift grid
(``edges``: its ``RedshiftGrid`` or bin edges), which every function here takes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from photoz_hpc.evaluate.pdfs import (
    HI68,
    HI95,
    LO68,
    LO95,
    ODDS_HALF_WIDTH,
    bin_edges,
    pdf_cdf_at,
    summarize_catalogue,
)
from photoz_hpc.io_utils import atomic_path
from photoz_hpc.survey import RedshiftGrid

Edges = np.ndarray | RedshiftGrid

#: PIT histogram bins, credibility levels of the reliability curve, odds bins of the odds reliability.
PIT_BINS = 20
CREDIBILITY_LEVELS = tuple(round(c, 2) for c in np.linspace(0.05, 0.95, 19))
ODDS_BINS = 10
#: RAIL's PIT outlier convention: PIT below 1e-4 or above 1 - 1e-4 (expected rate 2e-4 when honest).
PIT_OUTLIER_EPS = 1e-4
#: search range of the temperature, its log-spaced grid, and the credibility levels the fit matches.
T_RANGE = (0.05, 20.0)
T_GRID_POINTS = 81
FIT_LEVELS = np.round(np.arange(0.02, 0.99, 0.02), 2)


def softmax_log(log_p: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities softmax(log_p / T) row by row (float64); T = 1 just renormalises."""
    x = np.asarray(log_p, dtype=np.float64) / float(temperature)
    x = x - x.max(axis=1, keepdims=True)
    p = np.exp(x)
    return p / p.sum(axis=1, keepdims=True)


def pit_values(probs: np.ndarray, z_spec, edges: Edges) -> np.ndarray:
    """PIT of each galaxy: its pdf's CDF at its z_spec (1 above the grid, 0 below)."""
    return pdf_cdf_at(probs, np.asarray(z_spec, dtype=np.float64), edges)


def z_bins_of(z: np.ndarray, edges: Edges) -> np.ndarray:
    """The grid bin of each redshift (outside the grid: the edge bins, as the training labels)."""
    e = bin_edges(edges)
    return np.clip(np.searchsorted(e, np.asarray(z, dtype=np.float64), side="right") - 1, 0, e.size - 2)


def nll(log_p: np.ndarray, z_spec, edges: Edges, temperature: float = 1.0) -> float:
    """Mean -log p_T(bin of z_spec) (z_spec outside the grid counts in the edge bin, as in training)."""
    x = np.asarray(log_p, dtype=np.float64) / float(temperature)
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    bins = z_bins_of(z_spec, edges)
    return float(np.mean(lse - x[np.arange(len(x)), bins]))


def coverage_error(log_p: np.ndarray, z_spec, edges: Edges, temperature: float = 1.0) -> float:
    """Mean squared difference between the coverage of the central intervals of p_T and their credibility
    levels ``FIT_LEVELS`` (0: the reliability curve on its diagonal)."""
    pit = pit_values(softmax_log(log_p, temperature), z_spec, edges)
    level_needed = np.sort(np.abs(pit - 0.5) * 2.0)  # the smallest central interval holding each z_spec
    coverage = np.searchsorted(level_needed, FIT_LEVELS, side="right") / max(len(pit), 1)
    return float(np.mean((coverage - FIT_LEVELS) ** 2))


def fit_temperature(log_p: np.ndarray, z_spec, edges: Edges, t_range: tuple[float, float] = T_RANGE,
                    tol: float = 1e-4) -> float:
    """The T in ``t_range`` whose interval coverage is closest to nominal (``coverage_error``): the best of a
    log-spaced grid, refined by golden section on log T between its neighbours (coverage is a step function
    of T, so a grid first: no local search can be trapped far from the minimum)."""
    z_spec = np.asarray(z_spec, dtype=np.float64)
    grid = np.log(np.geomspace(t_range[0], t_range[1], T_GRID_POINTS))
    errors = [coverage_error(log_p, z_spec, edges, float(np.exp(u))) for u in grid]
    best = int(np.argmin(errors))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    g = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = coverage_error(log_p, z_spec, edges, float(np.exp(c))), coverage_error(log_p, z_spec, edges, float(np.exp(d)))
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = coverage_error(log_p, z_spec, edges, float(np.exp(c)))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = coverage_error(log_p, z_spec, edges, float(np.exp(d)))
    u = min((grid[best], errors[best]), (0.5 * (a + b), coverage_error(log_p, z_spec, edges, float(np.exp(0.5 * (a + b))))),
            key=lambda pair: pair[1])[0]
    return float(np.exp(u))


def calibration_report(probs: np.ndarray, z_spec, edges: Edges, log_p: np.ndarray | None = None,
                       temperature: float = 1.0) -> dict:
    """PIT histogram and statistics, coverage, reliability curves (and NLL when ``log_p`` is given) as a
    JSON-ready dict. ``probs``: (N, n_bins) pdfs over ``edges`` already at ``temperature`` (recorded, not applied)."""
    z_spec = np.asarray(z_spec, dtype=np.float64).ravel()
    pit = pit_values(probs, z_spec, edges)
    n = pit.size
    counts, _ = np.histogram(pit, bins=PIT_BINS, range=(0.0, 1.0))
    ecdf = np.sort(pit)
    ks = float(max(np.max(np.arange(1, n + 1) / n - ecdf), np.max(ecdf - np.arange(n) / n)))
    summary = summarize_catalogue(probs, edges)
    half = ODDS_HALF_WIDTH * (1.0 + summary["z_mode"])
    inside = np.abs(z_spec - summary["z_mode"]) <= half
    odds_edges = np.linspace(0.0, 1.0, ODDS_BINS + 1)
    which = np.clip(np.searchsorted(odds_edges, summary["odds"], side="right") - 1, 0, ODDS_BINS - 1)
    odds_rows = []
    for b in range(ODDS_BINS):
        sel = which == b
        odds_rows.append({"lo": float(odds_edges[b]), "hi": float(odds_edges[b + 1]), "n": int(sel.sum()),
                          "mean_odds": float(summary["odds"][sel].mean()) if sel.any() else float("nan"),
                          "fraction_inside": float(inside[sel].mean()) if sel.any() else float("nan")})
    report = {
        "n": int(n), "temperature": float(temperature),
        "pit_hist": {"edges": np.linspace(0.0, 1.0, PIT_BINS + 1).tolist(), "counts": counts.tolist(),
                     "density": (counts * PIT_BINS / max(n, 1)).tolist()},
        "pit_ks": ks,
        "pit_outlier_rate": float(np.mean((pit < PIT_OUTLIER_EPS) | (pit > 1.0 - PIT_OUTLIER_EPS))),
        "coverage_68": float(np.mean((pit >= LO68) & (pit <= HI68))),
        "coverage_95": float(np.mean((pit >= LO95) & (pit <= HI95))),
        "credibility": {"levels": list(CREDIBILITY_LEVELS),
                        "coverage": [float(np.mean(np.abs(pit - 0.5) <= c / 2)) for c in CREDIBILITY_LEVELS]},
        "odds_reliability": odds_rows,
    }
    if log_p is not None:
        report["nll"] = nll(log_p, z_spec, edges, temperature)
    return report


def calibrate(log_p: np.ndarray, z_spec, calib: np.ndarray, evaluate: np.ndarray, edges: Edges) -> dict:
    """Fit T on rows ``calib`` only, report before (T = 1) and after on rows ``evaluate`` (disjoint); the pdfs
    are over ``edges`` (the network's grid)."""
    calib, evaluate = np.asarray(calib), np.asarray(evaluate)
    if len(calib) == 0 or len(evaluate) == 0:
        raise ValueError("calibration and evaluation splits must both be non-empty")
    if np.intersect1d(calib, evaluate).size:
        raise ValueError("the calibration split overlaps the evaluation split")
    z_spec = np.asarray(z_spec, dtype=np.float64)
    t = fit_temperature(log_p[calib], z_spec[calib], edges)
    lp, z = log_p[evaluate], z_spec[evaluate]
    return {"temperature": t, "n_calib": int(len(calib)), "n_eval": int(len(evaluate)),
            "nll_calib_before": nll(log_p[calib], z_spec[calib], edges),
            "nll_calib_after": nll(log_p[calib], z_spec[calib], edges, t),
            "before": calibration_report(softmax_log(lp), z, edges, lp, 1.0),
            "after": calibration_report(softmax_log(lp, t), z, edges, lp, t)}


def plot_calibration(path: str | os.PathLike, reports: dict[str, dict], title: str = "") -> Path:
    """One PNG with the PIT histogram, the credibility curve and the odds reliability of each report
    (e.g. ``{"before": ..., "after": ...}``), each against its honest reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.8))
    for k, (label, rep) in enumerate(reports.items()):
        colour = f"C{k}"
        edges = np.asarray(rep["pit_hist"]["edges"])
        axes[0].stairs(rep["pit_hist"]["density"], edges, color=colour, lw=1.5,
                       label=f"{label} (T={rep['temperature']:.3g}, KS {rep['pit_ks']:.3f})")
        cov = rep["credibility"]
        axes[1].plot(cov["levels"], cov["coverage"], marker="o", ms=3, color=colour,
                     label=f"{label}: 68% {rep['coverage_68']:.3f}, 95% {rep['coverage_95']:.3f}")
        rows = [r for r in rep["odds_reliability"] if r["n"] > 0]
        axes[2].plot([r["mean_odds"] for r in rows], [r["fraction_inside"] for r in rows], marker="o", ms=3,
                     color=colour, label=label)
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--", label="honest (flat)")
    axes[0].set(xlabel="PIT", ylabel="density", xlim=(0, 1), title="PIT histogram")
    for ax in axes[1:]:
        ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="honest")
        ax.set(xlim=(0, 1), ylim=(0, 1))
    axes[1].set(xlabel="credibility of the central interval", ylabel="fraction of z_spec inside", title="coverage")
    axes[2].set(xlabel=f"odds (mass within $\\pm${ODDS_HALF_WIDTH}(1+z) of the mode)",
                ylabel="fraction of z_spec in that window", title="odds reliability")
    for ax in axes:
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- the calibrate command

#: stream tag of the calibration/evaluation split (independent of fine-tuning's splits for equal seeds).
_TAG_CALIB = 13


def calibration_split(ids: np.ndarray, calib_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) ids, disjoint and sorted: a seed-fixed ``calib_fraction`` of ``ids`` fits T."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    perm = ids[np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _TAG_CALIB])).permutation(len(ids))]
    n_cal = int(round(calib_fraction * len(ids)))
    if not 0 < calib_fraction < 1 or n_cal < 1 or n_cal >= len(ids):
        raise ValueError(f"--calib-fraction {calib_fraction} of {len(ids)} labeled galaxies leaves an empty "
                         "calibration or evaluation split")
    return np.sort(perm[:n_cal]), np.sort(perm[n_cal:])


def run_calibrate(checkpoint, data, out_dir, ids_path=None, calib_fraction: float = 0.5, split_seed: int = 0,
                  tta: int = 1, batch_size: int = 64, precision: str = "auto", overrides=None) -> dict:
    """The ``calibrate`` command: the network over labeled galaxies on every rank (gathered: a validation
    set, not a survey), a temperature fitted on the calibration split, before/after on the evaluation split;
    rank 0 writes ``calibration.json`` and ``calibration.png`` under ``out_dir``. Data of other bands than the
    network's is refused before any work."""
    from photoz_hpc.augment.loaders import build_loader
    from photoz_hpc.data.splits import labeled_ids, load_ids
    from photoz_hpc.errors import DatasetError, PhotozError
    from photoz_hpc.evaluate.inputs import check_inputs
    from photoz_hpc.evaluate.run import load_network
    from photoz_hpc.io_utils import atomic_write_json
    from photoz_hpc.run_lock import RunDir
    from photoz_hpc.train.inference import predict
    from photoz_hpc.train.precision import resolve_precision
    from photoz_hpc.train.runtime import run_with_comm, use_channels_last

    net, cfg, meta = load_network(checkpoint, overrides)
    (ds,) = check_inputs(net, cfg, [data], f"the network {checkpoint}")
    ids = load_ids(Path(ids_path)) if ids_path else labeled_ids(ds)
    z_all = ds.meta["specz_redshift"]
    if not np.isfinite(z_all[ids]).all():
        raise DatasetError(f"{ds.root}: {int((~np.isfinite(z_all[ids])).sum())} of the galaxies to calibrate on have "
                           "no spectroscopic redshift")
    try:
        calib_ids, eval_ids = calibration_split(ids, calib_fraction, split_seed)
    except ValueError as exc:
        raise PhotozError(str(exc)) from None
    out_dir = Path(out_dir)

    def body(cfg, comm, device, flag):
        prec = resolve_precision(precision, device)
        channels_last = use_channels_last(cfg, device)
        model = net.to(device).eval()
        loader = build_loader(cfg, ds, "eval", comm.rank, comm.world, cfg.seed, ids=ids, batch_size=batch_size,
                              device="gpu" if device.type == "cuda" else "cpu", grid=net.grid)
        pred = predict(model, loader, comm, device, prec.autocast, channels_last=channels_last, tta=tta,
                       with_log_probs=True)
        index, logp = pred["index"], pred["log_probs"].astype(np.float64)
        report = None
        if comm.rank == 0:
            # ``index`` is sorted and holds every id once: the rows of each split are found by bisection
            report = calibrate(logp, z_all[index], np.searchsorted(index, calib_ids), np.searchsorted(index, eval_ids),
                               net.grid)
            report.update({"redshift_grid": net.grid.to_dict(), "checkpoint": str(checkpoint), "dataset": str(ds.root), "tta": tta,
                           "calib_fraction": calib_fraction, "split_seed": split_seed, "precision": prec.name,
                           "source": {k: v for k, v in meta.items() if isinstance(v, (str, int, float)) or v is None}})
            out_dir.mkdir(parents=True, exist_ok=True)
            report["figure"] = str(plot_calibration(out_dir / "calibration.png",
                                                    {"before": report["before"], "after": report["after"]},
                                                    f"{Path(checkpoint).name}: evaluation split ({len(eval_ids)} galaxies)"))
            atomic_write_json(out_dir / "calibration.json", report)
        return comm.broadcast_object(report)

    return run_with_comm(cfg, None, body, hold=RunDir(out_dir, "calibrate"))


def read_temperature(value: str) -> float:
    """A temperature (predict's ``--temperature``, the Python API's ``temperature=``): a number, or a
    ``calibration.json`` written by ``calibrate``; the error names no flag, so it fits both."""
    import json

    from photoz_hpc.errors import PhotozError

    try:
        return float(value)
    except ValueError:
        pass
    path = Path(value)
    try:
        return float(json.loads(path.read_text())["temperature"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PhotozError(f"temperature {value!r} is neither a number nor a readable calibration.json ({exc})") from None
