"""Per-galaxy summaries of binned redshift pdfs: expectation, mode, 68% central interval, width.

A row of ``probs`` is read as a piecewise-constant density: probability ``p_k`` spread uniformly
over bin k of the model's redshift grid (``edges``: a ``RedshiftGrid`` or its bin edges; every function takes
them, there is no default grid: a pdf means nothing off its own). Its CDF is then piecewise linear between
the edges, so a percentile is found in the bin where the CDF crosses it and interpolated linearly
inside that bin; a pdf in one bin gives the interval [e_k + 0.16 w, e_k + 0.84 w], not a point.
The expectation of that density is ``sum_k p_k c_k`` over the bin centres, the project's ``z_phot``.
"""

from __future__ import annotations

import numpy as np

from photoz_hpc.survey import RedshiftGrid

#: the central 68% interval: the 16th and 84th percentiles (+-1 sigma of a Gaussian).
LO68, HI68 = 0.16, 0.84


def bin_edges(edges: np.ndarray | RedshiftGrid) -> np.ndarray:
    """The bin edges (float64) of a ``RedshiftGrid`` or of an array of edges."""
    return edges.edges() if isinstance(edges, RedshiftGrid) else np.asarray(edges, dtype=np.float64)


def check_probs(probs, edges: np.ndarray | RedshiftGrid, atol: float = 1e-4) -> np.ndarray:
    """``probs`` as float64 (N, n_bins) after checking shape, finiteness, p >= 0 and rows summing to 1."""
    edges = bin_edges(edges)
    n_bins = edges.size - 1
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != n_bins or p.shape[0] == 0:
        raise ValueError(f"probs must have shape (N >= 1, {n_bins}) to match the redshift grid, got {p.shape}")
    n_bad = int(np.count_nonzero(~np.isfinite(p).all(axis=1)))
    if n_bad:
        raise ValueError(f"probs: {n_bad} of {p.shape[0]} rows contain NaN or inf")
    n_neg = int(np.count_nonzero((p < 0).any(axis=1)))
    if n_neg:
        raise ValueError(f"probs: {n_neg} of {p.shape[0]} rows have negative probabilities (min {p.min():.3g})")
    off = np.abs(p.sum(axis=1) - 1.0)
    n_off = int(np.count_nonzero(off > atol))
    if n_off:
        worst = int(np.argmax(off))
        raise ValueError(f"probs: {n_off} of {p.shape[0]} rows do not sum to 1 within {atol:g} "
                         f"(worst: row {worst} sums to {p[worst].sum():.6g}); pass softmax outputs")
    return p


def _percentile(p: np.ndarray, cdf: np.ndarray, edges: np.ndarray, q: float) -> np.ndarray:
    """Per-row q-quantile of the piecewise-constant density (rows of ``p`` normalised, ``cdf`` = cumsum)."""
    k = np.minimum(np.count_nonzero(cdf < q, axis=1), p.shape[1] - 1)
    rows = np.arange(p.shape[0])
    pk = p[rows, k]
    below = cdf[rows, k] - pk
    frac = np.clip(np.divide(q - below, pk, out=np.zeros_like(pk), where=pk > 0), 0.0, 1.0)
    return edges[k] + frac * (edges[k + 1] - edges[k])


