"""The Multimodal Universe (MMU) image-sample HDF5 layout, named once: read by ``data.prepare``, written by ``sim``.

What the MMU build scripts write (MultimodalUniverse/MultimodalUniverse at 2dcff3d: scripts/legacysurvey,
scripts/ssl_legacysurvey, scripts/hsc ``build_parent_sample.py``), one row per object, every column a dataset of
the file's root group:

- ``image_array`` (N, bands, H, W) float32: the cutouts (legacysurvey DR10 and hsc 160 px, ssl_legacysurvey 152);
- ``image_band`` (N, bands) fixed-length utf-8 strings, the lower-case survey-prefixed band names
  (``des-g des-r des-i des-z``, ``des-g des-r des-z``, ``hsc-g ... hsc-y``): a survey's ``band_labels``;
- ``image_scale`` (N, bands) float32 arcsec/pixel; ``image_psf_fwhm`` (N, bands) float32 arcsec;
- ``image_ivar`` (N, bands, H, W) float32 and ``image_mask`` bool, True = a clean pixel, (N, bands, H, W) in hsc,
  (N, H, W) in legacysurvey: optional (ssl_legacysurvey has neither);
- ``object_id``: int64 (hsc, ssl_legacysurvey) or fixed-length utf-8 ``BRICKNAME-OBJID`` (legacysurvey DR10);
- ``ra``, ``dec`` (degrees) and the catalogue's columns: Galactic extinction as ``EBV`` (legacysurvey, SFD E(B-V)),
  ``ebv`` (ssl_legacysurvey) or per-band ``a_g`` ... ``a_y`` (hsc, magnitudes); ``z_spec`` where the sample has
  spectroscopic redshifts (ssl_legacysurvey).

Files sit at ``<sample>/healpix=<N>/001-of-001.hdf5`` (HEALPix nside 16, nested ordering, of ra/dec).
This module imports only numpy, h5py and photoz_hpc's top-level modules so both ``sim`` and ``data`` use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from photoz_hpc.errors import InputDataError
from photoz_hpc.io_utils import atomic_path
from photoz_hpc.survey import Survey

OBJECT_ID = "object_id"
IMAGE_ARRAY = "image_array"
IMAGE_BAND = "image_band"
IMAGE_SCALE = "image_scale"
IMAGE_PSF_FWHM = "image_psf_fwhm"
IMAGE_IVAR = "image_ivar"
IMAGE_MASK = "image_mask"
RA = "ra"
DEC = "dec"
Z_SPEC = "z_spec"
#: Columns that hold SFD E(B-V) itself, in the order they are looked for (legacysurvey, ssl_legacysurvey).
EBV_KEYS = ("EBV", "ebv")
#: Per-band extinction column of band ``b`` (hsc: ``a_g`` ... ``a_y``), magnitudes.
EXTINCTION_PREFIX = "a_"
#: The keys that make a file an MMU image sample (the release layout has ``images`` instead).
REQUIRED_KEYS = (OBJECT_ID, IMAGE_ARRAY, IMAGE_BAND, IMAGE_SCALE)
HEALPIX_NSIDE = 16
FILE_NAME = "001-of-001.hdf5"
#: ``image_scale`` must equal a survey's ``pixel_scale`` to this many arcsec (the files store float32).
SCALE_TOLERANCE = 1e-4


def extinction_key(band: str) -> str:
    """Column of band ``band``'s extinction A_b (``a_g``)."""
    return f"{EXTINCTION_PREFIX}{band}"


def healpix_file(root: str | os.PathLike, sample: str, healpix: int) -> Path:
    """Where the MMU scripts put the objects of one HEALPix pixel: ``<root>/<sample>/healpix=<N>/001-of-001.hdf5``."""
    return Path(root) / sample / f"healpix={int(healpix)}" / FILE_NAME


def is_mmu_file(fh: h5py.File) -> bool:
    """Whether an open HDF5 file is an MMU image sample (by its keys)."""
    return all(k in fh for k in REQUIRED_KEYS)


def decode_labels(values: np.ndarray | Sequence[Any]) -> list[str]:
    """``image_band`` values (bytes, str or h5py object strings) as Python strings."""
    return [v.decode("utf-8") if isinstance(v, bytes | np.bytes_) else str(v) for v in np.asarray(values).reshape(-1)]


def labels_of(survey: Survey, bands: Sequence[str] | None = None) -> list[str]:
    """The MMU ``image_band`` names of ``bands`` (default: all) of ``survey``."""
    bands = list(survey.bands if bands is None else bands)
    unknown = [b for b in bands if b not in survey.bands]
    if unknown:
        raise InputDataError(f"survey '{survey.name}' has no bands {unknown} (its bands: {list(survey.bands)})")
    return [survey.band_labels[survey.bands.index(b)] for b in bands]


def bands_for_labels(survey: Survey, labels: Sequence[str]) -> list[str] | None:
    """The survey's band names of MMU ``labels``, in their order; None if a label is not one of the survey's."""
    known = [lab.lower() for lab in survey.band_labels]
    try:
        return [survey.bands[known.index(str(lab).lower())] for lab in labels]
    except ValueError:
        return None


