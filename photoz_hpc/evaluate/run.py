"""``evaluate``: a fine-tuned network over a labeled dataset on every rank -> metrics, predictions, plots.

Outputs (rank 0, each written atomically): ``metrics.json`` (``photoz_metrics`` overall and per
redshift bin, plus what was evaluated -- the network's path and ``checkpoint_sha256``, the digest of the bytes
evaluated, so a file replaced later is not credited with these metrics -- and by which command), ``predictions.csv`` (dataset index, the store's
galaxy ids -- SDSS ``ObjID`` and ``specObjID``, Multimodal Universe ``object_id`` -- z_spec, z_phot, pdf mode,
68% interval) and the plots of ``plots.plot_evaluation``.

``evaluate`` never writes over another command's results (a fine-tuning run's own ``eval/``, a catalogue,
an evaluation of another network or dataset): its default output directory is named after the network and
the data (``evaluate-<checkpoint>-<dataset>[-<ids>]`` next to the checkpoint), and a directory that holds
anything else is refused. It warns when the evaluated galaxies include the network's training galaxies
(read from the run directory's ``train_ids.npy`` and ``labels.json``).

The network comes with its survey and redshift grid (``load_network``: as its file records them; none: SDSS and
the paper's 180 bins): data of other bands is refused before any work, and the pdf summaries, metrics bins and
plots follow the network's grid.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from photoz_hpc.comm.base import Comm
from photoz_hpc.config import FinetuneRunConfig, apply_overrides, config_from_dict
from photoz_hpc.data.dataset import ShardedDataset, open_dataset
from photoz_hpc.data.splits import labeled_ids, load_ids
from photoz_hpc.errors import PhotozError
from photoz_hpc.evaluate.ids import galaxy_ids, shared_galaxies
from photoz_hpc.evaluate.inputs import check_inputs
from photoz_hpc.evaluate.pdfs import summarize_pdfs
from photoz_hpc.evaluate.plots import plot_evaluation
from photoz_hpc.evaluate.predictions import write_predictions
from photoz_hpc.io_utils import atomic_write_json
from photoz_hpc.logs import get_logger
from photoz_hpc.metrics import grid_z_bins, photoz_metrics
from photoz_hpc.models.export import ENCODER_FORMAT
from photoz_hpc.models.model_files import read_file, read_model_dir
from photoz_hpc.models.photoz_net import PHOTOZ_MODEL_FORMAT, PhotoZNet, photoz_model_from_blob
from photoz_hpc.models.records import check_bands
from photoz_hpc.torch_files import read_torch_file
from photoz_hpc.train.checkpoint import checkpoint_task, finetune_checkpoint_network
from photoz_hpc.train.inference import predict
from photoz_hpc.train.precision import resolve_precision
from photoz_hpc.train.surveys import resolve_run_config

log = get_logger(__name__)


def load_network(path: str | Path, overrides: list[str] | None = None) -> tuple[PhotoZNet, FinetuneRunConfig, dict[str, Any]]:
    """The network (``net.survey``: the bands it reads; ``net.grid``: its redshift grid), the config it was trained
    with (loader/augment settings for evaluation; ``overrides`` applied; crops resolved for the network's survey,
    ``finetune.z_*`` its grid) and the file's metadata, from a photo-z model file (``best_model.pt``,
    ``photoz_model.pt``, an imported paper model), a fine-tuning checkpoint or an exported model directory; a
    pretraining checkpoint or anything else is an error. ``meta['checkpoint_sha256']``: ``model_digest`` of what was
    loaded, hashed from the very bytes the network was read from (what evaluate's metrics.json and predict's plan
    record)."""
    net, cfg, meta = _load_network(Path(path))
    if overrides:
        cfg = config_from_dict(apply_overrides(dataclasses.asdict(cfg), list(overrides), FinetuneRunConfig),
                               FinetuneRunConfig)
    return net, model_config(cfg, net), meta


def model_config(cfg: FinetuneRunConfig, net: PhotoZNet) -> FinetuneRunConfig:
    """``cfg`` resolved for the network: its survey's crops where the config leaves them unset (a model file of
    no config), and the redshift grid the network has (``finetune.z_*``)."""
    grid = net.grid
    ft = dataclasses.replace(cfg.finetune, z_min=grid.z_min, z_max=grid.z_max, n_z_bins=grid.n_bins)
    return resolve_run_config(dataclasses.replace(cfg, finetune=ft), net.survey)


def _load_network(path: Path) -> tuple[PhotoZNet, FinetuneRunConfig, dict[str, Any]]:
    path = Path(path)
    if path.is_dir():  # an exported model directory (export-model): checksums first, safetensors weights
        net, meta, digest = read_model_dir(path)
        cfg = (config_from_dict(meta["config"], FinetuneRunConfig) if meta.get("config")
               else config_from_dict({"model": meta["model"]}, FinetuneRunConfig))
        return net, cfg, {**{k: v for k, v in meta.items() if k != "config"}, "checkpoint_sha256": digest}
    data, digest = read_file(path, "checkpoint")  # read once: hashed, and both kinds are parsed from these bytes
    blob = read_torch_file(path, "checkpoint", data=data)
    del data
    if isinstance(blob, dict) and blob.get("format") == PHOTOZ_MODEL_FORMAT:
        net, meta = photoz_model_from_blob(blob, path)
        cfg = (config_from_dict(meta["config"], FinetuneRunConfig) if meta.get("config")
               else config_from_dict({"model": meta["model"]}, FinetuneRunConfig))
        return net, cfg, {**{k: v for k, v in meta.items() if k not in ("state_dict", "config")},
                          "checkpoint_sha256": digest}
    kind = checkpoint_task(blob)
    if kind == "finetune":
        net, cfg, state = finetune_checkpoint_network(blob, path)
        survey, grid = net.survey, net.grid
        return net, cfg, {"step": state["step"], "kind": "finetune checkpoint", "survey": survey.name,
                                 "bands": list(survey.bands), "redshift_grid": grid.to_dict(), "checkpoint_sha256": digest}
    if kind == "pretrain":
        raise PhotozError(f"{path} is a pretraining (MoCo) checkpoint: it has no redshift head. Fine-tune it first "
                          f"(photoz-hpc finetune finetune.init={path})")
    if isinstance(blob, dict) and blob.get("format") == ENCODER_FORMAT:
        raise PhotozError(f"{path} is an encoder export (encoder.pt): it has no redshift head. Fine-tune it first "
                          f"(photoz-hpc finetune finetune.init={path}) and evaluate the run's best_model.pt")
    raise PhotozError(f"{path} is neither a photo-z model file nor a fine-tuning checkpoint")


def evaluate_network(net: PhotoZNet, cfg: FinetuneRunConfig, dataset: ShardedDataset | str | Path, comm: Comm,
                     device: torch.device, out_dir: str | Path | None, ids: np.ndarray | None = None,
                     title: str = "", command: str = "evaluate", extra: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Metrics of ``net`` on ``ids`` (default: every labeled galaxy) of ``dataset``; rank 0 writes the
    outputs under ``out_dir`` when given, recording ``command`` (which command owns them) and ``extra``.
    Data of other bands than the network's is an error before any work. Collective: every rank calls it; same
    dict on every rank."""
    from photoz_hpc.augment.loaders import build_loader

    if not isinstance(dataset, ShardedDataset):
        dataset = open_dataset(dataset)
    check_bands(net.survey, "the network", dataset.survey, f"dataset {dataset.root}")
    grid = net.grid
    ids = labeled_ids(dataset) if ids is None else np.asarray(ids, dtype=np.int64)
    z_all = dataset.meta["specz_redshift"]
    if not np.isfinite(z_all[ids]).all():
        raise PhotozError(f"{dataset.root}: {int((~np.isfinite(z_all[ids])).sum())} of the galaxies to evaluate "
                          "have no spectroscopic redshift")
    loader = build_loader(cfg, dataset, "eval", comm.rank, comm.world, cfg.seed, ids=ids,
                          batch_size=cfg.finetune.eval_batch_size or cfg.loader.batch_size, grid=grid)
    net = net.to(device)
    precision = resolve_precision(cfg.train.precision, device)
    pred = predict(net, loader, comm, device, precision.autocast, with_probs=True)
    z_spec = z_all[pred["index"]]
    metrics = photoz_metrics(pred["z_phot"], z_spec, z_bins=grid_z_bins(grid))
    report = {"command": command, "metrics": metrics, "dataset": str(dataset.root), "n": int(len(pred["index"])),
              "model": cfg.model.arch, "survey": net.survey.name, "bands": list(net.survey.bands),
              "redshift_grid": grid.to_dict(), "device": str(device), "world_size": comm.world, **(extra or {})}
    if out_dir is not None and comm.rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = summarize_pdfs(pred["probs"], grid)
        write_predictions(out / "predictions.csv",
                          {"index": pred["index"], **galaxy_ids(dataset, pred["index"], every=True)}, z_spec, summary)
        report["plots"] = [str(p) for p in plot_evaluation(out, pred["z_phot"], z_spec, pred["probs"], title, grid)]
        report["predictions"] = str(out / "predictions.csv")
        atomic_write_json(out / "metrics.json", report)
        log.info("evaluated %d galaxies of %s: sigma_MAD %.5f, eta %.3f%%, bias %+.5f -> %s", report["n"],
                 dataset.root, metrics["sigma_mad"], 100 * metrics["eta"], metrics["bias"], out)
    return report


