"""GPU-only code paths, checked on the CPU wherever a CPU can show the defect (issue 13), plus a few
CUDA tests that ``benchmarks/gpu_check.sh`` runs on a GPU machine (skipped here).

Covered: the memory-format and precision choices, device set-up, Horovod with channels_last tensors and
its collective names, split BatchNorm staying channels_last, SyncBN without host copies, no host
synchronisation in a training step and metrics read one step late by the loop (on a faked GPU: a pinned
non-blocking copy behind an event, waited for one step late; the benchmark's step too), the exported encoder
(CPU, contiguous, loadable anywhere), and the DALI GPU path's pinned staging buffers. Issue 25: the GPU RNG
state of the rank's own device, the data wait from CUDA events, loaders without a stream sync per batch (the meta
device stands for a GPU whose values cannot be read back), fine-tuning's buffers in one all-reduce; each with a
CUDA test for what only a GPU shows (``test_cuda_*``).
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REPO, process_env, require_horovod, split_bn_case
from torch.utils._python_dispatch import TorchDispatchMode

from photoz_hpc.comm.base import Comm
from photoz_hpc.comm.horovod_comm import HorovodComm, HorovodViews, horovod_view
from photoz_hpc.config import ROOTS, load_config
from photoz_hpc.errors import ConfigError
from photoz_hpc.survey import load_survey
from photoz_hpc.train import precision as precision_mod
from photoz_hpc.train.pretrain import Trainer
from photoz_hpc.train.runtime import prepare_device, use_channels_last

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def _tiny_cfg(*more: str):
    # width 8, not 4: channels_last at width < 8 is refused on a CPU (models/cpu_guards.py, test below)
    return load_config(None, ["model.arch=resnet18", "model.width=8", "model.embed_dim=16", "moco.queue_size=32",
                              "loader.batch_size=8", "optim.batch_ref=8", "optim.lr=0.1", "moco.bn_splits=4", *more])


# ---------------------------------------------------------------------- choices: memory format, precision, device


@pytest.mark.parametrize("setting, on_cpu, on_gpu", [("auto", False, True), (True, True, True), (False, False, False)])
def test_channels_last_setting(setting, on_cpu: bool, on_gpu: bool) -> None:
    cfg = SimpleNamespace(model=SimpleNamespace(channels_last=setting))
    assert use_channels_last(cfg, CPU) is on_cpu and use_channels_last(cfg, GPU) is on_gpu


def test_shipped_configs_keep_their_memory_format() -> None:
    for name, root, expected in (("pretrain", "pretrain", "auto"), ("finetune", "finetune", "auto"),
                                 ("demo", "pretrain", False)):
        assert load_config(REPO / "configs" / f"{name}.yaml", root=ROOTS[root]).model.channels_last == expected, name


def _fake_gpu(monkeypatch, native: bool, emulated: bool) -> None:
    """A GPU whose bf16 is native, emulated only (V100, T4: is_bf16_supported() is True by default), or absent."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or (including_emulation and emulated)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_auto_precision_takes_native_bf16_only(monkeypatch, caplog) -> None:
    _fake_gpu(monkeypatch, native=False, emulated=True)
    assert not precision_mod.native_bf16_supported()
    p = precision_mod.resolve_precision("auto", GPU)
    assert p.name == "fp16" and p.scaler is not None  # not slow emulated bf16
    # setup_logging (run by earlier tests in the session) stops propagation to the root logger caplog watches
    monkeypatch.setattr(logging.getLogger("photoz_hpc"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        assert precision_mod.resolve_precision("bf16", GPU).name == "bf16"  # asked for: allowed, with a warning
    assert "emulates bf16" in caplog.text
    _fake_gpu(monkeypatch, native=True, emulated=True)
    assert precision_mod.native_bf16_supported()
    p = precision_mod.resolve_precision("auto", GPU)
    assert p.name == "bf16" and p.scaler is None
    _fake_gpu(monkeypatch, native=False, emulated=False)
    with pytest.raises(ConfigError, match="not supported by this GPU"):
        precision_mod.resolve_precision("bf16", GPU)
    assert precision_mod.resolve_precision("auto", CPU).name == "fp32"


def test_prepare_device_only_touches_cuda_for_gpu_runs(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    prepare_device(CPU)
    assert calls == [] and torch.backends.cudnn.benchmark is False
    prepare_device(torch.device("cuda", 1))  # every backend, 'none' included
    assert calls == [torch.device("cuda", 1)] and torch.backends.cudnn.benchmark is True


# ---------------------------------------------------------------------- Horovod with channels_last tensors


def test_horovod_views_share_memory_and_round_trip() -> None:
    w = torch.nn.Conv2d(5, 8, 3).weight.detach().contiguous(memory_format=torch.channels_last)
    assert not w.is_contiguous()  # what Horovod refused ('Tensor is required to be contiguous')
    v = horovod_view(w)
    assert v.is_contiguous() and v.data_ptr() == w.data_ptr()
    v.add_(1.0)  # Horovod writes results in place: the view's writes land in the weight
    torch.testing.assert_close(w, v.permute(0, 3, 1, 2))
    out, ctx = HorovodViews.compress(w)
    assert ctx is True and out.is_contiguous()
    grad = w.clone()
    grad.set_(HorovodViews.decompress(out, ctx))  # what DistributedOptimizer.synchronize does
    assert grad.shape == w.shape and grad.stride() == w.stride() and grad.data_ptr() == w.data_ptr()
    plain = torch.zeros(3, 4)
    assert horovod_view(plain) is plain and HorovodViews.compress(plain) == (plain, False)
    with pytest.raises(Exception, match="contiguous"):
        horovod_view(torch.zeros(4, 6)[:, ::2])


def test_horovod_one_process_channels_last_broadcast(tmp_path: Path) -> None:
    """The issue's reproduction: one process, a channels_last model, Horovod's parameter broadcast."""
    require_horovod()
    code = textwrap.dedent("""
        import torch
        from photoz_hpc.comm.select import init_comm
        comm = init_comm("horovod", 30.0, "cpu")
        model = torch.nn.Sequential(torch.nn.Conv2d(5, 8, 3), torch.nn.BatchNorm2d(8)).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        comm.broadcast_state(model, opt, [])
        opt = comm.wrap_optimizer(opt, model)
        model(torch.randn(4, 5, 9, 9).contiguous(memory_format=torch.channels_last)).sum().backward()
        opt.step()
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        comm.shutdown()
        print("HOROVOD-CL-OK")
    """)
    env = process_env()
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "HOROVOD-CL-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


class _FakeHvd:
    Sum, Average = "sum", "average"

    def __init__(self) -> None:
        self.names: list[str] = []

    def allreduce(self, t, op=None, name=None):
        self.names.append(name)
        return t.clone()

    def allgather(self, t, name=None):
        self.names.append(name)
        return t.clone()


def _fake_horovod_comm() -> HorovodComm:
    comm = object.__new__(HorovodComm)  # the collectives only, without hvd.init()
    Comm.__init__(comm)
    comm.hvd, comm.world = _FakeHvd(), 2
    return comm


def test_horovod_collective_names_are_stable_per_call_site() -> None:
    """A name per call site and tensor signature, the same at every step (Horovod's response cache); the old
    names carried a running counter, so no step ever repeated one."""
    comm = _fake_horovod_comm()
    x, y = torch.zeros(4), torch.zeros(2, 3)
    for _ in range(3):
        comm.allreduce(x)
        comm.allreduce(y)  # another site
        comm.allgather(y)
        comm.allreduce(x, "max")
    steps = [comm.hvd.names[i:i + 4] for i in range(0, 12, 4)]
    assert steps[0] == steps[1] == steps[2]
    assert len(set(steps[0])) == 4 and all(n.startswith("photoz.") for n in steps[0])
    assert "test_gpu_paths" in steps[0][0] and "allreduce_max" in steps[0][3]
    comm.allreduce(torch.zeros(5))  # same site as no other: a new name; shapes are part of it
    assert comm.hvd.names[-1] not in steps[0]


# ---------------------------------------------------------------------- split BatchNorm and SyncBN


class _Ops(TorchDispatchMode):
    """Records every aten op (name, output numel) that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        numel = out.numel() if isinstance(out, torch.Tensor) else 0
        self.ops.append((func.overloadpacket.__name__, numel))
        return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, None)])
def test_split_bn_stays_channels_last(dtype, tol) -> None:
    """Same outputs, gradients and running statistics as the NCHW path, the output channels_last, and no
    copy of the activations (the NCHW path copies to NCHW and back: see the negative control)."""
    bn, x, g, ref, xr, yr = split_bn_case(dtype)
    results = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        b = copy.deepcopy(bn)
        xi = x.contiguous(memory_format=fmt).detach().requires_grad_()
        gi = g.contiguous(memory_format=fmt)
        with _Ops() as rec:
            y = b(xi)
            y.backward(gi)
        copies = [op for op, n in rec.ops if op in ("copy_", "clone", "_to_copy", "contiguous") and n >= x.numel()]
        results[fmt] = (y, xi.grad, b, copies)
    y, gx, b, copies = results[torch.channels_last]
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous() and y.dtype == dtype
    assert gx.is_contiguous(memory_format=torch.channels_last)
    assert copies == [] and results[torch.contiguous_format][3] == []  # NCHW input: a free reshape
    for y, gx, b, _ in results.values():
        atol = tol if tol is not None else 0.03  # bf16 activations: ~3 significant digits
        torch.testing.assert_close(y.double(), yr, atol=atol, rtol=atol)
        torch.testing.assert_close(gx.double(), xr.grad, atol=atol, rtol=atol)
        torch.testing.assert_close(b.weight.grad.double(), ref.weight.grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b.bias.grad.double(), ref.bias.grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b.running_mean.double(), ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.running_var.double(), ref.running_var, rtol=1e-4, atol=1e-5)


def test_split_bn_nchw_path_would_copy_channels_last_input() -> None:
    """Negative control for the test above: the reference reshape of a channels_last input is a copy."""
    x = torch.randn(32, 16, 9, 7).contiguous(memory_format=torch.channels_last)
    with _Ops() as rec:
        x.reshape(8, 4 * 16, 9, 7)
    assert any(op in ("clone", "copy_") and n == x.numel() for op, n in rec.ops), rec.ops


def test_sync_bn_count_is_built_on_the_device() -> None:
    """No Python-list -> tensor per BatchNorm call (on a GPU: a host->device copy and a sync per layer)."""
    from photoz_hpc.models.collectives import CommSyncBatchNorm

    bn = CommSyncBatchNorm(8)
    x = torch.randn(4, 8, 5, 5)
    with _Ops() as rec:
        y = bn(x)
    assert "lift_fresh" not in {op for op, _ in rec.ops}
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, eps=bn.eps),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- no host synchronisation in a step

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "lift_fresh", "equal",
             "allclose", "unique", "_unique2"}


class HostSyncs:
    """Counts what would be a device->host synchronisation on a GPU: Python-level reads of tensor values
    (``.item()``, ``.tolist()``, ``.cpu()``, ``float()``, ``bool()``...) and dispatcher ops that read data on
    the host (``_local_scalar_dense``, ``nonzero``...) or turn host data into a tensor (``lift_fresh``:
    ``torch.tensor(list)``, a host->device copy on a GPU)."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[str] = []
        self.active = False
        for name in _READS:
            original = getattr(torch.Tensor, name)

            def patched(t, *a, _name=name, _orig=original, **kw):
                if self.active:
                    self.events.append(f"read:{_name}")
                return _orig(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, patched)
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                op = func.overloadpacket.__name__
                if outer.active and op in _SYNC_OPS:
                    outer.events.append(f"op:{op}")
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("bn_mode, channels_last", [("shuffle", False), ("shuffle", True), ("sync", False),
                                                     ("sync", True), ("none", False)])
def test_train_step_has_no_host_sync(monkeypatch, bn_mode: str, channels_last: bool) -> None:
    tr = Trainer(_tiny_cfg(f"moco.bn_mode={bn_mode}", f"model.channels_last={str(channels_last).lower()}"), Comm(),
                 CPU, steps_per_epoch=10)
    x = torch.randn(8, 5, 16, 16)
    tr.train_step(x, x.flip(-1))  # warm-up (first-call set-up is not the hot loop)
    syncs = HostSyncs(monkeypatch)
    with syncs:
        for _ in range(3):
            res = tr.train_step(x, x.flip(-1))
    assert syncs.events == [], syncs.events
    assert isinstance(res["loss"], torch.Tensor) and tr.memory_format == ("channels_last" if channels_last else "contiguous")


def test_host_sync_counter_sees_the_old_sync_bn_and_metric_reads(monkeypatch) -> None:
    """Negative control: the counter catches a Python-list tensor and a per-step metric read."""
    syncs = HostSyncs(monkeypatch)
    with syncs:
        torch.tensor([3.0])
        float(torch.ones(2).sum())
        torch.ones(2).cpu()
    assert syncs.events == ["op:lift_fresh", "read:__float__", "op:_local_scalar_dense", "read:cpu"]


def test_seeded_permutation_reaches_a_gpu_without_blocking(monkeypatch) -> None:
    """The key shuffle's permutation: same values as on the CPU, pinned and copied non-blocking to a GPU."""
    from photoz_hpc.models.moco import seeded_permutation

    cpu_perm = seeded_permutation(16, 7, CPU)
    assert torch.equal(cpu_perm, torch.randperm(16, generator=torch.Generator().manual_seed(7)))
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **kw: calls.append(("to", a, kw)) or t)
    gpu_perm = seeded_permutation(16, 7, GPU)
    assert calls == ["pin", ("to", (GPU,), {"non_blocking": True})]
    assert torch.equal(gpu_perm, cpu_perm)


class _SyntheticLoader:
    """In-memory pretraining batches (the loader contract: len, set_epoch, state, iteration)."""

    def __init__(self, n: int, batch: int, crop: int) -> None:
        self.n, self.batch, self.crop, self.epoch = n, batch, crop, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]

    def __iter__(self):
        g = torch.Generator().manual_seed(self.epoch)
        for _ in range(self.n):
            x = torch.randn(self.batch, 5, self.crop, self.crop, generator=g)
            yield {"view1": x, "view2": x.flip(-1)}


def _mark_steps(monkeypatch, events: list[str]) -> None:
    """Logs ``start:k`` before and ``end:k`` after each training step, so every read lands in a step or a window."""
    inner = Trainer.train_step

    def timed_step(self, v1, v2):
        events.append(f"start:{self.step + 1}")
        out = inner(self, v1, v2)
        events.append(f"end:{self.step}")
        return out

    monkeypatch.setattr(Trainer, "train_step", timed_step)


#: what a faked GPU's host reads and waits log; its launches (pin, copy, record) may happen inside a step
_WAITS = ("read:", "op:", "sync:", "device-sync", "elapsed:")


def _step_windows(ev: list[str], inside: tuple[str, ...] | None = None) -> dict[int, list[str]]:
    """By k: what happens after step k ends and before step k + 1 starts. An event inside a step fails the test:
    any event, or (``inside``) one starting with one of those prefixes."""
    windows: dict[int, list[str]] = {}
    current = None
    for e in ev[ev.index("start:1"):]:
        if e.startswith("start:"):
            current = None
        elif e.startswith("end:"):
            current = int(e[4:])
            windows[current] = []
        elif current is None:
            if inside is None or e.startswith(inside):
                pytest.fail(f"a host read or wait inside a training step: {e} ({ev})")
        else:
            windows[current].append(e)
    return windows


def test_loop_reads_each_steps_metrics_one_step_late(monkeypatch, tmp_path: Path) -> None:
    """Within the loop no step is read back while it runs, and step k's reduced metrics are read only after
    step k + 1 has been issued: nothing is read in the window after step 1, one read after every later step
    (the previous step's), and the last step is read after the loop."""
    from photoz_hpc.train.pretrain import run_pretrain

    steps = 7
    cfg = _tiny_cfg(f"out_dir={tmp_path / 'run'}", f"train.max_steps={steps}", "train.checkpoint_every=100000",
                    "train.progress=false", "train.tensorboard=false", "train.log_every=1", "dist.backend=none")
    syncs = HostSyncs(monkeypatch)
    _mark_steps(monkeypatch, syncs.events)
    with syncs:
        s = run_pretrain(cfg, loader=_SyntheticLoader(5, 8, 16), comm=Comm())
    assert s["steps"] == steps  # on a GPU machine (the GPU check) the same run goes to the GPU, channels_last
    assert s["memory_format"] == ("channels_last" if torch.cuda.is_available() else "contiguous")
    windows = _step_windows(syncs.events)
    assert windows[1] == [], windows  # step 1's own values are not read right after it ...
    assert all(windows[k] == ["read:tolist"] for k in range(2, steps)), windows  # ... but after step 2, etc.
    assert windows[steps][:2] == ["read:tolist", "read:tolist"], windows[steps]  # step 6, then 7 after the loop
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == steps  # every step still logged (log_every=1), in order
    assert s["data_wait_clock"] == ("cuda events" if torch.cuda.is_available() else "host clock")


# ---------------------------------------------------------------------- a faked GPU timeline: late reads, event timing


class FakeGpu:
    """What ``train/late_reads.py`` uses of a GPU, faked on the CPU, every use logged in order (``log``, shared
    with ``HostSyncs``): ``pin_memory`` (marks the tensor), a copy into a pinned tensor (blocking or not),
    ``torch.cuda.Event`` (one stream: events complete in record order, an event's ``synchronize`` completes it and
    every earlier one; ``elapsed_time`` raises unless both are complete, as CUDA does) and
    ``torch.cuda.synchronize``."""

    def __init__(self, monkeypatch, log: list[str]) -> None:
        from photoz_hpc.train import late_reads

        self.log, self.recorded, self.done = log, 0, 0
        gpu = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                self.seq, self.timing = None, enable_timing

            def record(self, stream=None) -> None:
                gpu.recorded += 1
                self.seq = gpu.recorded
                log.append(f"record:{self.seq}")

            def synchronize(self) -> None:
                log.append(f"sync:{self.seq}")
                gpu.done = max(gpu.done, self.seq)

            def query(self) -> bool:
                return self.seq is not None and self.seq <= gpu.done

            def elapsed_time(self, end) -> float:
                assert self.timing and end.timing, "elapsed_time of an event without enable_timing"
                if not (self.query() and end.query()):
                    raise RuntimeError("elapsed_time of an event that has not completed (it would block or fail)")
                log.append(f"elapsed:{self.seq}-{end.seq}")
                return 2.0 * (end.seq - self.seq)  # ms: the faked device time between them

        def pin(t):
            log.append("pin")
            t.fake_pinned = True
            return t

        copy = torch.Tensor.copy_

        def copy_(t, src, non_blocking: bool = False):
            if getattr(t, "fake_pinned", False):
                log.append("copy:" + ("non_blocking" if non_blocking else "blocking"))
            return copy(t, src, non_blocking)

        monkeypatch.setattr(late_reads, "_on_gpu", lambda device: True)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("device-sync"))
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
        monkeypatch.setattr(torch.Tensor, "copy_", copy_)


