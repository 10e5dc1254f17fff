"""``sweep-report``: a label-fraction sweep's metrics as CSV, the paper's Figure 2 and the labels-saved curve.

Which tasks are expected: the sweep file when given, else ``RUNS_DIR/sweep.json`` (written by every sweep
run), else every combination of the methods, fractions and seeds found as ``RUNS_DIR/<m>/<f>/<s>/``.
A task is used only when finished (``summary.json`` with final ``eval`` metrics, not pre-empted); every
other one is listed with its state. Metrics are the test set's (``TASK/test/metrics.json``) when every
finished task has them, else the validation set's (which also chose each task's best epoch).

Labels saved: for each point (fraction f, mean sigma_MAD s over seeds) of a pretrained method, the
fraction f_sup at which the supervised curve reaches s. The supervised curve is the mean over seeds at
each fraction, made non-increasing in fraction by a running minimum from the smallest fraction (the best
sigma_MAD reached with at most that many labels; this can only lower the curve, so it never inflates the
saving), and interpolated linearly in log fraction. Outside the curve f_sup is NaN: "beyond range" when
the supervised model never reaches s (more than every label is needed), "below range" when it reaches s
already at its smallest fraction.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from photoz_hpc.errors import PhotozError
from photoz_hpc.io_utils import atomic_open, atomic_write_json, atomic_write_text
from photoz_hpc.launch.sweep import (
    METHODS,
    PLAN_NAME,
    eval_metrics,
    fraction_name,
    load_sweep,
    read_summary,
    task_configs,
    task_state,
    test_metrics,
)

METRIC_KEYS = ("sigma_mad", "eta", "bias", "outlier_rate_lsst", "n")
LABELS = {"ssl": "self-supervised (fine-tuned)", "supervised": "supervised (from scratch)",
          "linear_probe": "linear probe (frozen encoder)"}
COLOURS = {"ssl": "C0", "supervised": "C3", "linear_probe": "C2"}


# ---------------------------------------------------------------------- labels saved


def labels_needed(fractions, sigma, target: float) -> tuple[float, str]:
    """(f_sup, status) at which the supervised curve (``fractions``, ``sigma``: means over seeds) reaches
    ``target``; status 'ok', 'beyond range' or 'below range' (f_sup NaN). See the module docstring."""
    f = np.asarray(fractions, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    keep = np.isfinite(f) & np.isfinite(s) & (f > 0)
    f, s = f[keep], s[keep]
    if len(f) == 0 or not math.isfinite(target):
        return math.nan, "no supervised curve" if len(f) == 0 else "no value"
    order = np.argsort(f)
    f, env = f[order], np.minimum.accumulate(s[order])
    if target > env[0]:
        return math.nan, "below range"
    if target == env[0]:
        return float(f[0]), "ok"
    if target < env[-1]:
        return math.nan, "beyond range"
    k = int(np.argmax(env <= target))  # first fraction whose (monotone) sigma_MAD is <= target; k >= 1
    t = (env[k - 1] - target) / (env[k - 1] - env[k])
    return float(np.exp(np.log(f[k - 1]) + t * (np.log(f[k]) - np.log(f[k - 1])))), "ok"


def labels_saved(aggregate: dict[str, dict[float, dict[str, Any]]], metric: str = "sigma_mad") -> list[dict[str, Any]]:
    """One row per point of every pretrained method: f, its mean sigma_MAD, f_sup, ratio f_sup / f, status."""
    sup = aggregate.get("supervised") or {}
    fr = sorted(sup)
    curve = [sup[f][metric]["mean"] for f in fr]
    rows = []
    for method in (m for m in METHODS if m != "supervised"):
        for f, agg in sorted((aggregate.get(method) or {}).items()):
            target = agg[metric]["mean"]
            f_sup, status = labels_needed(fr, curve, target)
            rows.append({"method": method, "fraction": f, "sigma_mad": target, "f_sup": f_sup,
                         "ratio": f_sup / f if math.isfinite(f_sup) else math.nan, "status": status})
    return rows


# ---------------------------------------------------------------------- gathering


def _expected(runs_dir: Path, sweep_file: str | None) -> tuple[list[dict[str, Any]], str, Any]:
    """The tasks to look for ({method, fraction, seed, dir[, index, state]}) and where the list came from."""
    if sweep_file:
        sweep = load_sweep(sweep_file)
        if Path(sweep.runs_dir).resolve() != runs_dir.resolve():
            raise PhotozError(f"sweep file {sweep_file} runs into {sweep.runs_dir}, not {runs_dir}")
        rows = []
        for task, cfg in task_configs(sweep):
            state, detail = task_state(sweep, task, cfg)
            rows.append({"index": task.index, "method": task.method, "fraction": task.fraction, "seed": task.seed,
                         "dir": task.dir, "state": state, "detail": detail})
        return rows, f"sweep file {sweep_file}", sweep
    record = runs_dir / PLAN_NAME
    if record.is_file():
        try:
            tasks = json.loads(record.read_text())["tasks"]
            return ([{"index": t["index"], "method": t["method"], "fraction": float(t["fraction"]), "seed": int(t["seed"]),
                      "dir": runs_dir / t["method"] / fraction_name(t["fraction"]) / str(t["seed"])} for t in tasks],
                    str(record), None)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PhotozError(f"{record} is unreadable ({exc}); pass --sweep FILE") from None
    found = set()
    for m in METHODS:
        for fdir in sorted((runs_dir / m).glob("*")) if (runs_dir / m).is_dir() else []:
            try:
                f = float(fdir.name)
            except ValueError:
                continue
            for sdir in fdir.glob("*"):
                if sdir.is_dir() and sdir.name.isdigit():
                    found.add((m, f, int(sdir.name)))
    if not found:
        raise PhotozError(f"{runs_dir}: no sweep task directories (<method>/<fraction>/<seed>/) and no {PLAN_NAME}")
    methods = [m for m in METHODS if any(x[0] == m for x in found)]
    fracs = sorted({x[1] for x in found})
    seeds = sorted({x[2] for x in found})
    rows = [{"method": m, "fraction": f, "seed": s, "dir": runs_dir / m / fraction_name(f) / str(s)}
            for m in methods for f in fracs for s in seeds]
    return rows, "directories found under " + str(runs_dir), None


def gather(runs_dir: str | Path, sweep_file: str | None = None) -> dict[str, Any]:
    """Every expected task with its state and metrics; which metric set ('test' or 'val') the report uses."""
    runs_dir = Path(runs_dir)
    rows, source, sweep = _expected(runs_dir, sweep_file)
    for r in rows:
        d = r["dir"]
        summary = read_summary(d)
        val = eval_metrics(summary)
        r["val"], r["test"] = val, test_metrics(d) if val is not None else None
        if "state" not in r:  # no sweep file: judge by the outputs alone
            r["state"] = ("finished" if val is not None else "missing" if not d.exists() else
                          "preempted" if summary and summary.get("preempted") else "unfinished")
            r["detail"] = ""
        elif r["state"] == "new":
            r["state"] = "missing"
        r["best_epoch"] = ((summary or {}).get("best_val") or {}).get("epoch")
        r["n_train"] = (summary or {}).get("n_train")
    for r in rows:
        r["done"] = r["state"] in ("finished", "untested") and r["val"] is not None
    done = [r for r in rows if r["done"]]
    use_test = bool(done) and all(r["test"] is not None for r in done)
    for r in rows:
        r["used"] = r.pop("done") and (not use_test or r["test"] is not None)
        r["metrics"] = (r["test"] if use_test else r["val"]) if r["used"] else None
    return {"rows": rows, "source": source, "metric_set": "test" if use_test else "validation", "sweep": sweep}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[float, dict[str, Any]]]:
    """method -> fraction -> {metric: {mean, std, min, max}, n_seeds, seeds} over the used tasks."""
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for r in rows:
        if r["used"]:
            out.setdefault(r["method"], {}).setdefault(r["fraction"], {"runs": []})["runs"].append(r)
    for per_f in out.values():
        for agg in per_f.values():
            runs = agg.pop("runs")
            agg["n_seeds"], agg["seeds"] = len(runs), sorted(r["seed"] for r in runs)
            for key in ("sigma_mad", "eta", "bias", "outlier_rate_lsst"):
                v = np.array([float(r["metrics"].get(key, math.nan)) for r in runs])
                agg[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                            "min": float(v.min()), "max": float(v.max())}
    return out


# ---------------------------------------------------------------------- outputs


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> Path:
    with atomic_open(path, "w") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
    return path


def _task_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        flat = {k: r.get(k) for k in ("index", "method", "fraction", "seed", "state", "used", "best_epoch", "n_train")}
        flat["dir"] = str(r["dir"])
        for prefix, m in (("val", r["val"]), ("test", r["test"])):
            for key in METRIC_KEYS:
                flat[f"{prefix}_{key}"] = (m or {}).get(key)
        out.append(flat)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fraction_axis(ax, fractions) -> None:
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([f"{100 * f:g}" for f in fractions], rotation=45)
    ax.minorticks_off()
    ax.set_xlabel("label fraction (%)")


def plot_figure2(agg: dict, path: Path, metric_set: str) -> Path:
    """sigma_MAD and eta against label fraction (log x), one line per method: the mean over seeds, a band
    of +-1 standard deviation and error bars from the smallest to the largest seed's value."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fractions = sorted({f for per_f in agg.values() for f in per_f})
    for ax, key, label, scale in ((axes[0], "sigma_mad", r"$\sigma_{\rm MAD}$", 1.0), (axes[1], "eta", r"$\eta$ (%)", 100.0)):
        for method, per_f in agg.items():
            f = np.array(sorted(per_f))
            mean = np.array([per_f[x][key]["mean"] for x in f]) * scale
            std = np.array([per_f[x][key]["std"] for x in f]) * scale
            lo = np.array([per_f[x][key]["min"] for x in f]) * scale
            hi = np.array([per_f[x][key]["max"] for x in f]) * scale
            c = COLOURS.get(method)
            ax.errorbar(f, mean, yerr=[mean - lo, hi - mean], fmt="o-", color=c, capsize=3, ms=4,
                        label=LABELS.get(method, method))
            ax.fill_between(f, mean - std, mean + std, color=c, alpha=0.15, linewidth=0)
        _fraction_axis(ax, fractions)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{metric_set} metrics: mean over seeds, band +-1 std, bars min-max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_labels_saved(saved: list[dict[str, Any]], path: Path) -> Path:
    """Left: f_sup against f (lines of 1x, 2x, 4x); right: the ratio f_sup / f. Out-of-range points are
    drawn as open triangles at the edge they exceed."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    fractions = sorted({r["fraction"] for r in saved}) or [1.0]
    grid = np.geomspace(min(fractions), max(fractions), 50)
    for factor, ls in ((1, "-"), (2, "--"), (4, ":")):
        a.plot(grid, np.minimum(factor * grid, 1.0), ls, color="grey", lw=0.8, label="no saving" if factor == 1 else f"{factor}x fewer labels")
    for method in dict.fromkeys(r["method"] for r in saved):
        rows = [r for r in saved if r["method"] == method]
        ok = [r for r in rows if r["status"] == "ok"]
        c = COLOURS.get(method)
        a.plot([r["fraction"] for r in ok], [r["f_sup"] for r in ok], "o-", color=c, label=LABELS.get(method, method))
        b.plot([r["fraction"] for r in ok], [r["ratio"] for r in ok], "o-", color=c, label=LABELS.get(method, method))
        beyond = [r["fraction"] for r in rows if r["status"] == "beyond range"]
        a.plot(beyond, [1.0] * len(beyond), "^", mfc="none", color=c, ms=8)
        below = [r["fraction"] for r in rows if r["status"] == "below range"]
        a.plot(below, [min(fractions)] * len(below), "v", mfc="none", color=c, ms=8)
    for ax in (a, b):
        _fraction_axis(ax, fractions)
        ax.grid(alpha=0.3)
    a.set_yscale("log")
    a.set_ylabel("supervised label fraction for the same $\\sigma_{\\rm MAD}$")
    b.set_ylabel("labels saved (f_sup / f)")
    b.axhline(1.0, color="grey", lw=0.8)
    a.legend(fontsize=7)
    fig.suptitle("open triangles: beyond (^) or below (v) the supervised curve", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pm(agg: dict, key: str, scale: float = 1.0, spec: str = ".4f") -> str:
    m = agg[key]
    return f"{format(m['mean'] * scale, spec)} ± {format(m['std'] * scale, spec.lstrip('+'))}"  # a spread has no sign


def _report_md(result: dict, agg: dict, saved: list[dict[str, Any]], out: Path) -> str:
    rows = result["rows"]
    used = sum(r["used"] for r in rows)
    lines = ["# Label-fraction sweep report", "",
             f"Tasks from {result['source']}: {len(rows)} expected, {used} used. Metrics: the **{result['metric_set']}** "
             "set" + (" (each task's best epoch was chosen on the validation set)." if result["metric_set"] == "validation"
                      else " (never used for any choice)."), "",
             "## Metrics by method and label fraction (mean ± std over seeds)", "",
             "| method | label fraction | seeds | sigma_MAD | eta (%) | bias |", "|---|---:|---:|---:|---:|---:|"]
    for method, per_f in agg.items():
        for f, a in sorted(per_f.items()):
            lines.append(f"| {method} | {100 * f:g} % | {a['n_seeds']} | {_pm(a, 'sigma_mad')} | "
                         f"{_pm(a, 'eta', 100.0, '.2f')} | {_pm(a, 'bias', spec='+.4f')} |")
    lines += ["", "![Figure 2](figure2.png)", "", "## Labels saved", "",
              "For each pretrained-method point: the supervised label fraction f_sup that reaches the same mean "
              "sigma_MAD (supervised means over seeds, running minimum over fractions, linear interpolation in "
              "log fraction) and the ratio f_sup / f.", "",
              "| method | f | sigma_MAD | f_sup | f_sup / f |", "|---|---:|---:|---:|---:|"]
    for r in saved:
        fs = f"{100 * r['f_sup']:.3g} %" if r["status"] == "ok" else r["status"]
        ratio = f"{r['ratio']:.2f}" if r["status"] == "ok" else "n/a"
        lines.append(f"| {r['method']} | {100 * r['fraction']:g} % | {r['sigma_mad']:.4f} | {fs} | {ratio} |")
    if not saved:
        lines.append("| (needs the supervised method and a pretrained one) | | | | |")
    lines += ["", "![labels saved](labels_saved.png)", "", "## Tasks not used", ""]
    unused = [r for r in rows if not r["used"]]
    lines += [f"- {r['method']} / {r['fraction']:g} / seed {r['seed']}: {r['state']}"
              + (f" ({r['detail']})" if r.get("detail") else "") + f" — `{r['dir']}`" for r in unused] or ["none"]
    return "\n".join(lines) + "\n"


def write_sweep_report(runs_dir: str | Path, sweep_file: str | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Write ``tasks.csv``, ``summary.csv``, ``labels_saved.csv``, ``figure2.png``, ``labels_saved.png``,
    ``report.md`` and ``report.json`` into ``out`` (default RUNS_DIR/report); returns a short summary."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise PhotozError(f"sweep runs directory {runs_dir} does not exist")
    out = Path(out) if out else runs_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    result = gather(runs_dir, sweep_file)
    agg = aggregate(result["rows"])
    saved = labels_saved(agg)
    task_fields = ["index", "method", "fraction", "seed", "state", "used", "best_epoch", "n_train",
                   *[f"{p}_{k}" for p in ("val", "test") for k in METRIC_KEYS], "dir"]
    _write_csv(out / "tasks.csv", _task_rows(result["rows"]), task_fields)
    summary_rows = [{"method": m, "fraction": f, "n_seeds": a["n_seeds"],
                     **{f"{k}_{s}": a[k][s] for k in ("sigma_mad", "eta", "bias") for s in ("mean", "std", "min", "max")}}
                    for m, per_f in agg.items() for f, a in sorted(per_f.items())]
    _write_csv(out / "summary.csv", summary_rows, list(summary_rows[0]) if summary_rows else ["method", "fraction"])
    _write_csv(out / "labels_saved.csv", saved, ["method", "fraction", "sigma_mad", "f_sup", "ratio", "status"])
    files = [out / n for n in ("tasks.csv", "summary.csv", "labels_saved.csv")]
    if agg:
        files.append(plot_figure2(agg, out / "figure2.png", result["metric_set"]))
        files.append(plot_labels_saved(saved, out / "labels_saved.png"))
    atomic_write_text(out / "report.md", _report_md(result, agg, saved, out))
    files.append(out / "report.md")
    brief = {"out": str(out), "source": result["source"], "metric_set": result["metric_set"],
             "n_expected": len(result["rows"]), "n_used": sum(r["used"] for r in result["rows"]),
             "not_used": [f"{r['method']}/{fraction_name(r['fraction'])}/{r['seed']}: {r['state']}"
                          for r in result["rows"] if not r["used"]],
             "labels_saved": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                              for r in saved], "files": [str(f) for f in files]}
    atomic_write_json(out / "report.json", brief)
    return brief