def default_out_dir(checkpoint: str | Path, data: str | Path, ids_path: str | Path | None = None) -> Path:
    """``evaluate-<checkpoint stem>-<dataset name>[-<ids stem>]`` next to the checkpoint: named after what is
    evaluated, so it never is a fine-tuning run's ``eval/`` nor the evaluation of another network or dataset."""
    name = f"evaluate-{Path(checkpoint).stem}-{Path(data).resolve().name}"
    if ids_path:
        name += f"-{Path(ids_path).stem}"
    return Path(checkpoint).resolve().parent / name


def check_out_dir(out_dir: Path, checkpoint: str | Path, data: str | Path, ids_path: str | Path | None) -> None:
    """Refuse an output directory holding anything but an earlier ``evaluate`` of the same network, data and ids
    (a re-run replaces it); everything else -- a fine-tuning run's ``eval/``, a catalogue, a run directory, an
    evaluation of something else -- is another command's result and is never overwritten."""
    from photoz_hpc.run_lock import LOCK_NAME

    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise PhotozError(f"--out {out_dir} is a file, not a directory")
    entries = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(LOCK_NAME))
    if not entries:
        return
    try:
        old = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("command") == "evaluate":
        same = (_same_file(old.get("checkpoint"), checkpoint) and _same_file(old.get("dataset"), data)
                and _same_file(old.get("ids"), ids_path))
        if same:
            return
        raise PhotozError(f"--out {out_dir} holds the evaluation of {old.get('checkpoint')} on {old.get('dataset')}"
                          f"{' (ids ' + str(old.get('ids')) + ')' if old.get('ids') else ''}: write this one to "
                          "another --out (or leave --out out for a directory of its own)")
    owner = f"'{old['command']}'" if isinstance(old, dict) and old.get("command") else "another command"
    shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "")
    raise PhotozError(f"--out {out_dir} holds the outputs of {owner} ({shown}): evaluate never writes over another "
                      "command's results; choose another --out (or leave --out out for a directory of its own)")