def test_late_read_copies_at_once_without_blocking_and_waits_for_its_own_event(monkeypatch) -> None:
    from photoz_hpc.train.late_reads import LateRead

    plain = torch.tensor([1.0, 2.0], dtype=torch.float64)
    syncs = HostSyncs(monkeypatch)
    with syncs:
        assert LateRead(plain).tolist() == [1.0, 2.0]  # a CPU: the values as they are
    assert syncs.events == ["read:tolist"]
    syncs.events.clear()
    FakeGpu(monkeypatch, syncs.events)
    with syncs:
        late = LateRead(plain)
        plain.add_(10)  # the next step's kernels may reuse the device tensor: the read holds the copy
        launched = list(syncs.events)
        values = late.tolist()
    assert launched == ["pin", "copy:non_blocking", "record:1"]  # no read, no wait at the all-reduce
    assert syncs.events[3:] == ["sync:1", "read:tolist"] and values == [1.0, 2.0]


def test_data_wait_is_the_host_clock_on_a_cpu_and_an_event_pair_read_later_on_a_gpu(monkeypatch) -> None:
    from photoz_hpc.train.late_reads import DataWait, LateRead

    w = DataWait(CPU).stop()
    assert w.clock == "host clock" and w.seconds() == w.host_s >= 0
    log: list[str] = []
    FakeGpu(monkeypatch, log)
    w = DataWait(CPU)  # a GPU, as far as late_reads can tell
    log.append("next(loader)")
    w.stop()
    late = LateRead(torch.zeros(3))  # the step's metrics, behind which the wait's events complete
    with pytest.raises(RuntimeError, match="not completed"):
        w.seconds()  # read at once, it would block (or fail)
    late.tolist()
    assert w.clock == "cuda events" and w.seconds() == pytest.approx(0.002)
    assert log == ["record:1", "next(loader)", "record:2", "pin", "copy:non_blocking", "record:3", "sync:3", "elapsed:1-2"]


