"""``photoz-hpc pretrain``: MoCo v2 pretraining (launch one process per GPU with srun, horovodrun,
mpirun or torchrun; a single process also works)."""

from __future__ import annotations

import argparse
import json

from photoz_hpc.torch_files import add_trust_pickle_flag


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised MoCo v2 pretraining",
        description="Pretrain the ResNet encoder (its stem takes the data's bands) with MoCo v2. Exit code 75 means pre-empted "
        "(checkpoint written; requeue the job and it resumes); a first Ctrl-C also writes a checkpoint and exits 130, "
        "a second stops at once.",
    )
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/pretrain.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loader.batch_size=128 dist.backend=torch")
    add_trust_pickle_flag(p)  # train.resume
    p.set_defaults(func=_run)
    e = subparsers.add_parser(
        "export-encoder", help="export the encoder of a pretraining checkpoint for embedding",
        description="Write the query encoder of a MoCo pretraining checkpoint (the ResNet trunk, its projection "
        "head and the settings it was trained with) as a small stand-alone file, what the end of pretrain writes as encoder.pt: "
        "for embed, and as finetune.init.")
    e.add_argument("checkpoint", help="checkpoint file (…/checkpoints/ckpt_*.pt)")
    e.add_argument("out", help="output file, e.g. encoder.pt")
    add_trust_pickle_flag(e)
    e.set_defaults(func=_export)


def run_training_command(args: argparse.Namespace, root: type, run) -> int:
    """What every training command does around ``run(cfg) -> summary``: config, logging, the pre-emption
    handler from the start, the summary on rank 0, exit 75 when pre-empted, 130 when stopped by Ctrl-C."""
    from photoz_hpc.config import load_config
    from photoz_hpc.launch_env import detect_env
    from photoz_hpc.logs import get_logger, setup_logging
    from photoz_hpc.train.signals import EXIT_INTERRUPTED, PreemptionFlag, exit_code, ignore_preemption

    log = get_logger(__name__)
    cfg = load_config(args.config, args.overrides, root=root)
    setup_logging(cfg.log_level if args.log_level == "INFO" else args.log_level, rank=detect_env().rank)
    PreemptionFlag(interrupt=True).install()  # what the run restores on return: no gap in which a signal kills us
    summary = run(cfg)
    # Done (checkpoint and summary written): a late SIGTERM -- e.g. srun --kill-on-bad-exit terminating this
    # rank because a peer already exited 75 -- must not turn this rank's exit code into 143 (no requeue).
    ignore_preemption()
    if detect_env().rank == 0:
        print(json.dumps(summary, indent=2))
    code = exit_code(summary)
    if code == EXIT_INTERRUPTED:
        log.warning("interrupted: stopped at step %s with checkpoint %s; run the same command to resume",
                    summary["steps"], summary["checkpoint"])
    return code


def _run(args: argparse.Namespace) -> int:
    from photoz_hpc.config import Config
    from photoz_hpc.train.pretrain import run_pretrain

    return run_training_command(args, Config, run_pretrain)


def _export(args: argparse.Namespace) -> int:
    from photoz_hpc.train.checkpoint import export_checkpoint_encoder

    print(export_checkpoint_encoder(args.checkpoint, args.out))
    return 0