def _same_file(a: str | Path | None, b: str | Path | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return Path(a).resolve() == Path(b).resolve()


def training_overlap(checkpoint: str | Path, dataset: ShardedDataset, ids: np.ndarray) -> dict[str, Any] | None:
    """How many of the galaxies ``ids`` of ``dataset`` trained the network: read from the fine-tuning run
    directory of ``checkpoint`` (its folder, or the one above ``checkpoints/``: ``train_ids.npy`` and
    ``labels.json``), matched by dataset id on the training dataset itself and by galaxy id (``ObjID``, or
    ``object_id``) on another one. None when the run directory or its training dataset cannot be found, or when the
    two name galaxies differently (SDSS ObjIDs against MMU ids: not comparable)."""
    ckpt = Path(checkpoint).resolve()
    for run in (ckpt.parent, ckpt.parent.parent):
        if (run / "train_ids.npy").is_file() and (run / "labels.json").is_file():
            break
    else:
        return None
    try:
        train_ids = load_ids(run / "train_ids.npy")
        train_root = Path(json.loads((run / "labels.json").read_text())["train_data"])
    except (OSError, ValueError, KeyError, PhotozError) as exc:
        log.warning("%s: cannot read its training selection (%s): not checked whether the evaluated galaxies "
                    "trained the network", run, exc)
        return None
    if train_root.resolve() == Path(dataset.root).resolve():
        common = int(np.intersect1d(ids, train_ids).size)
    else:
        try:
            train = open_dataset(train_root, verify_records=False)
        except PhotozError:
            log.warning("%s: its training dataset %s cannot be opened: not checked whether the evaluated galaxies "
                        "trained the network", run, train_root)
            return None
        common = shared_galaxies(dataset, ids, train, train_ids)
        if common is None:
            log.warning("%s: its training dataset %s names galaxies by %s, %s by %s: not checked whether the "
                        "evaluated galaxies trained the network", run, train_root, train.id_field, dataset.root,
                        dataset.id_field)
            return None
    return {"run": str(run), "n_training_galaxies": common}


def run_evaluate(checkpoint: str | Path, data: str | Path, out_dir: str | Path | None, ids_path: str | Path | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """The ``evaluate`` command: load, check the output directory and the training overlap, set up device and
    communicator, evaluate, write outputs."""
    from photoz_hpc.run_lock import RunDir
    from photoz_hpc.train.runtime import run_with_comm

    net, cfg, meta = load_network(checkpoint, overrides)
    (dataset,) = check_inputs(net, cfg, [data], f"the network {checkpoint}")  # its bands: before any work
    ids = load_ids(Path(ids_path)) if ids_path else None
    out_dir = Path(out_dir) if out_dir else default_out_dir(checkpoint, data, ids_path)
    check_out_dir(out_dir, checkpoint, data, ids_path)
    overlap = training_overlap(checkpoint, dataset, labeled_ids(dataset) if ids is None else ids)
    if overlap and overlap["n_training_galaxies"]:
        log.warning("%d of the evaluated galaxies trained this network (%s/train_ids.npy): their metrics are "
                    "optimistic; evaluate held-out galaxies (e.g. --ids %s/val_ids.npy)",
                    overlap["n_training_galaxies"], overlap["run"], overlap["run"])
    extra = {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": meta["checkpoint_sha256"],
             "ids": str(Path(ids_path).resolve()) if ids_path else None,
             "n_training_galaxies": overlap["n_training_galaxies"] if overlap else None}

    def body(cfg, comm, device, flag):
        return evaluate_network(net, cfg, dataset, comm, device, out_dir, ids, title=Path(checkpoint).name,
                                extra=extra)

    report = run_with_comm(cfg, None, body, hold=RunDir(out_dir, "evaluate"))
    report["checkpoint"] = str(checkpoint)
    report["source"] = {k: v for k, v in meta.items() if isinstance(v, (str, int, float)) or v is None}
    return report
