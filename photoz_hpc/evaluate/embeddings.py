"""``embed``: L2-normalised embeddings of every galaxy of a prepared dataset, on all ranks, streamed to disk.

The representation is the MoCo query encoder's projection output (``model.embed_dim``, 128 in the paper:
what the contrastive loss compares) or, with ``feature='trunk'``, the ResNet's pooled feature (2048-d for
a ResNet-50), also L2-normalised, so a dot product is the cosine similarity either way. Images go
through the ``eval`` pipeline (dereddened, centre crop, no augmentation).

Ranks: the eval sampler gives rank r the contiguous block r of the dataset ids, padded so that every
rank runs the same number of batches; padding rows are dropped, so each galaxy is embedded exactly once.
Each rank streams its block into its own ``.npy`` memory map (never the whole set in one process), and
rank 0 writes ``index.json`` last, after checking that the blocks tile ``0..N-1``. The encoder's survey (the
bands its stem reads, as its file records them; none: SDSS) must be the data's: another is refused before any
work.

    EMB/index.json              format, dataset (path, fingerprint, N), survey and bands, feature, dim, checkpoint,
                                id_field and id_dtype, parts
    EMB/part-00000.npy          (n_0, dim) float32, rows in dataset-id order
    EMB/part-00000.ids.npy      (n_0,) [('index', i8), (ID, dtype)]: the store's galaxy id under its own name and
                                dtype (``ids.id_column_of``): SDSS ('ObjID', i8), Multimodal Universe ('object_id', i8
                                or <U<width>, the store's width); plain .npy, read without pickle

Embeddings written before MMU stores existed (no ``id_field`` in the index) have ``('ObjID', i8)`` and still load:
the reader takes the id field from the id file's dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from photoz_hpc.augment.sampler import eval_block
from photoz_hpc.config import Config, apply_overrides, config_from_dict
from photoz_hpc.data.dataset import ShardedDataset, open_dataset
from photoz_hpc.errors import DatasetError, PhotozError
from photoz_hpc.evaluate import ids as galaxy_ids
from photoz_hpc.io_utils import atomic_write_json
from photoz_hpc.logs import get_logger
from photoz_hpc.models.records import check_bands
from photoz_hpc.models.resnet import build_encoder
from photoz_hpc.survey import Survey
from photoz_hpc.train.checkpoint import read_pretrained_encoder
from photoz_hpc.train.surveys import resolve_run_config

log = get_logger(__name__)

EMBED_FORMAT = "photoz-hpc/embeddings/1"
INDEX_NAME = "index.json"
FEATURES = ("projection", "trunk")
#: the id record of an SDSS store's embeddings (and of every embedding written before MMU stores existed)
ID_DTYPE = np.dtype([("index", "<i8"), ("ObjID", "<i8")])


def id_dtype(dataset: ShardedDataset) -> np.dtype:
    """The id record of ``dataset``'s embeddings: the dataset index and its galaxy id, under the store's name and
    dtype (SDSS: ``ID_DTYPE``)."""
    return np.dtype([("index", "<i8"), (dataset.id_field, dataset.meta_dtype[dataset.id_field])])


class Embedder(nn.Module):
    """ResNet trunk (+ the MoCo projection MLP) -> L2-normalised (B, dim) embeddings."""

    def __init__(self, trunk: nn.Module, head: nn.Module | None, survey: Survey | None = None) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head
        self.survey = survey or getattr(trunk, "survey", None)  # the bands it reads

    @property
    def dim(self) -> int:
        return self.head[-1].out_features if self.head is not None else self.trunk.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        if self.head is not None:
            h = self.head(h)
        return F.normalize(h.float(), dim=1)


def _mlp(state: dict[str, torch.Tensor], where: str) -> nn.Sequential:
    try:
        hidden, feat = state["0.weight"].shape
        dim = state["2.weight"].shape[0]
    except (KeyError, ValueError):
        raise PhotozError(f"{where}: the projection head has unexpected keys {sorted(state)[:6]}") from None
    head = nn.Sequential(nn.Linear(feat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
    head.load_state_dict(state)
    return head


def load_embedder(path: str | Path, feature: str = "projection") -> tuple[Embedder, dict[str, Any]]:
    """The network of a MoCo checkpoint or an ``encoder.pt`` (eval mode; ``.survey`` the bands its stem reads, as
    recorded, none: SDSS) and the config values it carries (the full pretraining config of a checkpoint; ``model``
    and the trained view settings ``augment`` of an export, ``model`` alone of an old one)."""
    path = Path(path)
    if feature not in FEATURES:
        raise PhotozError(f"feature '{feature}' is not one of {list(FEATURES)}")
    source = read_pretrained_encoder(path, "embeddings:")
    values, trunk_state, head_state, survey = source["config"], source["trunk"], source["head"], source["survey"]
    trunk = build_encoder(SimpleNamespace(**values["model"]), survey=survey)
    try:
        trunk.load_state_dict(trunk_state)
    except RuntimeError as exc:
        raise PhotozError(f"{path}: the encoder weights do not fit {values['model']} for the {survey.n_bands} bands "
                          f"{list(survey.bands)} it records ({exc})") from None
    head = None
    if feature == "projection":
        if not head_state:
            raise PhotozError(f"{path} has no projection head (an encoder.pt exported before heads were kept): "
                              "re-export it from its checkpoint (photoz-hpc export-encoder CKPT OUT), embed the "
                              "checkpoint itself, or use --feature trunk")
        head = _mlp(head_state, str(path))
    return Embedder(trunk, head, survey).eval(), values


def check_view_settings(path: str | Path, trained: dict[str, Any] | None, used: dict[str, Any]) -> list[str]:
    """Warn when the views ``embed`` uses differ from those the encoder was trained with (``trained``: its
    ``augment`` section; embed starts from it, so a difference is an explicit override), or when the file
    carries none (an ``encoder.pt`` exported before they were kept: the defaults are used). Returns the
    differing keys."""
    if trained is None:
        log.warning("%s carries no view settings (an encoder.pt exported before they were kept): embedding with "
                    "augment.crop_size=%d (and the other augment defaults or overrides); if the encoder was "
                    "trained on other crops, re-export it from its checkpoint (photoz-hpc export-encoder CKPT OUT) "
                    "or pass augment.crop_size=N", path, used["crop_size"])
        return []
    diff = sorted(k for k in trained if k in used and used[k] != trained[k])
    if diff:
        log.warning("%s was trained with %s; embedding with %s as overridden", path,
                    ", ".join(f"augment.{k}={trained[k]}" for k in diff),
                    ", ".join(f"augment.{k}={used[k]}" for k in diff))
    return diff


def dataset_fingerprint(dataset: ShardedDataset) -> str:
    """A short hash of the dataset's content (every shard's checksums and counts, from its manifest)."""
    shards = [[s.get("sha256"), s.get("meta_sha256"), s["count"]] for s in dataset.shards]
    text = json.dumps({"shape": list(dataset.image_shape), "shards": shards}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _part_names(rank: int) -> tuple[str, str]:
    return f"part-{rank:05d}.npy", f"part-{rank:05d}.ids.npy"


@torch.no_grad()
def embed_batch(net: Embedder, x: torch.Tensor, autocast) -> torch.Tensor:
    """(B, dim) float32 embeddings of a batch of eval views ``x`` under the precision's ``autocast``: the forward
    pass of ``embed`` and of the Python API's arrays (``evaluate.arrays``)."""
    with autocast():
        return net(x).float()