def _fake_gpu_steps(monkeypatch) -> HostSyncs:
    """Host reads recorded, a faked GPU's events logged alongside them, and the training steps marked."""
    syncs = HostSyncs(monkeypatch)
    FakeGpu(monkeypatch, syncs.events)
    _mark_steps(monkeypatch, syncs.events)
    return syncs


def test_loop_on_a_gpu_reads_step_k_after_step_k1_launched_and_after_its_event(monkeypatch, tmp_path: Path) -> None:
    """The loop on a (faked) GPU: step k's reduced metrics are copied into pinned memory without blocking and an
    event recorded right after the all-reduce; they are read after step k + 1 was launched, right after that
    event's ``synchronize`` (of step k, not a later one), and nothing else waits or reads in between."""
    from photoz_hpc.train.pretrain import run_pretrain

    steps = 6
    cfg = _tiny_cfg(f"out_dir={tmp_path / 'run'}", f"train.max_steps={steps}", "train.checkpoint_every=100000",
                    "train.progress=false", "train.tensorboard=false", "train.log_every=1", "dist.backend=none",
                    "train.device=cpu")  # the faked GPU, also on a GPU machine
    syncs = _fake_gpu_steps(monkeypatch)
    with syncs:
        s = run_pretrain(cfg, loader=_SyntheticLoader(5, 8, 16), comm=Comm())
    assert s["steps"] == steps
    windows = _step_windows(syncs.events, inside=_WAITS)
    copied: dict[int, int] = {}  # step -> the event recorded behind its metrics' copy
    for k in range(1, steps + 1):
        w = windows[k]
        i = w.index("copy:non_blocking")
        assert w[i - 1] == "pin" and w[i + 1].startswith("record:"), w
        copied[k] = int(w[i + 1][7:])
        waits = [e for e in w if e.startswith(("sync:", "read:", "op:", "device-sync"))]
        if k == 1:
            assert waits == [], w  # step 1 is not read right after it ...
        elif k < steps:
            assert waits == [f"sync:{copied[k - 1]}", "read:tolist"], w  # ... but after step 2 was launched
            assert w.index(f"sync:{copied[k - 1]}") > i + 1  # and after this step's copy was enqueued
    last = [e for e in windows[steps] if e.startswith(("sync:", "read:", "op:", "device-sync"))]
    assert last[:4] == [f"sync:{copied[steps - 1]}", "read:tolist", f"sync:{copied[steps]}", "read:tolist"], last
    assert "blocking" not in " ".join(syncs.events).replace("non_blocking", "")
    # the data wait: an event pair around each wait for a batch, read (elapsed_time, which the fake refuses before
    # both completed) with its step's metrics, after their event; 2 ms of faked device time each
    elapsed = [e for e in syncs.events if e.startswith("elapsed:")]
    assert len(elapsed) == steps and all(int(e.split("-")[1]) == int(e[8:].split("-")[0]) + 1 for e in elapsed)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == steps and all(r["data_s"] == pytest.approx(0.002) for r in rows)
    assert all(r["compute_s"] == pytest.approx(r["step_s"] - 0.002 - r["comm_s"]) for r in rows)
    assert s["data_wait_clock"] == "cuda events"
    assert s["step_time_s"]["data_s"] == pytest.approx(0.002)


