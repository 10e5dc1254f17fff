"""``photoz-hpc export-model``: a photo-z network as a shareable model directory, with what is known about it.

Why: a run directory holds the weights, but also what a reader needs to trust and use them: the training config
and data, the validation and test metrics and the commands that produced them. ``export_model`` reads the network
from any file that holds one (``best_model.pt``, ``photoz_model.pt``, a fine-tuning checkpoint, an
``import-checkpoint`` file), collects what its run directory records, and writes the directory of
``models.model_files`` (safetensors weights, model card, README, checksums).

What counts as recorded, and only for this very network -- this version of the file: a ``metrics.json`` counts only
when the digest it records of the network it evaluated (``checkpoint_sha256``, ``models.model_files.model_digest``)
equals the exported file's (a ``best_model.pt`` replaced after an evaluate, e.g. by a rerun, keeps none of the old
metrics); one without a digest (written before digests were recorded) or with another is left out, and the card
says which and why (``metrics.excluded``):

* validation: the run's ``eval/metrics.json`` (``finetune``'s final evaluation of ``best_model.pt``) when exporting
  ``best_model.pt``; else the validation the file itself records (``val_metrics``; a checkpoint's ``last_val`` when
  taken at its step);
* test: every ``evaluate`` output (``test/``, ``evaluate-*/``) next to the file whose ``checkpoint`` is this file;
* training data: ``labels.json`` (counts, split), the training config, and the dataset identity a fine-tuning
  checkpoint of the run records (a hash of the manifest's shard checksums; ``train.resume``).

Anything else is ``"not recorded"``. Encoders (``encoder.pt``, MoCo checkpoints) have no redshift head and are not
exported here: they are shared as ``encoder.pt``, plain data that ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from photoz_hpc.config import FinetuneRunConfig, config_from_dict
from photoz_hpc.errors import PhotozError
from photoz_hpc.logs import get_logger
from photoz_hpc.models.export import ENCODER_FORMAT
from photoz_hpc.models.model_files import NOT_RECORDED, is_model_dir, read_file, write_model_dir
from photoz_hpc.models.photoz_net import PHOTOZ_MODEL_FORMAT, PhotoZNet, photoz_model_from_blob
from photoz_hpc.torch_files import read_torch_file
from photoz_hpc.train.checkpoint import (
    checkpoint_dir,
    checkpoint_task,
    finetune_checkpoint_network,
    list_checkpoints,
)
from photoz_hpc.train.finetune import BEST_MODEL, FINAL_MODEL
from photoz_hpc.train.surveys import resolve_run_config

log = get_logger(__name__)

#: The metrics a card keeps (``photoz_metrics``' overall values; per-bin tables stay in the run directory).
METRIC_KEYS = ("sigma_mad", "eta", "bias", "bias_median", "outlier_rate_lsst", "n")


@dataclasses.dataclass
class Source:
    """The network read from a file and what the file says about it."""

    path: Path
    net: PhotoZNet
    model: dict[str, Any]
    config: dict[str, Any] | None  # the training config (FinetuneRunConfig as a dict), when recorded
    kind: str
    blob: dict[str, Any]  # the file's entries other than weights
    digest: str  # sha256 of the bytes the network was read from (model_digest of the file)


def read_source(path: str | Path) -> Source:
    """The photo-z network of a model file or fine-tuning checkpoint; an encoder, a MoCo checkpoint or anything else
    is a ``PhotozError`` saying what to export instead."""
    path = Path(path)
    if path.is_dir():
        hint = " (already an exported model directory)" if is_model_dir(path) else ""
        raise PhotozError(f"{path} is a directory{hint}: export-model reads a photo-z model file or a fine-tuning "
                          "checkpoint")
    data, digest = read_file(path, "photo-z model or checkpoint")  # read once: hashed and parsed from these bytes
    blob = read_torch_file(path, "photo-z model or checkpoint", data=data)
    del data
    if isinstance(blob, dict) and blob.get("format") == PHOTOZ_MODEL_FORMAT:
        net, meta = photoz_model_from_blob(blob, path)
        kind = "photo-z network imported by import-checkpoint" if "source" in meta else "photo-z model file"
        rest = {k: v for k, v in meta.items() if k != "state_dict"}
        return Source(path, net, dict(meta["model"]), meta.get("config"), kind, rest, digest)
    task = checkpoint_task(blob)
    if task == "finetune":
        net, cfg, state = finetune_checkpoint_network(blob, path)
        rest = {k: v for k, v in state.items() if k in ("step", "best", "last_val", "datasets", "task")}
        return Source(path, net, dataclasses.asdict(cfg.model), state["config"], "fine-tuning checkpoint", rest,
                      digest)
    if task == "pretrain" or (isinstance(blob, dict) and blob.get("format") == ENCODER_FORMAT):
        what = "a MoCo pretraining checkpoint" if task == "pretrain" else "an encoder export (encoder.pt)"
        raise PhotozError(f"{path} is {what}: it has no redshift head, and export-model writes photo-z networks. "
                          f"Fine-tune it (photoz-hpc finetune finetune.init={path}) and export the run's "
                          "best_model.pt; an encoder is shared as encoder.pt itself (plain data: torch.load(..., "
                          "weights_only=True) reads it, photoz-hpc embed and finetune.init take it)")
    raise PhotozError(f"{path} is neither a photo-z model file nor a fine-tuning checkpoint")


def run_dir_of(path: Path) -> Path | None:
    """The fine-tuning run directory the file belongs to (``best_model.pt`` / ``photoz_model.pt`` in it, or
    ``checkpoints/ckpt_*.pt`` under it), or None."""
    if path.name in (BEST_MODEL, FINAL_MODEL):
        run = path.parent
    elif path.parent.name == checkpoint_dir(".").name and path.name.startswith("ckpt_"):
        run = path.parent.parent
    else:
        return None
    return run if (run / "config.yaml").is_file() or (run / "summary.json").is_file() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _metrics(m: Any) -> dict[str, Any]:
    return {k: m[k] for k in METRIC_KEYS if isinstance(m, dict) and k in m}


def _finetune_command(run: Path | None) -> str:
    if run is not None and (run / "config.yaml").is_file():
        return f"photoz-hpc finetune --config {shlex.quote(str(run / 'config.yaml'))}"
    return NOT_RECORDED


#: why a metrics.json of this network's file is left out of the card
NO_DIGEST = "no digest recorded"
OTHER_VERSION = "evaluated another version of the file"


def digest_mismatch(report: dict[str, Any], src: Source) -> str | None:
    """None when ``report`` (a metrics.json) records the digest of the bytes exported, else why it is left out:
    ``NO_DIGEST`` (written before photoz-hpc recorded it: which version it evaluated is unknown) or
    ``OTHER_VERSION`` (the file was replaced after the evaluation)."""
    recorded = report.get("checkpoint_sha256")
    if not isinstance(recorded, str) or not recorded:
        return NO_DIGEST
    return None if recorded == src.digest else OTHER_VERSION


def _excluded(file: Path, metric_set: str, why: str, report: dict[str, Any]) -> dict[str, Any]:
    return {"set": metric_set, "file": str(file), "why": why, "recorded_sha256": report.get("checkpoint_sha256")}


def validation_metrics(src: Source, run: Path | None, excluded: list[dict[str, Any]] | None = None
                       ) -> dict[str, Any] | str:
    """The validation metrics of this network and the command that produced them (see the module docstring); a run's
    eval/metrics.json of another version of the file is appended to ``excluded`` with why."""
    command = _finetune_command(run)
    if run is not None and src.path.name == BEST_MODEL:
        file = run / "eval" / "metrics.json"
        report = _read_json(file)
        if report and report.get("command") == "finetune" and "metrics" in report:
            why = digest_mismatch(report, src)
            if why is None:
                return {"source": "final evaluation of best_model.pt", "dataset": report.get("dataset", NOT_RECORDED),
                        "metrics": _metrics(report["metrics"]), "command": command, "file": str(file)}
            if excluded is not None:
                excluded.append(_excluded(file, "validation", why, report))
    val = src.blob.get("val_metrics") if src.kind == "photo-z model file" else None
    if src.kind == "fine-tuning checkpoint":
        last = src.blob.get("last_val")
        val = last if isinstance(last, dict) and last.get("step") == src.blob.get("step") else None
    if isinstance(val, dict) and _metrics(val):
        cfg = src.config or {}
        dataset = (cfg.get("finetune") or {}).get("val_data") or (cfg.get("data") or {}).get("path", NOT_RECORDED)
        return {"source": f"validation during fine-tuning (epoch {val.get('epoch', src.blob.get('epoch'))}, "
                          f"step {val.get('step', src.blob.get('step'))})",
                "dataset": dataset, "metrics": _metrics(val), "command": command}
    return NOT_RECORDED


def _same_file(recorded: str, path: Path, report_dir: Path) -> bool:
    """Whether an evaluation's recorded checkpoint is ``path`` (or, in a moved run, a file of that name next to the
    evaluation's directory, where evaluate writes by default)."""
    rec = Path(recorded)
    try:
        if rec.exists() and rec.resolve() == path.resolve():
            return True
    except OSError:
        return False
    return not rec.exists() and rec.name == path.name and report_dir.parent.resolve() == path.parent.resolve()


