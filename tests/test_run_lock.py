"""One run per output directory (``photoz_hpc.run_lock``): a held directory refuses a second run naming the
holder; dead, stale and requeued holders are taken over with a log line; racing takers leave exactly one
holder; every writing command refuses a held directory before it writes anything; two real concurrent
pretraining runs leave the first one's metrics and checkpoints exactly those of a run alone; a SIGKILLed
holder's directory is taken over by the resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, SCRIPTS, TINY_MODEL, make_dataset, process_env, tiny_overrides

from photoz_hpc import run_lock
from photoz_hpc.cli import main as cli_main
from photoz_hpc.config import Config, FinetuneRunConfig, load_config
from photoz_hpc.data.prepare import prepare_hold
from photoz_hpc.errors import PhotozError
from photoz_hpc.evaluate.catalogue import catalogue_hold
from photoz_hpc.launch.sweep import load_sweep, plan
from photoz_hpc.models.moco import build_moco
from photoz_hpc.models.photoz_net import build_photoz_net, save_photoz_model
from photoz_hpc.run_lock import (
    LOCK_NAME,
    DirectoryHeld,
    RunDir,
    _take_over,
    acquire,
    hold_directory,
    hold_for_ranks,
    holder_info,
)
from photoz_hpc.train.checkpoint import save_checkpoint

TIMEOUT = 120  # generous: these wait for other processes on a shared 2-core machine
HOLDER = """
import sys
from photoz_hpc.run_lock import hold_directory
with hold_directory(sys.argv[1], "test holder", sys.argv[2] if len(sys.argv) > 2 else None):
    print("HELD", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@contextmanager
def holder(directory: Path, lock_file: Path | None = None):
    """Another process holding ``directory`` until the block ends; yields it (its pid is in the lock)."""
    args = [sys.executable, "-c", HOLDER, str(directory)] + ([str(lock_file)] if lock_file else [])
    p = subprocess.Popen(args, env=process_env(), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "HELD", line + p.stdout.read()
        yield p
    finally:
        p.stdin.close()
        p.wait(timeout=TIMEOUT)


@pytest.fixture(autouse=True)
def _package_logger():
    """Let caplog see the package logger (an in-process CLI call's ``setup_logging`` stops its propagation), and
    undo what such a call set up (a handler on a captured stream that is closed after the test)."""
    logger = logging.getLogger("photoz_hpc")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.propagate = True
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def _wait_for(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _write_lock(path: Path, age_s: float = 0.0, **info) -> dict:
    """A lock file as another holder would have left it, its heartbeat ``age_s`` old."""
    record = {"command": "pretrain", "host": "elsewhere-node", "pid": 4242, "pid_start": None, "slurm": {},
              "started": "2026-01-01T00:00:00", "argv": [], "token": "their-token", **info}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return record


def _snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` with its size and mtime (what a refused run must not change)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.name not in skip}


# ---------------------------------------------------------------------- the lock


def test_held_directory_refuses_naming_the_holder_and_release_frees_it(tmp_path):
    d = tmp_path / "run"
    with holder(d) as p:
        with pytest.raises(DirectoryHeld) as err:
            acquire(RunDir(d, "pretrain"))
        msg = str(err.value)
        assert str(d) in msg and f"pid {p.pid}" in msg and socket.gethostname() in msg and "test holder" in msg
        assert str(d / LOCK_NAME) in msg  # how to clear it by hand
        assert isinstance(err.value, PhotozError)
    assert not (d / LOCK_NAME).exists()  # released when the holder's block ended
    with hold_directory(d, "pretrain") as lock:
        assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid() == lock.info["pid"]
        with pytest.raises(DirectoryHeld, match="already held by this process"):
            acquire(RunDir(d, "pretrain"))
    assert not (d / LOCK_NAME).exists()


def test_released_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), hold_directory(tmp_path, "finetune"):
        assert (tmp_path / LOCK_NAME).is_file()
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    with hold_directory(tmp_path, "finetune"):
        pass


def test_dead_holder_on_this_host_is_taken_over_with_a_log_line(tmp_path, caplog):
    d = tmp_path / "run"
    with holder(d) as p:
        p.kill()  # SIGKILL: no chance to release
        p.wait(timeout=TIMEOUT)
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == p.pid
    with caplog.at_level(logging.WARNING, logger="photoz_hpc"), hold_directory(d, "pretrain"):
        assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"process {p.pid} no longer exists" in caplog.text and "took over" in caplog.text and str(d) in caplog.text


def test_a_pid_of_another_pid_namespace_is_not_judged_by_ours(tmp_path):
    """A container sharing this host name but not our pids: its holder's pid cannot be checked here, so only
    the heartbeat can make it stale."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(p.stdout)  # a pid that has exited
    _write_lock(tmp_path / LOCK_NAME, host=socket.gethostname(), pid=dead, pid_ns="pid:[1]")
    with pytest.raises(DirectoryHeld, match=f"pid {dead} on host {socket.gethostname()}"):
        acquire(RunDir(tmp_path, "pretrain"))


def test_other_host_holder_is_stale_only_once_its_heartbeat_stopped(tmp_path, caplog, monkeypatch):
    lock = tmp_path / LOCK_NAME
    _write_lock(lock, age_s=5, slurm={"job": "901", "step": "0", "restart": "0"})
    with pytest.raises(DirectoryHeld) as err:
        acquire(RunDir(tmp_path, "pretrain"))
    assert "elsewhere-node" in str(err.value) and "pid 4242" in str(err.value) and "Slurm job 901 step 0" in str(err.value)
    monkeypatch.setenv("PHOTOZ_LOCK_STALE_S", "60")
    os.utime(lock, (time.time() - 61, time.time() - 61))
    with caplog.at_level(logging.WARNING, logger="photoz_hpc"), hold_directory(tmp_path, "pretrain"):
        assert json.loads(lock.read_text())["token"] != "their-token"
    assert "no heartbeat for" in caplog.text and "elsewhere-node" in caplog.text


def test_requeued_slurm_job_takes_over_its_earlier_incarnation_at_once(tmp_path, caplog):
    lock = tmp_path / LOCK_NAME
    spec = RunDir(tmp_path, "pretrain")
    _write_lock(lock, slurm={"job": "77", "step": "0", "restart": "0"})  # fresh heartbeat, another node
    same = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    with pytest.raises(DirectoryHeld, match="Slurm job 77"):
        acquire(spec, environ=same)  # the same incarnation (another step of the job): a real second run
    with pytest.raises(DirectoryHeld):
        acquire(spec, environ={"SLURM_JOB_ID": "78", "SLURM_RESTART_COUNT": "1"})  # another job
    with caplog.at_level(logging.WARNING, logger="photoz_hpc"):
        lock_obj = acquire(spec, environ={**same, "SLURM_RESTART_COUNT": "1"})
    try:
        assert json.loads(lock.read_text())["slurm"]["restart"] == "1"
    finally:
        lock_obj.release()
    assert "Slurm requeued job 77 (restart 0 -> 1)" in caplog.text


def test_heartbeat_refreshes_the_lock_and_bad_settings_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOTOZ_LOCK_HEARTBEAT_S", "0.2")
    lock = tmp_path / LOCK_NAME
    with hold_directory(tmp_path, "embed"):
        old = time.time() - 1000
        os.utime(lock, (old, old))
        _wait_for(lambda: lock.stat().st_mtime > old + 500, "the heartbeat to touch the lock file")
    monkeypatch.setenv("PHOTOZ_LOCK_STALE_S", "soon")
    with pytest.raises(PhotozError, match="PHOTOZ_LOCK_STALE_S='soon' is not a number"):
        acquire(RunDir(tmp_path, "embed"))
    assert not lock.exists()


def test_a_late_taker_never_removes_the_lock_another_taker_just_made(tmp_path):
    """Two takers judged the same lock stale: the first replaces it; the second, still holding the old token,
    must leave the new lock alone and be refused, naming the first."""
    lock = tmp_path / LOCK_NAME
    _write_lock(lock, age_s=1000)
    me = holder_info("late taker")
    with hold_directory(tmp_path, "first taker") as first:
        assert not _take_over(lock, "their-token", me, 120.0)
        assert json.loads(lock.read_text())["token"] == first.info["token"]
        with pytest.raises(DirectoryHeld, match="already held by this process"):
            acquire(RunDir(tmp_path, "late taker"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no leftovers (.takeover, .stale-*)


def _on_first_rename_of(monkeypatch, src: Path, before=None, after=None) -> None:
    """Run ``before``/``after`` around the first ``os.rename`` of ``src``: another process acting between a
    taker's checks and its move, at exactly that moment."""
    real, fired = os.rename, []

    def rename(a, b, *args, **kw):
        if Path(a) != src or fired:
            return real(a, b, *args, **kw)
        fired.append(a)
        if before:
            before()
        try:
            return real(a, b, *args, **kw)
        finally:
            if after:
                after()
    monkeypatch.setattr(run_lock.os, "rename", rename)


def test_a_stale_holder_releasing_during_the_takeover_is_not_an_error(tmp_path, monkeypatch):
    """The lock vanishes between the taker's token check and its move aside (the holder judged stale was alive
    and released): the taker looks again and takes the free directory instead of failing."""
    lock = tmp_path / LOCK_NAME
    _write_lock(lock, age_s=1000)
    _on_first_rename_of(monkeypatch, lock, before=lock.unlink)
    with hold_directory(tmp_path, "pretrain") as held:
        assert json.loads(lock.read_text())["token"] == held.info["token"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("third_run", [False, True])
def test_a_lock_replaced_during_the_takeover_is_put_back_never_over_a_third_run(tmp_path, monkeypatch, caplog,
                                                                               third_run):
    """Between the taker's token check and its move aside the stale lock was released and run B created a new
    one, which the taker moves aside and must put back. If run C created the lock in that gap, C keeps it (a
    put-back must not replace it): the lock is C's and the taker is refused naming C. No copy is left over."""
    lock = tmp_path / LOCK_NAME
    _write_lock(lock, age_s=1000)

    def b_replaces_it():
        lock.unlink()
        _write_lock(lock, host="b-node", pid=1111, token="b-token")
    _on_first_rename_of(monkeypatch, lock, before=b_replaces_it,
                        after=(lambda: _write_lock(lock, host="c-node", pid=2222, token="c-token")) if third_run
                        else None)
    with caplog.at_level(logging.WARNING, logger="photoz_hpc"), pytest.raises(DirectoryHeld) as err:
        acquire(RunDir(tmp_path, "pretrain"))
    expect = ("c-token", "pid 2222 on host c-node") if third_run else ("b-token", "pid 1111 on host b-node")
    assert json.loads(lock.read_text())["token"] == expect[0]
    assert f"{tmp_path} is in use by another run" in str(err.value) and expect[1] in str(err.value), str(err.value)
    assert ("a takeover race displaced" in caplog.text and "pid 1111 on host b-node" in caplog.text) == third_run
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # no .stale-* copy, no .takeover


def test_a_stale_takeover_guard_is_removed_only_if_still_the_stale_one(tmp_path, monkeypatch):
    """Two takers judged the same takeover guard stale: the first removed it and created its own; the second
    must leave that fresh guard alone (and still removes a guard that is really the stale one)."""
    lock = tmp_path / LOCK_NAME
    guard = tmp_path / (LOCK_NAME + ".takeover")
    _write_lock(lock, age_s=1000)
    _write_lock(guard, age_s=1000, token="dead-taker")
    me = holder_info("late taker")
    real_read, fired = run_lock._read, []

    def read(path, *args, **kw):  # the first taker acts just after the second judged the guard stale
        found = real_read(path, *args, **kw)
        if Path(path) == guard and not fired:
            fired.append(path)
            guard.unlink()
            _write_lock(guard, token="first-taker")
        return found
    monkeypatch.setattr(run_lock, "_read", read)
    assert not _take_over(lock, "their-token", me, 120.0)
    assert json.loads(guard.read_text())["token"] == "first-taker"
    assert json.loads(lock.read_text())["token"] == "their-token"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK_NAME, guard.name])
    _write_lock(guard, age_s=1000, token="first-taker")  # that one died too: now it goes
    assert not _take_over(lock, "their-token", me, 120.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
    assert _take_over(lock, "their-token", me, 120.0) and sorted(tmp_path.iterdir()) == []


def _race(directory: str, go, results, release) -> None:
    # A loser looks again while the winner takes over: let it keep looking for as long as the test waits
    # (20 looks, ~1 s, can run out on a loaded machine while the winner is not scheduled).
    run_lock._TAKEOVER_ROUNDS = int(TIMEOUT / 0.05)
    go.wait()
    try:
        lock = acquire(RunDir(Path(directory), "racer"))
    except DirectoryHeld as exc:
        results.put(("refused", str(exc)))
        return
    results.put(("won", os.getpid()))
    release.wait(TIMEOUT)
    lock.release()


@pytest.mark.parametrize("round_", range(3))
def test_racing_takers_of_a_stale_lock_leave_exactly_one_holder(tmp_path, round_):
    _write_lock(tmp_path / LOCK_NAME, age_s=1000)
    ctx = multiprocessing.get_context("fork")
    go, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), go, results, release)) for _ in range(4)]
    for p in procs:
        p.start()
    go.set()
    outcomes = [results.get(timeout=TIMEOUT) for _ in procs]
    release.set()
    for p in procs:
        p.join(TIMEOUT)
    winners = [o for o in outcomes if o[0] == "won"]
    assert len(winners) == 1, outcomes
    assert all(f"pid {winners[0][1]}" in msg for kind, msg in outcomes if kind == "refused"), outcomes
    assert not (tmp_path / LOCK_NAME).exists()


class _Rank:
    """A stand-in communicator: ``broadcast_object`` returns what rank 0 sent (recorded here)."""

    def __init__(self, rank: int, from_root=None) -> None:
        self.rank, self.from_root, self.sent = rank, from_root, []

    def broadcast_object(self, obj, root: int = 0):
        self.sent.append(obj)
        return obj if self.rank == 0 else self.from_root


def test_rank0_holds_and_every_rank_learns_a_refusal(tmp_path):
    spec = RunDir(tmp_path / "run", "pretrain")
    rank0 = _Rank(0)
    with hold_for_ranks(rank0, spec) as lock:
        assert lock is not None and spec.lock_path.is_file() and rank0.sent == [None]
        with hold_for_ranks(_Rank(1, from_root=None), spec) as other:  # rank 1 takes nothing itself
            assert other is None
        refused = _Rank(0)
        with pytest.raises(DirectoryHeld, match="already held"), hold_for_ranks(refused, spec):
            pass
        assert "already held" in refused.sent[0]  # what the other ranks receive
    with pytest.raises(DirectoryHeld, match="in use"), hold_for_ranks(_Rank(1, from_root="run is in use"), spec):
        pass
    assert not spec.lock_path.exists()


# ---------------------------------------------------------------------- every command refuses a held directory


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lock_inputs")
    data = make_dataset(root / "data", n=96, size=20)
    cfg = load_config(None, [*TINY_MODEL, "augment.crop_size=16"], root=FinetuneRunConfig)
    torch.manual_seed(0)
    model = save_photoz_model(build_photoz_net(cfg.model), cfg.model, root / "best_model.pt",
                              {"config": dataclasses.asdict(cfg)})
    mcfg = load_config(None, [*TINY_MODEL, "moco.queue_size=64", "loader.batch_size=16", "seed=11"], root=Config)
    moco = save_checkpoint(root / "ck", 1, {"task": "pretrain", "model": build_moco(mcfg).state_dict(),
                                            "config": dataclasses.asdict(mcfg)})
    return {"root": root, "data": data, "model": model, "moco": moco}


FT = [*TINY_MODEL, "augment.crop_size=16", "loader.batch_size=16", "loader.backend=reference", "train.device=cpu",
      "train.progress=false", "train.tensorboard=false", "dist.backend=none", "train.max_steps=2",
      "finetune.val_fraction=0.25", "finetune.init=none"]
RUNTIME = ["loader.backend=reference", "dist.backend=none", "train.device=cpu"]


def _commands(s: dict, out: Path) -> dict[str, tuple[list[str], RunDir]]:
    """Each writing command's arguments with ``out`` as its output, and what it holds."""
    d, m = str(s["data"]), str(s["model"])
    return {
        "prepare": (["prepare", str(s["data"].parent / "release.h5"), "--out", str(out)], prepare_hold(out)),
        "pretrain": (["pretrain", *tiny_overrides(s["data"], out, 16, 64, ("dist.backend=none",))],
                     RunDir(out, "pretrain")),
        "finetune": (["finetune", *FT, f"data.path={d}", f"out_dir={out}"], RunDir(out, "finetune")),
        "predict": (["predict", "--checkpoint", m, "--data", d, "--out", str(out), *RUNTIME], RunDir(out, "predict")),
        "predict-block": (["predict", "--checkpoint", m, "--data", d, "--out", str(out), "--block", "1/2", *RUNTIME],
                          catalogue_hold(out, 1, 2)),
        "calibrate": (["calibrate", "--checkpoint", m, "--data", d, "--out", str(out), *RUNTIME], RunDir(out, "c")),
        "evaluate": (["evaluate", "--checkpoint", m, "--data", d, "--out", str(out), *RUNTIME], RunDir(out, "e")),
        "embed": (["embed", "--checkpoint", str(s["moco"]), "--data", d, "--out", str(out), *RUNTIME],
                  RunDir(out, "embed")),
    }


@pytest.mark.parametrize("command", ["prepare", "pretrain", "finetune", "predict", "predict-block", "calibrate",
                                     "evaluate", "embed"])
def test_every_writing_command_refuses_a_held_directory_before_writing(inputs, tmp_path, capsys, command):
    out = tmp_path / "out"
    args, spec = _commands(inputs, out)[command]
    with holder(spec.directory, spec.lock_file) as p:
        before = _snapshot(tmp_path)
        assert cli_main(args) == 1
        err = capsys.readouterr().err
        assert f"photoz-hpc {args[0]}: error: {out} is in use by another run" in err, err
        assert f"pid {p.pid}" in err and "test holder" in err
        assert _snapshot(tmp_path) == before  # nothing written, the holder's lock untouched
    assert not spec.lock_path.exists()


def test_predict_blocks_of_one_catalogue_run_side_by_side(inputs, tmp_path):
    """Array tasks write disjoint blocks of one catalogue at once: a held block does not refuse another."""
    out = tmp_path / "cat"
    args = ["predict", "--checkpoint", str(inputs["model"]), "--data", str(inputs["data"]), "--out", str(out),
            "--block", "0/2", *RUNTIME]
    with holder(out, catalogue_hold(out, 1, 2).lock_path):
        assert cli_main(args) == 0
    assert not list(out.glob(LOCK_NAME + "*"))


def test_sweep_task_refuses_a_held_task_directory(inputs, tmp_path, capsys):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "methods": ["supervised"], "fractions": [1.0], "seeds": [0], "encoder": str(tmp_path / "none.pt"),
        "finetune_config": str(REPO / "configs" / "finetune.yaml"), "runs_dir": str(tmp_path / "runs"),
        "overrides": [*FT[:-1], f"data.path={inputs['data']}"]}))
    task_dir = plan(load_sweep(sweep_file))[0].dir
    with holder(task_dir) as p:
        before = _snapshot(task_dir)
        assert cli_main(["finetune", "--sweep", str(sweep_file), "--task-id", "0"]) == 1
        err = capsys.readouterr().err
        assert f"{task_dir} is in use by another run" in err and f"pid {p.pid}" in err, err
        assert _snapshot(task_dir) == before


# ---------------------------------------------------------------------- two real pretraining runs


def _records(out: Path) -> list[tuple]:
    """The loss records of metrics.jsonl in file order (timings differ from run to run; these must not)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("acc"), r.get("lr")) for r in rows if "loss" in r]


def _checkpoints(out: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, map_location="cpu", weights_only=False)["model"]
            for p in sorted((out / "checkpoints").glob("ckpt_*.pt"))}


def _pretrain(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPTS / "pretrain_run.py"), *args], env=process_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _read_until(proc: subprocess.Popen, marker: str) -> str:
    """The output of ``proc`` up to the line holding ``marker`` (fails if it exits first)."""
    lines = []
    timer = threading.Timer(TIMEOUT, proc.kill)  # a run that never gets there must not hang the test
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                return "".join(lines)
    finally:
        timer.cancel()
    pytest.fail(f"the run exited before {marker!r}:\n" + "".join(lines)[-3000:])


@dataclasses.dataclass
class _Paused:
    proc: subprocess.Popen
    head: str  # its output up to the pause
    out: str = ""  # all its output, once it finished


@contextmanager
def _paused_pretrain(args: list[str], steps: int, gate: Path):
    """A pretraining run paused after ``steps`` steps (holding its directory) while the block runs; then the gate
    is released and the run's whole output read (``.out``). Killed if it is still running when the block fails."""
    proc = _pretrain([f"--pause-after={steps}", f"--until={gate}", *args])
    try:
        paused = _Paused(proc, _read_until(proc, f"TEST: paused after {steps} steps"))
        yield paused
        gate.touch()
        paused.out = paused.head + proc.communicate(timeout=TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_concurrent_pretrain_is_refused_and_the_first_is_unharmed(tmp_path):
    data = make_dataset(tmp_path / "data", n=128, size=20)
    more = ("train.max_steps=8", "train.checkpoint_every=3", "dist.backend=none")
    ref, run = tmp_path / "alone", tmp_path / "shared"
    gate = tmp_path / "go-on"
    with _paused_pretrain(tiny_overrides(data, run, 16, 64, more), 4, gate) as paused:
        first, head = paused.proc, paused.head  # holding its directory, its writes so far done
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == first.pid, head
        before = _snapshot(run, skip=(LOCK_NAME,))
        second = subprocess.run([sys.executable, "-m", "photoz_hpc", "pretrain", *tiny_overrides(data, run, 16, 64, more)],
                                env=process_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"photoz-hpc pretrain: error: {run} is in use by another run" in second.stderr, second.stderr
        assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr
        assert _snapshot(run, skip=(LOCK_NAME,)) == before  # the second run wrote nothing
    out = paused.out
    assert first.returncode == 0, out[-3000:]
    alone = _pretrain(tiny_overrides(data, ref, 16, 64, more))
    out_ref, _ = alone.communicate(timeout=TIMEOUT)
    assert alone.returncode == 0, out_ref[-3000:]
    a, b = _records(ref), _records(run)
    assert [r[0] for r in b] == list(range(1, 9)) == [r[0] for r in a]  # each step once, in order
    for x, y in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=1e-6, abs=1e-7)
    ca, cb = _checkpoints(ref), _checkpoints(run)
    assert list(cb) == list(ca) and cb
    for name in ca:
        for key, tensor in ca[name].items():
            assert torch.allclose(cb[name][key].float(), tensor.float(), rtol=1e-5, atol=1e-6), (name, key)
    assert not (run / LOCK_NAME).exists()


def test_sigkilled_pretrain_is_taken_over_by_its_resume(tmp_path):
    data = make_dataset(tmp_path / "data", n=128, size=20)
    run = tmp_path / "run"
    args = tiny_overrides(data, run, 16, 64, ("train.max_steps=8", "train.checkpoint_every=3", "dist.backend=none"))
    killed = _pretrain(["--kill-after=5", *args])
    out, _ = killed.communicate(timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, out[-3000:]
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == killed.pid  # left behind by the SIGKILL
    resumed = _pretrain(args)
    out, _ = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, out[-3000:]
    assert "took over the run lock" in out and f"process {killed.pid} no longer exists" in out, out[-3000:]
    assert "resumed from" in out and "at step 3" in out
    assert [r[0] for r in _records(run)][-5:] == [4, 5, 6, 7, 8]
    assert not (run / LOCK_NAME).exists()


def test_preempted_pretrain_releases_its_directory_for_the_requeued_run(tmp_path):
    """SIGUSR1 (the Slurm pre-emption path): checkpoint, exit 75 and the lock gone, so the requeue resumes at
    once without having to take anything over."""
    data = make_dataset(tmp_path / "data", n=128, size=20)
    run, gate = tmp_path / "run", tmp_path / "go-on"
    args = tiny_overrides(data, run, 16, 64, ("train.max_steps=8", "train.checkpoint_every=100", "dist.backend=none"))
    with _paused_pretrain(args, 3, gate) as paused:
        paused.proc.send_signal(signal.SIGUSR1)
    assert paused.proc.returncode == 75, paused.out[-3000:]
    assert not (run / LOCK_NAME).exists()
    resumed = _pretrain(args)
    out, _ = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from" in out and "took over" not in out, out[-3000:]
