"""Resume exactness: a run SIGKILLed mid-training and resumed (``resume: auto``) reproduces the
losses of an uninterrupted run, with the real data loader; a corrupt newest checkpoint is skipped. A resume
is the same run: another run's config or data is refused, a finished run started again writes nothing."""

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


# ---------------------------------------------------------------------- a resume is the same run


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``out`` (the run lock aside) with its size and modification time: 'nothing written'."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file() and ".photoz-run.lock" not in p.name}


def test_resume_refuses_another_run_and_a_finished_run_writes_nothing(tmp_path: Path) -> None:
    import shutil

    from photoz_hpc.config import load_config
    from photoz_hpc.errors import ConfigError
    from photoz_hpc.train.pretrain import run_pretrain

    data = make_dataset(tmp_path / "a", n=64)
    other = make_dataset(tmp_path / "b", n=64, seed=3)
    out = tmp_path / "run"

    def cfg(*more: str):
        return load_config(None, tiny_overrides(data, out, 16, 32, ("train.max_steps=4", "train.checkpoint_every=2",
                                                                    *more)))

    first = run_pretrain(cfg())
    assert first["steps"] == 4 and first["encoder"]
    before = _snapshot(out)
    assert {"config.yaml", "summary.json", "encoder.pt", "metrics.jsonl"} <= set(before)

    again = run_pretrain(cfg())  # finished: says so, writes nothing
    assert again["already_finished"] is True and again["steps"] == 4 and again["encoder"] == first["encoder"]
    assert _snapshot(out) == before

    with pytest.raises(ConfigError) as err:  # other data and another lr: another run
        run_pretrain(cfg(f"data.path={other}", "optim.lr=0.1", "train.max_steps=8"))
    msg = str(err.value)
    assert "another run" in msg and "data.path" in msg and "(other data)" in msg and "optim.lr: 0.3 -> 0.1" in msg
    assert "max_steps" not in msg  # a longer run may change
    with pytest.raises(ConfigError, match=r"moco.temperature: 0.2 -> 0.5"):
        run_pretrain(cfg("moco.temperature=0.5", "train.max_steps=8"))
    with pytest.raises(ConfigError, match=r"augment.crop_size: 16 -> 12"):
        run_pretrain(cfg("augment.crop_size=12"))  # also when the run is finished: it is another run
    with pytest.raises(ConfigError, match=r"loader.batch_size: global batch 1 x 16 = 16 -> 1 x 8 = 8"):
        run_pretrain(cfg("loader.batch_size=8", "train.max_steps=8"))  # lr scaling, steps per epoch: another run
    assert _snapshot(out) == before  # refused before anything was written

    # the same data elsewhere (staged, moved), a longer run, other logging and checkpointing: the same run, resumed
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    longer = run_pretrain(cfg(f"data.path={moved}", "train.max_steps=6", "train.log_every=3",
                              "train.checkpoint_every=5", "dist.timeout_s=99"))
    assert longer["start_step"] == 4 and longer["steps"] == 6 and "already_finished" not in longer
    assert f"path: {moved}" in (out / "config.yaml").read_text()  # the config in force now


