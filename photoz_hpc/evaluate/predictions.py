"""Per-galaxy prediction tables as CSV: id columns, z_spec and the pdf summary, written atomically.

Floats are written with ``repr`` (the shortest string that reads back to the same float64), so a
table round-trips exactly; integer ids are written as integers, so 64-bit SDSS ObjIDs survive (a float
column would round them); string ids (Multimodal Universe ``object_id``) are always written quoted (RFC 4180,
``""`` for a quote), so ``'00012'`` reads back as the string ``'00012'``, never the number 12 (pandas: pass
``dtype={'object_id': str}``). Plain CSV keeps the table readable by any tool, no pandas needed.
``csv_text`` / ``parse_csv`` / ``write_csv`` are the writer and reader every id-carrying CSV of evaluate uses
(search and anomaly tables too); files are UTF-8 whatever the locale (ids may be non-ASCII).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from photoz_hpc.io_utils import atomic_open

#: columns that follow the id columns, in this order; ``pdf_std`` only when the summary has it.
VALUE_COLUMNS = ("z_spec", "z_phot", "z_mode", "z_lo68", "z_hi68")
OPTIONAL_COLUMNS = ("pdf_std",)
_SPECIAL = (",", '"', "\n", "\r")


def _cell(value: Any, quote: bool) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bool, np.bool_)):
        text = str(bool(value))
    elif isinstance(value, (int, np.integer)):
        text = str(int(value))
    elif isinstance(value, (float, np.floating)):
        text = repr(float(value))
    else:
        text = str(value)
    if quote or any(c in text for c in _SPECIAL):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]], quoted: Iterable[int] = ()) -> str:
    """A CSV table: ints as integers, floats by ``repr``, str cells as given; the cells of the ``quoted`` columns
    (string ids) always quoted, any other cell only when it must be (a comma, quote or line break)."""
    quoted = set(quoted)
    lines = [",".join(_cell(h, False) for h in header)]
    lines += [",".join(_cell(v, i in quoted) for i, v in enumerate(row)) for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]],
              quoted: Iterable[int] = ()) -> Path:
    """``csv_text`` to ``path`` as UTF-8, atomically; returns the path."""
    text = csv_text(header, rows, quoted)
    with atomic_open(path, "wb") as fh:
        fh.write(text.encode("utf-8"))
    return Path(path)


def parse_csv(text: str, where: str) -> tuple[list[str], list[list[str]], list[bool]]:
    """(header, columns of cell texts, whether each column had a quoted cell) of a ``csv_text`` table; a quoted
    column is a string column. Errors name ``where`` and the line."""
    records: list[list[tuple[str, bool]]] = []
    row: list[tuple[str, bool]] = []
    i, n, line = 0, len(text), 1
    while i < n:
        if text[i] == '"':
            parts, j = [], i + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise ValueError(f"{where}:{line}: unterminated quoted field")
                parts.append(text[j:k])
                if text.startswith('"', k + 1):
                    parts.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            cell = "".join(parts)
            line += cell.count("\n")
            row.append((cell, True))
        else:
            k = i
            while k < n and text[k] not in ",\r\n":
                k += 1
            row.append((text[i:k], False))
            i = k
        if i < n and text[i] == ",":
            i += 1
            if i == n or text[i] in "\r\n":
                row.append(("", False))
            else:
                continue
        if i < n and text[i] not in "\r\n":
            raise ValueError(f"{where}:{line}: unexpected character {text[i]!r} after a quoted field")
        i += 2 if text.startswith("\r\n", i) else 1
        line += 1
        if row != [("", False)]:  # a blank line
            records.append(row)
        row = []
    if row:
        records.append(row)
    if not records:
        raise ValueError(f"{where}: empty file, expected a header line")
    header = [c for c, _ in records[0]]
    for lineno, rec in enumerate(records[1:], start=2):
        if len(rec) != len(header):
            raise ValueError(f"{where}:{lineno}: {len(rec)} fields, header has {len(header)}")
    columns = [[rec[c][0] for rec in records[1:]] for c in range(len(header))]
    quoted = [any(rec[c][1] for rec in records[1:]) for c in range(len(header))]
    return header, columns, quoted


def write_predictions(path: str | os.PathLike, ids: dict[str, np.ndarray], z_spec, summary: dict) -> Path:
    """Write ``ids`` (integer or string columns, e.g. ``index``, ``ObjID``, ``specObjID`` or ``object_id``),
    ``z_spec`` and the ``summarize_pdfs`` columns of ``summary`` to the CSV ``path`` atomically; returns the path."""
    columns: dict[str, np.ndarray] = {}
    for name, values in ids.items():
        arr = np.asarray(values)
        if arr.dtype.kind not in "iuU":
            raise ValueError(f"id column {name!r} must be integers or strings, got dtype {arr.dtype}")
        if name in VALUE_COLUMNS + OPTIONAL_COLUMNS or not name or any(c in name for c in _SPECIAL):
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
    quoted = [i for i, arr in enumerate(columns.values()) if arr.dtype.kind == "U"]
    rows = zip(*(arr.tolist() for arr in columns.values()), strict=True)
    return write_csv(path, list(columns), rows, quoted)


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
    """Columns of a ``write_predictions`` CSV: float64 for the redshift columns, int64 for integer ids, unicode
    for string ids (quoted cells), exactly as written."""
    header, cells, quoted = parse_csv(Path(path).read_text(encoding="utf-8"), str(path))
    out: dict[str, np.ndarray] = {}
    for name, col, is_str in zip(header, cells, quoted, strict=True):
        if name in VALUE_COLUMNS + OPTIONAL_COLUMNS:
            out[name] = np.array([float(c) for c in col], dtype=np.float64)
        elif is_str:
            out[name] = np.array(col, dtype=str)
        else:
            out[name] = _int_column(name, list(col))
    return out