def _benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_throughput_on_a_gpu_reads_each_step_after_the_next_launched(monkeypatch) -> None:
    """benchmarks/train_throughput.py's step, as the loop's: step k's metrics copied without blocking behind an
    event, read after step k + 1 was launched and after that event alone."""
    bench = _benchmark("train_throughput")
    syncs = _fake_gpu_steps(monkeypatch)
    args = SimpleNamespace(warmup=1, windows=1, window_steps=4, breakdown=False)
    cfg = _tiny_cfg("train.progress=false", "train.tensorboard=false", "augment.crop_size=16")
    with syncs:
        out = bench.run_mode("synthetic", cfg, Comm(), CPU, args, load_survey("sdss"))
    assert out["img_per_s"] > 0
    windows = _step_windows(syncs.events, inside=_WAITS)
    copied = {}
    for k in range(1, 6):
        w = windows[k]
        i = w.index("copy:non_blocking")
        copied[k] = int(w[i + 1][7:])
        waits = [e for e in w if e.startswith(("sync:", "read:", "op:"))]
        assert waits == ([] if k == 1 else [f"sync:{copied[k - 1]}", "read:tolist"]) + \
            ([f"sync:{copied[k]}", "read:tolist"] if k == 5 else []), (k, w)
    # the data wait of the 4 timed steps: event pairs, read after the window's last wait (2 ms of faked time each)
    assert [e for e in windows[5] if e.startswith("elapsed:")] == [e for e in syncs.events if e.startswith("elapsed:")]
    assert len([e for e in syncs.events if e.startswith("elapsed:")]) == 4  # synthetic batches: no epoch starts
    assert out["data_wait_frac"] == pytest.approx(0.002 / out["step_s"])