def embed_config(checkpoint: str | Path, net: Embedder, values: dict[str, Any],
                 overrides: list[str] | None = None) -> Config:
    """The config ``embed`` runs with: the encoder file's ``values`` (``load_embedder``) with ``overrides``, crops
    resolved for its survey; warns when the views differ from those it was trained with (``check_view_settings``)."""
    cfg = resolve_run_config(config_from_dict(apply_overrides(values, list(overrides or []), Config), Config),
                             net.survey)
    trained = values.get("augment")
    if trained is not None:  # an older export's or checkpoint's unset crop is its survey's default, as trained
        trained = dataclasses.asdict(resolve_run_config(config_from_dict({"augment": trained}, Config),
                                                        net.survey).augment)
    check_view_settings(checkpoint, trained, dataclasses.asdict(cfg.augment))
    return cfg


@torch.no_grad()
def _embed_block(net: Embedder, loader, dataset: ShardedDataset, out: Path, rank: int, world: int,
                 device: torch.device, autocast) -> dict[str, Any]:
    lo, hi = eval_block(len(dataset), rank, world)  # the eval loader's block of this rank
    vec_name, ids_name = _part_names(rank)
    tmp_vec, tmp_ids = out / f".{vec_name}.tmp", out / f".{ids_name}.tmp"
    vec = np.lib.format.open_memmap(tmp_vec, mode="w+", dtype=np.float32, shape=(hi - lo, net.dim))
    ids = np.lib.format.open_memmap(tmp_ids, mode="w+", dtype=id_dtype(dataset), shape=(hi - lo,))
    pos = 0
    loader.set_epoch(0)
    for batch in loader:
        keep = batch["valid"].cpu().numpy().astype(bool)
        index = batch["index"].cpu().numpy()[keep]
        if len(index) == 0:
            continue
        if not np.array_equal(index, np.arange(lo + pos, lo + pos + len(index))):
            raise PhotozError(f"rank {rank}: the eval loader delivered ids {index[:4]}..., expected {lo + pos}...")
        z = embed_batch(net, batch["image"].to(device, non_blocking=True), autocast)
        vec[pos:pos + len(index)] = z[torch.from_numpy(keep).to(z.device)].cpu().numpy()
        ids["index"][pos:pos + len(index)] = index
        ((field, values),) = galaxy_ids.galaxy_ids(dataset, index).items()
        ids[field][pos:pos + len(index)] = values
        pos += len(index)
    if pos != hi - lo:
        raise PhotozError(f"rank {rank}: embedded {pos} galaxies, its block [{lo}, {hi}) has {hi - lo}")
    vec.flush()
    ids.flush()
    del vec, ids
    os.replace(tmp_vec, out / vec_name)
    os.replace(tmp_ids, out / ids_name)
    return {"rank": rank, "file": vec_name, "ids": ids_name, "first": lo, "count": hi - lo}


