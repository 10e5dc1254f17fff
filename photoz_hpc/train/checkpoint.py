"""Atomic, self-validating checkpoints and ``resume: auto``.

Rank 0 writes ``<out_dir>/checkpoints/ckpt_<step>.pt`` through a temporary file + fsync + rename,
so a crash mid-write leaves the previous checkpoint intact. Each file carries a format tag, its task
(``pretrain`` or ``finetune``) and its step; a file that fails to load (truncated, corrupt) is skipped
with a warning; a file of another task, or one that holds pickled objects (``torch_files``), is an error
naming it (never silently used or skipped).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from photoz_hpc.errors import PhotozError
from photoz_hpc.logs import get_logger
from photoz_hpc.torch_files import UnsafePickleError, read_torch_file, write_torch_file

log = get_logger(__name__)

FORMAT = "photoz-hpc/checkpoint/2"
#: Format 1 held MoCo pretraining only; it still loads, as a 'pretrain' checkpoint.
_LEGACY_FORMATS = {"photoz-hpc/moco-checkpoint/1": "pretrain"}
TASKS = ("pretrain", "finetune")
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` atomically as ``ckpt_<step>.pt``; keep the newest ``keep`` files."""
    directory = Path(directory)
    path = directory / f"ckpt_{step:09d}.pt"
    state = {"format": FORMAT, "step": step, **state}
    if state.get("task") not in TASKS:
        raise PhotozError(f"checkpoint state for {path} must name its task, one of {list(TASKS)}")
    write_torch_file(path, state)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files, newest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_task(state: Any) -> str | None:
    """The task a loaded checkpoint belongs to, or None if it is not a photoz-hpc checkpoint."""
    if not isinstance(state, dict) or "step" not in state:
        return None
    if state.get("format") == FORMAT:
        return state.get("task") if state.get("task") in TASKS else None
    return _LEGACY_FORMATS.get(state.get("format"))


def load_checkpoint(path: str | Path, task: str | None = None) -> dict[str, Any]:
    """Load and validate one checkpoint (of ``task`` when given); ``PhotozError`` says why it is unusable."""
    path = Path(path)
    return validate_checkpoint(read_torch_file(path, "checkpoint"), path, task)


def validate_checkpoint(state: Any, path: Path, task: str | None = None) -> dict[str, Any]:
    """``load_checkpoint`` on a blob already read from ``path``."""
    kind = checkpoint_task(state)
    if kind is None:
        raise PhotozError(f"checkpoint {path} is not a photoz-hpc training checkpoint")
    if task is not None and kind != task:
        raise WrongCheckpointKind(f"checkpoint {path} is a {kind} checkpoint, but a {task} checkpoint is needed here")
    state["task"] = kind
    return state


class WrongCheckpointKind(PhotozError):
    """A valid checkpoint of another task (never skipped silently by ``resume: auto``)."""


def find_latest_valid(directory: str | Path, task: str | None = None) -> tuple[Path | None, dict[str, Any] | None]:
    """Newest checkpoint that loads; corrupt ones are skipped with a warning, another task's or one holding pickled
    objects is an error (skipping it would silently resume from an older one)."""
    for path in list_checkpoints(directory):
        try:
            return path, load_checkpoint(path, task)
        except (WrongCheckpointKind, UnsafePickleError):
            raise
        except PhotozError as exc:
            log.warning("skipping %s", exc)
    return None, None


def export_checkpoint_encoder(path: str | Path, out_path: str | Path) -> Path:
    """``export-encoder``: the encoder file of a pretraining checkpoint (another kind is an error)."""
    from photoz_hpc.models.export import export_encoder

    return export_encoder(load_checkpoint(path, "pretrain"), out_path)


def read_pretrained_encoder(path: str | Path, what: str) -> dict[str, Any]:
    """The pretrained encoder a MoCo pretraining checkpoint or an ``encoder.pt`` holds:
    ``{'config'`` (the run's config values; ``model`` and, when it has them, ``augment`` for an export),
    ``'trunk'`` (ResNet state dict),
    ``'head'`` (projection-head state dict, or None),
    ``'survey'`` (the ``Survey`` of its training data: the bands its stem reads; none recorded: SDSS)}. ``what``
    names the caller's argument in errors (e.g. ``finetune.init``); a fine-tuning checkpoint or anything else is an
    error naming the file."""
    from photoz_hpc.models.export import ENCODER_FORMAT, HEAD_PREFIX, encoder_state_from_moco
    from photoz_hpc.models.records import recorded_survey

    path = Path(path)
    blob = read_torch_file(path, what)
    if isinstance(blob, dict) and blob.get("format") == ENCODER_FORMAT:
        config = {"model": blob["model"]} | ({"augment": blob["augment"]} if blob.get("augment") else {})
        return {"config": config, "trunk": blob["state_dict"], "head": blob.get("projection_head"),
                "survey": recorded_survey(blob, f"{what} {path}")}
    kind = checkpoint_task(blob)
    if kind == "pretrain":
        head = {k[len(HEAD_PREFIX):]: v for k, v in blob["model"].items() if k.startswith(HEAD_PREFIX)}
        return {"config": blob["config"], "trunk": encoder_state_from_moco(blob["model"]), "head": head or None,
                "survey": recorded_survey(blob, f"{what} {path}")}
    if kind == "finetune":
        raise WrongCheckpointKind(f"{what} {path} is a fine-tuning checkpoint, not a MoCo pretraining checkpoint or "
                                  "its encoder.pt")
    raise PhotozError(f"{what} {path} is neither a MoCo pretraining checkpoint nor an encoder export")


def finetune_checkpoint_network(blob: Any, path: Path):
    """(network in eval mode, its ``FinetuneRunConfig``, validated state) of a fine-tuning checkpoint already read
    from ``path``: the stem for its recorded bands, the head for its recorded grid; weights that do not fit are an
    error naming the file. The one reader of a checkpoint's network (``evaluate``, ``predict``, ``export-model``)."""
    from photoz_hpc.config import FinetuneRunConfig, config_from_dict
    from photoz_hpc.models.photoz_net import build_photoz_net
    from photoz_hpc.models.records import recorded_grid, recorded_survey

    state = validate_checkpoint(blob, path, "finetune")
    cfg = config_from_dict(state["config"], FinetuneRunConfig)
    survey, grid = recorded_survey(state, str(path)), recorded_grid(state, str(path))
    net = build_photoz_net(cfg.model, survey, grid)
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise PhotozError(f"{path}: the weights do not fit a {cfg.model.arch}/{cfg.model.width} network for bands "
                          f"{list(survey.bands)} and {grid.n_bins} redshift bins ({exc})") from None
    return net.eval(), cfg, state