def evaluations(src: Source, run: Path | None, excluded: list[dict[str, Any]] | None = None
                ) -> list[dict[str, Any]] | str:
    """Every ``evaluate`` output of this network found next to it (``test/``, ``evaluate-*/``) with its command; one of
    the same path but another version of the file (or of unknown version) is appended to ``excluded`` with why."""
    found = []
    folders = {src.path.parent, *([run] if run is not None else [])}
    for report_file in sorted({p for d in folders for p in d.glob("*/metrics.json")}):
        report = _read_json(report_file)
        if not report or report.get("command") != "evaluate" or not report.get("checkpoint"):
            continue
        if not _same_file(str(report["checkpoint"]), src.path, report_file.parent):
            continue
        why = digest_mismatch(report, src)
        if why is not None:
            if excluded is not None:
                excluded.append(_excluded(report_file, "test", why, report))
            continue
        cmd = ["photoz-hpc", "evaluate", "--checkpoint", str(report["checkpoint"]), "--data",
               str(report.get("dataset")), "--out", str(report_file.parent)]
        if report.get("ids"):
            cmd += ["--ids", str(report["ids"])]
        found.append({"dataset": report.get("dataset", NOT_RECORDED), "ids": report.get("ids"),
                      "n_training_galaxies": report.get("n_training_galaxies"), "metrics": _metrics(report.get("metrics")),
                      "command": shlex.join(cmd), "file": str(report_file)})
    return found or NOT_RECORDED


