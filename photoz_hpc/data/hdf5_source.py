"""Reading public-release HDF5 files: validate the layout up front, then stream row ranges.

Validation happens before anything is written so a bad file fails fast with its name and the
problem; reading is in caller-sized chunks so memory stays bounded for 400 GB inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from photoz_hpc.errors import InputDataError
from photoz_hpc.survey import default_survey

REQUIRED_KEYS = ("images", "e_bv", "ra", "dec", "ObjID", "specObjID")
LABEL_KEYS = ("specz_redshift", "specz_redshift_err")


@dataclass(frozen=True)
class SourceFile:
    """A validated input file: its path, row count, image shape and whether it carries labels."""

    path: str
    rows: int
    height: int
    width: int
    labeled: bool
    size: int
    mtime_ns: int

    def fingerprint(self) -> dict:
        return {"path": self.path, "rows": self.rows, "size": self.size, "mtime_ns": self.mtime_ns}


def open_h5(path: str) -> h5py.File:
    """Open an input HDF5 file for reading; a missing or unreadable file is an error naming it."""
    if not os.path.isfile(path):
        raise InputDataError(f"{path}: input file does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputDataError(f"{path}: cannot be read as HDF5 (truncated or corrupt?): {exc}") from None


def validate_source(path: str | os.PathLike, n_bands: int = default_survey().n_bands) -> SourceFile:
    """Check keys, shapes, dtypes and lengths of one release file of ``n_bands`` bands (the survey's: SDSS 5);
    raise ``InputDataError`` naming it."""
    path = str(Path(path).resolve())
    with open_h5(path) as fh:
        missing = [k for k in REQUIRED_KEYS if k not in fh]
        if missing:
            raise InputDataError(f"{path}: missing required key(s) {missing} (has {sorted(fh.keys())})")
        labels_present = [k for k in LABEL_KEYS if k in fh]
        if len(labels_present) == 1:
            raise InputDataError(f"{path}: has '{labels_present[0]}' but not its partner; labeled files need both {LABEL_KEYS}")
        images = fh["images"]
        if not isinstance(images, h5py.Dataset):
            raise InputDataError(f"{path}: 'images' is not a dataset")
        if images.ndim != 4 or images.shape[1] != n_bands:
            raise InputDataError(f"{path}: 'images' has shape {images.shape}, expected (N, {n_bands}, H, W)")
        if images.dtype != np.float32:
            raise InputDataError(f"{path}: 'images' has dtype {images.dtype}, expected float32 (stored bit-exactly)")
        n = images.shape[0]
        expected = {"e_bv": (n, n_bands), "ra": (n,), "dec": (n,), "ObjID": (n,), "specObjID": (n,)}
        expected.update({k: (n,) for k in labels_present})
        for key, shape in expected.items():
            ds = fh[key]
            if not isinstance(ds, h5py.Dataset):
                raise InputDataError(f"{path}: '{key}' is not a dataset (it is an HDF5 {type(ds).__name__})")
            if ds.shape != shape:
                if ds.shape[:1] != (n,):
                    raise InputDataError(f"{path}: '{key}' has {ds.shape[0] if ds.shape else 0} rows but 'images' has {n}")
                raise InputDataError(f"{path}: '{key}' has shape {ds.shape}, expected {shape}")
            kind = ds.dtype.kind
            if key in ("ObjID", "specObjID"):
                if kind not in "iuSO":
                    raise InputDataError(f"{path}: '{key}' has dtype {ds.dtype}, expected integers")
            elif kind != "f":
                raise InputDataError(f"{path}: '{key}' has dtype {ds.dtype}, expected floating point")
        height, width = images.shape[2], images.shape[3]
    file_stat = os.stat(path)
    return SourceFile(path, n, height, width, bool(labels_present), file_stat.st_size, file_stat.st_mtime_ns)


def _as_int64(path: str, key: str, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    try:  # some releases store ids as byte strings of digits
        return np.array([int(v) for v in values], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise InputDataError(f"{path}: '{key}' holds values that are not integers ({exc})") from None


def open_source(src: SourceFile) -> h5py.File:
    """Open a validated source for reading (a context manager); errors name the file."""
    return open_h5(src.path)


def read_rows(src: SourceFile, start: int, stop: int, fh: h5py.File | None = None) -> dict[str, np.ndarray]:
    """Read rows [start, stop) of one source (from ``fh`` if given, else opened here); images stay
    float32 (N, bands, H, W), bit-exact."""
    if fh is None:
        with open_h5(src.path) as own:
            return read_rows(src, start, stop, own)
    try:
        out = {
            "images": fh["images"][start:stop],
            "e_bv": fh["e_bv"][start:stop].astype(np.float64),
            "ra": fh["ra"][start:stop].astype(np.float64),
            "dec": fh["dec"][start:stop].astype(np.float64),
            "ObjID": _as_int64(src.path, "ObjID", fh["ObjID"][start:stop]),
            "specObjID": _as_int64(src.path, "specObjID", fh["specObjID"][start:stop]),
        }
        if src.labeled:
            out["specz_redshift"] = fh["specz_redshift"][start:stop].astype(np.float64)
            out["specz_redshift_err"] = fh["specz_redshift_err"][start:stop].astype(np.float64)
        else:
            out["specz_redshift"] = np.full(stop - start, np.nan)
            out["specz_redshift_err"] = np.full(stop - start, np.nan)
    except OSError as exc:
        raise InputDataError(f"{src.path}: rows {start}..{stop} cannot be read (truncated or corrupt?): {exc}") from None
    return out


def bad_rows(src: SourceFile, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """Boolean mask of rows with non-finite pixels or metadata, and a reason per bad row."""
    images = rows["images"]
    bad_pix = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    bad_meta = ~np.isfinite(rows["e_bv"]).all(axis=1) | ~np.isfinite(rows["ra"]) | ~np.isfinite(rows["dec"])
    if src.labeled:
        bad_meta |= ~np.isfinite(rows["specz_redshift"]) | ~np.isfinite(rows["specz_redshift_err"])
    mask = bad_pix | bad_meta
    reasons = ["NaN/inf pixels" if bad_pix[i] else "NaN/inf metadata" for i in np.flatnonzero(mask)]
    return mask, reasons
