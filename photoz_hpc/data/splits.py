"""Which labeled galaxies train and which validate: a fixed held-out split and nested label fractions.

Every method of a label-fraction sweep (self-supervised fine-tuning, supervised baseline, linear probe)
must see the same galaxies, and a smaller fraction's galaxies must be inside every larger fraction's
(so the curves compare like with like). Both follow from one rule: sort the candidate ids, permute
them with a generator keyed only by the seed, take a prefix. The ids are written into the run
directory (``train_ids.npy``, ``val_ids.npy``) and checked again on resume.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from photoz_hpc.data import format as store_format
from photoz_hpc.data.dataset import ShardedDataset
from photoz_hpc.errors import ConfigError, DatasetError
from photoz_hpc.io_utils import atomic_open

# Stream tags: the split and the subset draw from independent streams even with equal seeds.
_TAG_SPLIT, _TAG_SUBSET = 11, 12


def _permuted(ids: np.ndarray, seed: int, tag: int) -> np.ndarray:
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, tag]))
    return ids[rng.permutation(len(ids))]


def labeled_ids(dataset: ShardedDataset) -> np.ndarray:
    """Ids of the samples with a finite spectroscopic redshift; an error naming the dataset if none."""
    z = dataset.meta["specz_redshift"]
    ids = np.flatnonzero(np.isfinite(z)).astype(np.int64)
    if len(ids) == 0:
        raise DatasetError(f"{dataset.root}: no sample has a spectroscopic redshift (specz_redshift); "
                           "fine-tuning and evaluation need a labeled dataset (synth --labeled)")
    return ids


def holdout_split(ids: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) ids, both sorted: a seed-fixed ``val_fraction`` of ``ids`` is held out."""
    perm = _permuted(ids, seed, _TAG_SPLIT)
    n_val = int(round(val_fraction * len(perm)))
    if n_val < 1 or n_val >= len(perm):
        raise ConfigError(f"finetune.val_fraction = {val_fraction} of {len(perm)} labeled galaxies leaves an empty "
                          "training or validation set")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def nested_subset(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The first ceil(fraction x n) of a seed-fixed permutation of ``ids`` (sorted): for one seed a
    smaller fraction's subset is always contained in a larger one's."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"finetune.label_fraction = {fraction} must be in (0, 1]")
    perm = _permuted(ids, seed, _TAG_SUBSET)
    return np.sort(perm[: max(1, math.ceil(fraction * len(perm) - 1e-9))])


def check_disjoint(train: ShardedDataset, train_ids: np.ndarray, val: ShardedDataset, val_ids: np.ndarray) -> None:
    """A separate validation set must not contain training galaxies (same ``ObjID``, or same
    ``specObjID`` when ObjIDs are absent; Multimodal Universe stores: same ``object_id``); same dataset:
    the id sets must not intersect."""
    if Path(train.root).resolve() == Path(val.root).resolve():
        common = np.intersect1d(train_ids, val_ids)
        if len(common):
            raise ConfigError(f"validation set overlaps training: {len(common)} galaxies of {train.root} are in both")
        return
    mmu = store_format.MMU_ID_FIELD
    if mmu in (train.id_field, val.id_field):
        if train.id_field != val.id_field or train.meta.dtype[mmu].kind != val.meta.dtype[mmu].kind:
            return  # ids of different catalogues cannot name the same galaxy
        common = np.intersect1d(train.meta[mmu][train_ids], val.meta[mmu][val_ids])
        if len(common):
            raise ConfigError(f"validation set {val.root} overlaps training set {train.root}: {len(common)} "
                              f"galaxies share an {mmu} (e.g. {common[0]!s}); a galaxy must never be both")
        return
    for key in store_format.RELEASE_ID_FIELDS:
        a, b = train.meta[key][train_ids], val.meta[key][val_ids]
        a, b = a[a > 0], b[b > 0]
        if len(a) and len(b):
            common = np.intersect1d(a, b)
            if len(common):
                raise ConfigError(f"validation set {val.root} overlaps training set {train.root}: {len(common)} "
                                  f"galaxies share a {key} (e.g. {int(common[0])}); a galaxy must never be both")
            return


def save_ids(path: Path, ids: np.ndarray) -> Path:
    """Write ids atomically as ``.npy`` (int64)."""
    with atomic_open(path, "wb") as fh:
        np.save(fh, np.asarray(ids, dtype=np.int64))
    return path


def load_ids(path: Path) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)  # an object array would unpickle: refused
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable id file ({exc})") from None
    if ids.ndim != 1 or ids.dtype.kind != "i":
        raise DatasetError(f"{path}: expected a 1-d integer id array, got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64)
