"""On-disk layout of a prepared dataset (format version 1).

A dataset directory holds:

- ``shard-NNNNN.bin``: fixed-size records, one per cutout, back to back with no header. Each
  record is the cutout as little-endian float32 (or float16: ``prepare --dtype float16``, the manifest's
  ``dtype``) in HWC order ((107, 107, 5) for SDSS; (H, W, bands) of the survey the manifest records): HWC is
  what DALI's ``rotate``/``warp_affine``/``crop`` expect, and fixed records let every reader memory-map a
  shard and slice a batch without parsing. float32 pixels are copied bit-for-bit from the source HDF5 (the
  store never rescales); float16 records are those pixels rounded once to nearest (half the bytes to read
  and stage), and every loader casts them to float32 after the read.
- ``shard-NNNNN.meta.npy``: a NumPy structured array (``meta_dtype(n_bands, id_dtype)``, recorded in the
  manifest as ``meta_dtype``) with one row per record: the input's metadata, ``ebv_sfd``, the source row and a
  CRC32 of the record's bytes. Release-layout (SDSS) input gives ``META_DTYPE`` exactly (ids ``ObjID`` and
  ``specObjID``); Multimodal Universe input keeps its ``object_id`` (int64, or fixed-width unicode as wide as the
  longest id) in place of those two.
- ``shard-NNNNN.json``: the shard's commit marker (count, checksums, source rows); written last,
  so a shard without it is incomplete and is redone by a resumed prepare.
- ``manifest.json``: written last of all; format version, shapes, dtype, layout, counts, the survey
  (``survey``: its full description; ``bands``), the per-shard sha256 of ``.bin`` and ``.meta.npy``, and
  per-band pixel statistics (median, MAD). A manifest without ``survey`` / ``meta_dtype`` (written before
  surveys existed) is SDSS with ``META_DTYPE``. docs/data_format.md lists every key.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from photoz_hpc.errors import DatasetError
from photoz_hpc.survey import default_survey

FORMAT_VERSION = 1
LAYOUT = "HWC"
IMAGE_DTYPE = np.dtype("<f4")  # the default record dtype (every store before ``--dtype`` existed)
#: Record dtypes ``prepare --dtype`` writes, by their manifest name.
IMAGE_DTYPES = {"float32": IMAGE_DTYPE, "float16": np.dtype("<f2")}
MANIFEST_NAME = "manifest.json"

#: Id fields of release-layout input (SDSS), and of Multimodal Universe input.
RELEASE_ID_FIELDS = ("ObjID", "specObjID")
MMU_ID_FIELD = "object_id"


def meta_dtype(n_bands: int, id_dtype: np.dtype | str | None = None) -> np.dtype:
    """The record metadata of a store of ``n_bands`` bands: ``id_dtype`` None is release-layout input
    (``ObjID``/``specObjID`` int64; with 5 bands exactly ``META_DTYPE``), otherwise an ``object_id`` of that
    dtype (``<i8``, or ``<U<width>`` for string ids: never truncated, the width comes from the data)."""
    if int(n_bands) < 1:
        raise ValueError(f"a store needs at least one band, got {n_bands}")
    if id_dtype is None:
        ids = [(name, "<i8") for name in RELEASE_ID_FIELDS]
    elif np.dtype(id_dtype).kind == "i":
        ids = [(MMU_ID_FIELD, "<i8")]
    elif np.dtype(id_dtype).kind == "U":
        ids = [(MMU_ID_FIELD, f"<U{max(1, np.dtype(id_dtype).itemsize // 4)}")]
    else:
        raise ValueError(f"object ids are integers or strings, not {np.dtype(id_dtype)}")
    return np.dtype(
        [
            ("specz_redshift", "<f8"),
            ("specz_redshift_err", "<f8"),
            ("e_bv", "<f8", (int(n_bands),)),
            ("ebv_sfd", "<f8"),
            ("ra", "<f8"),
            ("dec", "<f8"),
            *ids,
            ("source_file", "<i4"),
            ("source_row", "<i8"),
            ("crc32", "<u4"),
        ]
    )


#: The SDSS release store's metadata (and that of every manifest from before surveys existed).
META_DTYPE = meta_dtype(default_survey().n_bands)

#: Metadata fields returned by ``Dataset[i]`` under their release names (plus ``ebv_sfd``).
PUBLIC_META_FIELDS = ("specz_redshift", "specz_redshift_err", "e_bv", "ebv_sfd", "ra", "dec", "ObjID", "specObjID")


def meta_dtype_to_json(dtype: np.dtype) -> list[list[Any]]:
    """``[[name, dtype string, shape], ...]``: the manifest's ``meta_dtype``, rebuilt by ``meta_dtype_from_json``."""
    out = []
    for name in dtype.names:
        field = dtype.fields[name][0]
        base, shape = (field.base, list(field.shape)) if field.subdtype else (field, [])
        out.append([name, base.str, shape])
    return out


def meta_dtype_from_json(value: Any, where: str) -> np.dtype:
    try:
        return np.dtype([(str(n), str(d), tuple(int(s) for s in shape)) if shape else (str(n), str(d))
                         for n, d, shape in value])
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: manifest 'meta_dtype' is not a record description ({exc})") from None


def meta_dtype_of_manifest(manifest: dict, where: str) -> np.dtype:
    """The metadata dtype a manifest records; one from before ``meta_dtype`` was recorded is ``META_DTYPE``."""
    if "meta_dtype" not in manifest:
        return META_DTYPE
    return meta_dtype_from_json(manifest["meta_dtype"], where)


def id_field(dtype: np.dtype) -> str:
    """The field naming each galaxy: ``ObjID`` (release layout) or ``object_id`` (Multimodal Universe)."""
    return MMU_ID_FIELD if MMU_ID_FIELD in dtype.names else RELEASE_ID_FIELDS[0]


def public_fields(dtype: np.dtype) -> tuple[str, ...]:
    """Metadata fields ``Dataset[i]`` returns: everything but the store's bookkeeping."""
    return tuple(n for n in dtype.names if n not in ("source_file", "source_row", "crc32"))


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


def image_dtype(name: str, where: str = "dtype") -> np.dtype:
    """The record dtype of a manifest ``dtype`` / ``--dtype`` name (``float32`` or ``float16``)."""
    if name not in IMAGE_DTYPES:
        raise DatasetError(f"{where}: record dtype {name!r} is not one of {sorted(IMAGE_DTYPES)}")
    return IMAGE_DTYPES[name]


def image_dtype_of_manifest(manifest: dict, where: str) -> np.dtype:
    """The record dtype a manifest records; a manifest without ``dtype`` is float32."""
    return image_dtype(str(manifest.get("dtype", "float32")), f"{where}: manifest 'dtype'")


def record_bytes(height: int, width: int, bands: int, dtype: np.dtype | str = IMAGE_DTYPE) -> int:
    """Bytes of one (height, width, bands) record of ``dtype`` (a numpy dtype or its manifest name)."""
    itemsize = IMAGE_DTYPES[dtype].itemsize if isinstance(dtype, str) else np.dtype(dtype).itemsize
    return height * width * bands * itemsize