def embed_dataset(checkpoint: str | Path, data: str | Path, out: str | Path, feature: str = "projection",
                  overrides: list[str] | None = None) -> dict[str, Any]:
    """The ``embed`` command on this rank (every rank calls it); returns the index (same on every rank). Data of
    other bands than the encoder's is refused before any work; crops as the encoder was trained (its recorded
    ``augment``, else its survey's default)."""
    from photoz_hpc.augment.loaders import build_loader
    from photoz_hpc.run_lock import RunDir
    from photoz_hpc.train.precision import resolve_precision
    from photoz_hpc.train.runtime import run_with_comm

    net, values = load_embedder(checkpoint, feature)
    dataset = open_dataset(data)
    check_bands(net.survey, f"the encoder {checkpoint}", dataset.survey, f"dataset {dataset.root}")
    cfg = embed_config(checkpoint, net, values, overrides)
    out = Path(out)

    def body(cfg, comm, device, flag):
        if comm.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / INDEX_NAME).unlink(missing_ok=True)  # incomplete until the new index is written
        comm.allgather_object(None)  # barrier: no rank writes a part before the old index is gone
        loader = build_loader(cfg, dataset, "eval", comm.rank, comm.world, cfg.seed)
        model = net.to(device)
        autocast = resolve_precision(cfg.train.precision, device).autocast
        part = _embed_block(model, loader, dataset, out, comm.rank, comm.world, device, autocast)
        parts = comm.allgather_object(part)
        index = {"format": EMBED_FORMAT, "dataset": str(dataset.root), "fingerprint": dataset_fingerprint(dataset),
                 "n": len(dataset), "survey": net.survey.name, "bands": list(net.survey.bands),
                 "id_field": dataset.id_field, "id_dtype": dataset.meta_dtype[dataset.id_field].str,
                 "dim": model.dim, "feature": feature, "normalised": True, "dtype": "float32",
                 "checkpoint": str(checkpoint), "model": dataclasses.asdict(cfg.model), "pipeline": "eval",
                 "crop_size": cfg.augment.crop_size, "world_size": comm.world, "parts": parts}
        if comm.rank == 0:
            expect = 0
            for p in parts:
                if p["first"] != expect:
                    raise PhotozError(f"embedding parts do not tile the dataset: part {p['file']} starts at {p['first']}, "
                                      f"expected {expect}")
                expect += p["count"]
            if expect != len(dataset):
                raise PhotozError(f"embedding parts cover {expect} of {len(dataset)} galaxies")
            atomic_write_json(out / INDEX_NAME, index)
            log.info("embedded %d galaxies (%s, %d-d) on %d ranks -> %s", len(dataset), feature, model.dim,
                     comm.world, out)
        comm.allgather_object(None)  # every rank returns once the index exists
        return index

    return run_with_comm(cfg, None, body, hold=RunDir(out, "embed"))