def dataset_identity(src: Source, run: Path | None) -> dict[str, Any] | str:
    """The dataset identities a fine-tuning checkpoint of this run records (the exported one, else the newest)."""
    datasets = src.blob.get("datasets")
    if not isinstance(datasets, dict) and run is not None:
        for ckpt in list_checkpoints(checkpoint_dir(run))[:1]:
            try:
                state = read_torch_file(ckpt, "checkpoint")
            except PhotozError as exc:
                log.warning("not read for the dataset identity: %s", exc)
                continue
            same = isinstance(state, dict) and (state.get("config") or {}).get("data") == (src.config or {}).get("data")
            datasets = state.get("datasets") if same else None
    if isinstance(datasets, dict) and any(datasets.values()):
        return {k: v for k, v in datasets.items() if v}
    return NOT_RECORDED


def training_record(src: Source, run: Path | None) -> dict[str, Any]:
    """What the network was trained on, as far as the file and its run record it."""
    if "source" in src.blob and src.config is None:  # import-checkpoint: the paper authors' network
        return {"origin": "the paper authors' released network (Hayat et al. 2021), imported with photoz-hpc "
                          "import-checkpoint", "imported_from": src.blob["source"],
                "dataset": "SDSS (the paper's training set; not recorded in the file)", "n_train": NOT_RECORDED}
    cfg = src.config or {}
    ft, data = cfg.get("finetune") or {}, cfg.get("data") or {}
    labels = (_read_json(run / "labels.json") if run is not None else None) or {}
    init = ft.get("init", NOT_RECORDED)
    method = src.blob.get("method") or (
        NOT_RECORDED if not ft else "linear_probe" if ft.get("freeze_backbone")
        else "supervised" if str(init).lower() == "none" else "ssl")
    return {"method": method, "init": init,
            "dataset": labels.get("train_data") or data.get("path", NOT_RECORDED),
            "dataset_identity": dataset_identity(src, run),
            "validation_data": labels.get("val_data") or ft.get("val_data") or NOT_RECORDED,
            "split": labels.get("split", NOT_RECORDED),
            "label_fraction": labels.get("label_fraction", ft.get("label_fraction", NOT_RECORDED)),
            "n_labeled": labels.get("n_labeled", NOT_RECORDED), "n_train": labels.get("n_train", NOT_RECORDED),
            "n_val": labels.get("n_val", NOT_RECORDED),
            "step": src.blob.get("step", NOT_RECORDED), "epoch": src.blob.get("epoch", NOT_RECORDED),
            "run_dir": str(run) if run is not None else NOT_RECORDED}


