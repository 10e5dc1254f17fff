"""Point-estimate photo-z metrics on dz = (z_phot - z_spec) / (1 + z_spec), overall and per z_spec bin.

Definitions (Hayat et al. 2021, Pasquet et al. 2019; LSST DESC ``qp`` / RAIL for the outlier rate):

* ``sigma_mad`` = 1.4826 * median(|dz - median(dz)|)
* ``sigma_iqr`` = (P75(dz) - P25(dz)) / 1.349, percentiles with numpy's default linear interpolation
* ``eta`` = fraction of galaxies with |dz| > 0.05 (a fraction in [0, 1], not a percentage)
* ``bias`` = mean(dz); ``bias_median`` = median(dz) (what qp calls ``PointBias``)
* ``outlier_rate_lsst`` = fraction with |dz| > max(0.06, 3 sigma_iqr). The test is on |dz|, not on
  |dz - median(dz)|, because that is what the LSST Science Book states and what qp's
  ``PointOutlierRate`` (``src/qp/metrics/point_estimate_metric_classes.py``) and RAIL's former
  ``pointestimates.py`` compute; matching them lets our numbers be compared with DESC results.

Every value is a python float (or int for ``n``) so the dict goes straight to ``json.dumps``. Bins
without galaxies report ``n = 0`` and NaN metrics; ``json.dumps`` writes NaN as the bare token ``NaN``
(its default ``allow_nan=True``), which Python's json reads back but strict JSON parsers reject.
"""

from __future__ import annotations

import numpy as np

from photoz_hpc.survey import SDSS_GRID, RedshiftGrid

#: 1 / Phi^-1(0.75): makes the MAD a consistent estimator of a Gaussian sigma.
MAD_SCALE: float = 1.4826
#: IQR of a unit Gaussian.
IQR_SCALE: float = 1.349
#: |dz| threshold of the outlier fraction eta (Pasquet et al. 2019, Hayat et al. 2021).
ETA_THRESHOLD: float = 0.05
#: floor of the LSST catastrophic-outlier threshold max(0.06, 3 sigma_IQR).
LSST_OUTLIER_FLOOR: float = 0.06
#: ``per_bin`` rows over a model's redshift grid (``grid_z_bins``).
N_METRIC_BINS = 8


def grid_z_bins(grid: RedshiftGrid, n: int = N_METRIC_BINS) -> tuple[float, ...]:
    """z_spec bin edges of ``per_bin`` for a model of redshift grid ``grid``: ``n`` equal bins over its range
    (SDSS: 0, 0.05, ..., 0.4)."""
    return tuple(round(z, 12) for z in np.linspace(grid.z_min, grid.z_max, n + 1).tolist())


#: default z_spec bin edges of ``per_bin``: those of the paper's grid (0, 0.05, ..., 0.4); pass
#: ``z_bins=grid_z_bins(model_grid)`` for a model of another grid.
DEFAULT_Z_BINS: tuple[float, ...] = grid_z_bins(SDSS_GRID)

METRIC_KEYS = ("sigma_mad", "sigma_iqr", "eta", "bias", "bias_median", "outlier_rate_lsst")


def _dz_metrics(dz: np.ndarray) -> dict[str, float | int]:
    """The scalar metrics of one sample of dz (NaN, with n = 0, when it is empty)."""
    n = int(dz.size)
    if n == 0:
        return {key: float("nan") for key in METRIC_KEYS} | {"n": 0}
    median = float(np.median(dz))
    p75, p25 = np.percentile(dz, [75.0, 25.0])
    sigma_iqr = float(p75 - p25) / IQR_SCALE
    abs_dz = np.abs(dz)
    return {
        "sigma_mad": MAD_SCALE * float(np.median(np.abs(dz - median))),
        "sigma_iqr": sigma_iqr,
        "eta": float(np.count_nonzero(abs_dz > ETA_THRESHOLD)) / n,
        "bias": float(np.mean(dz)),
        "bias_median": median,
        "outlier_rate_lsst": float(np.count_nonzero(abs_dz > max(LSST_OUTLIER_FLOOR, 3.0 * sigma_iqr))) / n,
        "n": n,
    }


def _as_finite_1d(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise ValueError(f"{name}: {bad} of {arr.size} values are not finite (NaN or inf)")
    return arr.ravel()


def _check_bins(z_bins) -> np.ndarray:
    edges = np.asarray(z_bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2:
        raise ValueError(f"z_bins must be a 1-D array of at least 2 edges, got shape {edges.shape}")
    if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise ValueError(f"z_bins must be finite and strictly increasing, got {edges.tolist()}")
    return edges


def photoz_metrics(z_phot, z_spec, z_bins=None) -> dict:
    """Metrics of point estimates ``z_phot`` against ``z_spec`` (same shape), overall and per z_spec bin.

    ``z_bins``: z_spec bin edges (default ``DEFAULT_Z_BINS``); bins are half-open [z_lo, z_hi), so
    galaxies outside [z_bins[0], z_bins[-1]) count in the overall metrics but in no ``per_bin`` row.
    Returns the keys of ``METRIC_KEYS``, ``n`` and ``per_bin`` (a list of dicts with ``z_lo``, ``z_hi``
    and the same metrics). Raises ValueError on mismatched shapes, empty input, non-finite values or
    z_spec <= -1 (where dz is undefined).
    """
    zp_arr, zs_arr = np.asarray(z_phot), np.asarray(z_spec)
    if zp_arr.shape != zs_arr.shape:
        raise ValueError(f"z_phot and z_spec differ in shape: {zp_arr.shape} vs {zs_arr.shape}")
    if zp_arr.size == 0:
        raise ValueError("photoz_metrics needs at least one galaxy; got empty z_phot and z_spec")
    zp = _as_finite_1d("z_phot", zp_arr)
    zs = _as_finite_1d("z_spec", zs_arr)
    if np.any(zs <= -1.0):
        raise ValueError(f"z_spec: {int(np.count_nonzero(zs <= -1.0))} values are <= -1, where dz is undefined")
    edges = _check_bins(DEFAULT_Z_BINS if z_bins is None else z_bins)

    dz = (zp - zs) / (1.0 + zs)
    out: dict = _dz_metrics(dz)
    per_bin = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (zs >= lo) & (zs < hi)
        per_bin.append({"z_lo": float(lo), "z_hi": float(hi)} | _dz_metrics(dz[in_bin]))
    out["per_bin"] = per_bin
    return out


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    value = float(value)
    return "n/a" if not np.isfinite(value) else format(value * scale, spec)


def format_metrics_table(rows: dict[str, dict]) -> str:
    """Markdown table, one line per method: sigma_MAD, eta (%), bias (mean dz), outlier rate (%), n.

    ``rows`` maps a method name to a ``photoz_metrics`` result (only the scalar keys are read);
    NaN values (empty samples) print as ``n/a``.
    """
    lines = [
        "| method | sigma_MAD | eta (%) | bias | outlier rate LSST (%) | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        missing = [key for key in ("sigma_mad", "eta", "bias", "outlier_rate_lsst", "n") if key not in m]
        if missing:
            raise KeyError(f"metrics of {name!r} lack {missing}; pass photoz_metrics() results")
        lines.append(
            f"| {name} | {_fmt(m['sigma_mad'], '.5f')} | {_fmt(m['eta'], '.2f', 100.0)} | "
            f"{_fmt(m['bias'], '+.5f')} | {_fmt(m['outlier_rate_lsst'], '.2f', 100.0)} | {int(m['n'])} |"
        )
    return "\n".join(lines) + "\n"
