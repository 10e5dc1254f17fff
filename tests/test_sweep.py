"""Label-fraction sweeps: a stable and complete task order, per-task configs, resubmission (skip finished,
resume killed, refuse changed), the report on a tiny real sweep, the labels-saved value on a constructed
case with a known answer, and bad sweep files."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import TINY_MODEL, make_dataset

from photoz_hpc.cli import main
from photoz_hpc.config import Config, load_config
from photoz_hpc.errors import ConfigError
from photoz_hpc.launch.sweep import PAPER_FRACTIONS, load_sweep, plan, task_configs
from photoz_hpc.launch.sweep_report import labels_needed, write_sweep_report
from photoz_hpc.models.moco import build_moco
from photoz_hpc.train.checkpoint import export_checkpoint_encoder, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_MODEL, "augment.crop_size=16", "augment.jitter_max=2", "loader.batch_size=16",
        "loader.backend=reference", "loader.device=cpu", "train.precision=fp32", "train.progress=false",
        "train.tensorboard=false", "train.device=cpu", "optim.lr=0.2", "optim.batch_ref=16", "dist.backend=none",
        "train.max_steps=2", "train.checkpoint_every=1", "finetune.val_fraction=0.25"]


def write_sweep(path: Path, **values) -> Path:
    base = {"methods": ["ssl", "supervised", "linear_probe"], "fractions": [0.025, 0.5, 1.0], "seeds": [0, 1],
            "finetune_config": str(REPO / "configs" / "finetune.yaml"), "encoder": "runs/pretrain/encoder.pt",
            "runs_dir": str(path.parent / "runs"), "overrides": ["finetune.split_seed=5"]}
    base.update(values)
    base = {k: v for k, v in base.items() if v is not None}
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


# ---------------------------------------------------------------------- the plan


def test_task_order_is_stable_complete_and_documented(tmp_path, capsys):
    sweep = load_sweep(write_sweep(tmp_path / "sweep.yaml"))
    tasks = plan(sweep)
    assert len(tasks) == 3 * 3 * 2 and [t.index for t in tasks] == list(range(18))
    combos = [(t.method, t.fraction, t.seed) for t in tasks]
    assert len(set(combos)) == 18 and len({t.dir for t in tasks}) == 18
    for t in tasks:  # method-major, then fraction, then seed
        i_m, i_f, i_s = sweep.methods.index(t.method), sweep.fractions.index(t.fraction), sweep.seeds.index(t.seed)
        assert t.index == (i_m * 3 + i_f) * 2 + i_s
    assert tasks[5].dir == Path(sweep.runs_dir) / "ssl" / "1.0" / "1"
    assert [(t.method, t.fraction, t.seed) for t in plan(load_sweep(tmp_path / "sweep.yaml"))] == combos
    upstream = ["--produced", "data/sdss_labeled", "--produced", "runs/pretrain/encoder.pt"]  # not made here
    assert main(["sweep-plan", str(tmp_path / "sweep.yaml"), *upstream]) == 0
    out = capsys.readouterr().out
    assert "18 tasks (18 new)" in out and "--array=0-17" in out
    rows = [line.split() for line in out.splitlines()[1:19]]  # task method fraction seed state dir
    assert all(row[2] == Path(row[5]).parent.name for row in rows)  # 1.0 beside .../1.0/..., not 1
    assert main(["sweep-plan", str(tmp_path / "sweep.yaml"), "--json", *upstream]) == 0
    assert json.loads(capsys.readouterr().out)["array"] == "0-17"
    default = load_sweep(REPO / "configs" / "sweep.yaml")
    assert default.fractions == PAPER_FRACTIONS and len(plan(default)) == 3 * 9 * 3


def test_sweep_plan_and_run_refuse_missing_datasets_and_encoders(tmp_path, capsys):
    from photoz_hpc.launch.sweep import run_sweep

    data, enc, test = tmp_path / "labeled", tmp_path / "pre" / "encoder.pt", tmp_path / "test"
    path = write_sweep(tmp_path / "sweep.yaml", overrides=[f"data.path={data}"], encoder=str(enc),
                       test_data=str(test))
    assert main(["sweep-plan", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"data.path: {data}: dataset directory does not exist" in err
    assert f"{enc} does not exist" in err and f"test_data: {test}: dataset directory does not exist" in err
    with pytest.raises(ConfigError, match="dataset directory does not exist"):  # nothing runs either
        run_sweep(path, "0")
    assert not (tmp_path / "runs").exists()
    # declared as written by an upstream job of the chain: accepted
    produced = [a for p in (data, enc, test) for a in ("--produced", str(p))]
    assert main(["sweep-plan", str(path), *produced]) == 0
    assert "18 tasks (18 new)" in capsys.readouterr().out
    # present: accepted without --produced (the encoder only has to exist here; a dataset must be prepared)
    ds = make_dataset(tmp_path / "made", n=16, size=20)
    enc.parent.mkdir()
    enc.write_bytes(b"encoder")
    path = write_sweep(tmp_path / "sweep.yaml", overrides=[f"data.path={ds}"], encoder=str(enc))
    assert main(["sweep-plan", str(path)]) == 0
    capsys.readouterr()
    (tmp_path / "notprepared").mkdir()
    path = write_sweep(tmp_path / "sweep.yaml", overrides=[f"data.path={tmp_path / 'notprepared'}"], encoder=str(enc))
    assert main(["sweep-plan", str(path)]) == 1 and "manifest.json is missing" in capsys.readouterr().err


def test_pipeline_sweep_runs_on_the_prepared_data_from_the_pretrained_encoder(tmp_path):
    from photoz_hpc.launch.sweep import pipeline_sweep, sweep_yaml

    sweep = load_sweep(REPO / "configs" / "sweep.yaml")  # data.path comes from configs/finetune.yaml
    derived = pipeline_sweep(sweep, "/scratch/D", "/scratch/pre/encoder.pt", tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text(sweep_yaml(derived, "a note"))
    again = load_sweep(tmp_path / "p.yaml")
    for task, cfg in task_configs(again):
        assert cfg.data.path == "/scratch/D"
        assert cfg.finetune.init == ("none" if task.method == "supervised" else "/scratch/pre/encoder.pt")
    assert again.runs_dir == sweep.runs_dir and again.fractions == sweep.fractions
    other = dataclasses.replace(sweep, overrides=("data.path=/elsewhere",))
    with pytest.raises(ConfigError, match="overrides set data.path=/elsewhere but the pipeline fine-tunes on"):
        pipeline_sweep(other, "/scratch/D", "/scratch/pre/encoder.pt", tmp_path / "p.yaml")
    same = dataclasses.replace(sweep, overrides=("data.path=/scratch/D", "train.epochs=3"))
    assert pipeline_sweep(same, "/scratch/D", "e.pt", tmp_path / "p.yaml").overrides == ("train.epochs=3",
                                                                                          "data.path=/scratch/D")


def test_each_task_gets_its_method_fraction_and_seed_and_the_same_validation_split(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "sweep.yaml"))
    cfgs = dict((t.index, (t, c)) for t, c in task_configs(sweep))
    for t, c in cfgs.values():
        ft = c.finetune
        assert (c.seed, ft.subset_seed, ft.label_fraction, c.out_dir) == (t.seed, t.seed, t.fraction, str(t.dir))
        assert ft.split_seed == 5  # shared: every task validates on the same galaxies
        assert ft.init == ("none" if t.method == "supervised" else "runs/pretrain/encoder.pt")
        assert ft.freeze_backbone == (t.method == "linear_probe")


@pytest.mark.parametrize("change, message", [
    ({"methods": ["ssl", "simclr"]}, r"unknown method\(s\) \['simclr'\]"),
    ({"fractions": [0.5, 0.0]}, r"in \(0, 1\]"),
    ({"fractions": [2.5, 12.5]}, r"in \(0, 1\] \(e.g. 0.025 for 2.5 %\)"),
    ({"fractions": [0.5, 0.5]}, "twice"),
    ({"seeds": [0, -1]}, "non-negative integers"),
    ({"seeds": None}, r"missing key\(s\) \['seeds'\]"),
    ({"label_fractions": [0.5]}, r"unknown key\(s\) \['label_fractions'\]"),
    ({"encoder": None}, "'encoder' must be a non-empty string"),
    ({"overrides": ["finetune.label_fraction=0.3"]}, "must not set 'finetune.label_fraction'"),
    ({"overrides": ["subset_seed=3"]}, "must not set 'finetune.subset_seed'"),
    ({"overrides": ["optim.nope=1"]}, "unknown config key 'optim.nope'"),
    ({"overrides": ["optim.lr=-1"]}, "optim.lr"),
    ({"finetune_config": "nowhere.yaml"}, "finetune_config: config file 'nowhere.yaml' does not exist"),
])
def test_bad_sweep_files_give_clear_errors_naming_the_file(tmp_path, change, message):
    path = write_sweep(tmp_path / "bad.yaml", **change)
    with pytest.raises(ConfigError, match=message) as err:
        task_configs(load_sweep(path))
    assert str(path) in str(err.value)


def test_finetune_sweep_arguments_are_checked(tmp_path, capsys):
    path = write_sweep(tmp_path / "sweep.yaml")
    for argv, message in ((["--task-id", "18"], "outside 0..17"), (["--task-id", "x"], "integer or 'all'"),
                          ([], "needs --task-id"), (["--task-id", "0", "--config", "a.yaml"], "drop --config"),
                          (["--task-id", "0", "seed=3"], "put them in the sweep file")):
        assert main(["finetune", "--sweep", str(path), *argv]) == 1
        assert message in capsys.readouterr().err
    assert main(["finetune", "--task-id", "0"]) == 1
    assert "--task-id needs --sweep" in capsys.readouterr().err


# ---------------------------------------------------------------------- running and resubmitting


def _encoder(tmp_path: Path, data: Path) -> Path:
    cfg = load_config(None, [*TINY_MODEL, "moco.queue_size=64", "loader.batch_size=16",
                             f"data.path={data}", "seed=11"], root=Config)
    ckpt = save_checkpoint(tmp_path / "ck", 1, {"task": "pretrain", "model": build_moco(cfg).state_dict(),
                                                "config": dataclasses.asdict(cfg)})
    return export_checkpoint_encoder(ckpt, tmp_path / "encoder.pt")


def test_resubmission_skips_finished_resumes_killed_and_refuses_changed(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=96, size=20)
    (tmp_path / "base.yaml").write_text("seed: 0\n")
    path = write_sweep(tmp_path / "sweep.yaml", methods=["supervised", "ssl"], fractions=[0.5, 1.0], seeds=[0],
                       finetune_config=str(tmp_path / "base.yaml"), encoder=str(_encoder(tmp_path, data)),
                       overrides=[*TINY, f"data.path={data}"])
    sweep = load_sweep(path)
    tasks = plan(sweep)
    assert main(["finetune", "--sweep", str(path), "--task-id", "1"]) == 0
    summary = json.loads((tasks[1].dir / "summary.json").read_text())
    assert summary["eval"]["metrics"]["n"] == 24 and not summary["preempted"] and summary["n_train"] == 72
    stamp = (tasks[1].dir / "summary.json").stat().st_mtime_ns
    capsys.readouterr()

    assert main(["finetune", "--sweep", str(path), "--task-id", "all"]) == 0
    status = {o["task"]: o["status"] for o in json.loads(capsys.readouterr().out)}
    assert status == {0: "done", 1: "skipped (finished)", 2: "done", 3: "done"}
    assert (tasks[1].dir / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((tasks[2].dir / "summary.json").read_text())["n_train"] == 36  # ssl at 0.5

    # killed after its last checkpoint, before the end: it resumes (nothing left to train) and evaluates
    (tasks[3].dir / "summary.json").unlink()
    main(["sweep-plan", str(path)])
    assert "resumable" in capsys.readouterr().out
    assert main(["finetune", "--sweep", str(path), "--task-id", "3"]) == 0
    assert json.loads((tasks[3].dir / "summary.json").read_text())["start_step"] == 2

    report = write_sweep_report(sweep.runs_dir)
    assert report["n_expected"] == 4 and report["n_used"] == 4 and report["metric_set"] == "validation"
    rows = list(csv.DictReader(open(Path(report["out"]) / "tasks.csv")))
    assert [(r["method"], float(r["fraction"]), r["state"]) for r in rows] == [
        ("supervised", 0.5, "finished"), ("supervised", 1.0, "finished"), ("ssl", 0.5, "finished"),
        ("ssl", 1.0, "finished")]
    for name in ("figure2.png", "labels_saved.png", "report.md", "summary.csv", "labels_saved.csv"):
        assert (Path(report["out"]) / name).stat().st_size > 0

    # a changed sweep: every task it touches is refused, naming the directory
    write_sweep(path, methods=["supervised", "ssl"], fractions=[0.5, 1.0], seeds=[0],
                finetune_config=str(tmp_path / "base.yaml"), encoder=str(sweep.encoder),
                overrides=[*TINY, f"data.path={data}", "optim.lr=0.1"])
    capsys.readouterr()
    assert main(["finetune", "--sweep", str(path), "--task-id", "0"]) == 1
    err = capsys.readouterr().err
    assert str(tasks[0].dir) in err and "another config" in err and "optim.lr" in err
    main(["sweep-plan", str(path)])
    assert "4 tasks (4 changed)" in capsys.readouterr().out


# ---------------------------------------------------------------------- the report


def _fake_task(root: Path, method: str, fraction: float, seed: int, sigma: float, preempted: bool = False) -> None:
    d = root / method / repr(fraction) / str(seed)
    d.mkdir(parents=True)
    metrics = {"sigma_mad": sigma, "eta": sigma / 2, "bias": 0.001, "outlier_rate_lsst": 0.01, "n": 100}
    (d / "summary.json").write_text(json.dumps({"preempted": preempted, "eval": {"metrics": metrics},
                                                "best_val": {"epoch": 3}, "n_train": int(1000 * fraction)}))


def test_labels_needed_interpolates_in_log_fraction_on_a_monotone_curve():
    f, s = [0.1, 0.2, 0.4, 0.8], [0.08, 0.06, 0.04, 0.045]  # the last point is worse: the curve stays at 0.04
    assert labels_needed(f, s, 0.04) == (pytest.approx(0.4), "ok")
    assert labels_needed(f, s, 0.05)[0] == pytest.approx(math.sqrt(0.2 * 0.4))
    assert labels_needed(f, s, 0.07)[0] == pytest.approx(math.sqrt(0.1 * 0.2))
    assert labels_needed(f, s, 0.08) == (pytest.approx(0.1), "ok")
    assert math.isnan(labels_needed(f, s, 0.039)[0]) and labels_needed(f, s, 0.039)[1] == "beyond range"
    assert labels_needed(f, s, 0.09)[1] == "below range"
    assert labels_needed(f[::-1], s[::-1], 0.05)[0] == pytest.approx(math.sqrt(0.2 * 0.4))  # order irrelevant


def test_report_on_a_constructed_sweep_has_the_known_labels_saved(tmp_path):
    runs = tmp_path / "runs"
    sup = {0.1: 0.08, 0.2: 0.06, 0.4: 0.04, 0.8: 0.045}
    ssl = {0.1: 0.04, 0.2: 0.05, 0.4: 0.02, 0.8: 0.09}
    for f, s in sup.items():  # seeds 0.002 above and below the mean
        _fake_task(runs, "supervised", f, 0, s + 0.002)
        _fake_task(runs, "supervised", f, 1, s - 0.002)
    for f, s in ssl.items():
        for seed in (0, 1):
            if (f, seed) != (0.8, 1):  # missing
                _fake_task(runs, "ssl", f, seed, s, preempted=(f, seed) == (0.4, 1))
    report = write_sweep_report(runs, out=tmp_path / "report")
    assert report["n_expected"] == 16 and report["n_used"] == 14
    assert sorted(report["not_used"]) == ["ssl/0.4/1: preempted", "ssl/0.8/1: missing"]
    saved = {r["fraction"]: r for r in report["labels_saved"]}
    assert saved[0.1]["f_sup"] == pytest.approx(0.4) and saved[0.1]["ratio"] == pytest.approx(4.0)
    assert saved[0.2]["f_sup"] == pytest.approx(math.sqrt(0.08)) and saved[0.2]["ratio"] == pytest.approx(math.sqrt(2))
    assert (saved[0.4]["status"], saved[0.4]["f_sup"]) == ("beyond range", None)
    assert saved[0.8]["status"] == "below range"
    out = tmp_path / "report"
    summary = {(r["method"], float(r["fraction"])): r for r in csv.DictReader(open(out / "summary.csv"))}
    assert float(summary[("supervised", 0.2)]["sigma_mad_mean"]) == pytest.approx(0.06)
    assert float(summary[("supervised", 0.2)]["sigma_mad_std"]) == pytest.approx(0.002 * math.sqrt(2))
    assert summary[("ssl", 0.4)]["n_seeds"] == "1"
    text = (out / "report.md").read_text()
    assert "| ssl | 10 % | 0.0400 | 40 % | 4.00 |" in text and "ssl / 0.8 / seed 1: missing" in text
    assert (out / "figure2.png").stat().st_size > 1000 and (out / "labels_saved.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(out / "labels_saved.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok", "beyond range", "below range"]
    assert np.isclose(float(rows[0]["ratio"]), 4.0)


def test_report_uses_test_metrics_when_every_task_has_them(tmp_path):
    runs = tmp_path / "runs"
    for method, f, s in (("supervised", 0.5, 0.05), ("supervised", 1.0, 0.03), ("ssl", 0.5, 0.04)):
        _fake_task(runs, method, f, 0, s)
        (runs / method / repr(f) / "0" / "test").mkdir()
        (runs / method / repr(f) / "0" / "test" / "metrics.json").write_text(json.dumps({"metrics": {
            "sigma_mad": s + 0.01, "eta": 0.1, "bias": 0.0, "outlier_rate_lsst": 0.0, "n": 50}}))
    report = write_sweep_report(runs)
    assert report["metric_set"] == "test"
    assert report["labels_saved"][0]["sigma_mad"] == pytest.approx(0.05)


def test_report_of_an_empty_directory_is_an_error(tmp_path, capsys):
    assert main(["sweep-report", str(tmp_path)]) == 1
    assert "no sweep task directories" in capsys.readouterr().err


def test_science_benchmark_configs_validate(monkeypatch):
    monkeypatch.chdir(REPO)  # sweep paths are relative to the current directory
    for name in ("science_benchmark.yaml", "science_benchmark/pretrain_cpu.yaml"):
        cfg = load_config(REPO / "configs" / name, root=Config)
        assert cfg.train.epochs >= 100 and cfg.augment.ebv_max == 0.5
    for path in sorted((REPO / "configs" / "science_benchmark").glob("sweep_*.yaml")):
        sweep = load_sweep(path)
        for _, cfg in task_configs(sweep):
            assert cfg.finetune.val_data and sweep.test_data and cfg.finetune.val_data != sweep.test_data
            assert cfg.model.width in (8, 32) and cfg.out_dir.startswith(sweep.runs_dir)


def test_a_task_stopped_by_ctrl_c_ends_the_sweep_with_130_not_a_requeue() -> None:
    from photoz_hpc.launch.sweep import stop_code

    assert (stop_code("preempted"), stop_code("interrupted"), stop_code("done"), stop_code("skipped (finished)")) \
        == (75, 130, 0, 0)

