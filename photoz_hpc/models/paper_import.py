"""Import the paper authors' released PyTorch checkpoints (Hayat et al. 2021) as photoz-hpc files.

Why: the authors published a MoCo v2 pretrained ResNet-50 (``pretrained_paper_model.pth.tar``) and a
fine-tuned photo-z ResNet-50 (``photoz_finetuned_model.pth.tar``, also the supervised baseline); with
them our embedding, fine-tuning and evaluation code can start from the paper's weights.

Their layout (read in github.com/mahayat/ssl-sky-surveys, not copied):

* ``models/resnet.py``: torchvision's ResNet with ``conv1 = Conv2d(5, 64, 7, stride=1, padding=3,
  bias=False)``, the max-pool removed (no module, no keys) and ``fc = Linear(2048, num_classes)``,
  180 classes for photo-z (no dropout, no extra layers). Module names are the same as ours.
* ``train.py`` (fine-tuning / supervised): ``{'iters', 'epoch', 'model_state', 'optimizer_state_dict'}``
  where ``model_state`` is the DDP-wrapped network's state dict (``module.`` prefix).
* MoCo pretraining: that code is not released. ``utils/load_trained_model.py`` reads ``state_dict``
  (or ``model_state``), keeps ``module.encoder_q.*`` and expects ``fc.weight`` / ``fc.bias`` to be
  absent, which fits the facebookresearch/moco ``main_moco.py`` layout that we assume:
  ``{'epoch', 'arch', 'state_dict', 'optimizer'}`` with ``encoder_{q,k}.<resnet>``, the MLP head
  ``encoder_{q,k}.fc.0`` / ``fc.2`` (Linear, ReLU, Linear) and the buffers ``queue`` (dim, K), ``queue_ptr``.

Every source tensor must map to a tensor of our freshly built network (arch, width and stem kernel
inferred from the source) with the same shape, and every tensor of ours must be provided; otherwise a
``PhotozError`` names the file and lists the keys. A MoCo checkpoint becomes our encoder export
(``photoz-hpc/encoder/1``, the trunk) with the query projection head kept under ``projection_head``;
the key encoder and the queue are checked, then dropped (pretraining-only state). A fine-tuned
model becomes our photo-z model file (``save_photoz_model``).

The authors' loader feeds ``np.swapaxes(image, 0, 2)`` through ``ToTensor``, i.e. (C, W, H) cutouts;
``transpose_hw=True`` transposes every conv kernel so that our (C, H, W) inputs give their outputs.

SDSS only: the paper's networks read the 5 SDSS bands ugriz and predict its 180 bins over [0, 0.4). The files
written record that survey and grid (``models.records``), so they are refused on data of other bands.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from photoz_hpc.config import ModelConfig
from photoz_hpc.errors import PhotozError
from photoz_hpc.models.export import ENCODER_FORMAT
from photoz_hpc.models.moco import MoCo
from photoz_hpc.models.photoz_net import PHOTOZ_MODEL_FORMAT, PhotoZNet, save_photoz_model
from photoz_hpc.models.records import survey_record
from photoz_hpc.models.resnet import ARCHS, ResNet
from photoz_hpc.survey import SDSS_GRID, Survey, load_survey
from photoz_hpc.torch_files import read_torch_file, write_torch_file

#: What each kind is, for messages.
KINDS = {"moco": "MoCo pretraining checkpoint", "photoz": "fine-tuned photo-z model"}
#: Where a checkpoint dict keeps its state dict: main_moco.py, the authors' train.py.
STATE_KEYS = ("state_dict", "model_state")
DDP_PREFIX = "module."
_TRUNK = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
_MLP = re.compile(r"fc\.(\d+)\.(weight|bias)")
_ENCODERS = ("encoder_q", "encoder_k")
_SHOW = 8  # keys listed per problem in an error message


def paper_survey() -> Survey:
    """The paper's data: SDSS ugriz (the authors' stem reads those 5 bands; their head the 180-bin grid
    ``SDSS_GRID``). An imported model records both, so it is refused on data of other bands."""
    return load_survey("sdss")



def load_source(src: str | Path, trust_pickle: bool = False) -> Any:
    """The source file on the CPU, read without running code unless ``trust_pickle`` (``torch_files``)."""
    return read_torch_file(src, "checkpoint", trust_pickle=trust_pickle or None)


def unwrap(blob: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, scalar metadata such as epoch/arch) of a checkpoint dict or a bare state dict."""
    if not isinstance(blob, Mapping):
        raise PhotozError(f"{name}: expected a checkpoint dict or a state dict, found {type(blob).__name__}")
    fmt = blob.get("format")
    if isinstance(fmt, str) and fmt.startswith("photoz-hpc/"):
        raise PhotozError(f"{name} is already a photoz-hpc file (format {fmt!r}); nothing to import")
    for key in STATE_KEYS:
        if isinstance(blob.get(key), Mapping):
            # plain Python values (numpy's float64 and str_ subclass float and str), so the output is plain data
            meta = {str(k): type_(v) for k, v in blob.items() for type_ in (str, int, float)
                    if isinstance(v, type_) and not isinstance(v, bool)}
            return _tensors(blob[key], f"{name} ['{key}']"), meta
    if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return dict(blob), {}
    raise PhotozError(
        f"{name}: neither a checkpoint (no {' or '.join(repr(k) for k in STATE_KEYS)} entry) nor a bare "
        f"state dict; top-level keys: {_few(sorted(map(str, blob)))}"
    )


