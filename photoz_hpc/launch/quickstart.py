"""``photoz-hpc quickstart`` (alias ``demo``): the main job on the embedded default, CPU, minutes.

From nothing to a photo-z with real metrics: synthesise a small labeled survey, prepare and verify
it, pretrain MoCo briefly, fine-tune the pretrained encoder at one label fraction next to the
supervised baseline at the same fraction (same galaxies, same network, same loop), evaluate both on
the same held-out validation set and write ``report.md`` with the metrics table and plots.

The configs ship inside the package (``photoz_hpc.configs``), so it runs from any directory;
outputs go under the current directory (``--out``, ``data.path``) unless told otherwise.
Overrides ``key=value`` apply to every stage whose config has that key (``seed=3``,
``loader.batch_size=32``), or to the one that has it (``moco.queue_size``, ``finetune.label_fraction``).
At this budget self-supervision need not win: the report says what was measured, nothing more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from photoz_hpc.config import Config, FinetuneRunConfig, apply_overrides, config_from_dict, load_config, packaged_config
from photoz_hpc.data.format import MANIFEST_NAME
from photoz_hpc.errors import ConfigError
from photoz_hpc.logs import get_logger
from photoz_hpc.survey import load_survey, survey_of_manifest
from photoz_hpc.torch_files import add_trust_pickle_flag

log = get_logger(__name__)

PRETRAIN_CONFIG, FINETUNE_CONFIG = "demo.yaml", "demo_finetune.yaml"
METHODS = {"ssl": "self-supervised (MoCo encoder, fine-tuned)", "supervised": "supervised baseline (from scratch)"}


def register(sub: argparse._SubParsersAction) -> None:
    description = ("From nothing to a photo-z on the CPU in minutes: a labeled synthetic survey, a short MoCo "
                   "pretraining, fine-tuning next to the supervised baseline at the same label fraction, evaluation "
                   "on a held-out set, and a report (metrics table, plots).")
    for name, help_text in (("quickstart", "main job: synthetic survey -> MoCo -> fine-tuning vs supervised -> metrics"),
                            ("demo", "the same as quickstart (its earlier name)")):
        p = sub.add_parser(name, help=help_text, description=description)
        p.add_argument("--config", default=None, help=f"pretraining YAML (default: the packaged {PRETRAIN_CONFIG})")
        p.add_argument("--finetune-config", default=None,
                       help=f"fine-tuning YAML (default: the packaged {FINETUNE_CONFIG})")
        p.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
        p.add_argument("--survey", default=None,
                       help="survey to synthesise: sdss (default), legacy, hsc, lsst or a survey YAML path "
                       "(sets data.survey; docs/surveys.md)")
        p.add_argument("--fresh", action="store_true", help="regenerate the survey even if the dataset exists")
        p.add_argument("--skip-train", action="store_true", help="stop after preparing the dataset")
        p.add_argument("overrides", nargs="*", help="config overrides, key=value or section.key=value")
        add_trust_pickle_flag(p)  # its stages resume from, and read, model files
        p.set_defaults(func=run)


# ---------------------------------------------------------------------- configs


def split_overrides(overrides: list[str]) -> dict[type, list[str]]:
    """Each override goes to every config root that has its key; one no root has is an error."""
    routed: dict[type, list[str]] = {Config: [], FinetuneRunConfig: []}
    for text in overrides:
        taken = []
        for root in routed:
            try:
                config_from_dict(apply_overrides({}, [text], root), root)
            except ConfigError as exc:
                if "unknown config key" in str(exc) or "ambiguous" in str(exc):
                    continue  # not this root's key (a bad value of its key is reported by load_config)
            taken.append(root)
        if not taken:
            raise ConfigError(f"override '{text}' names a key of neither the pretraining nor the fine-tuning config "
                              "(on the command line)")
        for root in taken:
            routed[root].append(text)
    return routed


def stage_configs(args: argparse.Namespace) -> tuple[Config, dict[str, FinetuneRunConfig]]:
    """The pretraining config and one fine-tuning config per method, all inside ``args.out``."""
    overrides = list(args.overrides) + ([f"data.survey={args.survey}"] if getattr(args, "survey", None) else [])
    routed = split_overrides(overrides)
    out = Path(args.out)
    pre = load_config(args.config or packaged_config(PRETRAIN_CONFIG), routed[Config], root=Config)
    pre = dataclasses.replace(pre, out_dir=str(out / "pretrain"))
    base = load_config(args.finetune_config or packaged_config(FINETUNE_CONFIG), routed[FinetuneRunConfig],
                       root=FinetuneRunConfig)
    shared = {"data": pre.data, "model": dataclasses.replace(base.model, **{
        k: getattr(pre.model, k) for k in ("arch", "width", "stem_kernel")})}
    runs = {}
    for method in METHODS:
        init = str(out / "pretrain" / "encoder.pt") if method == "ssl" else "none"
        runs[method] = dataclasses.replace(base, out_dir=str(out / method), **shared,
                                           finetune=dataclasses.replace(base.finetune, init=init))
    return pre, runs


# ---------------------------------------------------------------------- dataset


def build_dataset(cfg, fresh: bool = False) -> Path:
    """Synthesise and prepare the survey at ``cfg.data.path`` unless a valid one exists."""
    from photoz_hpc.data.dataset import read_manifest
    from photoz_hpc.data.inputs import PrepareOptions
    from photoz_hpc.data.prepare import prepare
    from photoz_hpc.data.verify import verify_dataset
    from photoz_hpc.errors import DatasetError
    from photoz_hpc.sim import generate_survey

    dataset = Path(cfg.data.path)
    survey = load_survey(cfg.data.survey)
    bands = list(survey.spec.default_bands or survey.bands)  # what synth renders
    if not fresh and (dataset / MANIFEST_NAME).exists():
        try:
            verify_dataset(dataset)
        except DatasetError as exc:
            log.warning("existing dataset unusable, regenerating: %s", exc)
        else:
            found = survey_of_manifest(read_manifest(dataset), str(dataset))
            if (found.name, list(found.bands)) != (survey.name, bands):
                raise ConfigError(f"{dataset}: holds survey '{found.name}' bands {list(found.bands)}, but data.survey "
                                  f"asks for '{survey.name}' bands {bands}: use another data.path, or --fresh to "
                                  "replace it")
            log.info("reusing verified dataset %s (use --fresh to regenerate)", dataset)
            return dataset
    h5 = dataset.with_name(dataset.name + ".h5")
    h5.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    generate_survey(h5, n=cfg.data.synth_n, seed=cfg.seed, labeled=cfg.data.synth_labeled, survey=cfg.data.survey)
    log.info("synthesised %d %s galaxies in %.1f s -> %s", cfg.data.synth_n, survey.name, time.perf_counter() - t0, h5)
    # the description synth used (a user's file too: its labels may match no shipped survey)
    prepare([h5], dataset, samples_per_shard=cfg.data.samples_per_shard, overwrite=True,
            options=PrepareOptions(survey=cfg.data.survey))
    verify_dataset(dataset)
    return dataset


def _set_aside_finished_run(out: Path) -> None:
    """A re-run trains afresh: a finished run moves to ``OUT.prev`` (an unfinished one resumes)."""
    report = out / "report.md"
    if not report.exists():
        return
    prev = out.with_name(out.name + ".prev")
    shutil.rmtree(prev, ignore_errors=True)
    out.rename(prev)
    log.info("previous quickstart run finished: kept it as %s, training afresh in %s", prev, out)


# ---------------------------------------------------------------------- report


def _survey_line(dataset: Path) -> str:
    from photoz_hpc.data.dataset import read_manifest

    survey = survey_of_manifest(read_manifest(dataset), str(dataset))
    return f"survey {survey.name}, bands {' '.join(survey.bands)}"


def write_report(out: Path, dataset: Path, pre: dict[str, Any], results: dict[str, dict[str, Any]],
                 runs: dict[str, FinetuneRunConfig], seconds: float) -> Path:
    from photoz_hpc.io_utils import atomic_write_text
    from photoz_hpc.metrics import format_metrics_table

    ft = next(iter(runs.values())).finetune
    table = format_metrics_table({METHODS[m]: r["eval"]["metrics"] for m, r in results.items()})
    s_ssl, s_sup = (results[m]["eval"]["metrics"]["sigma_mad"] for m in ("ssl", "supervised"))
    verdict = ("the self-supervised network has the lower sigma_MAD" if s_ssl < s_sup else
               "the supervised baseline has the lower (or equal) sigma_MAD")
    lines = [
        "# photoz-hpc quickstart report", "",
        f"Synthetic labeled survey `{dataset}` ({_survey_line(dataset)}); pretraining `{pre['out_dir']}` ({pre['steps']} MoCo steps, loss "
        f"{pre['first_loss']:.3f} -> {pre['last_loss']:.3f}); fine-tuning on {results['ssl']['n_train']} labeled "
        f"galaxies (label fraction {ft.label_fraction:g}, the same galaxies for both methods), evaluation on the "
        f"{results['ssl']['n_val']} held-out galaxies. Wall time {seconds / 60:.1f} min.", "",
        "## Validation metrics (best network by validation sigma_MAD)", "", table,
        f"Measured: {verdict} ({s_ssl:.4f} vs {s_sup:.4f}). At this budget (a narrow network, minutes of "
        "CPU training, a small synthetic survey) this is no statement about the method; the paper's comparison "
        "needs the full configs on GPUs (configs/paper/).", "",
        "## Plots", "",
    ]
    for m, r in results.items():
        rel = Path(r["eval"]["dir"]).relative_to(out)
        lines += [f"### {METHODS[m]}", "", f"![z_phot vs z_spec]({rel}/zphot_vs_zspec.png)",
                  f"![dz vs z_spec]({rel}/dz_vs_zspec.png)", f"![pdfs]({rel}/pdfs.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    from photoz_hpc.config import save_config
    from photoz_hpc.data.verify import dataset_info
    from photoz_hpc.launch.finetune_eval import finetune_and_evaluate
    from photoz_hpc.train.pretrain import run_pretrain
    from photoz_hpc.train.signals import exit_code

    t0 = time.perf_counter()
    pre_cfg, runs = stage_configs(args)
    out = Path(args.out)
    if not args.skip_train:
        _set_aside_finished_run(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(pre_cfg, args.fresh)
    print("== dataset ==")
    print(json.dumps(dataset_info(dataset), indent=2))
    if args.skip_train:
        return 0
    save_config(pre_cfg, out)
    print("== 1/3 MoCo pretraining ==", flush=True)
    pre = run_pretrain(pre_cfg)
    if pre["preempted"]:  # a pre-emption signal (exit 75: requeue) or Ctrl-C (exit 130), after a checkpoint
        print("stopped during pretraining: re-run the same command to resume")
        return exit_code(pre)
    results = {}
    for i, (method, cfg) in enumerate(runs.items(), start=2):
        print(f"== {i}/3 fine-tuning: {METHODS[method]} ==", flush=True)
        results[method] = finetune_and_evaluate(cfg)
        if results[method]["preempted"]:
            print("stopped during fine-tuning: re-run the same command to resume")
            return exit_code(results[method])
    report = write_report(out, dataset, pre, results, runs, time.perf_counter() - t0)
    print(report.read_text())
    print(f"Quickstart done in {(time.perf_counter() - t0) / 60:.1f} min.\n  report      {report}\n"
          f"  dataset     {dataset}\n  pretraining {pre['out_dir']} (encoder {pre['encoder']})\n" +
          "".join(f"  {m:<11} {r['out_dir']} (best model {r['best_model']}, eval {r['eval']['dir']})\n"
                  for m, r in results.items()))
    return 0
