"""``photoz-hpc demo``: the main job on the embedded default, a synthetic survey on the CPU.

Generates (or reuses) a labeled synthetic survey, prepares it into the sharded store, verifies
and summarises it, then runs a short MoCo pretraining on it and reports where everything is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from photoz_hpc.data.format import MANIFEST_NAME
from photoz_hpc.logs import get_logger

log = get_logger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="main job: synthetic survey -> store -> short CPU pretraining",
        description="Run the whole pipeline on a freshly generated synthetic survey (CPU, a few minutes).",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default configs/demo.yaml)")
    p.add_argument("--fresh", action="store_true", help="regenerate the survey even if the dataset exists")
    p.add_argument("--skip-train", action="store_true", help="stop after preparing the dataset")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value or section.key=value")
    p.set_defaults(func=run)


def build_dataset(cfg, fresh: bool = False) -> Path:
    """Synthesise and prepare the demo survey at ``cfg.data.path`` unless a valid one exists."""
    from photoz_hpc.data.prepare import prepare
    from photoz_hpc.data.verify import verify_dataset
    from photoz_hpc.errors import DatasetError
    from photoz_hpc.sim import generate_survey

    dataset = Path(cfg.data.path)
    if not fresh and (dataset / MANIFEST_NAME).exists():
        try:
            verify_dataset(dataset)
            log.info("reusing verified dataset %s (use --fresh to regenerate)", dataset)
            return dataset
        except DatasetError as exc:
            log.warning("existing dataset unusable, regenerating: %s", exc)
    h5 = dataset.with_name(dataset.name + ".h5")
    t0 = time.perf_counter()
    generate_survey(h5, n=cfg.data.synth_n, seed=cfg.seed, labeled=cfg.data.synth_labeled)
    log.info("synthesised %d galaxies in %.1f s -> %s", cfg.data.synth_n, time.perf_counter() - t0, h5)
    prepare([h5], dataset, samples_per_shard=cfg.data.samples_per_shard, overwrite=True)
    verify_dataset(dataset)
    return dataset


def _set_aside_finished_run(out: Path) -> None:
    """A re-run of the demo trains afresh: a finished run moves to ``OUT.prev`` (an unfinished one resumes)."""
    summary = out / "summary.json"
    if not summary.exists():
        return
    try:
        done = json.loads(summary.read_text())
        finished = not done.get("preempted") and (done.get("steps") or 0) >= (done.get("total_steps") or 0)
    except (OSError, ValueError):
        finished = False
    if finished:
        prev = out.with_name(out.name + ".prev")
        shutil.rmtree(prev, ignore_errors=True)
        out.rename(prev)
        log.info("previous demo run finished: kept it as %s, training afresh in %s", prev, out)


def run(args: argparse.Namespace) -> int:
    from photoz_hpc.config import load_config, save_config
    from photoz_hpc.data.verify import dataset_info

    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.out_dir)
    if not args.skip_train:
        _set_aside_finished_run(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    dataset = build_dataset(cfg, args.fresh)
    info = dataset_info(dataset)
    print("== dataset ==")
    print(json.dumps(info, indent=2))
    if args.skip_train:
        return 0
    from photoz_hpc.train.pretrain import run_pretrain

    summary = run_pretrain(cfg)
    print("== pretraining ==")
    print(json.dumps(summary, indent=2, default=str))
    if summary.get("first_loss") is None:
        print(f"\nNo training steps ran (resumed at step {summary['start_step']} of {summary['total_steps']}).")
        return 0
    print(
        f"\nDemo done: MoCo loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} over {summary['steps']} steps "
        f"at {summary['img_per_s']:.0f} img/s ({summary['world_size']} rank(s), {summary['device']}).\n"
        f"  dataset     {dataset}\n  checkpoint  {summary['checkpoint']}\n  metrics     {summary['metrics']}\n"
        f"  tensorboard {summary['tensorboard']}\n  encoder     {summary['encoder']}\n  config      {out / 'config.yaml'}"
    )
    return 0