@pytest.mark.parametrize("device, clock, rc", [("cuda:0", "cuda events", 0), ("cuda:0", "host clock", 1),
                                               ("cpu", "host clock", 0)])
def test_gpu_check_report_needs_an_event_timed_data_wait_on_a_gpu(tmp_path: Path, capsys, device, clock, rc) -> None:
    """The GPU check's pretraining line: compute-only = global batch / (step time - data wait), and on a GPU the
    data wait must come from CUDA events (else the figure is wherever the host blocked)."""
    report = _benchmark("gpu_check_report")
    summary = {"global_batch": 64, "step_time_s": {"step_s": 0.1, "data_s": 0.02}, "img_per_s": 640.0,
               "data_wait_frac": 0.2, "data_wait_clock": clock, "precision": "bf16", "memory_format": "channels_last",
               "backend": "none", "first_step_loss": 5.0, "last_loss": 4.0, "steps": 8, "preempted": False,
               "device": device}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert report.pretrain(str(tmp_path / "summary.json"), "8") == rc
    out = capsys.readouterr().out
    assert f"compute-only 800 img/s, data wait 20% ({clock})" in out
    assert ("data wait timed with the host clock on a GPU" in out) == (rc == 1)


# ---------------------------------------------------------------------- loaders: no stream sync per batch
# The "GPU" here is torch's meta device: tensors with shapes but no data, so reading a value back on the host
# (.any(), nonzero, a boolean mask, .tolist()) raises instead of silently synchronising.

META = torch.device("meta")


def _record_moves(monkeypatch) -> list:
    calls = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)  # no CUDA here
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **kw: calls.append(("to", a, kw)) or to(t, *a, **kw))
    return calls


