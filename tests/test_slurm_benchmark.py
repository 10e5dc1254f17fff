"""slurm/benchmark_scaling.sh: train_throughput.py under srun at 1 and 2 ranks on the single-node cluster (weak
scaling with torch, strong scaling with Horovod and the 1-rank baseline the script adds), one JSON per run, then
the table of benchmarks/scaling.py report; bad settings fail before anything is submitted."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from helpers import require_horovod
from slurm_utils import REPO, require_slurm, wait_for

from photoz_hpc.data.prepare import prepare

TINY = ("moco.queue_size=128", "augment.crop_size=16", "train.progress=false")
MEASURE = {"PHOTOZ_WARMUP": "2", "PHOTOZ_WINDOWS": "2", "PHOTOZ_WINDOW_STEPS": "3"}


def _env(**extra: str) -> dict:
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                PHOTOZ_CONFIG="configs/demo.yaml", **MEASURE, **extra)


@pytest.mark.parametrize("backend, kind, sizes", [("torch", "weak", ["1", "2"]), ("horovod", "strong", ["2"])])
def test_benchmark_scaling_one_and_two_ranks_then_report(release_h5, tmp_path, backend, kind, sizes):
    require_slurm()
    if backend == "horovod":
        require_horovod()
    ds = prepare([release_h5("train.h5", 160, seed=7)], tmp_path / "my data", samples_per_shard=64)
    out = tmp_path / "scaling out"  # spaces: the scripts quote their paths
    env = _env(PHOTOZ_DATA=str(ds), PHOTOZ_BACKEND=backend, PHOTOZ_SCALING=kind, PHOTOZ_SCALING_DIR=str(out),
               PHOTOZ_SCALING_UNIT="tasks", PHOTOZ_BATCH="16", PHOTOZ_GLOBAL_BATCH="32",
               PHOTOZ_SCALING_SBATCH=f"--gpus-per-node=0 --cpus-per-task=1 --time=00:10:00 --output={tmp_path}/%j.out")
    res = subprocess.run(["bash", "slurm/benchmark_scaling.sh", "--submit", *sizes, "--", *TINY], cwd=REPO,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = re.findall(r"job (\d+)", res.stdout)
    assert len(ids) == 3 and ("baseline" in res.stdout) == (sizes == ["2"]), res.stdout

    def logs() -> str:
        return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.out")))

    def done() -> bool:
        return not subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip()

    try:
        wait_for(done, 420, logs, 2)
    finally:
        subprocess.run(["scancel", *ids], check=False)
    for n in (1, 2):  # one JSON per run, named as benchmarks/scaling.py run names them
        blob = json.loads((out / f"{kind}-{backend}-sharded-n{n}.json").read_text())
        assert blob["benchmark"] == "train_throughput" and blob["results"][0]["world_size"] == n, logs()
        assert blob["queue_mode"] == "sharded" and blob["windows"] == 2 and blob["window_steps"] == 3
        launch = (out / "logs" / f"{kind}-{backend}-sharded-n{n}" / "launch.log").read_text()
        assert f"tasks={n}" in launch and launch.rstrip().endswith("exit code 0"), launch
    rows = json.loads((out / f"scaling-{kind}.json").read_text())
    assert [r["ranks"] for r in rows] == [1, 2], logs()
    assert all(r["kind"] == kind and r["backend"] == backend and r["mode"] == "end2end" for r in rows), rows
    assert all(r["img_per_s"] > 0 for r in rows) and rows[0]["efficiency"] == 1.0 and rows[1]["efficiency"] > 0, rows
    batches = [(r["batch_per_rank"], r["global_batch"]) for r in rows]
    assert batches == ([(16, 16), (16, 32)] if kind == "weak" else [(32, 32), (16, 32)]), batches
    table = (out / f"scaling-{kind}.md").read_text()
    assert f"| {kind} | end2end | {backend} | sharded | 2 | {batches[1][0]} | 32 |" in table and "| 100% |" in table, table
    assert (out / f"scaling-{kind}.png").stat().st_size > 0

    again = subprocess.run(["bash", "slurm/benchmark_scaling.sh", "--merge", str(out)], cwd=REPO, capture_output=True,
                           text=True, env=env)  # the entry point that rebuilds the table
    assert again.returncode == 0 and (out / f"scaling-{kind}.md").read_text() == table, again.stdout + again.stderr


@pytest.mark.parametrize("setting, expect", [
    ({"PHOTOZ_STEPS": "60"}, "PHOTOZ_STEPS is gone"),
    ({"PHOTOZ_THROUGHPUT_MODE": "end2end"}, "PHOTOZ_THROUGHPUT_MODE=end2end reads the dataset: set PHOTOZ_DATA"),
    ({"PHOTOZ_SCALING": "sideways"}, "PHOTOZ_SCALING must be weak or strong"),
    ({"PHOTOZ_DATA": "/nowhere"}, "/nowhere is not a prepared dataset"),
    ({"PHOTOZ_EXTRA": "train.epochz=1"}, "unknown config key 'train.epochz'"),
])
def test_benchmark_scaling_bad_settings_fail_before_submitting(tmp_path, setting, expect):
    extra = [setting.pop("PHOTOZ_EXTRA")] if "PHOTOZ_EXTRA" in setting else []
    env = _env(PHOTOZ_SCALING_DIR=str(tmp_path / "out"), PATH=f"{tmp_path}:{os.environ['PATH']}", **setting)
    (tmp_path / "sbatch").write_text("#!/bin/sh\necho sbatch was called >&2\nexit 1\n")
    (tmp_path / "sbatch").chmod(0o755)  # nothing may be submitted
    res = subprocess.run(["bash", "slurm/benchmark_scaling.sh", "--submit", "1", "2", "--", *extra], cwd=REPO,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and expect in res.stderr and "sbatch was called" not in res.stderr, res.stderr
