"""Reading Multimodal Universe image-sample HDF5 files (``photoz_hpc.mmu_layout``): validate, then stream rows.

As for the release layout, every file is checked before anything is written (keys, shapes, dtypes, one band list
per file) so bad input fails fast naming the file; rows are then read in caller-sized chunks. Pixels are copied
bit for bit; ``image_ivar`` and ``image_mask`` are not applied (their presence is recorded, docs/surveys.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from photoz_hpc import mmu_layout as L
from photoz_hpc.data.hdf5_source import open_h5
from photoz_hpc.errors import InputDataError


@dataclass(frozen=True)
class MMUFile:
    """A validated MMU file: its shape, band labels, pixel scale, id kind and which columns it carries."""

    path: str
    rows: int
    height: int
    width: int
    labels: tuple[str, ...]  # image_band, in the file's channel order
    scale_min: float
    scale_max: float
    id_kind: str  # "int" or "str"
    id_width: int  # longest id in characters (strings)
    has_z_spec: bool
    ebv_key: str | None  # "EBV" / "ebv" when the file carries SFD E(B-V)
    extinction_keys: tuple[str, ...]  # the a_<band> columns present
    has_ivar: bool
    has_mask: bool
    size: int
    mtime_ns: int

    @property
    def labeled(self) -> bool:
        return self.has_z_spec

    def fingerprint(self) -> dict:
        return {"path": self.path, "rows": self.rows, "size": self.size, "mtime_ns": self.mtime_ns}


def _dataset(fh: h5py.File, path: str, key: str, shape: tuple[int, ...] | None, kinds: str, what: str) -> h5py.Dataset:
    ds = fh[key]
    if not isinstance(ds, h5py.Dataset):
        raise InputDataError(f"{path}: '{key}' is not a dataset (it is an HDF5 {type(ds).__name__})")
    if shape is not None and ds.shape != shape:
        if ds.shape[:1] != shape[:1]:
            raise InputDataError(f"{path}: '{key}' has {ds.shape[0] if ds.shape else 0} rows but 'image_array' has {shape[0]}")
        raise InputDataError(f"{path}: '{key}' has shape {ds.shape}, expected {shape}")
    if ds.dtype.kind not in kinds:
        raise InputDataError(f"{path}: '{key}' has dtype {ds.dtype}, expected {what}")
    return ds


def _strings(ds: h5py.Dataset, sel=slice(None)) -> np.ndarray:
    """A string column (fixed-length or variable, utf-8 or ascii) as a unicode array."""
    return np.asarray(ds.asstr()[sel], dtype=object).astype(str)


def _id_kind(path: str, ds: h5py.Dataset) -> str:
    if ds.dtype.kind in "iu":
        return "int"
    if h5py.check_string_dtype(ds.dtype) is not None:
        return "str"
    raise InputDataError(f"{path}: 'object_id' has dtype {ds.dtype}: ids must be integers or strings (a float "
                         "would lose digits)")


def validate_mmu(path: str | os.PathLike) -> MMUFile:
    """Check one MMU image-sample file; raise ``InputDataError`` naming it and the problem."""
    path = str(Path(path).resolve())
    with open_h5(path) as fh:
        missing = [k for k in (*L.REQUIRED_KEYS, L.RA, L.DEC) if k not in fh]
        if missing:
            raise InputDataError(f"{path}: missing Multimodal Universe key(s) {missing} (has {sorted(fh.keys())})")
        images = _dataset(fh, path, L.IMAGE_ARRAY, None, "f", "float32")
        if images.ndim != 4:
            raise InputDataError(f"{path}: '{L.IMAGE_ARRAY}' has shape {images.shape}, expected (N, bands, H, W)")
        if images.dtype != np.float32:
            raise InputDataError(f"{path}: '{L.IMAGE_ARRAY}' has dtype {images.dtype}, expected float32 (stored bit-exactly)")
        n, nb, height, width = images.shape
        if n == 0:
            raise InputDataError(f"{path}: '{L.IMAGE_ARRAY}' holds no images")
        band_ds = _dataset(fh, path, L.IMAGE_BAND, (n, nb), "SOU", "strings")
        if h5py.check_string_dtype(band_ds.dtype) is None:
            raise InputDataError(f"{path}: '{L.IMAGE_BAND}' has dtype {band_ds.dtype}, expected strings")
        bands = _strings(band_ds)
        labels = tuple(str(b) for b in bands[0])
        if (bands != bands[0]).any():
            row = int(np.flatnonzero((bands != bands[0]).any(axis=1))[0])
            raise InputDataError(f"{path}: '{L.IMAGE_BAND}' differs between rows (row 0 {list(labels)}, row {row} "
                                 f"{list(bands[row])}); one file must hold one band list")
        scale = _dataset(fh, path, L.IMAGE_SCALE, (n, nb), "f", "floating point")[:]
        if not np.isfinite(scale).all():
            raise InputDataError(f"{path}: '{L.IMAGE_SCALE}' has NaN/inf values")
        ids = _dataset(fh, path, L.OBJECT_ID, (n,), "iuSO", "integers or strings")
        id_kind = _id_kind(path, ids)
        id_width = 0
        if id_kind == "str":
            id_width = int(np.char.str_len(_strings(ids)).max())
        elif ids.dtype.kind == "u" and int(ids[:].max()) > np.iinfo(np.int64).max:
            raise InputDataError(f"{path}: 'object_id' holds unsigned ids beyond int64")
        for key in (L.RA, L.DEC):
            _dataset(fh, path, key, (n,), "f", "floating point")
        has_z = L.Z_SPEC in fh
        if has_z:
            _dataset(fh, path, L.Z_SPEC, (n,), "f", "floating point")
        ebv_key = next((k for k in L.EBV_KEYS if k in fh), None)
        if ebv_key:
            _dataset(fh, path, ebv_key, (n,), "f", "floating point")
        ext_keys = tuple(k for k in fh if k.startswith(L.EXTINCTION_PREFIX) and isinstance(fh[k], h5py.Dataset)
                         and fh[k].shape == (n,) and fh[k].dtype.kind == "f")
        for key in (L.IMAGE_IVAR, L.IMAGE_MASK):
            if key in fh and (not isinstance(fh[key], h5py.Dataset) or fh[key].shape[:1] != (n,)):
                raise InputDataError(f"{path}: '{key}' does not have one row per image ({n})")
        result = MMUFile(path, n, height, width, labels, float(scale.min()), float(scale.max()), id_kind, id_width, has_z, ebv_key, ext_keys,
                         L.IMAGE_IVAR in fh, L.IMAGE_MASK in fh, 0, 0)
    st = os.stat(path)
    return MMUFile(**{**result.__dict__, "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def read_ids(src: MMUFile, fh: h5py.File, start: int = 0, stop: int | None = None,
             width: int | None = None) -> np.ndarray:
    """object_id of rows [start, stop): int64, or unicode ``<U<width>``."""
    ds = fh[L.OBJECT_ID]
    stop = src.rows if stop is None else stop
    if src.id_kind == "int":
        return ds[start:stop].astype(np.int64)
    return _strings(ds, slice(start, stop)).astype(f"<U{max(1, width or src.id_width)}")


def read_columns(src: MMUFile, fh: h5py.File, start: int, stop: int, channels: list[int] | None,
                 extinction: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Rows [start, stop): images (n, bands, H, W) float32 in ``channels`` order (None: as stored), ra/dec,
    z_spec (NaN when absent) and the ``extinction`` columns (float64, one per name, stacked last)."""
    try:
        images = fh[L.IMAGE_ARRAY][start:stop]
        if channels is not None:
            images = images[:, channels]
        n = stop - start
        out = {
            "images": images,
            "ra": fh[L.RA][start:stop].astype(np.float64),
            "dec": fh[L.DEC][start:stop].astype(np.float64),
            "z_spec": fh[L.Z_SPEC][start:stop].astype(np.float64) if src.has_z_spec else np.full(n, np.nan),
            "extinction": (np.stack([fh[k][start:stop].astype(np.float64) for k in extinction], axis=-1)
                           if extinction else np.zeros((n, 0))),
        }
    except OSError as exc:
        raise InputDataError(f"{src.path}: rows {start}..{stop} cannot be read (truncated or corrupt?): {exc}") from None
    return out


__all__ = ["MMUFile", "read_columns", "read_ids", "validate_mmu"]
