"""The real Slurm scripts, submitted with sbatch to a real (single-node) cluster."""

from __future__ import annotations

import json

from slurm_utils import require_slurm, sbatch_wait

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