@pytest.mark.parametrize("pipeline", ["finetune", "eval"])
def test_loader_batch_labels_reach_the_gpu_pinned_non_blocking_and_index_valid_stay_on_the_host(monkeypatch, pipeline) -> None:
    from photoz_hpc.augment.base import LoaderBase
    from photoz_hpc.augment.pipelines import PIPELINES
    from photoz_hpc.augment.source import SourceBatch

    p = PIPELINES[pipeline]
    loader = LoaderBase(SimpleNamespace(spec=SimpleNamespace(pipeline=p)), "cpu")
    loader.torch_device = META
    sb = SourceBatch(index=np.array([4, 7, -1]), valid=np.array([True, True, False]), images=[], views=[],
                     labels={"z_bin": np.array([1, 2, 0]), "redshift": np.array([0.1, 0.2, 0.0], np.float32)})
    calls = _record_moves(monkeypatch)
    out = loader.make_batch(sb, [torch.zeros(3, 5, 4, 4, device=META)])
    assert set(out) == set(p.keys)
    assert calls == ["pin", ("to", (META,), {"non_blocking": True})] * len(p.label_keys)
    assert all(out[k].device == META for k in p.label_keys)
    assert out["index"].device.type == "cpu" and out["index"].tolist() == [4, 7, -1]
    if not p.training:
        assert out["valid"].device.type == "cpu" and out["valid"].tolist() == [True, True, False]


def _mixed_matrices() -> torch.Tensor:
    """Rows: a translation inside the image, one partly outside it, a rotation, another inside translation."""
    c, s = np.cos(0.3), np.sin(0.3)
    m = np.array([[[1, 0, 2], [0, 1, 3]], [[1, 0, -2], [0, 1, 1]], [[c, -s, 4.5], [s, c, 2.0]], [[1, 0, 0], [0, 1, 4]]],
                 np.float32)
    return torch.from_numpy(m)


def test_reference_warp_on_a_gpu_reads_nothing_back(monkeypatch) -> None:
    """The reference loader's warp decides translations from the host matrices: on a device whose values cannot be
    read it runs (any .any(), nonzero or boolean mask would raise), the index of the general path's rows is pinned
    and moved non-blocking, and the whole view (multiplier, noise) follows."""
    from photoz_hpc.augment.reference import apply_view, warp

    host = _mixed_matrices()
    images, matrix = torch.zeros(4, 5, 12, 12, device=META), host.to(META)
    calls = _record_moves(monkeypatch)
    out = warp(images, matrix, 8, host)
    assert out.shape == (4, 5, 8, 8) and out.device == META
    moves = [c for c in calls if c == "pin" or any(isinstance(a, torch.device) for a in c[1])]
    assert moves == ["pin", ("to", (META,), {"non_blocking": True})]  # rows 1 and 2: the general path's index
    view = apply_view(images, matrix, torch.ones(4, 5, device=META), 8, torch.ones(4, 5, device=META),
                      torch.zeros(4, 8, 8, 5, device=META), host)
    assert view.shape == (4, 5, 8, 8)


