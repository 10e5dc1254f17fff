"""Optimiser, schedules, precision, checkpoint files and config validation (no processes spawned)."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch

from photoz_hpc.comm.base import Comm
from photoz_hpc.comm.devices import cuda_device_index
from photoz_hpc.comm.liveness import Watchdog
from photoz_hpc.comm.select import init_comm
from photoz_hpc.config import load_config
from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.torch_files import read_torch_file, write_torch_file
from photoz_hpc.train.checkpoint import find_latest_valid, list_checkpoints, load_checkpoint, save_checkpoint
from photoz_hpc.train.metrics_log import MetricsLog
from photoz_hpc.train.optim import LARS, build_optimizer, lr_at
from photoz_hpc.train.precision import resolve_precision
from photoz_hpc.train.pretrain import Trainer, local_queue_ptr
from photoz_hpc.train.runtime import resolve_device, rng_state, set_rng_state


def test_lr_linear_scaling_warmup_and_cosine() -> None:
    cfg = load_config(None, ["optim.lr=0.1", "optim.warmup_epochs=1", "optim.batch_ref=256"]).optim
    # global batch 1024 -> base lr 0.4; 10 steps/epoch -> 10 warm-up steps; 110 steps in all
    assert lr_at(0, 110, 10, 1024, cfg) == pytest.approx(0.04)
    assert lr_at(9, 110, 10, 1024, cfg) == pytest.approx(0.4)
    assert lr_at(10, 110, 10, 1024, cfg) == pytest.approx(0.4)
    assert lr_at(60, 110, 10, 1024, cfg) == pytest.approx(0.2)
    assert lr_at(110, 110, 10, 1024, cfg) == pytest.approx(0.0, abs=1e-12)
    const = load_config(None, ["optim.schedule=constant"]).optim
    assert lr_at(50, 100, 10, 256, const) == pytest.approx(0.03)


def test_lars_trust_ratio_and_exclusions() -> None:
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))
    b = torch.nn.Parameter(torch.ones(4))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}], lr=1.0, momentum=0.0,
               weight_decay=0.0, eta=0.01)
    w.grad, b.grad = torch.ones(4, 4), torch.ones(4)
    opt.step()
    trust = 0.01 * 8.0 / 4.0  # eta * ||w|| / ||g||
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 2.0 - trust))
    torch.testing.assert_close(b.detach(), torch.zeros(4))  # plain SGD step
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    lars = build_optimizer(model, load_config(None, ["optim.name=lars"]).optim)
    assert isinstance(lars, LARS) and [len(g["params"]) for g in lars.param_groups] == [1, 1]


def test_precision_resolution_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32"
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert resolve_precision("fp16", cpu).scaler is not None


def test_checkpoints_atomic_pruned_and_corrupt_skipped(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"task": "pretrain", "x": torch.tensor([step])}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000000040.pt", "ckpt_000000030.pt", "ckpt_000000020.pt"]
    assert not list(tmp_path.glob(".*tmp*"))
    newest = tmp_path / "ckpt_000000040.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash without atomic writes
    path, state = find_latest_valid(tmp_path)
    assert path.name == "ckpt_000000030.pt" and state["step"] == 30 and int(state["x"]) == 30
    with pytest.raises(PhotozError, match="corrupt"):
        load_checkpoint(newest)
    torch.save({"format": "other"}, tmp_path / "ckpt_000000050.pt")
    with pytest.raises(PhotozError, match="not a photoz-hpc"):
        load_checkpoint(tmp_path / "ckpt_000000050.pt")


def _tiny_cfg(*more: str):
    return load_config(None, ["model.arch=resnet18", "model.width=4", "model.embed_dim=16", "moco.queue_size=32",
                              "loader.batch_size=8", "optim.batch_ref=8", "optim.lr=0.1", *more])


def test_bf16_autocast_training_step_on_cpu() -> None:
    tr = Trainer(_tiny_cfg("train.precision=bf16"), Comm(), torch.device("cpu"), steps_per_epoch=10)
    assert tr.precision.name == "bf16"
    x = torch.randn(8, 5, 16, 16)
    before = [p.detach().clone() for p in tr.params]
    res = tr.train_step(x, x.flip(-1))
    assert res["loss"].dtype == torch.float32 and math.isfinite(float(res["loss"]))
    assert all(p.dtype == torch.float32 for p in tr.params)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.params, strict=True))


def test_checkpoint_state_round_trip_restores_training() -> None:
    cfg = _tiny_cfg()
    x = [torch.randn(8, 5, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    a = Trainer(cfg, Comm(), torch.device("cpu"), steps_per_epoch=10)
    for i in range(2):
        a.train_step(x[i], x[i].flip(-1))
    state = {"step": a.step, **a.checkpoint_state()}
    b = Trainer(cfg, Comm(), torch.device("cpu"), steps_per_epoch=10)
    b.load_state(state)
    assert b.step == 2 and torch.equal(b.model.queue, a.model.queue) and int(b.model.queue_ptr) == 16
    for i in (2, 3):
        la, lb = a.train_step(x[i], x[i].flip(-1))["loss"], b.train_step(x[i], x[i].flip(-1))["loss"]
        assert float(la) == float(lb)


@pytest.mark.parametrize(
    "override, message",
    [
        ("moco.queue_mode=global", "queue_mode"),
        ("moco.temperature=0", "temperature"),
        ("model.stem_kernel=2", "stem_kernel"),
        ("optim.name=adam", "optim.name"),
        ("train.precision=fp8", "precision"),
        ("dist.backend=mpi", "dist.backend"),
        ("dist.timeout_s=0", "timeout_s"),
        ("optim.momentum=1.5", "optim.momentum"),
    ],
)
def test_bad_configs_rejected(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_queue_not_divisible_by_global_batch_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"moco.queue_size = 36 must be divisible by .* 1 x 8 = 8"):
        Trainer(_tiny_cfg("moco.queue_size=36"), Comm(), torch.device("cpu"), steps_per_epoch=10)


def test_none_backend_refuses_a_multi_rank_launch(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launched as 2 ranks"):
        init_comm("none")


def test_cuda_device_index_with_per_task_gpu_binding(monkeypatch) -> None:
    # srun --gpus-per-task=1: each of the node's 4 tasks (local ranks 0..3) sees one device, index 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [cuda_device_index(r) for r in range(4)] == [0, 0, 0, 0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", 3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # all of the node's GPUs visible
    assert [cuda_device_index(r) for r in range(4)] == [0, 1, 2, 3]
    assert resolve_device("auto", 2) == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(PhotozError, match="no CUDA device"):
        cuda_device_index(0)


class _FakeCudaRng:
    """``n`` visible GPUs' generators (distinct byte states), as torch.cuda's RNG functions see them: a device
    index past the visible ones is an IndexError, like torch's ``default_generators[idx]``."""

    def __init__(self, monkeypatch, n: int) -> None:
        self.states = [torch.full((8,), 10 * i, dtype=torch.uint8) for i in range(n)]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self._index(device)].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [self.set(t, i) for i, t in enumerate(states)])

    @staticmethod
    def _index(device) -> int:
        return device if isinstance(device, int) else (torch.device(device).index or 0)

    def set(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self._index(device)] = state.clone()


