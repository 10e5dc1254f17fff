"""On-disk layout of a prepared dataset (format version 1).

A dataset directory holds:

- ``shard-NNNNN.bin``: fixed-size records, one per cutout, back to back with no header. Each
  record is the cutout as little-endian float32 in HWC order (107, 107, 5): HWC is what DALI's
  ``rotate``/``warp_affine``/``crop`` expect, and fixed records let every reader memory-map a
  shard and slice a batch without parsing. Pixels are copied bit-for-bit from the source HDF5
  (float32 in, float32 out: the store never rounds or rescales).
- ``shard-NNNNN.meta.npy``: a NumPy structured array (``META_DTYPE``) with one row per record:
  release metadata, ``ebv_sfd``, the source row and a CRC32 of the record's bytes.
- ``shard-NNNNN.json``: the shard's commit marker (count, checksums, source rows); written last,
  so a shard without it is incomplete and is redone by a resumed prepare.
- ``manifest.json``: written last of all; format version, shapes, dtype, layout, counts, the
  per-shard sha256 of ``.bin`` and ``.meta.npy``, and per-band pixel statistics (median, MAD).
"""

from __future__ import annotations

import numpy as np

from photoz_hpc.constants import N_BANDS

FORMAT_VERSION = 1
LAYOUT = "HWC"
IMAGE_DTYPE = np.dtype("<f4")
MANIFEST_NAME = "manifest.json"

META_DTYPE = np.dtype(
    [
        ("specz_redshift", "<f8"),
        ("specz_redshift_err", "<f8"),
        ("e_bv", "<f8", (N_BANDS,)),
        ("ebv_sfd", "<f8"),
        ("ra", "<f8"),
        ("dec", "<f8"),
        ("ObjID", "<i8"),
        ("specObjID", "<i8"),
        ("source_file", "<i4"),
        ("source_row", "<i8"),
        ("crc32", "<u4"),
    ]
)

#: Metadata fields returned by ``Dataset[i]`` under their release names (plus ``ebv_sfd``).
PUBLIC_META_FIELDS = ("specz_redshift", "specz_redshift_err", "e_bv", "ebv_sfd", "ra", "dec", "ObjID", "specObjID")


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


def record_bytes(height: int, width: int, bands: int) -> int:
    return height * width * bands * IMAGE_DTYPE.itemsize
