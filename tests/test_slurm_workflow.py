"""The Slurm workflow on a real (single-node) cluster: the fine-tune sweep as a job array (concurrent tasks, a
pre-empted task requeued and resumed, finished tasks skipped on resubmission, the report), the whole paper
pipeline as one dependency chain, pretraining under srun with the Horovod backend, bad submissions failing at
once, and the scripts themselves (one pre-emption exit code, shellcheck)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import write_release_h5
from slurm_utils import REPO, job_info, require_slurm, sbatch_wait, start_requeued_now, submit, wait_for

from photoz_hpc.data.prepare import prepare
from photoz_hpc.train.signals import EXIT_PREEMPTED

SMALL = ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00")
TINY_FT = ["model.arch=resnet18", "model.width=8", "model.stem_kernel=3", "augment.crop_size=16", "augment.jitter_max=2",
           "loader.batch_size=16", "loader.backend=reference", "loader.device=cpu", "train.precision=fp32",
           "train.progress=false", "train.tensorboard=false", "optim.lr=0.2", "optim.batch_ref=16",
           "dist.backend=none", "finetune.val_fraction=0.25", "train.checkpoint_every=1000", "train.log_every=1"]
TINY_PRE = ("loader.batch_size=16", "moco.queue_size=128", "augment.crop_size=16", "train.progress=false")


def _dataset(release_h5, tmp_path: Path) -> Path:
    return prepare([release_h5("train.h5", 160, seed=7)], tmp_path / "ds", samples_per_shard=64)


def _sweep_file(tmp_path: Path, ds: Path, methods, fractions, seeds, steps: int, encoder: str = "",
                runs: str = "sweep") -> Path:
    sweep = {"methods": methods, "fractions": fractions, "seeds": seeds,
             "finetune_config": str(REPO / "configs" / "finetune.yaml"), "runs_dir": str(tmp_path / runs),
             "overrides": [f"data.path={ds}", f"train.max_steps={steps}", *TINY_FT]}
    if encoder:
        sweep["encoder"] = encoder
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _tail(*paths: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in paths if p.is_file())


def _queued(*jobs: str) -> str:
    res = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i %T %r"], capture_output=True, text=True)
    return res.stdout.strip()


def test_sweep_job_array_concurrent_preempted_task_resumes_then_report(release_h5, tmp_path):
    """4 array tasks at once; task 0 gets SIGUSR1, checkpoints, requeues, resumes; resubmission skips; the report."""
    require_slurm()
    ds = _dataset(release_h5, tmp_path)
    sweep = _sweep_file(tmp_path, ds, ["supervised"], [0.5, 1.0], [0, 1], steps=60, runs="sweep runs")  # a space
    env = {"PHOTOZ_SWEEP": str(sweep)}
    out = tmp_path / "out"
    out.mkdir()
    opts = (*SMALL, "--oversubscribe", "--array=0-3%4", f"--output={out}/task-%a.out")
    array = submit("slurm/finetune_sweep.sh", sbatch_opts=opts, env=env)
    runs = tmp_path / "sweep runs"
    task0 = runs / "supervised" / "0.5" / "0"
    log0 = runs / "logs" / "task-0" / "launch.log"

    def logs() -> str:
        return _tail(log0, out / "task-0.out", out / "task-1.out") + "\n" + _queued(array) + "\n" + job_info(f"{array}_0")

    most = 0

    def running_and_training() -> bool:
        nonlocal most
        most = max(most, len(_queued(array).count(" RUNNING ") * "x"))
        metrics = task0 / "metrics.jsonl"
        return metrics.is_file() and metrics.stat().st_size > 0

    try:
        wait_for(running_and_training, 240, logs, 0.3)
        subprocess.run(["scancel", "--signal=USR1", f"{array}_0"], check=True)
        start_requeued_now(f"{array}_0", 240, logs)
        wait_for(lambda: not _queued(array), 400, logs)
    finally:
        subprocess.run(["scancel", array], check=False)
    assert most >= 4, f"at most {most} array tasks ran at the same time\n{logs()}"
    launch = log0.read_text()
    assert f"exit code {EXIT_PREEMPTED}" in launch and "restart 1" in launch and launch.rstrip().endswith("exit code 0"), logs()
    text0 = (out / "task-0.out").read_text()
    assert "requeueing job" in text0 and re.search(r"resumed from .*ckpt_\d+\.pt at step [1-9]", text0), text0
    for d in sorted(runs.glob("supervised/*/*")):
        summary = json.loads((d / "summary.json").read_text())
        assert summary["eval"]["metrics"]["sigma_mad"] >= 0 and not summary["preempted"], d
    assert len(list(runs.glob("supervised/*/*/summary.json"))) == 4

    res, text = sbatch_wait("slurm/finetune_sweep.sh", sbatch_opts=(*SMALL, "--oversubscribe", "--array=0-3"),
                            env={**env, "PHOTOZ_TEST_LOG": str(tmp_path / "again.out")})
    assert res.returncode == 0, res.stdout + res.stderr + text
    assert all("is finished: skipped" in (runs / "logs" / f"task-{i}" / "launch.log").read_text() for i in range(4))

    res, text = sbatch_wait("slurm/finetune_sweep.sh", "--report", sbatch_opts=SMALL,
                            env={**env, "PHOTOZ_TEST_LOG": str(tmp_path / "report.out")})
    assert res.returncode == 0, res.stdout + res.stderr + text
    rows = list(csv.DictReader((runs / "report" / "tasks.csv").open()))
    assert len(rows) == 4 and all(r["state"] == "finished" for r in rows), rows
    assert (runs / "report" / "report.md").is_file() and (runs / "report" / "figure2.png").is_file()


def test_paper_pipeline_one_submission_dependency_chain(release_h5, tmp_path):
    """prepare -> pretrain -> sweep array -> report with --dependency=afterok; --dry-run submits nothing."""
    require_slurm()
    inputs = [str(release_h5("a.h5", 100, seed=3)), str(release_h5("b.h5", 60, seed=4))]
    data, pre = tmp_path / "data", tmp_path / "pretrain"
    sweep = _sweep_file(tmp_path, data, ["ssl", "supervised"], [1.0], [0], steps=3, encoder=str(pre / "encoder.pt"))
    out = tmp_path / "out"
    out.mkdir()
    common = " ".join((*(o for o in SMALL if "ntasks" not in o), "--oversubscribe", f"--output={out}/%x-%j.out"))
    argv = ["bash", "launch/submit_paper_pipeline.sh", "--data", str(data), "--inputs", " ".join(inputs),
            "--sweep", str(sweep), "--pretrain-config", "configs/demo.yaml", "--sbatch", common,
            "--prepare-sbatch", "--ntasks-per-node=2", "--pretrain-sbatch", "--ntasks-per-node=1",
            "--prepare-args", "--samples-per-shard 64", "--", "train.epochs=1", "dist.backend=torch", *TINY_PRE]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    dry = subprocess.run([*argv[:2], "--dry-run", *argv[2:]], cwd=REPO, capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    lines = [ln for ln in dry.stdout.splitlines() if " sbatch " in f" {ln}"]
    assert len(lines) == 4 and "--dependency=afterok:PRETRAIN_JOB --array=0-1%8" in lines[2], dry.stdout
    assert not data.exists() and "nothing submitted" in dry.stdout

    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = dict(re.findall(r"^(prepare|pretrain|sweep|report)\s+(\d+)", res.stdout, re.M))
    assert len(ids) == 4, res.stdout

    def logs() -> str:
        return "\n".join(_tail(p) for p in sorted(out.glob("*.out"))) + "\n" + _queued(*ids.values())

    def done() -> bool:
        queued = _queued(*ids.values())
        assert not re.search(r"DependencyNeverSatisfied|PartitionNodeLimit|launch failed", queued), logs()
        return not queued

    try:
        wait_for(done, 300, logs)
    finally:
        subprocess.run(["scancel", *ids.values()], check=False)
    assert (data / "manifest.json").is_file() and (pre / "encoder.pt").is_file(), logs()
    report = tmp_path / "sweep" / "report"
    rows = list(csv.DictReader((report / "tasks.csv").open()))
    assert sorted(r["method"] for r in rows) == ["ssl", "supervised"] and all(r["state"] == "finished" for r in rows), logs()
    assert (report / "report.md").is_file()


def test_sbatch_pretrain_horovod_backend_under_srun(release_h5, tmp_path):
    require_slurm()
    pytest.importorskip("horovod.torch")
    ds, run = _dataset(release_h5, tmp_path), tmp_path / "run"
    res, log = sbatch_wait(
        "slurm/pretrain.sh", "train.epochs=1", *TINY_PRE,
        sbatch_opts=("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00"),
        env={"PHOTOZ_CONFIG": "configs/demo.yaml", "PHOTOZ_DATA": str(ds), "PHOTOZ_BACKEND": "horovod",
             "PHOTOZ_SRUN_MPI": "pmix", "PHOTOZ_RUN_DIR": str(run), "PHOTOZ_TEST_LOG": str(tmp_path / "hvd.out")},
    )
    assert res.returncode == 0, res.stdout + res.stderr + log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "horovod", summary
    assert "horovod=" in (run / "launch.log").read_text()


@pytest.mark.parametrize("case", ["missing data", "unknown site", "config error", "sweep task out of range"])
def test_bad_submission_fails_at_once_naming_the_problem(release_h5, tmp_path, case):
    require_slurm()
    run = tmp_path / "run"
    env = {"PHOTOZ_CONFIG": "configs/demo.yaml", "PHOTOZ_RUN_DIR": str(run), "PHOTOZ_TEST_LOG": str(tmp_path / "bad.out")}
    script, args, opts, expect = "slurm/pretrain.sh", ["train.epochs=1"], SMALL, ""
    if case == "missing data":
        env["PHOTOZ_DATA"], expect = str(tmp_path / "nowhere"), f"{tmp_path / 'nowhere'} is not a prepared dataset"
    elif case == "unknown site":
        env["PHOTOZ_SITE"], expect = "atlantis", "PHOTOZ_SITE=atlantis: unknown site"
    elif case == "config error":
        env["PHOTOZ_DATA"], args, expect = str(_dataset(release_h5, tmp_path)), ["train.epochz=1"], "config error"
    else:
        sweep = _sweep_file(tmp_path, tmp_path / "ds", ["supervised"], [1.0], [0, 1], steps=2)
        script, args, opts = "slurm/finetune_sweep.sh", [], (*SMALL, "--array=0-2")
        env["PHOTOZ_SWEEP"], expect = str(sweep), "has 2 tasks: use --array=0-1"
    t0 = time.monotonic()
    res, log = sbatch_wait(script, *args, sbatch_opts=opts, env=env, timeout=120)
    assert res.returncode != 0 and expect in log, log
    assert "epochz" in log if case == "config error" else True
    assert not (run / "launch.log").exists() and "srun" not in log, log  # nothing was launched
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------------- the scripts themselves (no cluster)

SCRIPTS = sorted([*REPO.glob("slurm/*.sh"), *REPO.glob("slurm/sites/*.env"), *REPO.glob("launch/*.sh")])


def test_pre_emption_exit_code_is_defined_once_on_the_python_side():
    common = (REPO / "slurm" / "common.sh").read_text()
    assert "from photoz_hpc.train.signals import EXIT_PREEMPTED" in common
    for p in SCRIPTS:
        text = p.read_text()
        assert not re.search(r"\b75\b", text), f"{p} hard-codes the pre-emption exit code: use $PHOTOZ_EXIT_PREEMPTED"
    for name in ("pretrain.sh", "finetune_sweep.sh"):
        text = (REPO / "slurm" / name).read_text()
        assert "source slurm/common.sh" in text and "photoz_finish" in text and "--requeue" in text, name


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        if os.environ.get("PHOTOZ_REQUIRE_SHELLCHECK") == "1":
            pytest.fail("shellcheck is required (PHOTOZ_REQUIRE_SHELLCHECK=1): apt-get install shellcheck")
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    res = subprocess.run(["shellcheck", "-x", "-s", "bash", "-S", "warning", *map(str, SCRIPTS)], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_pipeline_dry_run_fine_tunes_on_its_prepared_data_from_its_encoder(tmp_path):
    """The shipped sweep (no overrides: configs/finetune.yaml says data/sdss_labeled) submitted by the pipeline runs
    on the dataset the pipeline prepares and the encoder its pretraining writes; nothing is written by a dry run."""
    h5 = write_release_h5(tmp_path / "a.h5", 8, seed=1, size=20)
    data, pre = tmp_path / "D", tmp_path / "pre"
    argv = ["bash", "launch/submit_paper_pipeline.sh", "--data", str(data), "--inputs", str(h5), "--sweep",
            "configs/sweep.yaml", "--pretrain-dir", str(pre), "--dry-run"]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    derived = yaml.safe_load(res.stdout.split("(dry run: not written):\n", 1)[1].split("\n\n", 1)[0])
    assert derived["overrides"] == [f"data.path={data}"] and derived["encoder"] == str(pre / "encoder.pt")
    sbatch = [ln for ln in res.stdout.splitlines() if " sbatch " in f" {ln}"]
    assert f"PHOTOZ_DATA={data} " in sbatch[1] and f"PHOTOZ_RUN_DIR={pre} " in sbatch[1], sbatch
    assert all("PHOTOZ_SWEEP=runs/sweep/pipeline-sweep.yaml " in ln for ln in sbatch[2:]), sbatch
    assert "sdss_labeled" not in res.stdout and not (REPO / "runs" / "sweep" / "pipeline-sweep.yaml").exists()
    # an explicit data.path of the sweep naming another dataset, or a missing test set: refused before any sbatch
    sweep = _sweep_file(tmp_path, tmp_path / "other", ["supervised"], [1.0], [0], steps=2)
    res = subprocess.run([*argv[:6], "--sweep", str(sweep), *argv[8:]], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "overrides set data.path=" in res.stderr and "sbatch" not in res.stdout, res.stderr
    raw = yaml.safe_load(sweep.read_text())
    sweep.write_text(yaml.safe_dump({**raw, "overrides": [f"data.path={data}"], "test_data": str(tmp_path / "T")}))
    res = subprocess.run([*argv[:6], "--sweep", str(sweep), *argv[8:]], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and f"test_data: {tmp_path / 'T'}: dataset directory does not exist" in res.stderr


def test_submit_pipeline_dry_run_and_bad_arguments(tmp_path):
    ds = tmp_path / "ds"
    sweep = _sweep_file(tmp_path, ds, ["supervised"], [0.5, 1.0], [0], steps=2, encoder="")
    run = ["bash", "launch/submit_paper_pipeline.sh", "--dry-run", "--sweep", str(sweep), "--pretrain-dir",
           str(tmp_path / "pre"), "--pretrain-config", "configs/demo.yaml"]
    res = subprocess.run([*run, "--data", str(ds)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "is not a prepared dataset" in res.stderr, res.stderr
    ds.mkdir()
    (ds / "manifest.json").write_text("{}")
    res = subprocess.run([*run, "--data", str(ds)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "manifest has no integer 'format_version'" in res.stderr, res.stderr
    shutil.rmtree(ds)
    prepare([write_release_h5(tmp_path / "ds.h5", 16, seed=1, size=20)], ds, samples_per_shard=64)
    res = subprocess.run([*run, "--data", str(ds), "--throttle", "3"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--array=0-1%3 slurm/finetune_sweep.sh" in res.stdout and "prepare.sh" not in res.stdout, res.stdout
    res = subprocess.run([*run, "--data", str(ds), "--", "train.epochz=3"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "epochz" in res.stderr, res.stderr