def test_reference_warp_from_host_matrices_equals_row_by_row() -> None:
    """Same values as warping each row alone (all-translation or all-general batches, no row selection), with the
    host matrices given or read from ``matrix``."""
    from photoz_hpc.augment.reference import warp

    host = _mixed_matrices()
    images = torch.randn(4, 5, 12, 12, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([warp(images[i : i + 1], host[i : i + 1], 8) for i in range(4)])
    assert torch.equal(warp(images, host.clone(), 8, host), rows)
    assert torch.equal(warp(images, host, 8), rows)
    assert torch.equal(rows[0], images[0, :, 3:11, 2:10])  # the exact crop of a translation


# ---------------------------------------------------------------------- exported encoder


def test_exported_encoder_is_cpu_contiguous_and_loads_anywhere(tmp_path: Path) -> None:
    """Exported from a channels_last model: every tensor contiguous on the CPU, so the file loads with
    ``torch.load`` alone (no map_location, weights_only) and into a plain CPU encoder."""
    from photoz_hpc.models.export import embed, export_encoder, load_encoder

    tr = Trainer(_tiny_cfg("model.channels_last=true"), Comm(), CPU, steps_per_epoch=10)
    assert not tr.model.encoder.conv1.weight.is_contiguous()  # what used to be written as is
    path = export_encoder({"model": tr.model.state_dict(), "step": 0, "config": {"model": vars(tr.cfg.model)}},
                          tmp_path / "encoder.pt")
    blob = torch.load(path, weights_only=True)
    assert blob["state_dict"] and all(t.device.type == "cpu" and t.is_contiguous() for t in blob["state_dict"].values())
    enc = load_encoder(path)
    assert embed(enc, torch.randn(3, 5, 16, 16)).shape == (3, enc.feature_dim)


# ---------------------------------------------------------------------- DALI GPU path: pinned staging


class _Event:
    def __init__(self) -> None:
        self.waited = 0

    def synchronize(self) -> None:
        self.waited += 1


def _fake_source(n_batches: int = 4, b: int = 3, size: int = 6):
    from photoz_hpc.augment.source import SourceBatch, ViewInputs

    rng = np.random.default_rng(0)
    batches = [[rng.random((size, size, 5), dtype=np.float32) for _ in range(b)] for _ in range(n_batches)]

    class Source:
        # a rotated crop of the whole image reaches past it: the CPU path needs its zero border
        spec = SimpleNamespace(n_views=2, noise=False, in_hw=(size, size), crop=size, rotation=True, jitter=False, jitter_max=0)

        def __len__(self) -> int:
            return n_batches

        def batch(self, k):
            view = ViewInputs(draws=None, matrix=np.zeros((b, 2, 3), np.float32), mult=np.ones((b, 1, 1, 5), np.float32),
                              sigma=None, noise=None)
            return SourceBatch(index=np.arange(b), valid=np.ones(b, bool), images=batches[k], views=[view, view])

    return Source(), batches


def test_dali_gpu_feeder_stages_records_in_a_reused_pinned_pool() -> None:
    """GPU path: records go to DALI as one dense staging buffer from the pinned pool (not pageable memory-mapped
    pages); a buffer is reused only after the event of its batch's outputs has completed."""
    from photoz_hpc.augment.dali_pipeline import _Feeder

    source, batches = _fake_source()
    feeder = _Feeder(source, 0, "gpu")
    allocated = []
    feeder.alloc = lambda shape: allocated.append(shape) or np.zeros(shape, np.float32)  # no CUDA here
    outs = [feeder.host(SimpleNamespace(iteration=i))[0] for i in range(2)]  # DALI prefetches two
    assert allocated == [(3, 6, 6, 5), (3, 6, 6, 5)]
    for out, recs in zip(outs, batches, strict=False):
        assert isinstance(out, np.ndarray) and out.flags.c_contiguous and np.array_equal(out, np.stack(recs))
    ev = _Event()
    _, buffer = feeder.delivered.popleft()
    feeder.release(buffer, ev)
    third = feeder.host(SimpleNamespace(iteration=2))[0]
    assert third is buffer and ev.waited == 1 and len(allocated) == 2  # reused after its event
    assert np.array_equal(third, np.stack(batches[2]))
    cpu = _Feeder(source, 0, "cpu")  # the CPU path keeps its zero-bordered buffers where a warp can leave the image
    assert cpu.host(SimpleNamespace(iteration=0))[0].shape == (3, 8, 8, 5)
    source.spec.crop = 4  # now every warp stays inside: the records themselves, not copied
    assert all(a is b for a, b in zip(_Feeder(source, 0, "cpu").host(SimpleNamespace(iteration=0))[0], batches[0], strict=True))


# ---------------------------------------------------------------------- CUDA (run by benchmarks/gpu_check.sh)


@CUDA
def test_cuda_train_step_has_no_host_sync() -> None:
    prepare_device(GPU)
    tr = Trainer(_tiny_cfg(), Comm(), GPU, steps_per_epoch=10)
    assert tr.channels_last and tr.precision.name == ("bf16" if precision_mod.native_bf16_supported() else "fp16")
    if tr.precision.scaler is not None:
        pytest.skip("fp16 + GradScaler: torch's scaler.step reads found_inf on the host once per step")
    x = torch.randn(8, 5, 16, 16, device=GPU).contiguous(memory_format=torch.channels_last)
    tr.train_step(x, x.flip(-1))  # warm-up: cuDNN autotuning, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            res = tr.train_step(x, x.flip(-1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(res["loss"]).item()


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_split_bn_channels_last_matches_nchw(dtype) -> None:
    from photoz_hpc.models.resnet import SplitBatchNorm2d

    bn = SplitBatchNorm2d(64, 8).to(GPU)
    x = torch.randn(64, 64, 16, 16, device=GPU, dtype=dtype)
    g = torch.randn_like(x)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        b = copy.deepcopy(bn)
        xi = x.contiguous(memory_format=fmt).detach().requires_grad_()
        y = b(xi)
        assert y.is_contiguous(memory_format=fmt)
        y.backward(g.contiguous(memory_format=fmt))
        outs.append((y.float(), xi.grad.float(), b.weight.grad, b.running_var))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@CUDA
def test_cuda_exported_encoder_loads_on_cpu(tmp_path: Path) -> None:
    from photoz_hpc.models.export import export_encoder

    tr = Trainer(_tiny_cfg(), Comm(), GPU, steps_per_epoch=10)
    path = export_encoder({"model": tr.model.state_dict(), "step": 0, "config": {"model": vars(tr.cfg.model)}},
                          tmp_path / "encoder.pt")
    blob = torch.load(path, weights_only=True)  # no map_location: CPU tensors in the file
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in blob["state_dict"].values())


@CUDA
def test_cuda_pinned_staging_buffer_is_page_locked() -> None:
    from photoz_hpc.augment.dali_pipeline import _pinned_array

    a = _pinned_array((2, 3, 4))
    assert torch.from_numpy(a).is_pinned()


