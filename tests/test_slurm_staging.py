"""Node-local staging (PHOTOZ_STAGE=1, photoz_stage in slurm/common.sh) on the real single-node cluster: one copy
per node (with data.partition=node, of the node's own shards), checksums verified, that the training reads and
that is removed when the job ends, its bytes and seconds per node in launch.log; a corrupt shard in the source
fails the job at once, naming the file, before any training is launched."""

from __future__ import annotations

import json
import re
import time

import yaml
from slurm_utils import require_slurm, sbatch_wait

from photoz_hpc.data.prepare import prepare
from photoz_hpc.data.verify import verify_dataset

TWO_RANKS = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00")
TINY_PRE = ("train.epochs=1", "loader.batch_size=16", "moco.queue_size=128", "augment.crop_size=16", "train.progress=false")


def _staged_pretrain(release_h5, tmp_path, corrupt: str = "", overrides: tuple[str, ...] = ()):
    """slurm/pretrain.sh on 2 ranks with PHOTOZ_STAGE=1; returns (dataset, stage dir, run dir, result, job log)."""
    ds = prepare([release_h5("train.h5", 160, seed=7)], tmp_path / "shared fs" / "ds", samples_per_shard=64)
    if corrupt:
        with open(ds / corrupt, "r+b") as f:  # same size, other bytes: only the checksum can tell
            f.seek(1000)
            f.write(b"\xff" * 16)
    stage, run = tmp_path / "node local", tmp_path / "run dir"  # spaces: the scripts quote their paths
    env = {"PHOTOZ_CONFIG": "configs/demo.yaml", "PHOTOZ_DATA": str(ds), "PHOTOZ_BACKEND": "torch",
           "PHOTOZ_RUN_DIR": str(run), "PHOTOZ_STAGE": "1", "PHOTOZ_STAGE_DIR": str(stage),
           "PHOTOZ_TEST_LOG": str(tmp_path / "job.out")}
    res, log = sbatch_wait("slurm/pretrain.sh", *TINY_PRE, *overrides, sbatch_opts=TWO_RANKS, env=env, timeout=300)
    return ds, stage, run, res, log


def test_staged_once_per_node_verified_trained_from_then_removed(release_h5, tmp_path):
    """data.partition=node (the global path's shell is the corrupt-shard test's): one node stages its shards."""
    require_slurm()
    ds, stage, run, res, log = _staged_pretrain(release_h5, tmp_path, overrides=("data.partition=node",))
    assert res.returncode == 0, res.stdout + res.stderr + log
    launch = (run / "launch.log").read_text()
    job = re.search(r"^== \S+ job (\d+) ", launch, re.M).group(1)
    staged = stage / f"photoz-{job}" / "ds"
    assert log.count("photoz: staged ") == 1, log  # one copy for the node's two ranks
    assert f"photoz: staged {ds} on " in log and f"in {staged} (" in log and "checksums verified)" in log, log
    # launch.log: the node's stage line, its partition (1 node owns all 3 shards), bytes and seconds
    lines = [ln for ln in launch.splitlines() if ln.startswith("photoz: staged ")]
    assert len(lines) == 1, launch
    got = re.search(r"\(node 0 of 1, partition (\w+): (\d+) of (\d+) shards, (\d+) bytes in ([\d.]+) s, ", lines[0])
    assert got and got.group(1) == "node" and got.group(2) == got.group(3) == "3", lines[0]
    assert int(got.group(4)) == sum(p.stat().st_size for p in ds.iterdir()), lines[0]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["path"] == str(staged), cfg["data"]  # the training read the copy
    assert cfg["data"]["partition"] == "node", cfg["data"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] > 0 and not summary["preempted"], summary
    assert (run / "launch.log").read_text().rstrip().endswith("exit code 0")
    assert stage.is_dir() and not any(stage.iterdir()), list(stage.rglob("*"))  # the copy is gone
    assert verify_dataset(ds)["ok"]  # the source is untouched


def test_corrupt_shard_fails_staging_at_once_naming_the_file(release_h5, tmp_path):
    require_slurm()
    t0 = time.monotonic()
    ds, stage, run, res, log = _staged_pretrain(release_h5, tmp_path, corrupt="shard-00001.bin")
    assert res.returncode != 0, log
    assert f"{ds / 'shard-00001.bin'}: sha256 mismatch (corrupt)" in log, log
    assert f"the copy of {ds} fails verification" in log and "nothing was launched" in log, log
    assert not (run / "launch.log").exists() and not (run / "config.yaml").exists(), log  # no training srun
    assert not list(stage.rglob("*.bin")), list(stage.rglob("*"))  # the bad copy removed
    assert time.monotonic() - t0 < 120