def test_cuda_rng_state_is_the_ranks_own_gpu_and_resumes_with_fewer_visible(monkeypatch, tmp_path: Path, caplog) -> None:
    """Saved under torchrun with 4 GPUs visible (local rank 2 on cuda:2), resumed under ``srun --gpus-per-task=1``
    (one GPU visible, cuda:0): cuda:0 gets what cuda:2 had. Older checkpoints (one state per visible GPU) give the
    rank the entry of the GPU it used then; something else is skipped with a warning."""
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    _FakeCudaRng(monkeypatch, 4)
    saved = rng_state(torch.device("cuda", 2))
    assert torch.equal(saved["cuda"], torch.full((8,), 20, dtype=torch.uint8))
    assert "cuda" not in rng_state(torch.device("cpu"))  # a CPU run has no GPU stream to keep
    path = write_torch_file(tmp_path / "ck.pt", {"rng": [saved]})
    loaded = read_torch_file(path, "checkpoint")["rng"][0]  # weights_only
    one = _FakeCudaRng(monkeypatch, 1)
    set_rng_state(loaded, torch.device("cuda", 0))
    assert torch.equal(one.states[0], torch.full((8,), 20, dtype=torch.uint8))
    old = {**loaded, "cuda": [torch.full((8,), 10 * i, dtype=torch.uint8) for i in range(4)]}  # get_rng_state_all
    one = _FakeCudaRng(monkeypatch, 1)
    set_rng_state(old, torch.device("cuda", 0))
    assert torch.equal(one.states[0], torch.full((8,), 20, dtype=torch.uint8))
    one = _FakeCudaRng(monkeypatch, 1)
    with caplog.at_level(logging.WARNING):
        set_rng_state({**loaded, "cuda": []}, torch.device("cuda", 0))
    assert torch.equal(one.states[0], torch.zeros(8, dtype=torch.uint8)) and "GPU's random stream restarts" in caplog.text
    set_rng_state(loaded, torch.device("cpu"))  # CPU resume of a GPU checkpoint: the CPU streams only


