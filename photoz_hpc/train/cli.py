"""``photoz-hpc pretrain``: MoCo v2 pretraining (launch one process per GPU with srun, horovodrun,
mpirun or torchrun; a single process also works); ``export-encoder`` (a pretraining checkpoint's encoder) and
``export-model`` (a photo-z network as a shareable model directory: ``train.model_export``)."""

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
    m = subparsers.add_parser(
        "export-model", help="export a photo-z network as a model directory anyone can load (safetensors + model card)",
        description="Write the photo-z network of CHECKPOINT into OUT_DIR: model.safetensors (the weights; no pickle), "
        "model_card.json and README.md (architecture, survey and bands, redshift grid, training data, validation "
        "and test metrics with the commands that produced them, as far as the run directory records them) and "
        "checksums.sha256. Loading needs photoz-hpc only and checks every checksum first; torch.hub.load(REPO, "
        "'photoz_model', path=OUT_DIR, source='local') works from a photoz-hpc checkout. Encoders (encoder.pt, MoCo "
        "checkpoints) have no redshift head: they are shared as encoder.pt. docs/model_files.md.")
    m.add_argument("checkpoint", help="best_model.pt, photoz_model.pt, a fine-tuning checkpoint (checkpoints/ckpt_*.pt) "
                   "or a file written by import-checkpoint")
    m.add_argument("out_dir", help="the directory to write (built beside it, then renamed into place)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    add_trust_pickle_flag(m)
    m.set_defaults(func=_export_model)


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


def _export_model(args: argparse.Namespace) -> int:
    from photoz_hpc.train.model_export import export_model

    print(json.dumps(export_model(args.checkpoint, args.out_dir, overwrite=args.overwrite), indent=2))
    return 0