def match_survey(labels: Sequence[str], scale: float, candidates: Sequence[Survey]) -> list[tuple[Survey, list[str]]]:
    """The candidate surveys whose band labels include ``labels`` and whose pixel scale is ``scale``,
    each with the band names the labels stand for (in the file's order)."""
    out = []
    for survey in candidates:
        bands = bands_for_labels(survey, labels)
        if bands is not None and len(set(bands)) == len(bands) and abs(float(scale) - survey.pixel_scale) <= SCALE_TOLERANCE:
            out.append((survey, bands))
    return out


def _string_column(values: np.ndarray | Sequence[Any], key: str) -> np.ndarray:
    """Strings as fixed-length utf-8 (the MMU scripts' ``h5py.string_dtype('utf-8', n)``), sized from the data."""
    encoded = [v if isinstance(v, bytes | np.bytes_) else str(v).encode("utf-8") for v in np.asarray(values).reshape(-1)]
    width = max([len(v) for v in encoded] + [1])
    arr = np.array(encoded, dtype=f"S{width}").reshape(np.shape(values))
    return arr.astype(h5py.string_dtype("utf-8", width))


def _column(value: Any, key: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind in "USO":
        return _string_column(arr, key)
    return arr


def _per_band(value: float | Sequence[float] | np.ndarray, n: int, bands: int, key: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 0 or arr.shape == (bands,):
        return np.broadcast_to(arr, (n, bands)).copy()
    if arr.shape != (n, bands):
        raise InputDataError(f"{key}: shape {arr.shape}, expected a scalar, ({bands},) or ({n}, {bands})")
    return arr


def write_mmu_file(
    path: str | os.PathLike,
    images: np.ndarray,
    bands_labels: Sequence[str],
    scale: float | Sequence[float] | np.ndarray,
    psf_fwhm: float | Sequence[float] | np.ndarray,
    object_id: np.ndarray | Sequence[Any],
    extra_columns: Mapping[str, Any] | None = None,
    *,
    compression: str | None = None,
) -> Path:
    """Write one MMU image-sample file exactly in the layout above, atomically (temporary name, then rename).

    ``images`` (N, bands, H, W) is written as float32; ``bands_labels`` are the ``image_band`` names (e.g.
    ``labels_of(survey)``), repeated per row; ``scale`` / ``psf_fwhm`` are a scalar, one per band or (N, bands);
    ``object_id`` integers (int64) or strings (fixed-length utf-8, as wide as the longest). ``extra_columns``
    (each N rows) are written as given, strings as fixed-length utf-8: ``ra``, ``dec``, ``EBV``/``ebv``, ``a_<band>``,
    ``z_spec``, ``image_ivar``, ``image_mask``, ... ``compression``: an h5py filter (the scripts use lzf / gzip).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != len(bands_labels):
        raise InputDataError(f"{path}: images of shape {images.shape}, expected (N, {len(bands_labels)}, H, W)")
    n, nb = images.shape[:2]
    ids = np.asarray(object_id)
    if ids.shape != (n,):
        raise InputDataError(f"{path}: object_id has shape {ids.shape}, expected ({n},)")
    columns: dict[str, np.ndarray] = {
        OBJECT_ID: _string_column(ids, OBJECT_ID) if ids.dtype.kind in "USO" else ids.astype(np.int64),
        IMAGE_BAND: _string_column(np.tile(np.asarray(list(bands_labels), dtype=object), (n, 1)), IMAGE_BAND),
        IMAGE_ARRAY: images.astype(np.float32, copy=False),
        IMAGE_SCALE: _per_band(scale, n, nb, IMAGE_SCALE),
        IMAGE_PSF_FWHM: _per_band(psf_fwhm, n, nb, IMAGE_PSF_FWHM),
    }
    for key, value in (extra_columns or {}).items():
        if key in columns:
            raise InputDataError(f"{path}: extra column '{key}' is one of the layout's own keys")
        arr = _column(value, key)
        if arr.ndim == 0 or arr.shape[0] != n:
            raise InputDataError(f"{path}: extra column '{key}' has shape {arr.shape}, expected {n} rows")
        columns[key] = arr
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        for key, arr in columns.items():
            opts = {"compression": compression, "chunks": True} if compression and arr.size else {}
            fh.create_dataset(key, data=arr, **opts)
    return path


__all__ = [
    "DEC", "EBV_KEYS", "EXTINCTION_PREFIX", "FILE_NAME", "HEALPIX_NSIDE", "IMAGE_ARRAY", "IMAGE_BAND", "IMAGE_IVAR",
    "IMAGE_MASK", "IMAGE_PSF_FWHM", "IMAGE_SCALE", "OBJECT_ID", "RA", "REQUIRED_KEYS", "SCALE_TOLERANCE", "Z_SPEC",
    "bands_for_labels", "decode_labels", "extinction_key", "healpix_file", "is_mmu_file", "labels_of", "match_survey",
    "write_mmu_file",
]