class _TwoRankComm(Comm):
    """A 2-rank communicator faked in one process: the other rank's tensor is ``3 t + 2``, so a mean is ``2 t + 1``
    element by element; every all-reduce is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.world, self.calls = 2, []

    def allreduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self.calls.append((op, t.dtype, t.numel()))
        return (t + (3 * t + 2)) / 2 if op == "mean" else t + (3 * t + 2)


def test_finetune_buffer_average_is_one_all_reduce_per_dtype_with_the_per_buffer_values() -> None:
    """``sync_buffers``: the BatchNorm statistics (float32) and a float64 buffer in one all-reduce per dtype (was
    one per buffer: ~200 synchronous collectives under Horovod), same values as buffer by buffer; integer buffers
    (num_batches_tracked) untouched."""
    from photoz_hpc.models.photoz_net import build_photoz_net
    from photoz_hpc.train.finetune import average_buffers

    torch.manual_seed(0)
    net = build_photoz_net(_tiny_cfg().model)
    net.register_buffer("scale64", torch.rand(3, dtype=torch.float64))
    for buf in net.buffers():
        if buf.is_floating_point():
            buf.uniform_(0.5, 2.0)
    per_buffer = copy.deepcopy(net)
    one = _TwoRankComm()
    for buf in per_buffer.buffers():  # the previous implementation
        if buf.is_floating_point() and buf.numel():
            buf.copy_(one.allreduce(buf, "mean"))
    ints = {k: v.clone() for k, v in net.named_buffers() if not v.is_floating_point()}
    comm = _TwoRankComm()
    average_buffers(net, comm)
    n32 = sum(b.numel() for b in net.buffers() if b.dtype == torch.float32)
    assert len(one.calls) > 20 and sorted(comm.calls, key=str) == [("mean", torch.float32, n32), ("mean", torch.float64, 3)]
    for (name, a), b in zip(net.named_buffers(), per_buffer.buffers(), strict=True):
        assert torch.equal(a, b), name
    assert all(torch.equal(ints[k], v) for k, v in net.named_buffers() if k in ints) and ints


def test_watchdog_start_stop_join() -> None:
    wd = Watchdog(timeout=60.0, rank=0)
    wd.start()
    assert wd.is_alive()
    wd.beat(1)
    wd.stop()
    wd.join(timeout=20)
    assert not wd.is_alive()


@pytest.mark.parametrize(
    "gptr, world, batch, mode, expected",
    [
        (48, 2, 8, "sharded", 24),  # same layout: a whole block of 2 x 8, unchanged
        (48, 2, 8, "replicated", 48),
        (8, 2, 8, "sharded", 0),  # written by 1 x 8, now 2 x 8: aligned down to the block start (was 4)
        (24, 2, 8, "local", 8),  # 24 -> 16 -> 8 per rank (a multiple of the batch)
        (24, 2, 8, "replicated", 16),
        (72, 4, 4, "sharded", 0),  # modulo the queue (64) first: 8, inside the first 4 x 4 block -> 0
        (48, 4, 8, "sharded", 8),  # 48 is a multiple of 32 plus 16 -> 32 -> 8 per rank
    ],
)
def test_local_queue_ptr_realigns_for_a_new_world_and_batch(gptr, world, batch, mode, expected) -> None:
    ptr = local_queue_ptr(gptr, 64, world, batch, mode)
    assert ptr == expected
    local_batch = batch if mode != "replicated" else world * batch
    assert ptr % local_batch == 0  # every rank enqueues whole batches at block boundaries


def test_metrics_log_tensorboard_scalars_read_back_with_tensorboard(tmp_path) -> None:
    """Our event files (written in the calling thread) are what TensorBoard's own reader reads: every numeric
    value of every logged step under its prefixed tag; booleans and strings only in the JSON lines; two logs in one
    directory and process get two files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in range(2):
        log = MetricsLog(tmp_path, prefix="finetune")
        for step in range(1, 4):
            log.log(step + 10 * run, {"loss": 1.0 / step, "epoch": run, "flag": True, "note": "x"})
        log.close()
    files = sorted((tmp_path / "tensorboard").iterdir())
    assert len(files) == 2 and all(f.name.startswith("events.out.tfevents.") for f in files)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["finetune/epoch", "finetune/loss"]
    loss = [(e.step, e.value) for e in acc.Scalars("finetune/loss")]
    assert loss == [(s + 10 * r, pytest.approx(1.0 / s)) for r in range(2) for s in range(1, 4)]
    assert [e.value for e in acc.Scalars("finetune/epoch")] == [0, 0, 0, 1, 1, 1]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"flag": true' in lines[0] and '"note": "x"' in lines[0]