def summarize_pdfs(probs, edges: np.ndarray | RedshiftGrid, atol: float = 1e-4,
                   with_std: bool = True) -> dict[str, np.ndarray]:
    """Per-galaxy ``z_phot``, ``z_mode``, ``z_lo68``, ``z_hi68`` (and ``pdf_std``) from (N, n_bins) ``probs``.

    ``edges``: the model's grid or its bin edges. Rows are renormalised to sum to
    exactly 1 after validation (``atol`` is the accepted deviation, e.g. float32 softmax rounding).
    ``pdf_std`` is the standard deviation of the piecewise-constant density: the spread of the bin
    centres plus the within-bin term w_k^2 / 12, so it is consistent with the interval.
    """
    edges = bin_edges(edges)
    p = check_probs(probs, edges, atol)
    p = p / p.sum(axis=1, keepdims=True)
    centres = 0.5 * (edges[:-1] + edges[1:])
    widths = np.diff(edges)
    cdf = np.cumsum(p, axis=1)
    out = {
        "z_phot": p @ centres,
        "z_mode": centres[np.argmax(p, axis=1)],
        "z_lo68": _percentile(p, cdf, edges, LO68),
        "z_hi68": _percentile(p, cdf, edges, HI68),
    }
    if with_std:
        var = p @ (centres**2 + widths**2 / 12.0) - out["z_phot"] ** 2
        out["pdf_std"] = np.sqrt(np.maximum(var, 0.0))
    return out


# ---------------------------------------------------------------------- catalogue summaries (added for predict)

#: the central 95% interval: the 2.5th and 97.5th percentiles (+-2 sigma of a Gaussian, to 0.05).
LO95, HI95 = 0.025, 0.975
#: half-width of the odds window in units of (1 + z_mode): the eta threshold's scale of a good photo-z.
ODDS_HALF_WIDTH = 0.03


def pdf_quantiles(probs, qs, edges: np.ndarray | RedshiftGrid, atol: float = 1e-4) -> np.ndarray:
    """(N, len(qs)) quantiles of each row's piecewise-constant density (the percentile rule above)."""
    edges = bin_edges(edges)
    p = check_probs(probs, edges, atol)
    p = p / p.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p, axis=1)
    return np.stack([_percentile(p, cdf, edges, float(q)) for q in qs], axis=1)


def pdf_cdf_at(probs, z, edges: np.ndarray | RedshiftGrid, atol: float = 1e-4) -> np.ndarray:
    """CDF of row i's piecewise-constant density at ``z[i]`` (piecewise linear; 0 below the grid, 1 above).
    With ``z`` = z_spec this is the PIT value."""
    edges = bin_edges(edges)
    p = check_probs(probs, edges, atol)
    p = p / p.sum(axis=1, keepdims=True)
    z = np.asarray(z, dtype=np.float64).ravel()
    if z.size != p.shape[0]:
        raise ValueError(f"z has {z.size} values for {p.shape[0]} pdfs")
    return _cdf_at(p, np.cumsum(p, axis=1), edges, z)


def _cdf_at(p: np.ndarray, cdf: np.ndarray, edges: np.ndarray, z: np.ndarray) -> np.ndarray:
    k = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, p.shape[1] - 1)
    rows = np.arange(p.shape[0])
    frac = np.clip((z - edges[k]) / (edges[k + 1] - edges[k]), 0.0, 1.0)
    return np.clip(cdf[rows, k] - p[rows, k] + frac * p[rows, k], 0.0, 1.0)


def summarize_catalogue(probs, edges: np.ndarray | RedshiftGrid, atol: float = 1e-4) -> dict[str, np.ndarray]:
    """``summarize_pdfs`` plus ``z_median``, the 95% interval ``z_lo95``/``z_hi95`` and ``odds``: the
    probability within +-``ODDS_HALF_WIDTH`` (1 + z_mode) of the mode (bins cut by the window count pro rata)."""
    edges = bin_edges(edges)
    out = summarize_pdfs(probs, edges, atol)
    p = check_probs(probs, edges, atol)
    p = p / p.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p, axis=1)
    out["z_median"] = _percentile(p, cdf, edges, 0.5)
    out["z_lo95"] = _percentile(p, cdf, edges, LO95)
    out["z_hi95"] = _percentile(p, cdf, edges, HI95)
    half = ODDS_HALF_WIDTH * (1.0 + out["z_mode"])
    out["odds"] = _cdf_at(p, cdf, edges, out["z_mode"] + half) - _cdf_at(p, cdf, edges, out["z_mode"] - half)
    return out
