"""Redshift labels from a separate table (``prepare --labels FILE``), joined on ``object_id``.

Image samples often carry no spectroscopic redshift (MMU legacysurvey, hsc): the labels come from a cross-match,
a CSV or Parquet table with an ``object_id`` column and a redshift column. Duplicate ids are an error (which value
would be right?); ids of the table that no image has are counted and reported, never dropped silently.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from photoz_hpc.errors import InputDataError, PhotozError

ID_COLUMN = "object_id"
#: How many ids of a labels table that no image has are listed in the log and the manifest.
EXAMPLES = 10


@dataclass(frozen=True)
class LabelTable:
    """Sorted ids and their redshifts (NaN or negative = no label)."""

    path: str
    key: str
    ids: np.ndarray  # sorted: int64 or unicode
    z: np.ndarray  # float64, aligned with ids

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Redshift of each id (NaN where the table has none)."""
        out = np.full(len(ids), np.nan)
        if len(self.ids) == 0 or len(ids) == 0:
            return out
        pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        hit = self.ids[pos] == ids
        out[hit] = self.z[pos[hit]]
        return out

    def fingerprint(self) -> dict:
        st = os.stat(self.path)
        return {"path": self.path, "key": self.key, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def clean_redshift(z: np.ndarray) -> np.ndarray:
    """Missing, NaN/inf or negative redshifts mean 'unlabeled' (NaN): catalogues use -1 / -99 for no redshift."""
    z = np.asarray(z, dtype=np.float64)
    return np.where(np.isfinite(z) & (z >= 0), z, np.nan)


def _read_csv(path: str, key: str) -> tuple[list, list]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            missing = [c for c in (ID_COLUMN, key) if c not in fields]
            if missing:
                raise InputDataError(f"{path}: labels file lacks column(s) {missing} (has {fields}); "
                                     "--redshift-key names the redshift column")
            ids, zs = [], []
            for row in reader:
                ids.append(row[ID_COLUMN])
                zs.append(row[key])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputDataError(f"{path}: unreadable labels file ({exc})") from None
    return ids, zs


def _read_parquet(path: str, key: str) -> tuple[list, list]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PhotozError(f"{path}: reading Parquet labels needs pyarrow (pip install pyarrow), or give a CSV file") from None
    try:
        schema = pq.read_schema(path)
        missing = [c for c in (ID_COLUMN, key) if c not in schema.names]
        if missing:
            raise InputDataError(f"{path}: labels file lacks column(s) {missing} (has {schema.names}); "
                                 "--redshift-key names the redshift column")
        table = pq.read_table(path, columns=[ID_COLUMN, key])
    except InputDataError:
        raise
    except Exception as exc:  # pyarrow raises its own error types for a corrupt file
        raise InputDataError(f"{path}: unreadable Parquet labels file ({type(exc).__name__}: {exc})") from None
    return table.column(ID_COLUMN).to_pylist(), table.column(key).to_pylist()


def _as_ids(path: str, values: list, kind: str, width: int) -> np.ndarray:
    if kind == "int":
        bad = next((v for v in values if isinstance(v, (bool, float, np.bool_, np.floating))), None)
        if bad is not None:  # a float id has lost its digits above 2**53 (HSC ids are ~4e16): it would join wrongly
            raise InputDataError(f"{path}: column '{ID_COLUMN}' holds non-integer values (e.g. {bad!r}); the images' "
                                 "ids are integers: write them as an integer column")
        try:
            return np.array([int(v) for v in values], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputDataError(f"{path}: column '{ID_COLUMN}' must hold integer ids like the images' ({exc})") from None
    if any(v is None or v == "" for v in values):
        raise InputDataError(f"{path}: column '{ID_COLUMN}' has empty ids")
    ids = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    return np.array(ids, dtype=f"<U{max([width, 1] + [len(v) for v in ids])}")


def _as_redshifts(path: str, key: str, values: list) -> np.ndarray:
    out = np.empty(len(values))
    for i, v in enumerate(values):
        try:
            out[i] = np.nan if v is None or (isinstance(v, str) and v.strip() == "") else float(v)
        except (TypeError, ValueError):
            raise InputDataError(f"{path}: row {i + 1} of column '{key}' is not a number ({v!r})") from None
    return out


def read_labels(path: str | os.PathLike, key: str, id_kind: str, id_width: int = 0) -> LabelTable:
    """Read a CSV or Parquet labels table; ids are parsed as the images' ids (``int`` or ``str``)."""
    path = str(Path(path).resolve())
    if not os.path.isfile(path):
        raise InputDataError(f"{path}: labels file does not exist")
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        raw_ids, raw_z = _read_parquet(path, key)
    elif suffix == ".csv":
        raw_ids, raw_z = _read_csv(path, key)
    else:
        raise InputDataError(f"{path}: labels file must be .csv or .parquet")
    if not raw_ids:
        raise InputDataError(f"{path}: labels file has no rows")
    ids = _as_ids(path, raw_ids, id_kind, id_width)
    z = _as_redshifts(path, key, raw_z)
    order = np.argsort(ids, kind="stable")
    ids, z = ids[order], z[order]
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if len(dup):
        raise InputDataError(f"{path}: {len(dup)} duplicate object_id(s) in the labels (e.g. {ids[dup[0]]!s}): "
                             "each galaxy needs one redshift")
    return LabelTable(path, key, ids, z)


def join_report(table: LabelTable, image_ids: np.ndarray) -> dict:
    """How the labels table meets the images: matched ids, labelled images, and table ids no image has."""
    found = np.isin(table.ids, image_ids)
    usable = np.isfinite(clean_redshift(table.z))
    absent = table.ids[~found]
    return {
        "file": table.path,
        "redshift_key": table.key,
        "rows": int(len(table.ids)),
        "matched": int(found.sum()),
        "labeled_images": int((found & usable).sum()),
        "not_in_images": int(len(absent)),
        "not_in_images_examples": [v.item() for v in absent[:EXAMPLES]],
    }


__all__ = ["LabelTable", "clean_redshift", "join_report", "read_labels"]
