"""The real Slurm scripts, submitted with sbatch to a real (single-node) cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

from slurm_utils import REPO, require_slurm, sbatch_wait, start_requeued_now

from photoz_hpc.data.prepare import prepare
from photoz_hpc.data.verify import verify_dataset


def test_sbatch_prepare_two_mpi_ranks_matches_serial(release_h5, tmp_path):
    require_slurm()
    a, b = release_h5("a.h5", 11, seed=5), release_h5("b.h5", 6, seed=6, labeled=False)
    serial = prepare([a, b], tmp_path / "serial", samples_per_shard=3)
    res, log = sbatch_wait(
        "slurm/prepare.sh", "--out", str(tmp_path / "slurm"), str(a), str(b), "--samples-per-shard", "3",
        sbatch_opts=("--nodes=1", "--ntasks-per-node=2", "--time=00:10:00"),
        env={"PHOTOZ_TEST_LOG": str(tmp_path / "prepare.out")},
    )
    assert res.returncode == 0, res.stdout + res.stderr + log
    assert "prepared 17 samples in 6 shards" in log
    ms = json.loads((serial / "manifest.json").read_text())
    mm = json.loads((tmp_path / "slurm" / "manifest.json").read_text())
    assert mm["shards"] == ms["shards"] and mm["pixel_stats"] == ms["pixel_stats"]
    assert verify_dataset(tmp_path / "slurm")["ok"]


def test_sbatch_prepare_reports_bad_usage(tmp_path):
    require_slurm()
    res, log = sbatch_wait(
        "slurm/prepare.sh", "--out", str(tmp_path / "x"),
        sbatch_opts=("--ntasks-per-node=1", "--time=00:05:00"), env={"PHOTOZ_TEST_LOG": str(tmp_path / "bad.out")},
    )
    assert res.returncode != 0 and "usage: sbatch slurm/prepare.sh" in log


def _small_dataset(release_h5, tmp_path):
    return prepare([release_h5("train.h5", 160, seed=7)], tmp_path / "ds", samples_per_shard=64)


TINY = ("loader.batch_size=16", "moco.queue_size=128", "augment.crop_size=32", "train.progress=false")


def _pretrain_env(tmp_path, ds, run_dir):
    return {
        "PHOTOZ_CONFIG": "configs/demo.yaml", "PHOTOZ_DATA": str(ds), "PHOTOZ_BACKEND": "torch",
        "PHOTOZ_RUN_DIR": str(run_dir), "PHOTOZ_TEST_LOG": str(tmp_path / "pretrain.out"),
    }


def test_sbatch_pretrain_two_ranks(release_h5, tmp_path):
    require_slurm()
    ds = _small_dataset(release_h5, tmp_path)
    run = tmp_path / "run"
    res, log = sbatch_wait(
        "slurm/pretrain.sh", "train.epochs=2", *TINY,
        sbatch_opts=("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00"),
        env=_pretrain_env(tmp_path, ds, run),
    )
    assert res.returncode == 0, res.stdout + res.stderr + log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "torch" and summary["steps"] == 10
    assert (run / "config.yaml").exists() and (run / "encoder.pt").exists()
    assert "tasks=2" in (run / "launch.log").read_text() and "exit code 0" in (run / "launch.log").read_text()


def test_sbatch_pretrain_preempted_requeues_and_resumes(release_h5, tmp_path):
    """SIGUSR1 (what --signal=USR1@300 sends) -> checkpoint, exit 75, scontrol requeue, exact resume."""
    require_slurm()
    ds = _small_dataset(release_h5, tmp_path)
    run = tmp_path / "run"
    env = dict(os.environ, **_pretrain_env(tmp_path, ds, run))
    cmd = ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={tmp_path / 'pretrain.out'}", "--nodes=1",
           "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00",
           str(REPO / "slurm/pretrain.sh"), "train.epochs=40", "train.checkpoint_every=1000", *TINY]
    job = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.strip().split(";")[0]
    def logs() -> str:
        parts = [run / "launch.log", tmp_path / "pretrain.out"]
        return "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in parts if p.exists()) + "\n" + _job_info(job)

    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0, 180, logs)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        start_requeued_now(job, 240, logs)  # skip Slurm's 120 s requeue delay, safely

        def restarted_and_finished() -> bool:
            return (run / "launch.log").read_text().count("exit code") >= 2

        _wait_for(restarted_and_finished, 400, logs)
    finally:
        subprocess.run(["scancel", job], check=False)
    launch = (run / "launch.log").read_text()
    out = (tmp_path / "pretrain.out").read_text()
    assert "exit code 75" in launch and "restart 1" in launch and launch.rstrip().endswith("exit code 0"), launch + out
    assert "requeueing job" in out and re.search(r"resumed from .*ckpt_\d+\.pt at step [1-9]", out), out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 200 and summary["start_step"] > 0 and not summary["preempted"]


def _job_info(job: str) -> str:
    res = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else ""


def _wait_for(predicate, timeout: float, diagnostics=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"condition not reached within {timeout} s\n{diagnostics()}")


def test_sbatch_predict_array_then_verify(release_h5, tmp_path):
    """Two array tasks x two ranks write the catalogue's three parts; the verify step finds every galaxy once."""
    require_slurm()
    import dataclasses

    from photoz_hpc.config import FinetuneRunConfig, load_config
    from photoz_hpc.models.photoz_net import build_photoz_net, save_photoz_model

    ds = _small_dataset(release_h5, tmp_path)  # 160 galaxies in shards of 64: parts of 64, 64, 32
    cfg = load_config(None, ["model.arch=resnet18", "model.width=8", "augment.crop_size=16", "loader.backend=reference"],
                      root=FinetuneRunConfig)
    ckpt = save_photoz_model(build_photoz_net(cfg.model), cfg.model, tmp_path / "best_model.pt",
                             {"config": dataclasses.asdict(cfg)})
    cat = tmp_path / "catalogue"
    env = {"PHOTOZ_CHECKPOINT": str(ckpt), "PHOTOZ_DATA": str(ds), "PHOTOZ_CATALOGUE": str(cat),
           "PHOTOZ_BACKEND": "torch", "PHOTOZ_TEST_LOG": str(tmp_path / "predict.out")}
    res, log = sbatch_wait(
        "slurm/predict.sh", "--batch-size", "32",
        sbatch_opts=("--array=0-1", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                     "--time=00:10:00"),
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr + log
    ranks = {p.stem: json.loads(p.read_text())["rank"] for p in (cat / "done").glob("*.json")}
    # task 0 gets part 0 (its rank 1: block 0 of one part is empty), task 1 parts 1 and 2 (ranks 0 and 1)
    assert ranks == {"d000-s00000": 1, "d000-s00001": 0, "d000-s00002": 1}, ranks
    res, log = sbatch_wait("slurm/predict.sh", "--verify", sbatch_opts=("--ntasks-per-node=1", "--gpus-per-node=0",
                                                                        "--cpus-per-task=1", "--time=00:05:00"),
                           env={**env, "PHOTOZ_TEST_LOG": str(tmp_path / "verify.out")})
    assert res.returncode == 0 and "OK: 160 of 160 galaxies in 3 of 3 parts" in log, res.stdout + res.stderr + log
    assert (cat / "manifest.json").exists()