class Embeddings:
    """Read side of an ``embed`` output: memory-mapped parts, never loaded whole unless asked. ``ids`` is the id
    record of every row (``index`` and the galaxy id), ``id_field`` the galaxy id's name (``ObjID``, ``object_id``)
    and ``object_ids`` its values, in the store's dtype."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / INDEX_NAME
        if not path.is_file():
            raise DatasetError(f"{self.root}: not an embedding directory ({INDEX_NAME} is missing; an interrupted "
                               "embed leaves none: run it again)")
        try:
            self.index = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: unreadable ({exc})") from None
        if self.index.get("format") != EMBED_FORMAT:
            raise DatasetError(f"{path}: not a photoz-hpc embedding index (format {self.index.get('format')!r})")
        self.n, self.dim = int(self.index["n"]), int(self.index["dim"])
        self.parts, ids = [], []
        for p in self.index["parts"]:
            try:
                vec = np.load(self.root / p["file"], mmap_mode="r")
                pid = np.load(self.root / p["ids"], mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{self.root}: embedding part {p['file']} is unreadable ({exc})") from None
            if vec.shape != (p["count"], self.dim) or len(pid) != p["count"]:
                raise DatasetError(f"{self.root}: part {p['file']} has shape {vec.shape}, the index says "
                                   f"({p['count']}, {self.dim})")
            names = pid.dtype.names or ()
            if len(names) != 2 or names[0] != "index" or pid.dtype[names[1]].kind not in "iU":
                raise DatasetError(f"{self.root}: {p['ids']} is not an id record [('index', i8), (ID, i8 or str)] "
                                   f"({pid.dtype})")
            if ids and pid.dtype.names != ids[0].dtype.names:
                raise DatasetError(f"{self.root}: {p['ids']} names galaxies by {names[1]}, {self.index['parts'][0]['ids']} "
                                   f"by {ids[0].dtype.names[1]}")
            self.parts.append(vec)
            ids.append(np.asarray(pid))
        self.id_field: str = ids[0].dtype.names[1] if ids else self.index.get("id_field", "ObjID")
        recorded = self.index.get("id_field")
        if recorded is not None and recorded != self.id_field:
            raise DatasetError(f"{self.root}: the index names galaxies by {recorded}, the id files by {self.id_field}")
        if ids:  # one dtype for all parts (string widths are the store's: equal, unless files were mixed)
            common = np.result_type(*(i.dtype[1] for i in ids))
            rec = np.dtype([("index", "<i8"), (self.id_field, common)])
            ids = [i.astype(rec) for i in ids]
        self.ids = np.concatenate(ids) if ids else np.zeros(0, ID_DTYPE)
        if len(self.ids) != self.n or not np.array_equal(self.ids["index"], np.arange(self.n)):
            raise DatasetError(f"{self.root}: the parts do not hold each of the {self.n} galaxies once, in order")

    def __len__(self) -> int:
        return self.n

    @property
    def object_ids(self) -> np.ndarray:
        """Each row's galaxy id (``ids[id_field]``): int64, or str for string ids."""
        return self.ids[self.id_field]

    def chunks(self, size: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) blocks in order, read from the memory maps."""
        start = 0
        for part in self.parts:
            for lo in range(0, len(part), size):
                rows = np.array(part[lo:lo + size], dtype=np.float32)  # a writable copy of one block
                yield start + lo, rows
            start += len(part)

    def rows(self, positions) -> np.ndarray:
        """The embeddings of the given rows (dataset ids)."""
        positions = np.asarray(positions, dtype=np.int64)
        starts = np.cumsum([0] + [len(p) for p in self.parts])
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        for k, i in enumerate(positions):
            j = int(np.searchsorted(starts, i, side="right") - 1)
            out[k] = self.parts[j][i - starts[j]]
        return out

    def vectors(self) -> np.ndarray:
        """All embeddings in one (n, dim) array (what an in-memory index needs)."""
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in self.parts]) if self.parts else \
            np.zeros((0, self.dim), np.float32)

    def check_dataset(self, dataset: ShardedDataset) -> None:
        """The dataset must be the one these embeddings were computed from."""
        fp = dataset_fingerprint(dataset)
        if fp != self.index["fingerprint"] or len(dataset) != self.n:
            raise DatasetError(f"embeddings {self.root} were computed from dataset {self.index['dataset']} "
                               f"({self.n} galaxies, fingerprint {self.index['fingerprint']}), not from {dataset.root} "
                               f"({len(dataset)} galaxies, fingerprint {fp}): embed that dataset first")

    def dataset(self, path: str | Path | None = None) -> ShardedDataset:
        """The dataset (``path``, default the one recorded in the index), checked against the embeddings."""
        ds = open_dataset(path or self.index["dataset"])
        self.check_dataset(ds)
        return ds

    def lookup(self, ids, by: str = "index") -> np.ndarray:
        """Row positions of dataset ids (``by='index'``) or of galaxy ids (``by='id'``, or ``'objid'``: the store's
        ``ObjID`` / ``object_id``, int64 or str, given as values or text); unknown ones are an error."""
        field, obj = self.id_field, self.object_ids
        if by == "index":
            given = np.asarray(ids).ravel().tolist()
            try:
                values = np.array([int(v) for v in given], dtype=np.int64)
            except ValueError:  # text that is no integer: perhaps a string id
                values = None
            bad = given if values is None else values[(values < 0) | (values >= self.n)].tolist()
            if bad:
                try:
                    known = bool(np.isin(galaxy_ids.parse_ids(bad, obj.dtype, field), obj).all())
                except PhotozError:
                    known = False
                what = "SDSS ObjIDs" if field == "ObjID" else f"{field}s"
                hint = (f"they are {what} of this set: pass --objid" if known
                        else f"ids are dataset indices; {what} need --objid")
                raise PhotozError(f"galaxy id(s) {bad[:5]} are not in 0..{self.n - 1} of {self.root} ({hint})")
            return values
        if by not in ("id", "objid"):
            raise PhotozError(f"lookup by {by!r}: 'index' or 'id'")
        wanted = galaxy_ids.parse_ids(np.asarray(ids).ravel().tolist(), obj.dtype, field)
        order = np.argsort(obj, kind="stable")
        sorted_obj = obj[order]
        at = np.clip(np.searchsorted(sorted_obj, wanted), 0, max(self.n - 1, 0))
        found = sorted_obj[at] == wanted if self.n else np.zeros(len(wanted), bool)
        if not found.all():
            raise PhotozError(f"{field}(s) {[galaxy_ids.id_value(v) for v in wanted[~found][:5]]} are not in {self.root}")
        return order[at]
