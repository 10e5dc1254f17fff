"""One config system: YAML files validated into dataclasses, with ``key=value`` overrides.

Every section is a dataclass; unknown keys and wrongly typed values raise a ``ConfigError``
naming the dotted key. ``section.key=value`` sets one field; a bare ``key=value`` sets a
top-level field or, if unambiguous, the one section field of that name. Values in overrides are
parsed as YAML (``true``, ``0.5``, ``[1, 2]``). The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import os
import re
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
    """Where the prepared dataset lives and how the demo survey is generated.

    ``survey``: the survey the quickstart synthesises (a shipped name, ``sdss`` ``legacy`` ``hsc`` ``lsst``, or a
    survey YAML path; docs/surveys.md). Training reads the survey from the prepared data, never from here.

    ``partition``: how training batches draw from the store. ``global`` (default): one permutation of every sample
    per epoch, dealt to all ranks, so every rank reads from everywhere. ``node``: the shards are dealt to the nodes
    once (``data.partition``; balanced by sample count, in a fixed random shard order), each epoch every node
    permutes only its own share and its ranks split it, so a node reads (and ``PHOTOZ_STAGE=1`` copies) only its
    share. Evaluation loaders always read globally. docs/data_at_scale.md says which to choose.
    """

    path: str = "data/synthetic"
    survey: str = "sdss"
    synth_n: int = 2048
    synth_labeled: bool = True
    samples_per_shard: int = 1024
    partition: str = "global"

    def __post_init__(self) -> None:
        if self.partition not in ("global", "node"):
            raise ConfigError(f"config key 'data.partition' = {self.partition!r} must be 'global' or 'node'")
        _check_range("data.synth_n", self.synth_n, 1)
        _check_range("data.samples_per_shard", self.samples_per_shard, 1)


@dataclass
class AugmentConfig:
    """Augmentation switches and ranges; defaults are the paper's values.

    ``reddening``/``rotation``/``jitter``/``noise`` switch the pretraining augmentations (rotation and
    jitter also apply to fine-tuning); ``deredden`` switches the correction by the galaxy's own SFD
    E(B-V) in the fine-tuning and evaluation pipelines, ``pretrain_deredden`` the same correction before
    the pretraining reddening (off: reddening on top of the observed image, which is what the paper
    describes). Which
    pipeline may apply what: ``photoz_hpc.augment.pipelines``. See docs/augmentations.md.

    ``crop_size`` and ``jitter_max`` (pixels) default to ``None``: the dataset's survey's numbers (SDSS 64 and 7,
    the paper's; a survey of finer pixels needs more of them for the same ~25 arcsec). Runs save them resolved
    (``photoz_hpc.augment.draws.resolve_augment``), so a saved config always holds the numbers used.
    """

    reddening: bool = True
    ebv_min: float = 0.0
    ebv_max: float = 0.5
    rotation: bool = True
    rotation_max_deg: float = 360.0
    jitter: bool = True
    jitter_max: int | None = None  # None: the survey's (SDSS 7)
    crop_size: int | None = None  # None: the survey's (SDSS 64)
    noise: bool = True
    noise_scale_min: float = 1.0
    noise_scale_max: float = 3.0
    noise_method: Literal["table", "fresh"] = "table"
    noise_table_size: int = 4194304
    deredden: bool = True
    pretrain_deredden: bool = False

    def __post_init__(self) -> None:
        _check_range("augment.ebv_min", self.ebv_min, 0.0)
        if self.ebv_max < self.ebv_min:
            raise ConfigError("config key 'augment.ebv_max' must be >= 'augment.ebv_min'")
        _check_range("augment.rotation_max_deg", self.rotation_max_deg, 0.0, 360.0)
        if self.jitter_max is not None:
            _check_range("augment.jitter_max", self.jitter_max, 0)
        if self.crop_size is not None:
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
    """Encoder architecture (ResNet with a stride-1 stem over the data's bands, 5 for SDSS) and projection head."""

    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"
    width: int = 64
    stem_kernel: int = 3
    embed_dim: int = 128
    head_hidden_dim: int = 0  # 0: same as the encoder's feature dim (MoCo v2)
    # channels_last memory format: 'auto' = on GPUs only; true/false = on every device (CPU too)
    channels_last: bool | Literal["auto"] = "auto"

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
    # shuffle-node: keys shuffled among the ranks of a node only ('shuffle_node' is read as it)
    bn_mode: Literal["shuffle", "shuffle-node", "shuffle_node", "sync", "none"] = "shuffle"
    queue_mode: Literal["sharded", "local", "replicated"] = "sharded"
    # keys shuffled within one rank (bn_mode 'shuffle' on one process, 'shuffle-node' with one rank per
    # node): BN statistics per sub-batch of loader.batch_size / bn_splits (must divide it); 1 = plain BN
    # (the query/key BatchNorm leak). Unused when keys are shuffled across ranks.
    bn_splits: int = 8
    # split BN's backward on channels_last activations: auto (fused on a GPU with Triton, else eager), fused
    # (torch.compile), eager, copy (NCHW copy); benchmarks/split_bn.py times them
    split_bn_backward: Literal["auto", "fused", "eager", "copy"] = "auto"

    def __post_init__(self) -> None:
        if self.bn_mode == "shuffle_node":
            self.bn_mode = "shuffle-node"
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
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    milestones: list[float] = field(default_factory=list)  # schedule 'step': epochs at which lr *= gamma
    gamma: float = 0.1
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
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"config key 'optim.gamma' = {self.gamma} must be in (0, 1]")
        if any(m <= 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"config key 'optim.milestones' = {self.milestones} must be increasing positive epochs")


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
    log_every: int = 10  # steps between metrics.jsonl/TensorBoard records
    progress: bool = True  # tqdm's bar on a terminal; off (or stderr not a terminal): progress_every's lines
    progress_every: int = 100  # steps between progress log lines where there is no bar; 0: none
    tensorboard: bool = True
    export_encoder: bool = True

    def __post_init__(self) -> None:
        _check_range("train.epochs", self.epochs, 1)
        _check_range("train.max_steps", self.max_steps, 0)
        _check_range("train.checkpoint_every", self.checkpoint_every, 1)
        _check_range("train.keep_checkpoints", self.keep_checkpoints, 1)
        _check_range("train.cpu_threads", self.cpu_threads, 0)
        _check_range("train.log_every", self.log_every, 1)
        _check_range("train.progress_every", self.progress_every, 0)
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
class FinetuneConfig:
    """Fine-tuning the photo-z classifier: initialisation, labels, validation (docs/training.md).

    ``init``: a pretraining checkpoint, an exported ``encoder.pt``, or ``none`` (the supervised
    baseline: same network and loop, random initialisation). ``label_fraction`` of the labeled training
    galaxies are used, a subset nested across fractions for one ``subset_seed``. ``val_data``: a
    separate prepared dataset; empty = hold out ``val_fraction`` of ``data.path``, fixed by ``split_seed``.
    ``select_max_eta``: the best network is the lowest validation sigma_MAD among validations with an outlier
    rate eta at most this (else the lowest eta); 1.0 = sigma_MAD alone. ``z_min``, ``z_max``, ``n_z_bins``: the
    model's redshift grid (``n_z_bins`` equal bins over [z_min, z_max)); unset (None): the training data's survey's
    (SDSS: 0.0, 0.4, 180, the paper's). A run saves them resolved, and the model records its grid.
    """

    init: str = "none"
    label_fraction: float = 1.0
    subset_seed: int = 0
    val_data: str = ""
    val_fraction: float = 0.2
    split_seed: int = 0
    backbone_lr_scale: float = 0.1
    freeze_backbone: bool = False
    val_every: int = 1  # epochs between validations (and best-checkpoint choices)
    # best network: the lowest validation sigma_MAD among validations whose outlier rate eta is at most this
    # (else the lowest eta); 1.0: sigma_MAD alone (docs/finetuning.md, "Which network is kept")
    select_max_eta: float = 0.5
    eval_batch_size: int = 0  # 0: loader.batch_size
    z_min: float | None = None  # redshift grid of the head; None: the survey's (SDSS 0.0)
    z_max: float | None = None  # None: the survey's (SDSS 0.4)
    n_z_bins: int | None = None  # None: the survey's (SDSS 180)

    def __post_init__(self) -> None:
        if self.z_min is not None:
            _check_range("finetune.z_min", self.z_min, 0.0)
        if self.z_max is not None:
            _check_range("finetune.z_max", self.z_max, 0.0)
            if self.z_min is not None and self.z_max <= self.z_min:
                raise ConfigError(f"config key 'finetune.z_max' = {self.z_max} must be > finetune.z_min = {self.z_min}")
        if self.n_z_bins is not None:
            _check_range("finetune.n_z_bins", self.n_z_bins, 2)
        if not self.init:
            raise ConfigError("config key 'finetune.init' must be a checkpoint path, an encoder.pt or 'none'")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"config key 'finetune.label_fraction' = {self.label_fraction} must be in (0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"config key 'finetune.val_fraction' = {self.val_fraction} must be in (0, 1)")
        _check_range("finetune.backbone_lr_scale", self.backbone_lr_scale, 0.0)
        _check_range("finetune.val_every", self.val_every, 1)
        _check_range("finetune.select_max_eta", self.select_max_eta, 0.0, 1.0)
        _check_range("finetune.eval_batch_size", self.eval_batch_size, 0)


@dataclass
class _RunBase:
    """What every command's config shares."""

    seed: int = 0
    out_dir: str = "runs/default"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


@dataclass
class Config(_RunBase):
    """``photoz-hpc pretrain``: MoCo v2 pretraining."""

    moco: MocoConfig = field(default_factory=MocoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def _finetune_optim() -> OptimConfig:
    # The paper authors' fine-tuning: SGD momentum 0.9, lr 0.004 per 256, no weight decay, x0.1 at 60 and 90.
    return OptimConfig(lr=0.004, weight_decay=0.0, schedule="step", milestones=[60.0, 90.0], gamma=0.1)


@dataclass
class FinetuneRunConfig(_RunBase):
    """``photoz-hpc finetune``: the photo-z classifier (self-supervised init, supervised baseline or probe)."""

    out_dir: str = "runs/finetune"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=_finetune_optim)


#: Config root of each command that takes ``--config`` (each validates only what it uses).
PretrainConfig = Config
ROOTS: dict[str, type] = {"pretrain": Config, "finetune": FinetuneRunConfig}


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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        f = fields[k]
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            # a section given partially keeps this root's defaults for the rest (e.g. fine-tuning's optim)
            v = {**dataclasses.asdict(f.default_factory()), **v}
        kwargs[k] = _coerce(prefix + k, v, hints[k])
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any], root: type = Config) -> Any:
    """Validate a nested dict (e.g. parsed YAML) into a ``root`` config (default: pretraining)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping at top level, got {type(values).__name__}")
    return _build(root, values)


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


def resolve_key(key: str, root: type = Config) -> list[str]:
    """Map a dotted or bare key to its path in ``root``; bare keys must be unambiguous."""
    if "." in key:
        return key.split(".")
    hints = typing.get_type_hints(root)
    if key in hints and not dataclasses.is_dataclass(hints[key]):
        return [key]
    hits = [name for name, tp in hints.items() if dataclasses.is_dataclass(tp) and key in {f.name for f in dataclasses.fields(tp)}]
    if len(hits) == 1:
        return [hits[0], key]
    if not hits:
        raise ConfigError(f"unknown config key '{key}'")
    raise ConfigError(f"config key '{key}' is ambiguous: use one of {[h + '.' + key for h in hits]}")


def apply_overrides(values: dict[str, Any], overrides: list[str], root: type = Config) -> dict[str, Any]:
    """Return a copy of the nested dict ``values`` with ``key=value`` overrides applied."""
    out = yaml.safe_load(yaml.safe_dump(values)) or {}
    for text in overrides:
        key, value = _parse_override(text)
        path = resolve_key(key, root)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return out


_KEY_IN_MESSAGE = re.compile(r"config key '([^']+)'")


def _override_paths(overrides: list[str], root: type) -> dict[str, str]:
    """Dotted path -> override text, for attributing a validation error to the command line."""
    paths = {}
    for text in overrides:
        try:
            paths[".".join(resolve_key(_parse_override(text)[0], root))] = text
        except ConfigError:
            continue
    return paths


def _has_path(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _override_for_key(key: str, from_cli: dict[str, str], file_values: dict[str, Any]) -> str | None:
    """The override that put ``key`` into the config: one that sets it or a section above it, or, when the
    file does not have ``key``, one that sets a key below it (a mistyped or foreign section, ``trian.epochs=1``)."""
    for path, text in from_cli.items():
        if key == path or key.startswith(path + "."):
            return text
    if not _has_path(file_values, key):
        for path, text in from_cli.items():
            if path.startswith(key + "."):
                return text
    return None


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file's top-level mapping (empty file: {}); errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{p}' must contain a mapping at top level")
    return values


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, root: type = Config) -> Any:
    """Load ``path`` (YAML, optional) and apply overrides into a ``root`` config; a ``ConfigError`` names
    the key and where its value came from (the file, or the command-line override that set it)."""
    overrides = list(overrides or [])
    values: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    try:
        merged = apply_overrides(values, overrides, root)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (on the command line)") from None
    try:
        return config_from_dict(merged, root)
    except ConfigError as exc:
        match = _KEY_IN_MESSAGE.search(str(exc))
        key = match.group(1).split("[")[0] if match else None
        hit = _override_for_key(key, _override_paths(overrides, root), values) if key else None
        if hit is not None:
            where = f" (from the command-line override '{hit}')"
        else:
            where = f" (in {path})" if path else (" (on the command line)" if overrides else "")
        raise ConfigError(f"{exc}{where}") from None


def packaged_config(name: str) -> Path:
    """Path of a YAML file of ``configs/`` as shipped inside the installed package (``photoz_hpc.configs``)."""
    from importlib.resources import files

    path = Path(str(files("photoz_hpc.configs") / name))
    if not path.is_file():
        raise ConfigError(f"no packaged config '{name}' (installed photoz_hpc.configs has no such file)")
    return path


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, directory: str | os.PathLike) -> Path:
    """Write the resolved config as ``config.yaml`` into ``directory`` atomically."""
    from photoz_hpc.io_utils import atomic_write_text

    target = Path(directory) / "config.yaml"
    atomic_write_text(target, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return target
