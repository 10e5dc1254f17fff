"""``evaluate``: a fine-tuned network over a labeled dataset on every rank -> metrics, predictions, plots.

Outputs (rank 0, each written atomically): ``metrics.json`` (``photoz_metrics`` overall and per
redshift bin, plus what was evaluated), ``predictions.csv`` (ids, z_spec, z_phot, pdf mode, 68%
interval) and the plots of ``plots.plot_evaluation``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from photoz_hpc.comm.base import Comm
from photoz_hpc.config import FinetuneRunConfig, apply_overrides, config_from_dict
from photoz_hpc.data.dataset import ShardedDataset, open_dataset
from photoz_hpc.data.splits import labeled_ids, load_ids
from photoz_hpc.errors import PhotozError
from photoz_hpc.evaluate.pdfs import summarize_pdfs
from photoz_hpc.evaluate.plots import plot_evaluation
from photoz_hpc.evaluate.predictions import write_predictions
from photoz_hpc.io_utils import atomic_write_json
from photoz_hpc.logs import get_logger
from photoz_hpc.metrics import photoz_metrics
from photoz_hpc.models.photoz_net import PHOTOZ_MODEL_FORMAT, PhotoZNet, build_photoz_net, photoz_model_from_blob
from photoz_hpc.torch_files import read_torch_file
from photoz_hpc.train.checkpoint import checkpoint_task, validate_checkpoint
from photoz_hpc.train.inference import predict
from photoz_hpc.train.precision import resolve_precision

log = get_logger(__name__)


def load_network(path: str | Path, overrides: list[str] | None = None) -> tuple[PhotoZNet, FinetuneRunConfig, dict[str, Any]]:
    """The network, the config it was trained with (loader/augment settings for evaluation; ``overrides``
    applied) and the file's metadata, from a photo-z model file (``best_model.pt``, ``photoz_model.pt``, an
    imported paper model) or a fine-tuning checkpoint; a pretraining checkpoint or anything else is an error."""
    net, cfg, meta = _load_network(Path(path))
    if overrides:
        cfg = config_from_dict(apply_overrides(dataclasses.asdict(cfg), list(overrides), FinetuneRunConfig),
                               FinetuneRunConfig)
    return net, cfg, meta


def _load_network(path: Path) -> tuple[PhotoZNet, FinetuneRunConfig, dict[str, Any]]:
    path = Path(path)
    blob = read_torch_file(path, "checkpoint")  # read once: both kinds are parsed from this blob
    if isinstance(blob, dict) and blob.get("format") == PHOTOZ_MODEL_FORMAT:
        net, meta = photoz_model_from_blob(blob, path)
        cfg = (config_from_dict(meta["config"], FinetuneRunConfig) if meta.get("config")
               else config_from_dict({"model": meta["model"]}, FinetuneRunConfig))
        return net, cfg, {k: v for k, v in meta.items() if k not in ("state_dict", "config")}
    kind = checkpoint_task(blob)
    if kind == "finetune":
        state = validate_checkpoint(blob, path, "finetune")
        cfg = config_from_dict(state["config"], FinetuneRunConfig)
        net = build_photoz_net(cfg.model)
        net.load_state_dict(state["model"])
        return net.eval(), cfg, {"step": state["step"], "kind": "finetune checkpoint"}
    if kind == "pretrain":
        raise PhotozError(f"{path} is a pretraining (MoCo) checkpoint: it has no redshift head. Fine-tune it first "
                          f"(photoz-hpc finetune finetune.init={path})")
    raise PhotozError(f"{path} is neither a photo-z model file nor a fine-tuning checkpoint")


def evaluate_network(net: PhotoZNet, cfg: FinetuneRunConfig, dataset: ShardedDataset | str | Path, comm: Comm,
                     device: torch.device, out_dir: str | Path | None, ids: np.ndarray | None = None,
                     title: str = "") -> dict[str, Any]:
    """Metrics of ``net`` on ``ids`` (default: every labeled galaxy) of ``dataset``; rank 0 writes the
    outputs under ``out_dir`` when given. Collective: every rank calls it; same dict on every rank."""
    from photoz_hpc.augment.loaders import build_loader

    if not isinstance(dataset, ShardedDataset):
        dataset = open_dataset(dataset)
    ids = labeled_ids(dataset) if ids is None else np.asarray(ids, dtype=np.int64)
    z_all = dataset.meta["specz_redshift"]
    if not np.isfinite(z_all[ids]).all():
        raise PhotozError(f"{dataset.root}: {int((~np.isfinite(z_all[ids])).sum())} of the galaxies to evaluate "
                          "have no spectroscopic redshift")
    loader = build_loader(cfg, dataset, "eval", comm.rank, comm.world, cfg.seed, ids=ids,
                          batch_size=cfg.finetune.eval_batch_size or cfg.loader.batch_size)
    net = net.to(device)
    precision = resolve_precision(cfg.train.precision, device)
    pred = predict(net, loader, comm, device, precision.autocast, with_probs=True)
    z_spec = z_all[pred["index"]]
    metrics = photoz_metrics(pred["z_phot"], z_spec)
    report = {"metrics": metrics, "dataset": str(dataset.root), "n": int(len(pred["index"])),
              "model": cfg.model.arch, "device": str(device), "world_size": comm.world}
    if out_dir is not None and comm.rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = summarize_pdfs(pred["probs"])
        meta = dataset.meta[pred["index"]]
        write_predictions(out / "predictions.csv",
                          {"index": pred["index"], "ObjID": meta["ObjID"], "specObjID": meta["specObjID"]},
                          z_spec, summary)
        report["plots"] = [str(p) for p in plot_evaluation(out, pred["z_phot"], z_spec, pred["probs"], title)]
        report["predictions"] = str(out / "predictions.csv")
        atomic_write_json(out / "metrics.json", report)
        log.info("evaluated %d galaxies of %s: sigma_MAD %.5f, eta %.3f%%, bias %+.5f -> %s", report["n"],
                 dataset.root, metrics["sigma_mad"], 100 * metrics["eta"], metrics["bias"], out)
    return report


def run_evaluate(checkpoint: str | Path, data: str | Path, out_dir: str | Path | None, ids_path: str | Path | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """The ``evaluate`` command: load, set up device and communicator, evaluate, write outputs."""
    from photoz_hpc.run_lock import RunDir
    from photoz_hpc.train.runtime import run_with_comm

    net, cfg, meta = load_network(checkpoint, overrides)
    ids = load_ids(Path(ids_path)) if ids_path else None
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).resolve().parent / "eval"

    def body(cfg, comm, device, flag):
        return evaluate_network(net, cfg, data, comm, device, out_dir, ids, title=Path(checkpoint).name)

    report = run_with_comm(cfg, None, body, hold=RunDir(out_dir, "evaluate"))
    report["checkpoint"] = str(checkpoint)
    report["source"] = {k: v for k, v in meta.items() if isinstance(v, (str, int, float)) or v is None}
    return report
