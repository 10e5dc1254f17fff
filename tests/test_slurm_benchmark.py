"""slurm/benchmark_scaling.sh on the single-node cluster: weak scaling at 1 and 2 ranks, then the merged table."""

from __future__ import annotations

import json
import os
import re
import subprocess

from slurm_utils import REPO, require_slurm, wait_for

from photoz_hpc.data.prepare import prepare


def test_benchmark_scaling_one_and_two_ranks_then_merge(release_h5, tmp_path):
    require_slurm()
    ds = prepare([release_h5("train.h5", 160, seed=7)], tmp_path / "ds", samples_per_shard=64)
    out = tmp_path / "scaling"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PHOTOZ_CONFIG="configs/demo.yaml",
               PHOTOZ_DATA=str(ds), PHOTOZ_BACKEND="torch", PHOTOZ_SCALING_DIR=str(out), PHOTOZ_SCALING_UNIT="tasks",
               PHOTOZ_BATCH="16", PHOTOZ_STEPS="12",
               PHOTOZ_SCALING_SBATCH=f"--gpus-per-node=0 --cpus-per-task=1 --time=00:10:00 --output={tmp_path}/%j.out")
    res = subprocess.run(["bash", "slurm/benchmark_scaling.sh", "--submit", "1", "2"], cwd=REPO, capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = re.findall(r"job (\d+)", res.stdout)
    assert len(ids) == 3, res.stdout

    def logs() -> str:
        return "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.out"))

    def done() -> bool:
        return not subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip()

    try:
        wait_for(done, 300, logs)
    finally:
        subprocess.run(["scancel", *ids], check=False)
    table = json.loads((out / "scaling-weak.json").read_text())
    assert [r["ranks"] for r in table["runs"]] == [1, 2] and all(r["img_per_s"] > 0 for r in table["runs"]), logs()
    assert table["runs"][0]["efficiency"] == 1.0 and "| torch | 2 | 32 |" in (out / "scaling-weak.md").read_text()
