"""Embedding export: the query encoder's ResNet trunk as a small stand-alone file.

``export_encoder`` writes ``{'format', 'model' (ModelConfig as dict), 'state_dict', 'projection_head',
'augment', 'survey'}``: ``augment`` is the pretraining's AugmentConfig (as a dict, crop and jitter resolved to
numbers), the view settings (crop size, dereddening) the encoder was trained with, so that ``embed`` sees
galaxies as the encoder did; ``survey`` the training data's survey (``Survey.to_dict()``: the bands the stem
reads). The head, ``augment`` and ``survey`` are absent in files written before they were added (no survey: SDSS).
``load_encoder`` rebuilds the ResNet (plain BatchNorm, eval mode, the stem for the recorded bands) for
``photoz-hpc embed`` and fine-tuning. ``embed`` maps (N, bands, S, S) cutouts to (N, feature_dim) representations.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from photoz_hpc.errors import PhotozError
from photoz_hpc.models.records import default_survey, recorded_survey, survey_record
from photoz_hpc.models.resnet import ResNet, build_encoder
from photoz_hpc.survey import Survey
from photoz_hpc.torch_files import read_torch_file, write_torch_file

ENCODER_FORMAT = "photoz-hpc/encoder/1"
HEAD_PREFIX = "encoder_q.1."


def encoder_state_from_moco(moco_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ResNet trunk's entries of a MoCo state dict (``encoder_q.0.*``), renamed."""
    prefix = "encoder_q.0."
    return {k[len(prefix):]: v for k, v in moco_state.items() if k.startswith(prefix)}


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # CPU, contiguous (NCHW) tensors: loadable on any machine with weights_only=True and no map_location
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def save_encoder(trunk_state: dict[str, torch.Tensor], head_state: dict[str, torch.Tensor] | None, model_cfg,
                 out_path: str | Path, step: int | None = None, augment_cfg=None, survey: Survey | None = None) -> Path:
    """Write the encoder file atomically (plain data): the trunk (``load_encoder``), the query projection head
    (``embed``'s 128-d output; keys 0.* / 2.*), the view settings it was trained with, if given, and the survey of
    its training data (None: the default survey, SDSS; the stem's input channels must be its bands)."""
    out_path = Path(out_path)
    survey = survey or default_survey()
    stem = trunk_state.get("conv1.weight")
    if stem is not None and stem.ndim == 4 and stem.shape[1] != survey.n_bands:
        raise PhotozError(f"{out_path}: the encoder's stem reads {stem.shape[1]} bands but its survey "
                          f"'{survey.name}' has {survey.n_bands} {list(survey.bands)}")
    blob = {"format": ENCODER_FORMAT, "model": _as_dict(model_cfg), "state_dict": _cpu(trunk_state), "step": step,
            **survey_record(survey)}
    if head_state:
        blob["projection_head"] = _cpu(head_state)
    if augment_cfg is not None:
        blob["augment"] = _as_dict(augment_cfg)
    return write_torch_file(out_path, blob)


def export_moco_encoder(moco, model_cfg, out_path: str | Path, step: int | None = None, augment_cfg=None) -> Path:
    """Export a live ``MoCo`` module's query trunk (``MoCo.encoder``, whose ``survey`` is recorded), projection
    head and view settings (pass them resolved: ``augment.draws.resolve_augment``)."""
    return save_encoder(moco.encoder.state_dict(), moco.encoder_q[1].state_dict(), model_cfg, out_path, step,
                        augment_cfg, moco.encoder.survey)


def export_encoder(source: dict, out_path: str | Path, model_cfg=None) -> Path:
    """Export from a loaded pretraining checkpoint dict (``model`` = MoCo state dict, ``config`` whose
    ``augment`` section is kept as the encoder's view settings, ``survey`` when it records one)."""
    model_cfg = source["config"]["model"] if model_cfg is None else model_cfg
    head = {k[len(HEAD_PREFIX):]: v for k, v in source["model"].items() if k.startswith(HEAD_PREFIX)}
    return save_encoder(encoder_state_from_moco(source["model"]), head, model_cfg, out_path, source.get("step"),
                        source["config"].get("augment"), recorded_survey(source, "pretraining checkpoint"))


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> ResNet:
    """The exported ResNet trunk, in eval mode, its stem built for the recorded bands (``.survey``; none: SDSS)."""
    blob = read_torch_file(path, "encoder file", map_location)
    if not isinstance(blob, dict) or blob.get("format") != ENCODER_FORMAT:
        raise PhotozError(f"{path} is not a photoz-hpc encoder export")
    survey = recorded_survey(blob, str(path))
    encoder = build_encoder(SimpleNamespace(**blob["model"]), survey=survey)
    try:
        encoder.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise PhotozError(f"{path}: the encoder weights do not fit a {blob['model']} trunk for the "
                          f"{survey.n_bands} bands {list(survey.bands)} it records ({exc})") from None
    return encoder.eval()


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Representations (N, feature_dim) of (N, bands, S, S) cutouts (a tensor or a numpy array, read as float32),
    in fp32 on the encoder's device."""
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    stem = getattr(getattr(encoder, "conv1", None), "in_channels", None)  # the bands the encoder reads
    if images.ndim != 4:
        raise PhotozError(f"embed: images must be (N, {stem or 'bands'}, S, S), got shape {tuple(images.shape)}")
    if stem is not None and images.shape[1] != stem:
        raise PhotozError(f"embed: images have {images.shape[1]} bands but the encoder reads {stem}")
    device = next(encoder.parameters()).device
    out = [encoder(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, encoder.feature_dim)