def test_mismatch_lists_result_keys_and_ignores_the_keys_that_may_change() -> None:
    import dataclasses

    from photoz_hpc.config import FinetuneRunConfig, load_config
    from photoz_hpc.train.resume import MAY_CHANGE, may_change, mismatch

    base = load_config(None, ["finetune.init=runs/x/encoder.pt"], root=FinetuneRunConfig)
    saved = dataclasses.asdict(base)
    changed = load_config(None, ["finetune.init=./runs/x/../x/encoder.pt", "train.epochs=500", "train.log_every=1",
                                 "train.progress=false", "train.progress_every=7", "dist.backend=torch",
                                 "loader.num_threads=9", "out_dir=elsewhere", "log_level=DEBUG"], root=FinetuneRunConfig)
    assert mismatch(saved, None, changed, {}) == ([], [])
    for override, key in [("finetune.init=none", "finetune.init"), ("finetune.label_fraction=0.5", "finetune.label_fraction"),
                          ("seed=3", "seed"), ("model.width=32", "model.width"), ("optim.milestones=[10]", "optim.milestones"),
                          ("augment.rotation=false", "augment.rotation"), ("finetune.select_max_eta=1.0",
                                                                           "finetune.select_max_eta"),
                          ("data.path=other", "data.path"), ("train.precision=bf16", "train.precision")]:
        diffs, _ = mismatch(saved, None, load_config(None, ["finetune.init=runs/x/encoder.pt", override],
                                                     root=FinetuneRunConfig), {})
        assert [d.split(":")[0] for d in diffs] == [key], (override, diffs)
        assert not may_change(key)
    # datasets compared by content where both sides know it: a moved copy resumes, other data does not
    moved = load_config(None, ["finetune.init=runs/x/encoder.pt", "data.path=/staged/copy"], root=FinetuneRunConfig)
    assert mismatch(saved, {"data.path": "abc"}, moved, {"data.path": "abc"})[0] == []
    assert mismatch(saved, {"data.path": "abc"}, base, {"data.path": "def"})[0][0].endswith("(other data)")
    # a checkpoint older than a key: reported as not compared, never as a difference
    del saved["finetune"]["select_max_eta"]
    assert mismatch(saved, None, base, {}) == ([], ["finetune.select_max_eta"])
    assert all(k.split(".")[0] in {"out_dir", "log_level", "train", "dist", "loader", "model", "optim", "finetune",
                                   "data", "moco"} for k in MAY_CHANGE)


def test_split_bn_backward_may_change_on_resume() -> None:
    """moco.split_bn_backward picks an implementation of the same backward: a resume may switch it."""
    import dataclasses

    from photoz_hpc.config import load_config
    from photoz_hpc.train.resume import mismatch

    saved = dataclasses.asdict(load_config(None, ["moco.split_bn_backward=fused"]))
    assert mismatch(saved, None, load_config(None, ["moco.split_bn_backward=copy"]), {}) == ([], [])
    assert mismatch(saved, None, load_config(None, ["moco.bn_splits=4"]), {})[0]  # the split itself may not


def test_global_batch_may_follow_a_new_rank_count_but_not_change() -> None:
    """The per-rank batch may change with the world size (2 x 8 -> 1 x 16); the global batch may not."""
    from photoz_hpc.train.resume import global_batch_change

    assert global_batch_change({"world": 2, "batch_size": 8}, 1, 16) is None
    assert global_batch_change({"world": 2, "batch_size": 8}, 2, 8) is None
    assert global_batch_change({"world": 2, "batch_size": 8}, 2, 16) == "loader.batch_size: global batch 2 x 8 = 16 -> 2 x 16 = 32"
    assert global_batch_change({}, 2, 16) is None  # a checkpoint without them: not compared


def test_init_paths_are_compared_as_files(tmp_path: Path, monkeypatch) -> None:
    """A relative and an absolute path to the same encoder are the same init."""
    import dataclasses

    from photoz_hpc.config import FinetuneRunConfig, load_config
    from photoz_hpc.train.resume import mismatch

    monkeypatch.chdir(tmp_path)
    saved = dataclasses.asdict(load_config(None, ["finetune.init=runs/x/encoder.pt"], root=FinetuneRunConfig))
    absolute = load_config(None, [f"finetune.init={tmp_path / 'runs/x/encoder.pt'}"], root=FinetuneRunConfig)
    assert mismatch(saved, None, absolute, {}) == ([], [])
    other = load_config(None, [f"finetune.init={tmp_path / 'runs/y/encoder.pt'}"], root=FinetuneRunConfig)
    assert [d.split(":")[0] for d in mismatch(saved, None, other, {})[0]] == ["finetune.init"]