def test_metrics_log_goes_on_without_tensorboard_when_its_file_fails(tmp_path, monkeypatch, caplog) -> None:
    from photoz_hpc.train import metrics_log

    log = MetricsLog(tmp_path, prefix="p")

    def full(self, step, values):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics_log.TensorBoardScalars, "add", full)
    # setup_logging (run by earlier tests in the session) stops propagation to the root logger caplog watches
    monkeypatch.setattr(logging.getLogger("photoz_hpc"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        log.log(1, {"loss": 1.0})
        log.log(2, {"loss": 0.5})
    log.close()
    assert "TensorBoard logging stopped" in caplog.text and "No space left" in caplog.text
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_first_ctrl_c_is_a_stop_request_and_the_second_stops_at_once() -> None:
    """Training's flag takes SIGINT (interrupt=True): the first only sets the flag, the second raises
    KeyboardInterrupt; other flags leave SIGINT alone; exit codes 0, 75 (pre-empted: requeue), 130 (Ctrl-C)."""
    import os
    import signal

    from photoz_hpc.train.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, PreemptionFlag, exit_code

    before = signal.getsignal(signal.SIGINT)
    plain = PreemptionFlag().install()
    try:
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        plain.restore()
    flag = PreemptionFlag(interrupt=True).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled before os.kill returns to Python code
        assert flag.raised and flag.interrupted and not flag.preempted
        inner = PreemptionFlag(interrupt=True).install()  # a run's own flag knows what came during start-up
        try:
            assert inner.interrupted
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
            inner_pre = PreemptionFlag(interrupt=True).install()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert inner_pre.preempted and inner_pre.interrupted  # both recorded; the loop lets pre-emption win
            inner_pre.restore()
        finally:
            inner.restore()
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is before
    assert exit_code({"preempted": False}) == 0
    assert exit_code({"preempted": True, "interrupted": False}) == EXIT_PREEMPTED == 75
    assert exit_code({"preempted": True, "interrupted": True}) == EXIT_INTERRUPTED == 130


def test_progress_lines_every_n_steps_and_at_the_end(monkeypatch, caplog) -> None:
    from photoz_hpc.train.metrics_log import ProgressLines

    monkeypatch.setattr(logging.getLogger("photoz_hpc"), "propagate", True)
    lines = ProgressLines("finetune", start_step=2, total=9, every=3, global_batch=64)
    with caplog.at_level(logging.INFO, logger="photoz_hpc"):
        for step in range(3, 10):
            lines.update(step, epoch=step // 4, loss=1.0 / step, step_s=0.5, data_s=0.1)
    got = [r.getMessage() for r in caplog.records if "finetune step" in r.getMessage()]
    assert [m.split()[2] for m in got] == ["3/9", "6/9", "9/9"]
    assert got[1].startswith("finetune step 6/9 (67%), epoch 1, loss 0.1667, 128 img/s, data wait 20%, ETA ")