def strip_ddp_prefix(state: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Drop DistributedDataParallel's ``module.`` prefix (returns the new dict, whether any key had it)."""
    out: dict[str, torch.Tensor] = {}
    had = False
    for key, value in state.items():
        new = key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key
        had |= new != key
        if new in out:
            raise PhotozError(f"{name}: key {new!r} appears both with and without the DDP prefix {DDP_PREFIX!r}")
        out[new] = value
    return out, had


def detect_kind(state: Mapping[str, torch.Tensor], name: str) -> str:
    """'moco' (``encoder_q.*`` keys) or 'photoz' (a plain ResNet with ``conv1.weight``)."""
    if any(k.startswith(tuple(e + "." for e in _ENCODERS)) for k in state):
        return "moco"
    if "conv1.weight" in state:
        return "photoz"
    raise PhotozError(
        f"{name}: unrecognised layout: neither a MoCo checkpoint ('encoder_q.*' keys) nor a ResNet "
        f"photo-z model ('conv1.weight', 'fc.weight'); keys: {_few(sorted(state))}"
    )


def rename(kind: str, key: str) -> str | None:
    """Our name for a source key (``module.`` already stripped), or None when it has no counterpart."""
    if kind == "photoz":
        if key.startswith(_TRUNK):
            return "encoder." + key
        return {"fc.weight": "head.weight", "fc.bias": "head.bias"}.get(key)
    if key in ("queue", "queue_ptr"):
        return key
    enc, _, rest = key.partition(".")
    if enc in _ENCODERS:
        if rest.startswith(_TRUNK):
            return f"{enc}.0.{rest}"
        if m := _MLP.fullmatch(rest):
            return f"{enc}.1.{m[1]}.{m[2]}"
    return None


def source_name(kind: str, ours: str) -> str:
    """Inverse of ``rename``: the source key that would provide our key (for 'missing' messages)."""
    if kind == "photoz":
        return ours.removeprefix("encoder.") if ours.startswith("encoder.") else "fc." + ours.removeprefix("head.")
    enc, _, rest = ours.partition(".")
    if enc not in _ENCODERS:
        return ours
    return f"{enc}.{rest[2:]}" if rest.startswith("0.") else f"{enc}.fc.{rest[2:]}"


def infer_trunk(state: Mapping[str, torch.Tensor], prefix: str, name: str) -> dict[str, Any]:
    """arch, width and stem kernel of the ResNet under ``prefix`` (from the stem shape and block counts)."""
    w = state.get(prefix + "conv1.weight")
    if w is None or w.ndim != 4:
        raise PhotozError(f"{name}: no 4-d stem convolution weight '{prefix}conv1.weight'")
    width, cin, kh, kw = (int(s) for s in w.shape)
    sdss = paper_survey()
    if cin != sdss.n_bands:
        raise PhotozError(f"{name}: the stem convolution takes {cin} input channels; import-checkpoint reads the paper's "
                          f"SDSS checkpoints only, whose stem takes the {sdss.n_bands} bands "
                          f"{''.join(sdss.bands)} (other surveys: train with photoz-hpc pretrain/finetune)")
    if kh != kw or kh % 2 == 0:
        raise PhotozError(f"{name}: stem kernel {kh}x{kw} is not square and odd (ours pads by kernel // 2)")
    blocks = []
    for i in range(1, 5):
        pat = re.compile(rf"{re.escape(prefix)}layer{i}\.(\d+)\.")
        blocks.append(len({m[1] for k in state if (m := pat.match(k))}))
    block = "bottleneck" if prefix + "layer1.0.conv3.weight" in state else "basic"
    # No match (e.g. a block missing): build the paper's ResNet-50 and let the key check list the gaps.
    arch = next((a for a, (b, n) in ARCHS.items() if b == block and n == tuple(blocks)), "resnet50")
    return {"arch": arch, "width": width, "stem_kernel": kh}


def _dim(state: Mapping[str, torch.Tensor], key: str, axis: int, default: int) -> int:
    t = state.get(key)
    return int(t.shape[axis]) if isinstance(t, torch.Tensor) and t.ndim == 2 else default


def build_target(kind: str, state: Mapping[str, torch.Tensor], name: str) -> tuple[nn.Module, ModelConfig]:
    """Our freshly built network for the source (PhotoZNet, or MoCo sized by the source's head and
    queue), and the ModelConfig written into the output file."""
    prefix = "encoder_q." if kind == "moco" else ""
    trunk = infer_trunk(state, prefix, name)
    sdss = paper_survey()
    encoder = ResNet(trunk["arch"], trunk["width"], sdss.n_bands, trunk["stem_kernel"])
    encoder.survey = sdss
    feat = encoder.feature_dim
    if kind == "photoz":  # the paper's grid: a head of another size is a shape mismatch (match_state)
        return PhotoZNet(encoder, SDSS_GRID), ModelConfig(**trunk)
    hidden = _dim(state, "encoder_q.fc.0.weight", 0, feat)
    dim = _dim(state, "encoder_q.fc.2.weight", 0, 128)
    queue_size = _dim(state, "queue", 1, 65536)
    cfg = ModelConfig(**trunk, embed_dim=dim, head_hidden_dim=0 if hidden == feat else hidden)
    moco = MoCo(encoder, feat, dim=dim, queue_size=queue_size, queue_mode="replicated", bn_mode="none",
                batch_size=1, hidden_dim=hidden, bn_splits=1)
    return moco, cfg


def match_state(kind: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                name: str) -> dict[str, torch.Tensor]:
    """The source renamed to our keys; raises unless keys and shapes match ``expected`` one to one."""
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        ours = rename(kind, key)
        if ours is None:
            unmapped.append(key)
        else:
            mapped[ours], origin[ours] = value, key
    leftover = sorted(origin[k] for k in mapped if k not in expected)
    missing = sorted(source_name(kind, k) for k in expected if k not in mapped)
    wrong = sorted(
        f"{origin[k]} {tuple(v.shape)} (ours {tuple(expected[k].shape)})"
        for k, v in mapped.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    problems = [
        f"{len(keys)} {what}: {_few(keys)}"
        for keys, what in ((sorted(unmapped), "unmapped source keys"), (leftover, "source keys our network lacks"),
                           (missing, "keys missing from the source"), (wrong, "shape mismatches"))
        if keys
    ]
    if problems:
        raise PhotozError(f"{name}: cannot import as a {KINDS[kind]} (names without {DDP_PREFIX!r}): "
                          + "; ".join(problems))
    return mapped


def convert(blob: Any, name: str, transpose_hw: bool = False) -> tuple[str, nn.Module, ModelConfig, dict[str, Any]]:
    """(kind, our network holding the source's weights, its ModelConfig, provenance) from a loaded
    source object; ``name`` (the file) is used in every error message."""
    state, meta = unwrap(blob, name)
    state, had_prefix = strip_ddp_prefix(state, name)
    kind = detect_kind(state, name)
    net, cfg = build_target(kind, state, name)
    if isinstance(meta.get("arch"), str) and meta["arch"] in ARCHS and meta["arch"] != cfg.arch:
        raise PhotozError(f"{name}: the checkpoint says arch {meta['arch']!r} but its tensors are a {cfg.arch}")
    mapped = match_state(kind, state, net.state_dict(), name)
    net.load_state_dict(mapped, strict=True)
    if transpose_hw:
        transpose_kernels(net)
    provenance = {"file": name, "kind": kind, "ddp_prefix": had_prefix, "transpose_hw": transpose_hw,
                  "n_tensors": len(state), **{k: meta[k] for k in ("epoch", "iters", "arch") if k in meta}}
    return kind, net.eval(), cfg, provenance


@torch.no_grad()
def transpose_kernels(net: nn.Module) -> None:
    """Swap the spatial axes of every conv kernel: f_new(x) = f_old(x transposed in H and W).

    Exact for our ResNets: the stem and every strided conv have square kernels with equal padding and
    stride on both axes, BatchNorm/ReLU are per pixel and the global average pool ignores the order.
    """
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.copy_(m.weight.transpose(-1, -2).contiguous())


def _cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def write_encoder(moco: MoCo, cfg: ModelConfig, out: Path, provenance: dict[str, Any]) -> Path:
    """The ``export_encoder`` layout (trunk only, read by ``load_encoder``) plus ``projection_head``
    (our MoCo MLP, keys ``0.*`` / ``2.*``), ``source`` (provenance) and ``survey`` (SDSS), written atomically."""
    blob = {"format": ENCODER_FORMAT, "model": dataclasses.asdict(cfg), "state_dict": _cpu(moco.encoder),
            "step": provenance.get("iters"), "projection_head": _cpu(moco.encoder_q[1]), "source": provenance,
            **survey_record(paper_survey())}
    return write_torch_file(out, blob)


def import_checkpoint(src: str | Path, out: str | Path, transpose_hw: bool = False,
                      trust_pickle: bool = False) -> dict[str, Any]:
    """Convert the authors' checkpoint ``src`` into our encoder export (MoCo) or photo-z model file
    (fine-tuned) at ``out``; returns a small report (kind, tensors, architecture, output)."""
    src, out = Path(src), Path(out)
    kind, net, cfg, prov = convert(load_source(src, trust_pickle), str(src), transpose_hw)
    if kind == "moco":
        write_encoder(net, cfg, out, prov)
        fmt, written = ENCODER_FORMAT, len(net.encoder.state_dict()) + len(net.encoder_q[1].state_dict())
    else:
        save_photoz_model(net, cfg, out, extra={"source": prov})
        fmt, written = PHOTOZ_MODEL_FORMAT, len(net.state_dict())
    report = {"kind": kind, "source": str(src), "out": str(out), "format": fmt, "n_tensors": prov["n_tensors"],
              "n_written": written, "arch": cfg.arch, "width": cfg.width, "stem_kernel": cfg.stem_kernel,
              "ddp_prefix": prov["ddp_prefix"], "transpose_hw": transpose_hw, "epoch": prov.get("epoch"),
              "survey": paper_survey().name, "bands": list(paper_survey().bands)}
    if kind == "moco":
        report["embed_dim"] = cfg.embed_dim
        report["dropped"] = "encoder_k.*, queue, queue_ptr (checked, pretraining-only)"
    else:
        report["n_bins"] = net.head.out_features
        report["redshift_grid"] = net.grid.to_dict()
    return report


def _tensors(state: Mapping, name: str) -> dict[str, torch.Tensor]:
    bad = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise PhotozError(f"{name}: {len(bad)} state-dict entries are not tensors: {_few(bad)}")
    return {str(k): v for k, v in state.items()}


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")
