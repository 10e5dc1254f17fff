"""Label-fraction sweeps: one YAML file -> a numbered list of fine-tuning tasks (a Slurm job array).

A sweep file names ``methods`` (``ssl``: fine-tune the pretrained ``encoder``; ``supervised``: the same
network from scratch; ``linear_probe``: the frozen ``encoder`` + a trained head), label ``fractions`` in
(0, 1], ``seeds``, the base ``finetune_config``, the ``runs_dir`` and shared ``overrides``; optionally
``test_data``, a labeled dataset on which each task's best network is evaluated once at the end (the
validation set chooses the best epoch, so it is not an unbiased test). Relative paths are relative to
the current directory, as in every config.

Task order (stable for a given file): method-major, then fraction, then seed, each in the order the file
lists them: ``index = (i_method * n_fractions + i_fraction) * n_seeds + i_seed``. Task ``i`` runs into
``RUNS_DIR/<method>/<fraction>/<seed>/`` (fraction as Python writes the float, e.g. ``0.025``, ``1.0``).
A task's seed is both ``seed`` (initialisation, data order, augmentations) and ``finetune.subset_seed``
(which labeled galaxies), so seeds differ in both; ``finetune.split_seed`` is not touched, so every task
validates on the same galaxies, and for one seed every method trains on the same galaxies.

Finished = ``summary.json`` with ``eval`` metrics, not pre-empted (and ``test/metrics.json`` when the
sweep has ``test_data``), and a saved ``config.yaml`` identical to what the sweep now produces. Finished
tasks are skipped on resubmission; a task directory whose config differs is an error naming it; an
unfinished one resumes from its checkpoints (``train.resume: auto``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from photoz_hpc.config import (
    FinetuneRunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    read_yaml_mapping,
    resolve_key,
)
from photoz_hpc.errors import ConfigError
from photoz_hpc.logs import get_logger

log = get_logger(__name__)

#: method -> (finetune.init comes from the sweep's encoder, finetune.freeze_backbone)
METHODS = {"ssl": (True, False), "supervised": (False, False), "linear_probe": (True, True)}
#: The paper's label fractions (2.5 ... 100 %).
PAPER_FRACTIONS = (0.025, 0.0625, 0.125, 0.25, 0.375, 0.625, 0.75, 0.875, 1.0)
_REQUIRED = ("methods", "fractions", "seeds", "finetune_config", "runs_dir")
_OPTIONAL = ("encoder", "overrides", "test_data")
#: Keys the sweep sets per task: shared overrides must leave them alone.
_PER_TASK = ("out_dir", "seed", "finetune.label_fraction", "finetune.subset_seed", "finetune.init",
             "finetune.freeze_backbone")
PLAN_NAME = "sweep.json"
STATES = ("new", "incomplete", "resumable", "untested", "finished", "changed")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A validated sweep file."""

    path: Path
    methods: tuple[str, ...]
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    finetune_config: str
    runs_dir: str
    encoder: str = ""
    overrides: tuple[str, ...] = ()
    test_data: str = ""


@dataclasses.dataclass(frozen=True)
class SweepTask:
    index: int
    method: str
    fraction: float
    seed: int
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.method}/{fraction_name(self.fraction)}/{self.seed}"


def fraction_name(fraction: float) -> str:
    """The directory name of a label fraction: the shortest text that reads back as the same float."""
    return repr(float(fraction))


# ---------------------------------------------------------------------- the file


def _list(where: str, key: str, value: Any) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty list, got {value!r}")
    if len({json.dumps(v) for v in value}) != len(value):
        raise ConfigError(f"{where}: '{key}' lists a value twice: {value}")
    return value


