"""One config system: YAML files validated into dataclasses, with ``key=value`` overrides.

Every section is a dataclass; unknown keys and wrongly typed values raise a ``ConfigError``
naming the dotted key. ``section.key=value`` sets one field; a bare ``key=value`` sets a
top-level field or, if unambiguous, the one section field of that name. Values in overrides are
parsed as YAML (``true``, ``0.5``, ``[1, 2]``). The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from photoz_hpc.errors import ConfigError


def _check_range(key: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if lo is not None and value < lo:
        raise ConfigError(f"config key '{key}' = {value!r} must be >= {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"config key '{key}' = {value!r} must be <= {hi}")


@dataclass
class DataConfig:
    """Where the prepared dataset lives and how the demo survey is generated."""

    path: str = "data/synthetic"
    synth_n: int = 2048
    synth_labeled: bool = True
    samples_per_shard: int = 1024

    def __post_init__(self) -> None:
        _check_range("data.synth_n", self.synth_n, 1)
        _check_range("data.samples_per_shard", self.samples_per_shard, 1)


@dataclass
class AugmentConfig:
    """Augmentation switches and ranges; defaults are the paper's values.

    ``reddening``/``rotation``/``jitter``/``noise`` switch the pretraining augmentations (rotation and
    jitter also apply to fine-tuning); ``deredden`` switches the correction by the galaxy's own SFD
    E(B-V) in the fine-tuning and evaluation pipelines. See docs/augmentations.md.
    """

    reddening: bool = True
    ebv_min: float = 0.0
    ebv_max: float = 0.5
    rotation: bool = True
    rotation_max_deg: float = 360.0
    jitter: bool = True
    jitter_max: int = 7
    crop_size: int = 64
    noise: bool = True
    noise_scale_min: float = 1.0
    noise_scale_max: float = 3.0
    noise_method: Literal["table", "fresh"] = "table"
    noise_table_size: int = 4194304
    deredden: bool = True

    def __post_init__(self) -> None:
        _check_range("augment.ebv_min", self.ebv_min, 0.0)
        if self.ebv_max < self.ebv_min:
            raise ConfigError("config key 'augment.ebv_max' must be >= 'augment.ebv_min'")
        _check_range("augment.rotation_max_deg", self.rotation_max_deg, 0.0, 360.0)
        _check_range("augment.jitter_max", self.jitter_max, 0)
        _check_range("augment.crop_size", self.crop_size, 1)
        _check_range("augment.noise_scale_min", self.noise_scale_min, 0.0)
        if self.noise_scale_max < self.noise_scale_min:
            raise ConfigError("config key 'augment.noise_scale_max' must be >= 'augment.noise_scale_min'")
        _check_range("augment.noise_table_size", self.noise_table_size, 1)


@dataclass
class LoaderConfig:
    """Data loading: implementation, device and batching.

    ``num_workers`` is the reference loader's DataLoader worker count; ``verify_records`` CRC-checks
    each record the first time a loader reads it (corrupt data is an error, never a silent batch).
    """

    backend: Literal["auto", "dali", "reference"] = "auto"
    device: Literal["cpu", "gpu"] = "cpu"
    batch_size: int = 256
    num_threads: int = 2
    prefetch: int = 2
    num_workers: int = 0
    verify_records: bool = True

    def __post_init__(self) -> None:
        _check_range("loader.batch_size", self.batch_size, 1)
        _check_range("loader.num_threads", self.num_threads, 1)
        _check_range("loader.prefetch", self.prefetch, 1)
        _check_range("loader.num_workers", self.num_workers, 0)


@dataclass
class ModelConfig:
    """Encoder architecture (ResNet with a stride-1 5-band stem) and projection head."""

    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"
    width: int = 64
    stem_kernel: int = 3
    embed_dim: int = 128
    head_hidden_dim: int = 0  # 0: same as the encoder's feature dim (MoCo v2)
    channels_last: bool = True  # used on GPU only

    def __post_init__(self) -> None:
        _check_range("model.width", self.width, 1)
        _check_range("model.embed_dim", self.embed_dim, 1)
        _check_range("model.head_hidden_dim", self.head_hidden_dim, 0)
        if self.stem_kernel < 1 or self.stem_kernel % 2 == 0:
            raise ConfigError(f"config key 'model.stem_kernel' = {self.stem_kernel} must be a positive odd integer")


@dataclass
class MocoConfig:
    """MoCo v2 hyper-parameters and the distributed queue mode (see docs/training.md)."""

    queue_size: int = 65536
    momentum: float = 0.999
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    temperature: float = 0.2
    bn_mode: Literal["shuffle", "sync", "none"] = "shuffle"
    queue_mode: Literal["sharded", "local", "replicated"] = "sharded"
    # bn_mode 'shuffle' on one process: BN statistics per sub-batch of loader.batch_size / bn_splits
    # (must divide it); 1 = plain BN (the query/key BatchNorm leak). Unused with several ranks.
    bn_splits: int = 8

    def __post_init__(self) -> None:
        _check_range("moco.queue_size", self.queue_size, 1)
        _check_range("moco.bn_splits", self.bn_splits, 1)
        _check_range("moco.momentum", self.momentum, 0.0, 1.0)
        if self.temperature <= 0:
            raise ConfigError(f"config key 'moco.temperature' = {self.temperature} must be > 0")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (lr is per ``batch_ref`` samples of global batch)."""

    name: Literal["sgd", "lars"] = "sgd"
    lr: float = 0.03
    batch_ref: int = 256  # linear scaling: lr_eff = lr * global_batch / batch_ref
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    lars_eta: float = 0.001
    grad_clip: float = 0.0  # 0: off; else max global grad norm
    fused: bool = False  # use apex's fused optimiser when importable (never required)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"config key 'optim.lr' = {self.lr} must be > 0")
        _check_range("optim.batch_ref", self.batch_ref, 1)
        _check_range("optim.momentum", self.momentum, 0.0, 1.0)
        _check_range("optim.weight_decay", self.weight_decay, 0.0)
        _check_range("optim.warmup_epochs", self.warmup_epochs, 0.0)
        _check_range("optim.grad_clip", self.grad_clip, 0.0)
        if self.lars_eta <= 0:
            raise ConfigError(f"config key 'optim.lars_eta' = {self.lars_eta} must be > 0")


