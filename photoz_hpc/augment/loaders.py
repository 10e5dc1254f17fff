"""``build_loader``: the one entry point the trainer uses (see docs/augmentations.md for the contract)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from photoz_hpc.augment.base import LoaderBase
from photoz_hpc.augment.draws import resolve_spec
from photoz_hpc.augment.source import BatchSource, RecordReader
from photoz_hpc.config import Config
from photoz_hpc.data.dataset import ShardedDataset, open_dataset
from photoz_hpc.errors import ConfigError
from photoz_hpc.logs import get_logger
from photoz_hpc.survey import RedshiftGrid

log = get_logger(__name__)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def build_loader(
    cfg: Config,
    dataset: ShardedDataset | str | Path,
    pipeline: str,
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
    device: str | None = None,
    ids=None,
    batch_size: int | None = None,
    grid: RedshiftGrid | None = None,
    ranks_per_node: int | None = None,
) -> LoaderBase:
    """A loader of ``pipeline`` batches for this rank (a name of ``pipelines.PIPELINES``: 'pretrain' | 'finetune' | 'eval').

    ``cfg.loader.backend``: 'dali', 'reference' or 'auto' (DALI when installed); ``device``
    (default ``cfg.loader.device``; its 'gpu' on a machine without CUDA: 'cpu', with a WARNING): 'cpu' or 'gpu'
    (tensors are delivered there). ``ids`` restricts the
    samples (a label subset or a validation split); ``batch_size`` overrides ``cfg.loader.batch_size``; ``grid`` is
    the redshift grid of the ``z_bin`` labels, the model's (default: that of the survey the dataset's manifest
    records). The bands, extinction vector and default crop and jitter are the dataset survey's.

    ``cfg.data.partition`` 'node' deals a training pipeline's epochs per node (``augment/sampler.py``), nodes being
    blocks of ``ranks_per_node`` consecutive ranks (the communicator's ``node_size``; None: all ranks on one node).
    """
    if not isinstance(dataset, ShardedDataset):
        dataset = open_dataset(dataset)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world_size {world_size} is not a valid rank")
    if not device:  # the config's: a GPU without one falls back to the CPU with a WARNING (comm.devices)
        from photoz_hpc.comm.devices import gpu_or_cpu

        device = gpu_or_cpu("loader.device", cfg.loader.device)
    if device not in ("cpu", "gpu"):
        raise ConfigError(f"loader device '{device}' must be 'cpu' or 'gpu'")
    if device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("loader device 'gpu' was asked for but no CUDA device is available: make batches on the "
                              "CPU (device='cpu', loader.device=cpu)")
    backend = cfg.loader.backend
    if backend == "auto":
        backend = "dali" if dali_available() else "reference"
    elif backend == "dali" and not dali_available():
        raise ConfigError("loader.backend=dali but nvidia-dali is not installed (pip install nvidia-dali-cuda120)")
    spec = resolve_spec(cfg.augment, dataset.manifest, pipeline, str(dataset.root), grid)
    seed = cfg.seed if seed is None else seed
    reader = RecordReader(dataset, verify=cfg.loader.verify_records)
    per_node = (ranks_per_node or world_size) if cfg.data.partition == "node" else None
    source = BatchSource(dataset, spec, batch_size or cfg.loader.batch_size, rank, world_size, seed, reader, ids, per_node)
    if backend == "dali":
        from photoz_hpc.augment.dali_pipeline import DaliLoader

        loader: LoaderBase = DaliLoader(source, device, cfg.loader.num_threads, cfg.loader.prefetch)
    else:
        from photoz_hpc.augment.reference import ReferenceLoader

        loader = ReferenceLoader(source, device, cfg.loader.num_workers, cfg.loader.prefetch)
    log.debug("%s loader: %s on %s, %d batches/epoch on rank %d/%d", pipeline, backend, device, len(loader), rank, world_size)
    return loader
