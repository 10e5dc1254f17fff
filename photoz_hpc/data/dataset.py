"""Reading a prepared dataset: ``open_dataset(DIR)`` gives indexable, memory-mapped access.

Opening checks the manifest version and every shard's size (a truncated shard is caught at once);
``ds[i]`` checks the record's CRC32 so a corrupted record is an error, never a silent wrong sample.
Full sha256 checks are ``photoz-hpc verify``'s job (they read everything).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from photoz_hpc.data import format as store_format
from photoz_hpc.data.partition import StagedCopy, read_staged
from photoz_hpc.errors import DatasetError
from photoz_hpc.survey import Survey, survey_of_manifest

PIXEL_STATS_KEYS = ("median", "mad")


def read_manifest(root: str | Path) -> dict:
    """Load and version-check ``manifest.json``; errors name the directory and the problem."""
    root = Path(root)
    path = root / store_format.MANIFEST_NAME
    if root.is_file():
        hint = (f"; turn a release HDF5 into one with: photoz-hpc prepare {root} --out DIR"
                if root.suffix.lower() in (".h5", ".hdf5", ".hdf", ".he5") else "")
        raise DatasetError(f"{root} is a file, not a prepared dataset directory (a store made by photoz-hpc prepare)"
                           + hint)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory does not exist")
    if not path.is_file():
        hint = " (an unfinished prepare left it incomplete: re-run prepare to finish)" if root.name.endswith(".partial") or (root.with_name(root.name + ".partial")).exists() else ""
        raise DatasetError(f"{root}: not a prepared dataset, {store_format.MANIFEST_NAME} is missing{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable manifest: {exc}") from None
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise DatasetError(f"{path}: manifest has no integer 'format_version'")
    if version > store_format.FORMAT_VERSION:
        raise DatasetError(
            f"{path}: written by a newer photoz-hpc (format version {version}, this one reads <= {store_format.FORMAT_VERSION}); upgrade photoz-hpc"
        )
    for key in ("image_shape", "shards", "count", "layout"):
        if key not in manifest:
            raise DatasetError(f"{path}: manifest lacks '{key}'")
    if manifest["layout"] != store_format.LAYOUT:
        raise DatasetError(f"{path}: unsupported layout '{manifest['layout']}' (expected {store_format.LAYOUT})")
    survey = survey_of_manifest(manifest, str(path))
    bands = manifest["image_shape"][-1] if isinstance(manifest["image_shape"], list) and manifest["image_shape"] else None
    if bands != survey.n_bands:
        raise DatasetError(f"{path}: image_shape {manifest['image_shape']} does not have the {survey.n_bands} bands "
                           f"{list(survey.bands)} of its survey '{survey.name}'")
    if "bands" in manifest and list(manifest["bands"]) != list(survey.bands):
        raise DatasetError(f"{path}: 'bands' {manifest['bands']} differ from its survey '{survey.name}' bands "
                           f"{list(survey.bands)}")
    return manifest


def pixel_stats(manifest: dict, where: str = "dataset") -> dict[str, np.ndarray]:
    """Per-band median and MAD from a manifest; a clear error if they are missing."""
    stats = manifest.get("pixel_stats") or {}
    missing = [k for k in PIXEL_STATS_KEYS if k not in stats]
    if missing:
        raise DatasetError(f"{where}: manifest has no pixel statistics {missing} (needed by the noise augmentation); re-run prepare")
    out = {k: np.asarray(stats[k], dtype=np.float64) for k in PIXEL_STATS_KEYS}
    bands = manifest["image_shape"][-1]
    for k, v in out.items():
        if v.shape != (bands,) or not np.isfinite(v).all():
            raise DatasetError(f"{where}: manifest pixel_stats '{k}' must be {bands} finite numbers, got {stats[k]}")
    return out


class ShardedDataset:
    """Random access to a prepared dataset; images are memory-mapped (H, W, C) records.

    ``survey`` is the survey the manifest records (SDSS for a store from before surveys existed) and ``bands``
    its band names, in channel order; ``id_field`` / ``object_ids`` name each galaxy (``ObjID`` int64 for
    release-layout input, ``object_id`` int64 or unicode for Multimodal Universe input).

    ``image_dtype`` is the records' dtype (the manifest's ``dtype``: float32, or float16 from ``prepare --dtype
    float16``): the record views (``shard_images``, ``records_hwc``, ``images_hwc``) are in it, zero-copy, and every
    reader casts to float32 where the numbers are used (``ds[i]["image"]`` is float32).

    ``staged``: for a node-local copy made by ``photoz-hpc stage`` with node partitions, what it holds; the
    ``.bin`` files of other nodes' shards are absent there, and reading one of their records is an error.
    """

    def __init__(self, root: str | Path, verify_records: bool = True) -> None:
        self.root = Path(root).resolve()
        self.manifest = read_manifest(self.root)
        self.survey: Survey = survey_of_manifest(self.manifest, str(self.root / store_format.MANIFEST_NAME))
        self.meta_dtype = store_format.meta_dtype_of_manifest(self.manifest, str(self.root / store_format.MANIFEST_NAME))
        self.id_field: str = store_format.id_field(self.meta_dtype)
        self.image_shape: tuple[int, int, int] = tuple(self.manifest["image_shape"])
        self.image_dtype: np.dtype = store_format.image_dtype_of_manifest(
            self.manifest, str(self.root / store_format.MANIFEST_NAME))
        self.record_bytes = store_format.record_bytes(*self.image_shape, self.image_dtype)
        self.verify_records = verify_records
        self.shards = self.manifest["shards"]
        counts = np.array([s["count"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        if int(self.offsets[-1]) != self.manifest["count"]:
            raise DatasetError(f"{self.root}: shard counts sum to {self.offsets[-1]}, manifest says {self.manifest['count']}")
        self.staged: StagedCopy | None = read_staged(self.root)
        for number, shard in enumerate(self.shards):
            path = self.root / shard["file"]
            if not self.holds(number):
                continue
            if not path.is_file():
                raise DatasetError(f"{path}: shard file is missing")
            size, expected = path.stat().st_size, shard["count"] * self.record_bytes
            if size != expected:
                raise DatasetError(f"{path}: shard is truncated or padded ({size} bytes, expected {expected})")
        self._images: dict[int, np.memmap] = {}
        self._meta: np.ndarray | None = None
        self._checked: np.ndarray | None = None  # records whose CRC this object has verified
        self._plain: dict[int, np.ndarray] = {}  # shard -> its memmap as a plain ndarray (cheaper views)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def holds(self, shard: int) -> bool:
        """Whether this directory has shard ``shard``'s records (a partial node-local copy has only its node's)."""
        return self.staged is None or shard in self.staged.shards

    @property
    def bands(self) -> tuple[str, ...]:
        return self.survey.bands

    @property
    def object_ids(self) -> np.ndarray:
        """Each sample's galaxy id (``meta[id_field]``): int64 ``ObjID`` or MMU ``object_id`` (int64 or str)."""
        return self.meta[self.id_field]

    @property
    def meta(self) -> np.ndarray:
        """All samples' metadata as one structured array (``meta_dtype``, the manifest's), loaded on first use."""
        if self._meta is None:
            parts = []
            for shard in self.shards:
                path = self.root / shard["meta"]
                try:
                    part = np.load(path, allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise DatasetError(f"{path}: unreadable metadata ({exc})") from None
                if part.dtype != self.meta_dtype or len(part) != shard["count"]:
                    raise DatasetError(f"{path}: metadata has {len(part)} rows of {part.dtype}, expected "
                                       f"{shard['count']} of {self.meta_dtype}")
                parts.append(part)
            self._meta = np.concatenate(parts) if parts else np.zeros(0, self.meta_dtype)
        return self._meta

    def pixel_stats(self) -> dict[str, np.ndarray]:
        return pixel_stats(self.manifest, str(self.root))

    def locate_many(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample ids in [0, len), shard numbers, rows within the shards) of global indices (negative: from the end)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)]
            raise IndexError(f"index {bad[0]} outside [-{n}, {n}) for dataset of {n} samples")
        idx = idx % n if n else idx
        shards = np.searchsorted(self.offsets, idx, side="right") - 1
        return idx, shards, idx - self.offsets[shards]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, row within shard) of a global sample index."""
        _, shards, rows = self.locate_many([index])
        return int(shards[0]), int(rows[0])

    def shard_images(self, shard: int) -> np.memmap:
        """Memory-map of one shard's records, shape (count, H, W, C) of ``image_dtype``."""
        if shard not in self._images:
            info = self.shards[shard]
            if not self.holds(shard):
                raise DatasetError(
                    f"{self.root / info['file']}: not here: {self.staged.describe()} holds only its node's shards; this "
                    "rank reads another node's records, so the job's node layout differs from the staging's (run on "
                    f"{self.staged.nodes} node(s) with the same ranks per node, or stage again)")
            self._images[shard] = np.memmap(
                self.root / info["file"], dtype=self.image_dtype, mode="r", shape=(info["count"], *self.image_shape)
            )
        return self._images[shard]

    def image_hwc(self, index: int, verify: bool | None = None) -> np.ndarray:
        """One record as (H, W, C) ``image_dtype`` (a zero-copy memmap view), CRC-checked as ``records_hwc`` checks."""
        return self.records_hwc([index], verify)[0]

    def records_hwc(self, indices, verify: bool | None = None) -> list[np.ndarray]:
        """Records as zero-copy (H, W, C) views of ``image_dtype``, in the order asked, with one lookup for the whole batch (the
        loaders' host callbacks run in the training thread, where a lookup per record costs about as much as
        the rest of a batch's draws).

        With ``verify`` (default ``verify_records``) each record's CRC32 is checked the first time this dataset
        object reads it, so training loops pay the check once per record, not once per epoch.
        """
        idx, shards, rows = self.locate_many(indices)
        plain = self._plain
        out = []
        for shard, row in zip(shards.tolist(), rows.tolist(), strict=True):
            if shard not in plain:
                plain[shard] = np.asarray(self.shard_images(shard))  # views without np.memmap's overhead
            out.append(plain[shard][row])
        if self.verify_records if verify is None else verify:
            if self._checked is None:
                self._checked = np.zeros(len(self), dtype=bool)
            crc = self.meta["crc32"]
            for j in np.flatnonzero(~self._checked[idx]):
                if zlib.crc32(out[j]) != int(crc[idx[j]]):
                    path = self.root / self.shards[int(shards[j])]["file"]
                    raise DatasetError(f"{path}: record {rows[j]} (sample {idx[j]}) is corrupt (CRC mismatch)")
                self._checked[idx[j]] = True
        return out

    def images_hwc(self, indices: np.ndarray) -> np.ndarray:
        """A batch of records as (n, H, W, C) ``image_dtype`` (CRC-checked when ``verify_records``)."""
        return np.stack(self.records_hwc(indices)) if len(indices) else np.zeros((0, *self.image_shape), self.image_dtype)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = np.ascontiguousarray(self.image_hwc(index).transpose(2, 0, 1), dtype=np.float32)
        row = self.meta[index]
        item: dict[str, Any] = {"image": image, "index": int(index % len(self))}
        for key in store_format.public_fields(self.meta_dtype):
            value = row[key]
            item[key] = value.copy() if isinstance(value, np.ndarray) else value.item()
        return item


def open_dataset(root: str | Path, verify_records: bool = True) -> ShardedDataset:
    """Open a prepared dataset directory (see ``photoz_hpc.data.format`` for the layout)."""
    return ShardedDataset(root, verify_records=verify_records)
