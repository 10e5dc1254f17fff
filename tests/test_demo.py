"""The README's main job, ``photoz-hpc quickstart`` (alias ``demo``), end to end on a tiny synthetic survey:
run from another directory with the packaged configs, it pretrains, fine-tunes next to the supervised
baseline, evaluates both and writes the report; a re-run trains afresh."""

from __future__ import annotations

import json
import subprocess
import sys

from photoz_hpc.data.verify import verify_dataset


def test_quickstart_runs_end_to_end_from_any_directory_and_a_rerun_trains_afresh(tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    args = [
        sys.executable, "-m", "photoz_hpc", "demo", "--out", "run", "data.path=survey",
        "data.synth_n=128", "data.samples_per_shard=32", "loader.batch_size=16", "moco.queue_size=64",
        "augment.crop_size=16", "augment.jitter_max=2", "train.progress=false", "train.epochs=2",
    ]
    res = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Quickstart done" in res.stdout and "sigma_MAD" in res.stdout
    assert verify_dataset(work / "survey")["count"] == 128
    pre = json.loads((work / "run" / "pretrain" / "summary.json").read_text())
    assert pre["task"] == "pretrain" and pre["steps"] == pre["total_steps"] == 16 and pre["last_loss"] is not None
    assert (work / "run" / "pretrain" / "encoder.pt").exists()
    for method in ("ssl", "supervised"):
        s = json.loads((work / "run" / method / "summary.json").read_text())
        assert s["task"] == "finetune" and s["steps"] == s["total_steps"] > 0
        assert s["eval"]["metrics"]["n"] == s["n_val"] > 0
        for name in ("metrics.json", "predictions.csv", "zphot_vs_zspec.png", "dz_vs_zspec.png", "pdfs.png"):
            assert (work / "run" / method / "eval" / name).exists(), (method, name)
    ssl_cfg = (work / "run" / "ssl" / "config.yaml").read_text()
    assert "encoder.pt" in ssl_cfg and "init: none" in (work / "run" / "supervised" / "config.yaml").read_text()
    # both methods trained on the same galaxies and were validated on the same held-out ones
    for name in ("train_ids.npy", "val_ids.npy"):
        assert (work / "run" / "ssl" / name).read_bytes() == (work / "run" / "supervised" / name).read_bytes()
    report = (work / "run" / "report.md").read_text()
    assert "| self-supervised" in report and "| supervised baseline" in report and "zphot_vs_zspec.png" in report

    res = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reusing verified dataset" in res.stderr and "Quickstart done" in res.stdout
    assert (work / "run.prev" / "report.md").exists()
    assert json.loads((work / "run" / "pretrain" / "summary.json").read_text())["start_step"] == 0


def test_quickstart_runs_another_survey_and_refuses_reusing_one_of_another(tmp_path):
    """``quickstart --survey hsc``: synthesised, prepared and trained as HSC (5 bands g r i z y, its 400-bin grid);
    the same data.path asked for as LSST afterwards is an error, not a silent reuse."""
    from photoz_hpc.data.dataset import ShardedDataset

    base = [sys.executable, "-m", "photoz_hpc", "quickstart", "--out", "run", "data.path=survey", "data.synth_n=128",
            "data.samples_per_shard=32", "loader.batch_size=16", "moco.queue_size=32", "augment.crop_size=16",
            "augment.jitter_max=2", "train.progress=false", "train.epochs=1"]
    res = subprocess.run([*base, "--survey", "hsc"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ds = ShardedDataset(tmp_path / "survey")
    assert ds.survey.name == "hsc" and ds.survey.bands == tuple("grizy") and ds.image_shape[-1] == 5
    best = json.loads((tmp_path / "run" / "ssl" / "summary.json").read_text())
    assert best["eval"]["metrics"]["n"] == best["n_val"] > 0
    assert "survey hsc, bands g r i z y" in (tmp_path / "run" / "report.md").read_text()
    res = subprocess.run([*base, "--survey", "lsst"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode != 0 and "holds survey 'hsc'" in res.stderr and "--fresh" in res.stderr