def input_view(src: Source) -> dict[str, Any]:
    """The evaluation view the network expects (crop, dereddening), resolved for its survey."""
    values = src.config if src.config else {"model": src.model}
    try:
        cfg = resolve_run_config(config_from_dict(values, FinetuneRunConfig), src.net.survey)
    except PhotozError:
        return {"crop_size": NOT_RECORDED, "deredden": NOT_RECORDED}
    return {"crop_size": cfg.augment.crop_size, "deredden": cfg.augment.deredden}


def export_model(source: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Export the photo-z network of ``source`` as a model directory at ``out_dir`` (``models.model_files``);
    returns a short report (output, files, bands, grid, what was recorded)."""
    src = read_source(source)
    run = run_dir_of(src.path) if src.kind != "photo-z network imported by import-checkpoint" else None
    excluded: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {"validation": validation_metrics(src, run, excluded),
                               "test": evaluations(src, run, excluded)}
    if excluded:
        metrics["excluded"] = excluded
        for e in excluded:
            log.warning("%s: not in the model card (%s metrics): %s", e["file"], e["set"], e["why"])
    origin = {"file": str(src.path.resolve()), "sha256": src.digest, "kind": src.kind}
    origin.update({k: src.blob[k] for k in ("step", "epoch") if isinstance(src.blob.get(k), (int, float))})
    card = {"input": input_view(src), "training": training_record(src, run), "metrics": metrics, "source": origin,
            "config": src.config}
    out = write_model_dir(src.net, src.model, out_dir, card, overwrite=overwrite)
    log.info("exported %s (%s) -> %s", src.path, src.kind, out)
    return {"out": str(out), "source": str(src.path), "kind": src.kind, "bands": list(src.net.survey.bands),
            "survey": src.net.survey.name, "redshift_grid": src.net.grid.to_dict(),
            "validation": "recorded" if isinstance(metrics["validation"], dict) else NOT_RECORDED,
            "test": len(metrics["test"]) if isinstance(metrics["test"], list) else NOT_RECORDED,
            "excluded": [f"{e['file']}: {e['why']}" for e in excluded],
            "files": sorted(p.name for p in out.iterdir())}
