"""Per-galaxy prediction tables as CSV: id columns, z_spec and the pdf summary, written atomically.

Floats are written with ``repr`` (the shortest string that reads back to the same float64), so a
table round-trips exactly; ids are written as integers, so 64-bit SDSS ObjIDs survive (a float
column would round them). Plain CSV keeps the table readable by any tool, no pandas needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from photoz_hpc.io_utils import atomic_write_text

#: columns that follow the id columns, in this order; ``pdf_std`` only when the summary has it.
VALUE_COLUMNS = ("z_spec", "z_phot", "z_mode", "z_lo68", "z_hi68")
OPTIONAL_COLUMNS = ("pdf_std",)


def write_predictions(path: str | os.PathLike, ids: dict[str, np.ndarray], z_spec, summary: dict) -> Path:
    """Write ``ids`` (integer columns, e.g. ``index``, ``ObjID``, ``specObjID``), ``z_spec`` and the
    ``summarize_pdfs`` columns of ``summary`` to the CSV ``path`` atomically; returns the path."""
    columns: dict[str, np.ndarray] = {}
    for name, values in ids.items():
        arr = np.asarray(values)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"id column {name!r} must be integers, got dtype {arr.dtype}")
        if name in VALUE_COLUMNS + OPTIONAL_COLUMNS or not name or any(c in name for c in ',"\n\r'):
            raise ValueError(f"id column name {name!r} is reserved or not a plain CSV header")
        columns[name] = arr.ravel()
    missing = [key for key in VALUE_COLUMNS[1:] if key not in summary]
    if missing:
        raise ValueError(f"summary lacks {missing}; pass the dict of summarize_pdfs()")
    columns["z_spec"] = np.asarray(z_spec, dtype=np.float64).ravel()
    for key in VALUE_COLUMNS[1:] + tuple(k for k in OPTIONAL_COLUMNS if k in summary):
        columns[key] = np.asarray(summary[key], dtype=np.float64).ravel()
    lengths = {name: arr.size for name, arr in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"columns differ in length: {lengths}")

    text_columns = [[str(v) for v in arr.tolist()] if arr.dtype.kind in "iu" else [repr(v) for v in arr.tolist()]
                    for arr in columns.values()]
    lines = [",".join(columns)] + [",".join(row) for row in zip(*text_columns, strict=True)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


def _int_column(name: str, cells: list[str]) -> np.ndarray:
    try:
        values = [int(c) for c in cells]
    except ValueError as exc:
        raise ValueError(f"column {name!r} is not an integer id column: {exc}") from None
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        return np.array(values, dtype=np.uint64)


def read_predictions(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a ``write_predictions`` CSV: float64 for the redshift columns, int64 for ids."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file, expected a header line")
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:] if line]
    for lineno, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{lineno}: {len(row)} fields, header has {len(header)}")
    cells = list(zip(*rows, strict=True)) if rows else [()] * len(header)
    out: dict[str, np.ndarray] = {}
    for name, col in zip(header, cells, strict=True):
        if name in VALUE_COLUMNS + OPTIONAL_COLUMNS:
            out[name] = np.array([float(c) for c in col], dtype=np.float64)
        else:
            out[name] = _int_column(name, list(col))
    return out
