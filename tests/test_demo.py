"""The README's main job, ``photoz-hpc demo``, end to end on a small synthetic survey."""

from __future__ import annotations

import json
import subprocess
import sys

from photoz_hpc.data.verify import verify_dataset


def test_demo_runs_end_to_end_and_a_rerun_trains_afresh(tmp_path):
    args = [
        sys.executable, "-m", "photoz_hpc", "demo", f"out_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'survey'}",
        "data.synth_n=96", "data.samples_per_shard=32", "train.epochs=2", "loader.batch_size=16",
        "moco.queue_size=64", "augment.crop_size=16", "augment.jitter_max=2", "train.progress=false",
    ]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Demo done: MoCo loss" in res.stdout and "checkpoint" in res.stdout
    assert verify_dataset(tmp_path / "survey")["count"] == 96
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 12 and summary["last_loss"] is not None
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "encoder.pt").exists()

    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reusing verified dataset" in res.stderr and "Demo done" in res.stdout
    assert (tmp_path / "run.prev" / "summary.json").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["start_step"] == 0