def _text(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty string (a path), got {value!r}")
    return value


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every error names the file and the key."""
    path = Path(path)
    where = f"sweep file {path}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must contain a mapping with keys {list(_REQUIRED)}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (valid: {sorted(_REQUIRED + _OPTIONAL)})")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    methods = _list(where, "methods", raw["methods"])
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"{where}: unknown method(s) {bad} in 'methods' (valid: {list(METHODS)})")
    fractions = _list(where, "fractions", raw["fractions"])
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ConfigError(f"{where}: 'fractions' must be label fractions in (0, 1] (e.g. 0.025 for 2.5 %), "
                              f"got {f!r}")
    if len({fraction_name(f) for f in fractions}) != len(fractions):
        raise ConfigError(f"{where}: 'fractions' lists a value twice: {fractions}")
    seeds = _list(where, "seeds", raw["seeds"])
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"{where}: 'seeds' must be non-negative integers, got {seeds}")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{where}: 'overrides' must be a list of 'key=value' strings, got {overrides!r}")
    encoder = raw.get("encoder") or ""
    if any(METHODS[m][0] for m in methods):
        encoder = _text(where, "encoder", encoder)
    for key in ("test_data",):
        if raw.get(key) not in (None, ""):
            _text(where, key, raw[key])
    sweep = Sweep(path, tuple(methods), tuple(float(f) for f in fractions), tuple(seeds),
                  _text(where, "finetune_config", raw["finetune_config"]), _text(where, "runs_dir", raw["runs_dir"]),
                  str(encoder), tuple(overrides), str(raw.get("test_data") or ""))
    _check_overrides(sweep)
    return sweep


def _check_overrides(sweep: Sweep) -> None:
    for text in sweep.overrides:
        key = text.split("=", 1)[0].strip()
        try:
            dotted = ".".join(resolve_key(key, FinetuneRunConfig))
        except ConfigError as exc:
            raise ConfigError(f"sweep file {sweep.path}: overrides: {exc}") from None
        if dotted in _PER_TASK:
            raise ConfigError(f"sweep file {sweep.path}: overrides must not set '{dotted}': the sweep sets it per task "
                              f"(per-task keys: {list(_PER_TASK)})")


# ---------------------------------------------------------------------- the plan


def plan(sweep: Sweep) -> list[SweepTask]:
    """Every task, in the documented order (method-major, then fraction, then seed)."""
    combos = itertools.product(sweep.methods, sweep.fractions, sweep.seeds)
    return [SweepTask(i, m, f, s, Path(sweep.runs_dir) / m / fraction_name(f) / str(s))
            for i, (m, f, s) in enumerate(combos)]


def _base_values(sweep: Sweep) -> dict[str, Any]:
    try:
        values = read_yaml_mapping(sweep.finetune_config)
    except ConfigError as exc:
        raise ConfigError(f"sweep file {sweep.path}: finetune_config: {exc}") from None
    try:
        return apply_overrides(values, list(sweep.overrides), FinetuneRunConfig)
    except ConfigError as exc:
        raise ConfigError(f"sweep file {sweep.path}: overrides: {exc}") from None


def task_config(sweep: Sweep, task: SweepTask, base: dict[str, Any] | None = None) -> FinetuneRunConfig:
    """The fine-tuning config of one task: base file + shared overrides + the task's own keys."""
    values = json.loads(json.dumps(base if base is not None else _base_values(sweep)))
    use_encoder, freeze = METHODS[task.method]
    values["out_dir"] = str(task.dir)
    values["seed"] = task.seed
    ft = values.setdefault("finetune", {})
    if not isinstance(ft, dict):
        raise ConfigError(f"sweep file {sweep.path}: 'finetune' of {sweep.finetune_config} must be a section")
    ft.update(label_fraction=task.fraction, subset_seed=task.seed, freeze_backbone=freeze,
              init=sweep.encoder if use_encoder else "none")
    try:
        return config_from_dict(values, FinetuneRunConfig)
    except ConfigError as exc:
        raise ConfigError(f"sweep file {sweep.path} (task {task.index}, {task.name}; base {sweep.finetune_config} "
                          f"+ overrides): {exc}") from None


def task_configs(sweep: Sweep) -> list[tuple[SweepTask, FinetuneRunConfig]]:
    base = _base_values(sweep)
    return [(t, task_config(sweep, t, base)) for t in plan(sweep)]


def _plain(cfg) -> dict[str, Any]:
    """The config as ``config.yaml`` reads back (YAML round trip: tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def read_summary(task_dir: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads((task_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def eval_metrics(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The final validation metrics of a finished fine-tuning summary, else None."""
    if not summary or summary.get("preempted") is not False:
        return None
    metrics = (summary.get("eval") or {}).get("metrics")
    return metrics if isinstance(metrics, dict) and "sigma_mad" in metrics else None


def test_metrics(task_dir: Path) -> dict[str, Any] | None:
    try:
        metrics = json.loads((task_dir / "test" / "metrics.json").read_text()).get("metrics")
    except (OSError, ValueError, AttributeError):
        return None
    return metrics if isinstance(metrics, dict) and "sigma_mad" in metrics else None


def _as_run_saves_it(cfg: FinetuneRunConfig) -> FinetuneRunConfig:
    """``cfg`` as a run saves it in config.yaml: the survey defaults its data decide (crop, jitter, redshift grid)
    made concrete. Without the data (not prepared yet, or gone) it stays as written."""
    from photoz_hpc.errors import PhotozError
    from photoz_hpc.train.surveys import data_survey, resolve_run_config

    try:
        survey = data_survey(cfg.data.path)
    except (PhotozError, OSError):
        return cfg
    return resolve_run_config(cfg, survey)


def task_state(sweep: Sweep, task: SweepTask, cfg: FinetuneRunConfig) -> tuple[str, str]:
    """(state, detail): new, incomplete (restarts), resumable (has checkpoints), untested (trained, test
    evaluation missing), finished, or changed (its config.yaml differs from the sweep's: an error to run)."""
    from photoz_hpc.train.checkpoint import checkpoint_dir, list_checkpoints

    d = task.dir
    if not d.exists():
        return "new", ""
    saved = d / "config.yaml"
    if saved.is_file():
        try:
            old = yaml.safe_load(saved.read_text())
        except yaml.YAMLError as exc:
            return "changed", f"unreadable config.yaml ({exc})"
        keys = _diff(old, _plain(_as_run_saves_it(cfg)))
        if keys:
            return "changed", "differs in " + ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
    elif read_summary(d) is not None or list_checkpoints(checkpoint_dir(d)):
        return "changed", "has training outputs but no config.yaml"
    if eval_metrics(read_summary(d)) is not None:
        if sweep.test_data and test_metrics(d) is None:
            return "untested", "trained; test evaluation missing"
        return "finished", ""
    if list_checkpoints(checkpoint_dir(d)):
        return "resumable", ""
    return "incomplete", ""


def check_paths(sweep: Sweep, pairs: list[tuple[SweepTask, FinetuneRunConfig]], produced: tuple[str, ...] = ()
                ) -> None:
    """Every input path of these tasks exists before anything is submitted or run: ``data.path``,
    ``finetune.val_data`` and ``test_data`` are prepared datasets, ``finetune.init`` (the encoder) a file.
    ``produced``: paths an upstream job of the same chain will write (the pipeline's prepared dataset and
    pretraining encoder), not checked. One ConfigError lists every missing input."""
    from photoz_hpc.data.dataset import read_manifest
    from photoz_hpc.errors import DatasetError

    made = {Path(p).resolve() for p in produced}
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for _, cfg in pairs:
        items = [("data.path", cfg.data.path, True), ("finetune.val_data", cfg.finetune.val_data, True),
                 ("test_data", sweep.test_data, True), ("finetune.init", cfg.finetune.init, False)]
        for key, value, dataset in items:
            if not value or (key == "finetune.init" and value.lower() == "none") or (key, value) in seen:
                continue
            seen.add((key, value))
            if Path(value).resolve() in made:
                continue
            if dataset:
                try:
                    read_manifest(value)
                except DatasetError as exc:
                    problems.append(f"{key}: {exc}")
            elif not Path(value).is_file():
                problems.append(f"{key} (the sweep's encoder): {value} does not exist (a pretraining checkpoint or "
                                "encoder.pt)")
    if problems:
        raise ConfigError(f"sweep file {sweep.path}: " + "; ".join(problems) + " (an input that an upstream job of "
                          "the same chain will write: sweep-plan --produced PATH)")


def pipeline_sweep(sweep: Sweep, data: str, encoder: str, path: str | Path) -> Sweep:
    """The sweep as ``launch/submit_paper_pipeline.sh`` submits it: fine-tuning on the dataset the pipeline
    prepares (``data.path`` = ``data``, replacing the finetune_config's) and, for ssl and linear_probe, from the
    encoder its pretraining exports. An explicit ``data.path`` override naming another dataset is an error (which
    one was meant is not ours to guess)."""
    overrides = []
    for text in sweep.overrides:
        key, _, value = text.partition("=")
        if ".".join(resolve_key(key.strip(), FinetuneRunConfig)) == "data.path":
            if Path(value.strip()).resolve() != Path(data).resolve():
                raise ConfigError(f"sweep file {sweep.path}: overrides set data.path={value.strip()} but the pipeline "
                                  f"fine-tunes on the dataset it prepares ({data}): drop that override, or run the "
                                  "stages one by one")
            continue
        overrides.append(text)
    uses_encoder = any(METHODS[m][0] for m in sweep.methods)
    return dataclasses.replace(sweep, path=Path(path), overrides=(*overrides, f"data.path={data}"),
                               encoder=str(encoder) if uses_encoder else sweep.encoder)


def sweep_yaml(sweep: Sweep, note: str = "") -> str:
    """A sweep file's text (``load_sweep`` reads it back as ``sweep``)."""
    body = {"methods": list(sweep.methods), "fractions": list(sweep.fractions), "seeds": list(sweep.seeds),
            "finetune_config": sweep.finetune_config, "encoder": sweep.encoder, "runs_dir": sweep.runs_dir,
            "test_data": sweep.test_data, "overrides": list(sweep.overrides)}
    head = "".join(f"# {line}\n" for line in note.splitlines())
    return head + yaml.safe_dump(body, sort_keys=False)


def changed_error(sweep: Sweep, task: SweepTask, detail: str) -> ConfigError:
    return ConfigError(f"sweep task {task.index} ({task.name}): {task.dir} was run with another config than sweep "
                       f"file {sweep.path} now produces ({detail}); delete or move that directory to rerun the "
                       "task, or restore the sweep file")


def plan_record(sweep: Sweep, tasks: list[SweepTask]) -> dict[str, Any]:
    """What ``RUNS_DIR/sweep.json`` holds: the file and every task (the report lists missing ones)."""
    return {"sweep": str(sweep.path), "methods": list(sweep.methods), "fractions": list(sweep.fractions),
            "seeds": list(sweep.seeds), "encoder": sweep.encoder, "test_data": sweep.test_data,
            "order": "method-major, then fraction, then seed",
            "tasks": [{"index": t.index, "method": t.method, "fraction": t.fraction, "seed": t.seed, "dir": str(t.dir)}
                      for t in tasks]}


# ---------------------------------------------------------------------- running


def run_task(sweep: Sweep, task: SweepTask, cfg: FinetuneRunConfig) -> dict[str, Any]:
    """Run (or skip, or resume) one task on every rank; returns its outcome."""
    from photoz_hpc.evaluate.run import run_evaluate
    from photoz_hpc.launch.finetune_eval import finetune_and_evaluate

    state, detail = task_state(sweep, task, cfg)
    out = {"task": task.index, "method": task.method, "fraction": task.fraction, "seed": task.seed, "dir": str(task.dir)}
    if state == "changed":
        raise changed_error(sweep, task, detail)
    if state == "finished":
        log.info("sweep task %d (%s) is finished: skipped", task.index, task.name)
        return {**out, "status": "skipped (finished)"}
    if state != "untested":
        log.info("sweep task %d (%s): %s", task.index, task.name, "resuming" if state == "resumable" else "starting")
        summary = finetune_and_evaluate(cfg)
        if summary["preempted"]:
            return {**out, "status": "interrupted" if summary.get("interrupted") else "preempted"}
    if sweep.test_data:
        run_evaluate(task.dir / "best_model.pt", sweep.test_data, task.dir / "test")
    metrics = eval_metrics(read_summary(task.dir)) or {}
    return {**out, "status": "done", "val_sigma_mad": metrics.get("sigma_mad"), "val_eta": metrics.get("eta")}


def select_tasks(sweep: Sweep, tasks: list, task_id: str) -> list:
    if task_id == "all":
        return tasks
    try:
        i = int(task_id)
    except ValueError:
        raise ConfigError(f"--task-id must be an integer or 'all', got {task_id!r}") from None
    if not 0 <= i < len(tasks):
        raise ConfigError(f"--task-id {i} is outside 0..{len(tasks) - 1} of sweep file {sweep.path} ({len(tasks)} tasks)")
    return [tasks[i]]


def run_sweep(sweep_path: str | Path, task_id: str) -> tuple[int, list[dict[str, Any]]]:
    """``finetune --sweep FILE --task-id N|all``: (exit code, outcomes). Every selected task's config is
    checked against its directory before anything runs; a pre-empted task stops the loop (exit 75; 130 after Ctrl-C)."""
    from photoz_hpc.io_utils import atomic_write_json
    from photoz_hpc.launch_env import detect_env

    sweep = load_sweep(sweep_path)
    pairs = select_tasks(sweep, task_configs(sweep), task_id)
    to_run = []
    for task, cfg in pairs:
        state, detail = task_state(sweep, task, cfg)
        if state == "changed":
            raise changed_error(sweep, task, detail)
        if state != "finished":
            to_run.append((task, cfg))
    check_paths(sweep, to_run)
    if detect_env().rank == 0:
        atomic_write_json(Path(sweep.runs_dir) / PLAN_NAME, plan_record(sweep, plan(sweep)))
    outcomes = []
    for task, cfg in pairs:
        outcomes.append(run_task(sweep, task, cfg))
        code = stop_code(outcomes[-1]["status"])
        if code:
            return code, outcomes
    return 0, outcomes


def stop_code(status: str) -> int:
    """A task's outcome as the sweep's exit code: 75 pre-empted (the job script requeues), 130 stopped by Ctrl-C
    (never requeued), 0 otherwise (the loop goes on)."""
    from photoz_hpc.train.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED

    return {"preempted": EXIT_PREEMPTED, "interrupted": EXIT_INTERRUPTED}.get(status, 0)