@dataclass
class TrainConfig:
    """Training loop length, precision, checkpointing and logging cadence."""

    epochs: int = 100
    max_steps: int = 0  # 0: epochs * steps per epoch; else stop after this many steps (schedules use it)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int = 0  # torch intra-op threads per rank on CPU; 0: auto (cores / ranks per node - loader threads)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: str = "auto"  # auto | never | path to a checkpoint file
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    export_encoder: bool = True

    def __post_init__(self) -> None:
        _check_range("train.epochs", self.epochs, 1)
        _check_range("train.max_steps", self.max_steps, 0)
        _check_range("train.checkpoint_every", self.checkpoint_every, 1)
        _check_range("train.keep_checkpoints", self.keep_checkpoints, 1)
        _check_range("train.cpu_threads", self.cpu_threads, 0)
        _check_range("train.log_every", self.log_every, 1)
        if not self.resume:
            raise ConfigError("config key 'train.resume' must be 'auto', 'never' or a checkpoint path")


@dataclass
class DistConfig:
    """Communication backend and failure handling."""

    backend: Literal["auto", "horovod", "torch", "none"] = "auto"
    timeout_s: float = 600.0  # collective timeout and no-progress watchdog
    watchdog: bool = True

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"config key 'dist.timeout_s' = {self.timeout_s} must be > 0")


@dataclass
class Config:
    """The whole run configuration."""

    seed: int = 0
    out_dir: str = "runs/default"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# --------------------------------------------------------------------------- validation


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp`` (int->float widening allowed); name ``key`` on error."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping (section), got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' = {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' = {value!r} has the wrong type (expected {tp})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
        return origin(items)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"config key '{key}' = {value!r} must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' = {value!r} must be a number")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            raise ConfigError(
                f"config key '{key}' = {value!r} must be a string (YAML reads yes/no/on/off/true/false as "
                f"booleans: quote the value, e.g. {key.split('.')[-1]}: \"off\")"
            )
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' = {value!r} must be a string")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (valid keys: {sorted(names)})")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Validate a nested dict (e.g. parsed YAML) into a ``Config``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping at top level, got {type(values).__name__}")
    return _build(Config, values)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value or section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return key, value


def _resolve_key(key: str) -> list[str]:
    """Map a dotted or bare key to its path in ``Config``; bare keys must be unambiguous."""
    if "." in key:
        return key.split(".")
    top = {f.name: f for f in dataclasses.fields(Config)}
    if key in top and not dataclasses.is_dataclass(typing.get_type_hints(Config)[key]):
        return [key]
    hits = [
        name
        for name, tp in typing.get_type_hints(Config).items()
        if dataclasses.is_dataclass(tp) and key in {f.name for f in dataclasses.fields(tp)}
    ]
    if len(hits) == 1:
        return [hits[0], key]
    if not hits:
        raise ConfigError(f"unknown config key '{key}'")
    raise ConfigError(f"config key '{key}' is ambiguous: use one of {[h + '.' + key for h in hits]}")


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``values`` with ``key=value`` overrides applied."""
    out = yaml.safe_load(yaml.safe_dump(values)) or {}
    for text in overrides:
        key, value = _parse_override(text)
        path = _resolve_key(key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML, optional) and apply overrides; raises ``ConfigError`` naming the key."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"config file '{p}' must contain a mapping at top level")
    try:
        return config_from_dict(apply_overrides(values, overrides or []))
    except ConfigError as exc:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"{exc}{where}") from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, directory: str | os.PathLike) -> Path:
    """Write the resolved config as ``config.yaml`` into ``directory`` atomically."""
    from photoz_hpc.io_utils import atomic_write_text

    target = Path(directory) / "config.yaml"
    atomic_write_text(target, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return target
