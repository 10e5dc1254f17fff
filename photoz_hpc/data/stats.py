"""Exact per-band median and MAD over every pixel of a dataset, in bounded memory and in parallel.

An exact median of ~10^10 pixels cannot be sorted in memory, so it is found by radix selection on
the float32 bit patterns: a 65,536-bin histogram of the top 16 bits locates the bin holding the
k-th value, a second histogram of the low 16 bits inside that bin pins it exactly. Histograms are
integer counts, so summing them across MPI ranks gives bit-identical results to a serial run.
MAD = median(|x - median|) (raw: no 1.4826 factor) uses the same two passes on the deviations.

``median`` follows ``numpy.median`` (mean of the two middle values for an even count, in
float64). Deviations are ``float32(|float64(x) - median|)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from photoz_hpc.comm.base import Comm

_BINS = 1 << 16
BlockSource = Callable[[], Iterable[np.ndarray]]  # yields (n, H, W, bands) float32 blocks


def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """Map float32 to uint32 so that unsigned order equals float order (NaN-free input)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    negative = (bits >> 31).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def _keys_to_float(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.uint32)
    positive = (keys >> 31).astype(bool)
    bits = np.where(positive, keys & np.uint32(0x7FFFFFFF), ~keys)
    return bits.view(np.float32)


def _order_statistics(
    blocks: BlockSource, bands: int, ranks: np.ndarray, transform: Callable[[np.ndarray, int], np.ndarray], comm
) -> np.ndarray:
    """Exact values of the ``ranks[b, j]``-th smallest (0-based) transformed pixel of each band b."""
    hist_hi = np.zeros((bands, _BINS), dtype=np.int64)
    for block in blocks():
        for b in range(bands):
            keys = _sortable_keys(transform(block[..., b], b))
            hist_hi[b] += np.bincount((keys >> 16).ravel(), minlength=_BINS)
    hist_hi = comm.allreduce_array(hist_hi)
    cum = np.cumsum(hist_hi, axis=1)
    hi_bin = np.stack([np.searchsorted(cum[b], ranks[b], side="right") for b in range(bands)])
    below = np.where(hi_bin > 0, np.take_along_axis(cum, np.maximum(hi_bin - 1, 0), axis=1), 0)

    n_targets = ranks.shape[1]
    hist_lo = np.zeros((bands, n_targets, _BINS), dtype=np.int64)
    for block in blocks():
        for b in range(bands):
            keys = _sortable_keys(transform(block[..., b], b)).ravel()
            top = keys >> 16
            for hb in np.unique(hi_bin[b]):  # the two middle ranks usually share one high bin: count it once
                sel = keys[top == hb]
                if sel.size:
                    hist_lo[b, hi_bin[b] == hb] += np.bincount(sel & 0xFFFF, minlength=_BINS)
    hist_lo = comm.allreduce_array(hist_lo)
    values = np.empty((bands, n_targets), dtype=np.float64)
    for b in range(bands):
        for j in range(n_targets):
            within = ranks[b, j] - below[b, j]
            lo = np.searchsorted(np.cumsum(hist_lo[b, j]), within, side="right")
            key = (np.uint32(hi_bin[b, j]) << np.uint32(16)) | np.uint32(lo)
            values[b, j] = float(_keys_to_float(np.array([key], dtype=np.uint32))[0])
    return values


def exact_median_mad(blocks: BlockSource, bands: int, total_pixels_per_band: int, comm=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (median, MAD) over all pixels yielded by ``blocks()``, summed over ``comm`` ranks.

    ``blocks`` is called once per pass (four passes); ``total_pixels_per_band`` is the global count.
    """
    comm = comm or Comm()
    n = int(total_pixels_per_band)
    if n <= 0:
        raise ValueError("cannot compute pixel statistics of an empty dataset")
    ranks = np.tile(np.array([(n - 1) // 2, n // 2], dtype=np.int64), (bands, 1))
    mid = _order_statistics(blocks, bands, ranks, lambda x, b: x, comm)
    median = mid.mean(axis=1)

    def deviation(x: np.ndarray, b: int) -> np.ndarray:
        return np.abs(x.astype(np.float64) - median[b]).astype(np.float32)

    mad = _order_statistics(blocks, bands, ranks, deviation, comm).mean(axis=1)
    return median, mad


def reference_median_mad(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-memory reference with the same definitions, for tests: ``pixels`` is (..., bands)."""
    flat = pixels.reshape(-1, pixels.shape[-1])
    median = np.median(flat.astype(np.float64), axis=0)
    dev = np.abs(flat.astype(np.float64) - median).astype(np.float32)
    mad = np.median(dev.astype(np.float64), axis=0)
    return median, mad
