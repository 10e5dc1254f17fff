"""How every output names galaxies: the store's own id columns, under their own names and dtypes.

SDSS release stores name a galaxy by ``ObjID`` (and ``specObjID``), int64; Multimodal Universe stores by
``object_id``, int64 or a unicode string such as Legacy DR10's ``'BRICKNAME-OBJID'``. Outputs carry the store's
ids exactly (never cast, never padded or stripped), so a string id like ``'0001m002-00012'`` comes back
character for character. Every output asks here which columns to write and what their values are, so the rule
lives in one place: predictions.csv (``predictions``), catalogue parts (``catalogue``), embedding id files
(``embeddings``), search and anomaly tables (``similarity_cli``) and the training-overlap check (``run``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from photoz_hpc.data import format as store_format
from photoz_hpc.data.dataset import ShardedDataset
from photoz_hpc.errors import PhotozError

#: how catalogue schemas (plan ``column_dtypes``) name the two id kinds
INT_LABEL, STRING_LABEL = "int64", "string"


def id_fields(ds: ShardedDataset) -> tuple[str, ...]:
    """Every id column of the store, primary first: ``('ObjID', 'specObjID')`` (release layout) or
    ``('object_id',)`` (Multimodal Universe). Per-galaxy tables that carry all ids (predictions.csv) write these."""
    names = ds.meta_dtype.names
    if ds.id_field in store_format.RELEASE_ID_FIELDS:
        return tuple(f for f in store_format.RELEASE_ID_FIELDS if f in names)
    return (ds.id_field,)


def galaxy_ids(ds: ShardedDataset, rows: np.ndarray, every: bool = False) -> dict[str, np.ndarray]:
    """``{column: values}`` of the galaxies at dataset rows ``rows``: the primary id (``ds.id_field``), or with
    ``every`` all of ``id_fields`` (SDSS: ``ObjID`` and ``specObjID``); values keep the store's dtype."""
    rows = np.asarray(rows, dtype=np.int64)
    meta = ds.meta
    return {name: np.ascontiguousarray(meta[name][rows]) for name in (id_fields(ds) if every else (ds.id_field,))}


def id_kind(dtype: np.dtype) -> str:
    """``'int'`` or ``'str'``: the two kinds of ids a store holds (anything else is an error)."""
    kind = np.dtype(dtype).kind
    if kind in "iu":
        return "int"
    if kind == "U":
        return "str"
    raise PhotozError(f"galaxy ids are integers or strings, not {np.dtype(dtype)}")


def id_label(dtype: np.dtype) -> str:
    """How a catalogue schema names the id column's dtype: ``int64`` or ``string`` (any width)."""
    return INT_LABEL if id_kind(dtype) == "int" else STRING_LABEL


def id_column_of(ds: ShardedDataset) -> tuple[str, str]:
    """(name, schema label) of the store's primary id column: ``('ObjID', 'int64')``, ``('object_id', 'string')``."""
    return ds.id_field, id_label(ds.meta_dtype[ds.id_field])


def shared_id_column(datasets: Sequence[ShardedDataset]) -> tuple[str, str]:
    """The one id column a table of several inputs has (a catalogue): every input must name galaxies by the same
    column and kind, else a clear error naming the inputs (a column cannot hold SDSS ObjIDs and MMU strings)."""
    columns = [id_column_of(ds) for ds in datasets]
    if len(set(columns)) > 1:
        listed = "; ".join(f"{ds.root}: {name} ({label})" for ds, (name, label) in zip(datasets, columns, strict=True))
        raise PhotozError(f"the inputs name their galaxies differently ({listed}); one catalogue holds one id column: "
                          "make one catalogue per id kind")
    return columns[0]


def as_ids(values: Any, label: str) -> np.ndarray:
    """Ids read back from a file as the store's kind: int64 for ``int64``; a unicode array for ``string`` (Parquet
    and HDF5 return Python str objects, or utf-8 bytes)."""
    arr = np.asarray(values)
    if label == INT_LABEL:
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    elif arr.dtype.kind == "O":
        arr = np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in arr.tolist()], dtype=str) \
            if arr.size else np.zeros(0, "<U1")
    return arr.astype(str, copy=False)


def id_value(value: Any) -> int | str:
    """A Python int or str for JSON and CSV cells (int64 ids stay exact: never a float)."""
    return str(value) if isinstance(value, str) else int(value)  # np.str_ too: a plain str


def parse_ids(texts: Iterable[str | int], dtype: np.dtype, field: str) -> np.ndarray:
    """Ids given on a command line, as the store's kind: integers for int64 ids (a non-integer is an error naming
    ``field``), the exact text for string ids (``'00012'`` stays ``'00012'``)."""
    texts = list(texts)
    if id_kind(dtype) == "str":
        return np.array([str(t) for t in texts], dtype=str) if texts else np.zeros(0, "<U1")
    out = []
    for t in texts:
        try:
            out.append(int(t))
        except ValueError:
            raise PhotozError(f"{field} {t!r} is not an integer: this set's {field}s are integers") from None
    return np.array(out, dtype=np.int64)


def comparable(a: ShardedDataset, b: ShardedDataset) -> bool:
    """Whether ids of ``a`` and ``b`` can name the same galaxy: the same id column and kind (SDSS ObjIDs with
    SDSS ObjIDs, MMU string ids with MMU string ids); ids of different catalogues cannot be matched."""
    return id_column_of(a) == id_column_of(b)


def shared_galaxies(a: ShardedDataset, a_rows: np.ndarray, b: ShardedDataset, b_rows: np.ndarray) -> int | None:
    """How many galaxies of rows ``a_rows`` of ``a`` are among rows ``b_rows`` of ``b``, matched by the primary id;
    None when their ids cannot be compared (``comparable``)."""
    if not comparable(a, b):
        return None
    return int(np.isin(a.meta[a.id_field][a_rows], b.meta[b.id_field][b_rows]).sum())
