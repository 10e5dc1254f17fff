"""End to end on the CPU with the real loader: the loss falls, files appear, the CLI exits 75 on SIGTERM and 130
after a checkpoint on Ctrl-C, a batch job logs progress lines instead of a bar."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, make_dataset, tiny_overrides

from photoz_hpc.config import load_config
from photoz_hpc.models.export import embed, load_encoder
from photoz_hpc.train.pretrain import run_pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n=256)


def test_pretrain_loss_falls_and_outputs_exist(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    # 8 steps/epoch; the 64-key queue holds real keys after 2 steps. The fixture's only invariant between
    # two views is each sample's per-band offset, which random reddening and noise would scramble, so
    # they are off here: the objective then has something to learn in 48 steps even with split BN
    # (no BN leak to exploit). Measured falls: 0.158 (seed 5), 0.172 (seed 1).
    cfg = load_config(None, tiny_overrides(data, out, 32, 64, ("train.epochs=6", "train.checkpoint_every=16",
                                                              "train.tensorboard=true", "optim.lr=0.1",
                                                              "moco.momentum=0.99", "augment.reddening=false",
                                                              "augment.noise=false")))
    s = run_pretrain(cfg)
    assert s["steps"] == 48 and s["queue_fill_steps"] == 2
    assert s["last_loss"] < s["first_loss"] - 0.1, (s["first_loss"], s["last_loss"])
    assert s["img_per_s"] > 0 and 0 <= s["data_wait_frac"] < 1
    assert set(s["step_time_s"]) == {"data_s", "compute_s", "comm_s", "step_s"}
    assert Path(s["checkpoint"]).name == "ckpt_000000048.pt"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "ckpt_000000016.pt", "ckpt_000000032.pt", "ckpt_000000048.pt"]
    records = [json.loads(line) for line in Path(s["metrics"]).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 49))
    assert {"loss", "lr", "momentum", "img_per_s", "data_wait_frac", "data_s", "comm_s", "compute_s"} <= set(records[0])
    assert any((out / "tensorboard").iterdir())
    assert json.loads((out / "summary.json").read_text())["last_loss"] == s["last_loss"]
    assert (out / "config.yaml").is_file()
    enc = load_encoder(s["encoder"])
    import dataclasses

    import torch

    assert torch.load(s["encoder"], weights_only=True)["augment"] == dataclasses.asdict(cfg.augment)  # its views

    assert embed(enc, torch.randn(3, 5, 16, 16)).shape == (3, 64)


def _signal_pretrain(out: Path, args: list[str], sig: signal.Signals) -> tuple[int, str]:
    """Starts ``pretrain`` in a subprocess, sends ``sig`` once 3 steps are logged, and returns (exit code, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "photoz_hpc", "pretrain", *args], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    try:
        log, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"pretrain did not stop after {sig.name}")
    return proc.returncode, log