@CUDA
def test_cuda_rng_state_is_the_ranks_own_gpu_and_an_old_list_gives_its_entry(monkeypatch) -> None:
    """Issue 25: one state (the rank's GPU) saved and restored; an older checkpoint's per-GPU list (4 GPUs visible
    then, local rank 2) restores its entry 2 on the one GPU visible now, where set_rng_state_all raised IndexError."""
    from photoz_hpc.train.runtime import rng_state, set_rng_state

    prepare_device(GPU)
    state = rng_state(GPU)
    assert isinstance(state["cuda"], torch.Tensor)
    first = torch.rand(4, device=GPU)
    set_rng_state(state, GPU)
    assert torch.equal(torch.rand(4, device=GPU), first)
    other = torch.cuda.get_rng_state(GPU)  # a state after those draws: not entry 2's
    for name, value in (("RANK", "2"), ("LOCAL_RANK", "2"), ("WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    set_rng_state({**state, "cuda": [other, other, state["cuda"], other]}, GPU)
    assert torch.equal(torch.rand(4, device=GPU), first)


def _busy(cycles: int = 2_000_000_000) -> None:
    """Queue a kernel that keeps the GPU busy for a while (about a second at 2 GHz)."""
    torch.cuda._sleep(cycles)


@CUDA
def test_cuda_late_read_waits_for_its_copy_not_for_the_work_launched_after() -> None:
    """Issue 25: the metrics' copy is pinned and non-blocking (no sync at the all-reduce, sync debug mode 'error'),
    and its read returns while later work still runs; a plain .tolist() (the old read) waits for that work."""
    from photoz_hpc.train.late_reads import LateRead

    prepare_device(GPU)
    values = torch.arange(4, dtype=torch.float64, device=GPU)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        late = LateRead(values * 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert late._host.is_pinned()
    _busy()  # step k + 1
    assert late.tolist() == [0.0, 2.0, 4.0, 6.0]
    assert not torch.cuda.current_stream().query()  # the read did not wait for step k + 1
    torch.cuda.synchronize()
    _busy()
    (values * 2).tolist()  # negative control: the old read waits for the whole stream
    assert torch.cuda.current_stream().query()


@CUDA
def test_cuda_data_wait_is_the_gpus_idle_time() -> None:
    """Issue 25: while queued work keeps the GPU busy, a host wait for the loader costs the GPU nothing (the event
    pair is back to back); with the GPU idle it is the host's wait."""
    import time as time_mod

    from photoz_hpc.train.late_reads import DataWait, LateRead

    prepare_device(GPU)
    torch.cuda.synchronize()
    _busy()
    w = DataWait(GPU)
    time_mod.sleep(0.05)  # the loader
    w.stop()
    LateRead(torch.zeros(1, device=GPU)).tolist()
    assert w.clock == "cuda events" and w.seconds() < w.host_s / 2
    torch.cuda.synchronize()
    w = DataWait(GPU)
    time_mod.sleep(0.05)
    w.stop()
    LateRead(torch.zeros(1, device=GPU)).tolist()
    assert w.seconds() > w.host_s / 2


@CUDA
def test_cuda_loader_batch_and_reference_warp_do_not_sync() -> None:
    """Issue 25: labels pinned and non-blocking, index/valid on the host, and the reference warp (translations
    decided on the host, the general rows by a device index) run under sync debug mode 'error', with the CPU's
    values."""
    from photoz_hpc.augment.base import LoaderBase
    from photoz_hpc.augment.pipelines import PIPELINES
    from photoz_hpc.augment.reference import warp
    from photoz_hpc.augment.source import SourceBatch

    prepare_device(GPU)
    loader = LoaderBase(SimpleNamespace(spec=SimpleNamespace(pipeline=PIPELINES["finetune"])), "gpu")
    sb = SourceBatch(index=np.array([4, 7]), valid=np.array([True, True]), images=[], views=[],
                     labels={"z_bin": np.array([1, 2]), "redshift": np.array([0.1, 0.2], np.float32)})
    host = _mixed_matrices()
    images = torch.randn(4, 5, 12, 12, generator=torch.Generator().manual_seed(0))
    on_gpu, matrix = images.to(GPU), host.to(GPU)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = loader.make_batch(sb, [torch.zeros(2, 5, 4, 4, device=GPU)])
        warped = warp(on_gpu, matrix, 8, host)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out["z_bin"].device == GPU and out["index"].device.type == "cpu"
    assert out["z_bin"].tolist() == [1, 2]
    torch.testing.assert_close(warped.cpu(), warp(images, host, 8), atol=1e-4, rtol=1e-4)


@CUDA
def test_cuda_buffer_average_is_one_all_reduce_per_dtype() -> None:
    """Issue 25: fine-tuning's BatchNorm statistics on the GPU go to the communicator as one flattened tensor (one
    GPU cannot run 2 NCCL ranks: the collective itself is in the torchrun/Horovod steps of the GPU check)."""
    from photoz_hpc.models.photoz_net import build_photoz_net
    from photoz_hpc.train.finetune import average_buffers

    net = build_photoz_net(_tiny_cfg().model).to(GPU)
    calls = []

    class TwoRanks(Comm):
        def __init__(self) -> None:
            super().__init__()
            self.world = 2

        def allreduce(self, t, op="sum"):
            calls.append((op, t.device, t.numel()))
            return t * 3  # the mean with another rank holding 5 t

    before = [b.clone() for b in net.buffers() if b.is_floating_point()]
    average_buffers(net, TwoRanks())
    after = [b for b in net.buffers() if b.is_floating_point()]
    assert calls == [("mean", GPU, sum(b.numel() for b in before))]
    assert all(torch.equal(a, 3 * b) for a, b in zip(after, before, strict=True))


# ---------------------------------------------------------------------- a CPU kernel defect, refused up front


def test_narrow_channels_last_cpu_training_is_refused() -> None:
    """ResNet width 4 has a 1x1 stride-2 shortcut of 4 input channels, whose channels_last backward corrupts the
    heap in oneDNN's AVX2 kernel (the abort that ended whole test runs on AMD EPYC CI machines): refused on a
    CPU, for both trainers, before any step; NCHW, or width 8, trains."""
    from photoz_hpc.models.cpu_guards import corrupting_convolutions
    from photoz_hpc.models.resnet import ResNet

    assert [name for name, _ in corrupting_convolutions(ResNet("resnet18", width=4))] == ["layer2.0.downsample.0"]
    assert corrupting_convolutions(ResNet("resnet18", width=8)) == []
    assert corrupting_convolutions(ResNet("resnet50", width=64)) == []
    narrow = ("model.arch=resnet18", "model.width=4")
    with pytest.raises(ConfigError, match=r"1x1 stride-2 convolution of 4 input channels.*model.width >= 8"):
        Trainer(_tiny_cfg(*narrow, "model.channels_last=true"), Comm(), CPU, steps_per_epoch=10)
    tr = Trainer(_tiny_cfg(*narrow, "model.channels_last=false"), Comm(), CPU, steps_per_epoch=10)
    x = torch.randn(8, 5, 16, 16)
    assert torch.isfinite(tr.train_step(x, x.flip(-1))["loss"])


def test_narrow_channels_last_cpu_finetuning_is_refused() -> None:
    from photoz_hpc.models.cpu_guards import check_cpu_channels_last
    from photoz_hpc.models.photoz_net import build_photoz_net

    cfg = _tiny_cfg("model.width=4")
    net = build_photoz_net(cfg.model)
    with pytest.raises(ConfigError, match="layer2.0.downsample.0"):
        check_cpu_channels_last(net, CPU, True)
    check_cpu_channels_last(net, CPU, False)
    check_cpu_channels_last(net, GPU, True)  # cuDNN has no such defect

