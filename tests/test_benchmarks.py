"""The benchmark scripts' mechanics (never their figures: goals are recorded in benchmarks/RESULTS.md, not
asserted): each runs in a tiny mode and writes valid JSON, the scaling report merges results, the scaling model
reproduces a hand-computed case, and the DALI wheel's parts reassemble."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_release_h5

from photoz_hpc.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _bench_module(name: str):
    """A benchmarks/ script as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module

TINY = ["model.width=4", "model.embed_dim=16", "loader.batch_size=16", "moco.queue_size=64", "augment.crop_size=16",
        "augment.jitter_max=2", "loader.num_threads=1", "train.cpu_threads=1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    return prepare([write_release_h5(root / "in.h5", 48, seed=3, size=48)], root / "ds", samples_per_shard=16)


def _py(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, text=True, capture_output=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_train_throughput_tiny_run_writes_its_json(store, tmp_path):
    out = tmp_path / "tt.json"
    _py(str(BENCH / "train_throughput.py"), "--config", "configs/demo.yaml", "--data", str(store), "--warmup", "1",
        "--windows", "2", "--window-steps", "2", "--json", str(out), *TINY)
    blob = json.loads(out.read_text())
    assert [r["mode"] for r in blob["results"]] == ["synthetic", "end2end", "pipeline"]
    for r in blob["results"]:
        assert r["img_per_s"] > 0 and len(r["img_per_s_windows"]) == 2 and r["img_per_s_ci95"] >= 0
        assert set(r["breakdown_s"]) == {"data", "forward", "momentum", "queue", "comm", "backward", "optimizer", "other"}
    train = blob["results"][1]
    assert train["breakdown_s"]["forward"] > 0 and train["breakdown_s"]["backward"] > 0 and 0 <= train["data_wait_frac"] < 1
    assert blob["flops_per_image"] > 0 and "mfu" in blob["results"][0]
    assert blob["versions"]["torch"] and blob["load_avg_before"] and blob["date"]


def test_scaling_report_merges_results_into_a_table_and_plot(tmp_path):
    main = _bench_module("scaling").main

    def fake(n: int, rate: float, kind: str, gb: int) -> None:
        blob = {"benchmark": "train_throughput", "kind": kind, "scaling_backend": "torch", "queue_mode": "sharded",
                "model": "resnet18/8", "crop": 32, "embed": 64, "bn_mode": "shuffle",
                "results": [{"mode": "synthetic", "world_size": n, "backend": "torch", "batch_per_rank": gb // n if kind == "strong" else 64,
                             "global_batch": gb, "img_per_s": rate, "img_per_s_ci95": 1.0, "step_s": 0.1,
                             "breakdown_s": {"comm": 0.01}}]}
        (tmp_path / "jobs" / f"{kind}{n}").mkdir(parents=True)
        (tmp_path / "jobs" / f"{kind}{n}" / "r.json").write_text(json.dumps(blob))

    fake(1, 100.0, "weak", 64)
    fake(2, 150.0, "weak", 128)
    fake(1, 100.0, "strong", 128)
    fake(2, 180.0, "strong", 128)
    table, rows = tmp_path / "t.md", tmp_path / "rows.json"
    assert main(["report", str(tmp_path / "jobs"), "--table", str(table), "--plot", str(tmp_path / "p.png"),
                 "--json", str(rows)]) == 0
    eff = {(r["kind"], r["ranks"]): r["efficiency"] for r in json.loads(rows.read_text())}
    assert eff == {("weak", 1): 1.0, ("weak", 2): 0.75, ("strong", 1): 1.0, ("strong", 2): 0.9}
    assert "| weak | synthetic | torch | sharded | 2 |" in table.read_text() and (tmp_path / "p.png").stat().st_size > 0


def test_scaling_run_two_gloo_ranks(store, tmp_path):
    """The launcher: torch backend, 1 and 2 ranks on Gloo, one JSON per run."""
    out = tmp_path / "scaling"
    _py(str(BENCH / "scaling.py"), "run", "--config", "configs/demo.yaml", "--out", str(out), "--ranks", "1,2",
        "--backends", "torch", "--kinds", "weak", "--batch", "16", "--warmup", "1", "--windows", "2",
        "--window-steps", "2", *TINY[:2], "moco.queue_size=64", "augment.crop_size=16", timeout=300)
    for n in (1, 2):
        blob = json.loads((out / f"weak-torch-sharded-n{n}.json").read_text())
        assert blob["results"][0]["world_size"] == n and blob["ranks"] == n and blob["kind"] == "weak"


def test_scaling_model_reproduces_a_hand_computed_case():
    sm = _bench_module("scaling_model")
    Network, Workload, allgather_s, efficiency, step_terms = (sm.Network, sm.Workload, sm.allgather_s, sm.efficiency,
                                                             sm.step_terms)

    net = Network("test", gpus_per_node=2, intra_gbs=1.0, inter_gbs=1.0, alpha_intra_us=0.0, alpha_inter_us=0.0)
    w = Workload(step_s=0.1, batch=2, params=1_000_000, bn_layers=1, bn_channels=8, crop=4, embed=1, overlap=0.0)
    # 4 ranks = 2 nodes x 2: all-reduce of 4 MB = 2 (1/2) 4e6 / 1e9 within + 2 (1/2) 4e6 / 1e9 between = 8 ms
    terms = step_terms(w, 4, net, "torch", "none", "local")
    assert terms["gradients"] == pytest.approx(8e-3)
    assert terms["metrics"] == pytest.approx(2 * 32 / 1e9 * 2 * 0.5)
    # shuffle-BN images: 5 x 4 x 4 x 4 bytes x 2 = 640 B per rank; into a node: 2 x (4 - 2) x 640 B at 1 GB/s
    assert allgather_s(640, 4, net) == pytest.approx(2560 / 1e9)
    shuffle = step_terms(w, 4, net, "torch", "shuffle", "local")["shuffle_bn"]
    assert shuffle == pytest.approx((2560 + 2 * 2 * 8) / 1e9)
    e = efficiency(w, 4, net, "torch", "none", "local")
    assert e["efficiency"] == pytest.approx(0.1 / (0.1 + 8e-3 + 6.4e-8))
    assert e["limiting"] == "gradients"
    hidden = efficiency(Workload(**{**w.__dict__, "overlap": 1.0}), 4, net, "torch", "none", "local")
    assert hidden["terms_s"]["gradients"] == 0.0  # 8 ms hide under a 50 ms backward
    strong = efficiency(w, 2, net, "torch", "none", "local", kind="strong", global_batch=2)
    assert strong["batch_per_rank"] == 1 and math.isclose(strong["compute_s"], 0.05)


def test_scaling_model_cli_compares_with_measured_points(tmp_path):
    main = _bench_module("scaling_model").main

    jobs = tmp_path / "m"
    jobs.mkdir()
    for n, rate in ((1, 100.0), (2, 170.0)):
        (jobs / f"n{n}.json").write_text(json.dumps({
            "benchmark": "train_throughput", "kind": "weak", "scaling_backend": "torch", "queue_mode": "sharded",
            "model": "resnet18/4", "crop": 16, "embed": 16, "bn_mode": "shuffle",
            "results": [{"mode": "synthetic", "world_size": n, "backend": "torch", "batch_per_rank": 16,
                         "global_batch": 16 * n, "img_per_s": rate, "img_per_s_ci95": 0.0, "step_s": 0.16,
                         "breakdown_s": None}]}))
    out = tmp_path / "model.json"
    assert main(["--arch", "resnet18", "--width", "8", "--gpus", "8,256", "--measured", str(jobs), "--json", str(out)]) == 0
    blob = json.loads(out.read_text())
    assert blob["measured_comparison"][0]["measured"] == pytest.approx(0.85)
    assert 0 < blob["measured_comparison"][0]["model"] <= 1
    assert {r["ranks"] for r in blob["rows"]} == {8, 256}


def test_host_feed_tiny_run(store, tmp_path):
    out = tmp_path / "hf.json"
    _py(str(BENCH / "host_feed.py"), "--data", str(store), "--batch-size", "8", "--batches", "3", "--threads", "1,2",
        "--json", str(out), "augment.crop_size=16", "augment.jitter_max=2")
    blob = json.loads(out.read_text())
    assert {"read", "draws", "padded", "read_threads1", "read_threads2"} <= set(blob["stages"])
    assert blob["sample_bytes"] == 48 * 48 * 5 * 4 and blob["target_gb_per_s"] == pytest.approx(40000 * 48 * 48 * 5 * 4 / 1e9)


def test_loader_wait_tiny_run(store, tmp_path):
    """Both loaders run every step of the timed epochs; our host work is their difference; the first steps of
    epochs are kept apart (48 labeled samples, batch 8: 6 steps per epoch, epochs 1 and 2 timed)."""
    out = tmp_path / "lw.json"
    p = _py(str(BENCH / "loader_wait.py"), "--data", str(store), "--pipeline", "finetune", "--compute-ms", "2",
            "--epochs", "3", "--json", str(out), "loader.batch_size=8", "augment.crop_size=16", "augment.jitter_max=2",
            "loader.num_threads=1")
    blob = json.loads(out.read_text())
    for name in ("real", "same-batch"):
        r = blob[name]
        assert r["steps"] == 12 and r["steady_ms"] > 0 and r["epoch_start_ms"] > 0
    assert blob["host_work_ms"] == pytest.approx(blob["real"]["steady_ms"] - blob["same-batch"]["steady_ms"])
    assert blob["batch_size"] == 8 and blob["pipeline"] == "finetune" and "host work per batch" in p.stdout


def test_dali_wheel_parts_reassemble(tmp_path):
    wheel = tmp_path / "fake_dali-1.0-py3-none-any.whl"
    wheel.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    deps = tmp_path / "deps"
    deps.mkdir()
    (deps / "dep-1.0-py3-none-any.whl").write_bytes(b"dep")
    env = dict(os.environ, PARTS=str(tmp_path / "parts"), LINK=str(tmp_path / "link"))
    p = subprocess.run(["bash", str(BENCH / "device" / "split_wheel.sh"), str(wheel), str(deps), "1"], env=env,
                       text=True, capture_output=True)
    assert p.returncode == 0, p.stderr
    parts = sorted((tmp_path / "parts").glob("part*"))
    assert len(parts) == 4 and all(f.stat().st_size <= 1024 * 1024 for d in parts for f in d.glob("wheel.part*"))
    # the device side, with a stand-in interpreter that records the install instead of running pip
    fake = tmp_path / "py"
    fake.write_text('#!/usr/bin/env bash\necho "$@" >> "$STORE/calls"\n')
    fake.chmod(0o755)
    env = dict(os.environ, STORE=str(tmp_path / "store"), PYTHON=str(fake))
    for i, d in enumerate(parts):
        p = subprocess.run(["bash", str(BENCH / "device" / "receive_part.sh"), str(d)], env=env, text=True,
                           capture_output=True)
        assert p.returncode == 0, p.stderr
        assert f"parts: {i + 1} of 4" in p.stdout
    calls = (tmp_path / "store" / "calls").read_text()
    assert "pip install" in calls and wheel.name in calls and "dep-1.0-py3-none-any.whl" in calls
    # a corrupt part is refused
    bad = parts[1] / "wheel.part01"
    bad.write_bytes(b"x" + bad.read_bytes()[1:])
    p = subprocess.run(["bash", str(BENCH / "device" / "receive_part.sh"), str(parts[1])], env=env, text=True,
                       capture_output=True)
    assert p.returncode == 1 and "sha256" in p.stderr
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() in (tmp_path / "parts" / "MANIFEST").read_text()
