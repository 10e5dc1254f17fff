"""Both real backends end to end, shuffle-BN across ranks, rank-environment detection and failure handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, make_dataset, require_horovod, run_horovod, run_torch, tiny_overrides

from photoz_hpc.comm.select import resolve_backend
from photoz_hpc.launch_env import detect_env


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n=256)


def _summary(log: str) -> dict:
    lines = [ln.split("SUMMARY ", 1)[1] for ln in log.splitlines() if "SUMMARY " in ln]  # horovodrun prefixes lines
    assert lines, log[-3000:]
    return json.loads(lines[-1])


def test_finetune_buffer_average_is_one_gloo_all_reduce_with_the_per_buffer_values(tmp_path: Path) -> None:
    out = tmp_path / "buffers.json"
    for rc, log in run_torch("buffer_average.py", ["--out", str(out)]):
        assert rc == 0, log[-3000:]
    results = json.loads(out.read_text())
    assert [r["calls"] for r in results] == [["mean"], ["mean"]]  # float32 only: one collective (was one per buffer)
    assert all(r["equal"] and r["changed"] for r in results) and results[0]["flat"] == results[1]["flat"]


def test_shuffle_bn_unshuffles_exactly(tmp_path: Path) -> None:
    out = tmp_path / "shuffle.json"
    for rc, log in run_torch("shuffle_bn.py", ["--backend", "torch", "--out", str(out)]):
        assert rc == 0, log[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == 2
    for r in results:
        assert r["unshuffle_exact"] and r["moved_rows"]
        assert r["key_max_diff"] < 1e-5
    assert results[0]["tags"] == sorted(list(range(6)) + [100.0 + i for i in range(6)])  # a permutation of all rows


CHANNELS_LAST = pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])


@CHANNELS_LAST
def test_torch_backend_pretrain(tmp_path: Path, data: Path, channels_last: bool) -> None:
    more = ("train.max_steps=6", "dist.backend=torch", "moco.queue_mode=sharded",
            f"model.channels_last={str(channels_last).lower()}")
    results = run_torch("pretrain_run.py", tiny_overrides(data, tmp_path / "run", 16, 64, more))
    for rc, log in results:
        assert rc == 0, log[-3000:]
    s = _summary(results[0][1])
    assert s["backend"] == "torch" and s["world_size"] == 2 and s["steps"] == 6 and s["global_batch"] == 32
    assert s["memory_format"] == ("channels_last" if channels_last else "contiguous")
    assert Path(s["checkpoint"]).is_file() and Path(s["encoder"]).is_file()


@CHANNELS_LAST
def test_horovod_backend_pretrain(tmp_path: Path, data: Path, channels_last: bool) -> None:
    """With channels_last this is the default GPU set-up's crash at start-up (``hvd.broadcast_parameters``:
    'Tensor is required to be contiguous'), and then in the gradient all-reduce, reproduced on CPU."""
    require_horovod()
    more = ("train.max_steps=6", "dist.backend=auto", "moco.queue_mode=sharded",
            f"model.channels_last={str(channels_last).lower()}")
    rc, log = run_horovod("pretrain_run.py", tiny_overrides(data, tmp_path / "run", 16, 64, more))
    assert rc == 0, log[-3000:]
    s = _summary(log)
    assert s["backend"] == "horovod" and s["world_size"] == 2 and s["steps"] == 6
    assert s["memory_format"] == ("channels_last" if channels_last else "contiguous")
    assert Path(s["checkpoint"]).is_file()


def test_dead_rank_does_not_hang(tmp_path: Path, data: Path) -> None:
    """Rank 1 is SIGKILLed after step 3: rank 0 must stop with an error naming itself and the step."""
    more = ("train.max_steps=50", "dist.backend=torch", "dist.timeout_s=30")
    args = ["--kill-after=3", "--kill-rank=1", *tiny_overrides(data, tmp_path / "run", 16, 64, more)]
    (rc0, log0), (rc1, _) = run_torch("pretrain_run.py", args, timeout=120)
    assert rc1 == -9
    assert rc0 not in (0, None), log0[-3000:]
    assert "rank 0 failed at step 4" in log0 or "rank 0: no training progress" in log0, log0[-3000:]


HANG_TIMEOUT_S = 10  # dist.timeout_s for the hung-rank tests; the subprocess limit below keeps a test from hanging


@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_hung_rank_times_out_and_is_named(tmp_path: Path, data: Path, backend: str) -> None:
    """Rank 1 stays alive but hangs (sleeps forever) when fetching the batch after step 3, so rank 0 blocks in
    a collective of step 4. Within about dist.timeout_s every process exits non-zero, and rank 0's log names
    rank 1 as the one that did not respond (gloo timeout for torch, the no-progress watchdog for Horovod)."""
    if backend == "horovod":
        require_horovod()
    more = ("train.max_steps=50", f"dist.backend={backend}", f"dist.timeout_s={HANG_TIMEOUT_S}")
    args = ["--hang-after=3", "--hang-rank=1", *tiny_overrides(data, tmp_path / "run", 16, 64, more)]
    t0 = time.monotonic()
    if backend == "torch":
        (rc0, log0), (rc1, log1) = run_torch("pretrain_run.py", args, timeout=55)
        assert rc0 not in (0, None) and rc1 not in (0, None), (rc0, rc1)
        log = log0
    else:
        rc, log = run_horovod("pretrain_run.py", args, timeout=55)
        assert rc != 0, log[-3000:]
        log0 = "\n".join(ln for ln in log.splitlines() if ln.startswith("[0]"))
        log1 = "\n".join(ln for ln in log.splitlines() if ln.startswith("[1]"))
    elapsed = time.monotonic() - t0
    assert "TEST: hanging after 3 steps" in log1, log[-3000:]
    # rank 0 names rank 1; the hung rank's own watchdog (if it fires before it is killed) names itself
    assert "rank(s) [1] did not respond" in log0, log0[-3000:]
    assert "rank 0" in log0 and f"dist.timeout_s={HANG_TIMEOUT_S}" in log0, log0[-3000:]
    if "no training progress" in log1:
        assert "rank 1: no training progress" in log1 and "after step 3" in log1, log1[-3000:]
    # start-up + 3 steps + the timeout + watchdog granularity; generous because the CPU may be shared
    assert elapsed < 50, elapsed


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, (1, 1, 4, "torchrun")),
        ({"HOROVOD_RANK": "2", "HOROVOD_LOCAL_RANK": "0", "HOROVOD_SIZE": "3"}, (2, 0, 3, "horovodrun")),
        ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "8"}, (5, 1, 8, "openmpi")),
        ({"SLURM_PROCID": "7", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16"}, (7, 3, 16, "slurm")),
        ({}, (0, 0, 1, "none")),
    ],
)
def test_detect_env(env: dict, expected: tuple) -> None:
    e = detect_env(env)
    assert (e.rank, e.local_rank, e.world, e.launcher) == expected


def test_logs_and_dist_agree_on_rank_under_horovodrun_in_slurm(monkeypatch) -> None:
    """horovodrun inside a Slurm allocation: logs must tag the Horovod rank, like the trainer."""
    from photoz_hpc.logs import _rank_from_env

    for key in ("PHOTOZ_RANK", "RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK",
                "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)
    env = {"HOROVOD_RANK": "1", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_SIZE": "2",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert detect_env().rank == 1 and detect_env().launcher == "horovodrun"
    assert _rank_from_env() == 1


def test_resolve_backend_auto() -> None:
    assert resolve_backend("auto", detect_env({})) == "none"
    assert resolve_backend("auto", detect_env({"RANK": "0", "WORLD_SIZE": "2"})) == "torch"
    assert resolve_backend("torch", detect_env({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"})) == "torch"


def test_missing_horovod_fails_in_ci_and_skips_elsewhere(monkeypatch) -> None:
    import helpers as launch

    monkeypatch.setattr(launch, "horovod_ready", lambda: False)
    monkeypatch.setenv("PHOTOZ_REQUIRE_HOROVOD", "1")
    with pytest.raises(pytest.fail.Exception, match="PHOTOZ_REQUIRE_HOROVOD=1"):
        launch.require_horovod()
    monkeypatch.delenv("PHOTOZ_REQUIRE_HOROVOD")
    with pytest.raises(pytest.skip.Exception):
        launch.require_horovod()


def test_horovod_refuses_tasks_that_did_not_join_one_job() -> None:
    """srun without a working --mpi plugin: each task's hvd.init() sees a world of 1 while Slurm launched 2."""
    require_horovod()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_COMM_WORLD", "PMI_", "PMIX_", "HOROVOD_", "SLURM_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="2", PYTHONPATH=str(REPO),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    code = "from photoz_hpc.comm.select import init_comm; init_comm('horovod', 30.0, 'cpu')"
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "Horovod connected 1 rank(s) but slurm launched 2 tasks" in p.stderr, p.stderr[-3000:]