def test_sigterm_saves_checkpoint_and_exits_75(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    args = tiny_overrides(data, out, 32, 64, ("train.max_steps=100000", "train.checkpoint_every=100000"))
    rc, log = _signal_pretrain(out, args, signal.SIGTERM)
    assert rc == 75, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preempted"] is True and 3 <= summary["steps"] < 100000
    assert Path(summary["checkpoint"]).name == f"ckpt_{summary['steps']:09d}.pt"
    assert summary["encoder"] is None


def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_run_resumes(tmp_path: Path, data: Path) -> None:
    """A first SIGINT is a stop request like a pre-emption (checkpoint, summary) but exits 130, not 75 (nothing
    requeues a run its user stopped); the same command then resumes from that checkpoint."""
    out = tmp_path / "run"
    args = tiny_overrides(data, out, 32, 64, ("train.max_steps=100000", "train.checkpoint_every=100000"))
    rc, log = _signal_pretrain(out, args, signal.SIGINT)
    assert rc == 130, log[-3000:]
    assert "press Ctrl-C again to stop at once" in log and "run the same command to resume" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preempted"] is True and summary["interrupted"] is True and summary["steps"] >= 3
    assert Path(summary["checkpoint"]).name == f"ckpt_{summary['steps']:09d}.pt"
    assert Path(summary["checkpoint"]).is_file() and summary["encoder"] is None
    more = tiny_overrides(data, out, 32, 64, (f"train.max_steps={summary['steps'] + 2}", "train.checkpoint_every=100000"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    resumed = subprocess.run([sys.executable, "-m", "photoz_hpc", "pretrain", *more], cwd=REPO, env=env, text=True,
                             capture_output=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = json.loads((out / "summary.json").read_text())
    assert after["start_step"] == summary["steps"] and after["steps"] == summary["steps"] + 2
    assert after["interrupted"] is False and after["encoder"]


def test_batch_job_logs_progress_lines_and_no_bar(tmp_path: Path, data: Path) -> None:
    """stderr is a pipe here, as in every Slurm job: no carriage-return progress bar, a log line every
    train.progress_every steps and at the last step."""
    out = tmp_path / "run"
    args = tiny_overrides(data, out, 32, 64, ("train.max_steps=10", "train.progress=true", "train.progress_every=4"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "photoz_hpc", "pretrain", *args], cwd=REPO, env=env, text=True,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if " pretrain step " in line]
    assert [line.split(" pretrain step ")[1].split(" ")[0] for line in lines] == ["4/10", "8/10", "10/10"], p.stderr
    assert all(k in lines[0] for k in ("(40%)", "epoch 0", "loss ", "img/s", "data wait", "ETA ")), lines[0]
    assert "\r" not in p.stderr  # no tqdm bar
    quiet = subprocess.run([sys.executable, "-m", "photoz_hpc", "pretrain", *args[:-1], "train.progress_every=0",
                            f"out_dir={tmp_path / 'quiet'}"], cwd=REPO, env=env, text=True, capture_output=True,
                           timeout=120)
    assert quiet.returncode == 0 and " pretrain step " not in quiet.stderr


class _SignallingLoader:
    """Loader proxy that sends this process ``signum`` from ``len()`` (start-up, before the first step)
    or from ``state_dict()`` (the checkpoint after the loop)."""

    def __init__(self, inner, signum: int, at: str) -> None:
        self.inner, self.signum, self.at, self.sent = inner, signum, at, False

    def _maybe_send(self, where: str) -> None:
        if where == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)  # handled synchronously, before os.kill returns to Python code

    def __len__(self) -> int:
        self._maybe_send("len")
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def state_dict(self) -> dict:
        self._maybe_send("state_dict")
        return self.inner.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.inner.load_state_dict(sd)

    def __iter__(self):
        return iter(self.inner)


@pytest.mark.parametrize("signum, at", [(signal.SIGUSR1, "len"), (signal.SIGTERM, "state_dict")])
def test_preemption_signal_outside_the_loop_is_handled(tmp_path: Path, data: Path, signum: int, at: str) -> None:
    """A signal during start-up stops cleanly (nothing trained: no checkpoint); one during the final save is
    absorbed (the run completes). The previous handler is restored afterwards. A recorder stands in for the
    default action, which would kill the test process."""
    from photoz_hpc.comm.base import Comm
    from photoz_hpc.train.pretrain import _build_loader

    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(data, out, 32, 64, ("train.max_steps=3", "train.checkpoint_every=1000")))
    received: list[int] = []

    def recorder(sig, frame) -> None:
        received.append(sig)

    previous = signal.signal(signum, recorder)
    try:
        loader = _SignallingLoader(_build_loader(cfg, Comm()), signum, at)
        s = run_pretrain(cfg, loader=loader)
        assert loader.sent and received == [], "the signal reached the previous handler, not the trainer's"
        assert signal.getsignal(signum) is recorder
        os.kill(os.getpid(), signum)  # restored: the recorder gets it again
        assert received == [signum]
    finally:
        signal.signal(signum, previous)
    if at == "len":
        assert s["preempted"] is True and s["steps"] == 0 and s["checkpoint"] is None and s["encoder"] is None
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    else:
        assert s["preempted"] is False and s["steps"] == 3 and Path(s["checkpoint"]).name == "ckpt_000000003.pt"
        assert s["encoder"] is not None


class _InterruptingLoader(_SignallingLoader):
    """Sends this process each of ``signums`` when the third batch is fetched."""

    def __init__(self, inner, signums: tuple[int, ...]) -> None:
        super().__init__(inner, 0, "iter")
        self.signums = signums

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == 2 and not self.sent:
                self.sent = True
                for sig in self.signums:
                    os.kill(os.getpid(), sig)
            yield batch


@pytest.mark.parametrize("signums, interrupted", [((signal.SIGINT,), True), ((signal.SIGINT, signal.SIGUSR1), False)])
def test_ctrl_c_alone_is_an_interrupt_and_a_preemption_wins(tmp_path: Path, data: Path, signums, interrupted) -> None:
    """Both stop with a checkpoint; with a pre-emption signal as well the summary says pre-empted only (exit 75:
    the scheduler's requeue must not be lost to a Ctrl-C)."""
    from photoz_hpc.comm.base import Comm
    from photoz_hpc.train.pretrain import _build_loader
    from photoz_hpc.train.signals import exit_code

    cfg = load_config(None, tiny_overrides(data, tmp_path / "run", 32, 64, ("train.max_steps=50",
                                                                              "train.checkpoint_every=1000")))
    s = run_pretrain(cfg, loader=_InterruptingLoader(_build_loader(cfg, Comm()), signums))
    assert s["preempted"] is True and s["interrupted"] is interrupted and 3 <= s["steps"] < 50
    assert Path(s["checkpoint"]).name == f"ckpt_{s['steps']:09d}.pt"
    assert exit_code(s) == (130 if interrupted else 75)
