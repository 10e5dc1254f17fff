"""What ``prepare --dtype`` stores: float32 records (bit copies of the inputs) or float16 ones (half the bytes).

Why a rule: float16 holds |x| <= 65504 with a relative precision of 2^-11 for normal numbers (|x| >= 6.1e-5);
below that, subnormals keep an absolute precision of 2^-25 (about 3e-8), and smaller values flush to 0. Sky-
subtracted fluxes in nanomaggies (SDSS) sit far inside that range, so rounding changes a pixel by far less than its
noise. A survey whose flux unit is very large or very small does not fit, and silently storing inf or a cutout
of zeros would be a wrong dataset. So ``prepare`` refuses, naming the input file and row:

- overflow: any finite pixel that float16 rounds to +-inf (|x| >= 65520; 65504 is float16's largest number);
- bulk underflow: in any band of a record, more than ``FLUSH_FRACTION`` (1%) of the non-zero pixels rounding to
  0 (this includes a band whose non-zero pixels all vanish). A few flushed pixels in the noise of a sky-
  dominated band (|x| < 3e-8 where the noise is ~1e-2) are an absolute error below 3e-8 and are accepted;
- lost precision: a band where more than ``FLUSH_FRACTION`` of the non-zero pixels are subnormal in float16
  (|x| < 6.1e-5, where the precision is absolute, ~3e-8, not relative) and the rounding error (rms over the
  band) exceeds ``NOISE_FRACTION`` (1%) of the band's median absolute deviation (about 2/3 of the sky noise of
  a sky-dominated cutout): the pixels survive but their noise does not. Sky noise of ~1e-2 has its subnormal pixels rounded by
  ~1e-8, far below that, and is accepted.

docs/data_format.md states the rule and the precision for users.
"""

from __future__ import annotations

import numpy as np

from photoz_hpc.data.format import IMAGE_DTYPES

#: Largest share of a record band's non-zero pixels that may flush to 0 (or be subnormal) in float16.
FLUSH_FRACTION = 0.01
#: Largest rms rounding error of a band with many subnormal pixels, relative to the band's MAD.
NOISE_FRACTION = 0.01
SMALLEST_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1e-5
HALF = IMAGE_DTYPES["float16"]


def to_records(hwc: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(n, H, W, C) float32 pixels as records of ``dtype``: the array itself for float32 (bit copies), rounded
    to nearest for float16."""
    with np.errstate(over="ignore"):  # overflow to inf is found by ``half_problem``
        return hwc.astype(dtype, copy=False)


def half_problem(pixels: np.ndarray, records: np.ndarray, bands: tuple[str, ...]) -> tuple[int, str] | None:
    """The first record (row of the chunk) float16 cannot hold and why, or None: ``pixels`` (n, H, W, C) finite
    float32, ``records`` their float16 rounding."""
    overflow = np.isinf(records).any(axis=(1, 2, 3))
    nonzero = (pixels != 0).sum(axis=(1, 2))  # (n, C)
    flushed = ((records == 0) & (pixels != 0)).sum(axis=(1, 2))
    bulk = (flushed > FLUSH_FRACTION * nonzero).any(axis=1)
    subnormal = ((np.abs(pixels) < SMALLEST_NORMAL) & (pixels != 0)).sum(axis=(1, 2)) > FLUSH_FRACTION * nonzero
    coarse = np.zeros(len(pixels), dtype=bool)
    for row, band in zip(*np.nonzero(subnormal), strict=True):  # rare: only bands with many tiny pixels
        if _coarse(pixels[row, ..., band], records[row, ..., band]):
            coarse[row] = True
    bad = np.flatnonzero(overflow | bulk | coarse)
    if not len(bad):
        return None
    row = int(bad[0])
    if overflow[row]:
        band = int(np.flatnonzero(np.isinf(records[row]).any(axis=(0, 1)))[0])
        big = float(np.abs(pixels[row, ..., band]).max())
        return row, (f"a pixel of band {bands[band]} is {big:g}, beyond float16's range (largest 65504): float16 "
                     "cannot hold this survey's fluxes; prepare it with --dtype float32 (the default)")
    if not bulk[row]:
        band = next(b for b in np.flatnonzero(subnormal[row]) if _coarse(pixels[row, ..., b], records[row, ..., b]))
        err, typical = _rounding(pixels[row, ..., band], records[row, ..., band])
        return row, (f"float16 rounds the pixels of band {bands[band]} by {err:.2g} rms, {err / max(typical, 1e-300):.0%} "
                     f"of their median absolute deviation {typical:.2g} (most are below float16's normal range, 6.1e-5, where its precision "
                     f"is ~3e-8; at most {NOISE_FRACTION:.0%} is allowed): the survey's flux unit is too small for "
                     "float16; prepare it with --dtype float32 (the default)")
    band = int(np.flatnonzero(flushed[row] > FLUSH_FRACTION * nonzero[row])[0])
    return row, (f"{int(flushed[row, band])} of {int(nonzero[row, band])} non-zero pixels of band {bands[band]} "
                 f"would flush to 0 in float16 (|x| < 3e-8; at most {FLUSH_FRACTION:.0%} may): the survey's flux unit "
                 "is too small for float16; prepare it with --dtype float32 (the default)")


def _rounding(pixels: np.ndarray, records: np.ndarray) -> tuple[float, float]:
    """(rms rounding error, median absolute deviation) of one record band."""
    err = float(np.sqrt(np.mean((records.astype(np.float64) - pixels.astype(np.float64)) ** 2)))
    return err, float(np.median(np.abs(pixels - np.median(pixels))))


def _coarse(pixels: np.ndarray, records: np.ndarray) -> bool:
    err, typical = _rounding(pixels, records)
    return err > NOISE_FRACTION * typical


__all__ = ["FLUSH_FRACTION", "NOISE_FRACTION", "half_problem", "to_records"]
