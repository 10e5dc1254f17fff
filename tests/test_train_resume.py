"""Resume exactness: a run SIGKILLed mid-training and resumed (``resume: auto``) reproduces the
losses of an uninterrupted run, with the real data loader; a corrupt newest checkpoint is skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_dataset, run_single, run_torch, tiny_overrides


def _losses(out: Path) -> dict[int, float]:
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]  # a resumed run re-logs steps after the checkpoint: keep the last
    return losses


def _ckpt_steps(out: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (out / "checkpoints").glob("ckpt_*.pt"))


@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_resume_reproduces_losses(tmp_path: Path, world: int) -> None:
    data = make_dataset(tmp_path / "data", n=256)
    batch = 32 // world  # 8 steps per epoch, so the resumed part crosses an epoch boundary
    more = ("train.max_steps=11", "train.checkpoint_every=4", "moco.bn_mode=shuffle", "dist.backend=" +
            ("torch" if world > 1 else "none"))

    def run(out: Path, kill_after: int = 0):
        args = ([f"--kill-after={kill_after}"] if kill_after else []) + tiny_overrides(data, out, batch, 64, more)
        if world == 1:
            return [run_single("pretrain_run.py", args)]
        return run_torch("pretrain_run.py", args, world=world)

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for rc, out in run(ref):
        assert rc == 0, out[-3000:]
    for rc, out in run(cut, kill_after=6):
        assert rc == -9, f"expected SIGKILL, got rc={rc}:\n{out[-3000:]}"
    assert _ckpt_steps(cut) == [4], "the killed run should have left exactly the step-4 checkpoint"
    (cut / "checkpoints" / "ckpt_000000005.pt").write_bytes(b"PK\x03\x04 truncated garbage")  # newest, corrupt
    results = run(cut)
    for rc, out in results:
        assert rc == 0, out[-3000:]
    log0 = results[0][1]
    assert "skipping checkpoint" in log0 and "ckpt_000000005.pt" in log0, log0[-3000:]
    assert "resumed from" in log0 and "at step 4" in log0
    a, b = _losses(ref), _losses(cut)
    assert sorted(b) == list(range(1, 12)) == sorted(a)
    for step in range(5, 12):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}: {b[step]} != {a[step]}"
    # and a wrong resume would be visible: losses differ from step to step
    assert len({round(a[s], 5) for s in range(5, 12)}) > 3
