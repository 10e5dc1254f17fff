"""``photoz-hpc finetune`` and ``photoz-hpc evaluate``: a photo-z network from labels, and its metrics.

``finetune`` trains (``train.finetune``) and then, unless pre-empted, evaluates the best network
(by validation sigma_MAD) on the validation set into ``OUT_DIR/eval`` and adds those metrics to
``summary.json``. Exit code 75 means pre-empted (checkpoint written; requeue and it resumes).
"""

from __future__ import annotations

import argparse
import json

from photoz_hpc.launch.finetune_eval import finetune_and_evaluate
from photoz_hpc.torch_files import add_trust_pickle_flag

__all__ = ["finetune_and_evaluate", "register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune the photo-z classifier (self-supervised init, supervised baseline, linear probe)",
        description="Train the redshift classifier (bins: finetune.z_min/z_max/n_z_bins, default the survey's grid; SDSS 180 over [0, 0.4)) on labeled images, validate every epoch, keep the best "
        "network by validation sigma_MAD and evaluate it. finetune.init=PATH (pretraining checkpoint or "
        "encoder.pt) or none (supervised baseline). Exit code 75 means pre-empted (requeue to resume).",
    )
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/finetune.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.init=runs/pretrain/encoder.pt "
                   "finetune.label_fraction=0.125")
    p.add_argument("--sweep", default=None, help="a label-fraction sweep file (configs/sweep.yaml): run its task "
                   "--task-id into RUNS_DIR/<method>/<fraction>/<seed>/ (see photoz-hpc sweep-plan)")
    p.add_argument("--task-id", default=None, help="with --sweep: the task number N, or 'all' (one after another)")
    add_trust_pickle_flag(p)  # finetune.init, train.resume
    p.set_defaults(func=_finetune)
    e = subparsers.add_parser(
        "evaluate",
        help="photo-z metrics, predictions and plots of a fine-tuned network on a labeled dataset",
        description="Run a fine-tuned network (best_model.pt, photoz_model.pt or a fine-tuning checkpoint) over a "
        "labeled prepared dataset on all ranks; write metrics.json, predictions.csv and plots.",
    )
    e.add_argument("--checkpoint", required=True, help="best_model.pt, photoz_model.pt or checkpoints/ckpt_*.pt")
    e.add_argument("--data", required=True, help="prepared dataset directory with spectroscopic redshifts")
    e.add_argument("--out", default=None, help="output directory (default: evaluate-<checkpoint>-<dataset>[-<ids>]/ next to "
                   "the checkpoint); a directory holding another command's outputs is refused")
    e.add_argument("--ids", default=None, help="optional .npy of dataset ids to evaluate (e.g. a run's val_ids.npy)")
    e.add_argument("overrides", nargs="*", help="loader/dist/train overrides, e.g. loader.batch_size=512")
    add_trust_pickle_flag(e)
    e.set_defaults(func=_evaluate)


def _finetune(args: argparse.Namespace) -> int:
    from photoz_hpc.config import FinetuneRunConfig
    from photoz_hpc.errors import ConfigError
    from photoz_hpc.train.cli import run_training_command

    if args.sweep:
        from photoz_hpc.launch.sweep_cli import run_sweep_command

        return run_sweep_command(args)
    if args.task_id is not None:
        raise ConfigError("--task-id needs --sweep FILE")
    return run_training_command(args, FinetuneRunConfig, finetune_and_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from photoz_hpc.evaluate.run import run_evaluate
    from photoz_hpc.launch_env import detect_env

    report = run_evaluate(args.checkpoint, args.data, args.out, args.ids, args.overrides)
    if detect_env().rank == 0:
        m = report["metrics"]
        print(json.dumps({"checkpoint": report["checkpoint"], "n": report["n"], "sigma_mad": m["sigma_mad"],
                          "eta": m["eta"], "bias": m["bias"], "outlier_rate_lsst": m["outlier_rate_lsst"],
                          "out": report.get("predictions")}, indent=2))
    return 0
