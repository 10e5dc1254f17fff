"""The 5-band ResNet: stride-1 stem, configurable depth/width/kernel, exported encoder round trip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import split_bn_case

from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.models.export import embed, encoder_state_from_moco, export_encoder, load_encoder
from photoz_hpc.models.resnet import ResNet, build_encoder


@pytest.mark.parametrize("arch, width, feat", [("resnet18", 8, 64), ("resnet34", 4, 32), ("resnet50", 4, 128)])
def test_shapes_and_feature_dim(arch: str, width: int, feat: int) -> None:
    net = ResNet(arch, width=width)
    out = net(torch.randn(3, 5, 16, 16))
    assert out.shape == (3, feat) == (3, net.feature_dim)


@pytest.mark.parametrize("kernel", [3, 7])
def test_stem_is_one_stride1_conv_over_5_bands(kernel: int) -> None:
    net = ResNet("resnet18", width=8, stem_kernel=kernel)
    assert net.conv1.in_channels == 5 and net.conv1.stride == (1, 1) and net.conv1.kernel_size == (kernel, kernel)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    x = torch.randn(2, 5, 20, 20)
    assert net.bn1(net.conv1(x)).shape[-2:] == (20, 20)  # full resolution after the stem
    # three stride-2 stages: 20 -> 10 -> 5 -> 3
    feats = net.layer4(net.layer3(net.layer2(net.layer1(net.relu(net.bn1(net.conv1(x)))))))
    assert feats.shape[-1] == 3


def test_bad_arch_and_kernel_are_rejected() -> None:
    with pytest.raises(ConfigError, match="resnet101"):
        ResNet("resnet101")
    with pytest.raises(ConfigError, match="odd"):
        ResNet("resnet18", stem_kernel=4)


def test_export_load_embed_round_trip(tmp_path) -> None:
    cfg = SimpleNamespace(arch="resnet18", width=8, stem_kernel=3, embed_dim=16)
    torch.manual_seed(0)
    enc = build_encoder(cfg).eval()
    moco_state = {f"encoder_q.0.{k}": v for k, v in enc.state_dict().items()}
    moco_state["encoder_k.0.conv1.weight"] = torch.zeros(1)  # must not leak into the export
    assert set(encoder_state_from_moco(moco_state)) == set(enc.state_dict())
    path = export_encoder({"model": moco_state, "config": {"model": vars(cfg)}, "step": 7}, tmp_path / "enc.pt")
    loaded = load_encoder(path)
    x = torch.randn(5, 5, 16, 16)
    torch.testing.assert_close(embed(loaded, x, batch_size=2), enc(x))
    # a numpy array (float64 too) is accepted, as docs/training.md shows: embed(enc, images)
    torch.testing.assert_close(embed(loaded, x.numpy(), batch_size=2), enc(x))
    torch.testing.assert_close(embed(loaded, x.numpy().astype("float64")), enc(x))
    with pytest.raises(PhotozError, match=r"\(N, 5, S, S\)"):
        embed(loaded, x.numpy()[0])
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(PhotozError, match="unreadable"):
        load_encoder(tmp_path / "bad.pt")


def _no_cpu_compile() -> str | None:
    """Why Inductor cannot build CPU kernels here, or None: no toolchain, or a probe compile fails (torch's C++
    codegen breaks under some settings, e.g. ATEN_CPU_CAPABILITY=default: "'at::vec' has not been declared").
    The product then runs the eager backward with a warning (tested below); only these tests need the compile."""
    from photoz_hpc.models.resnet import cpu_toolchain_missing

    missing = cpu_toolchain_missing()
    if missing:
        return missing
    try:
        torch.compile(lambda x: (x * x).sum(0) * x, dynamic=True)(torch.randn(8, 16))
    except Exception as exc:  # the compiler's own failure, whatever its type
        return f"torch.compile cannot build CPU kernels here ({type(exc).__name__})"
    return None


_CPU_COMPILE = _no_cpu_compile()
#: the fused backward on the CPU is a real Inductor C++ compile: skipped, with the reason, where it cannot build
needs_cpu_compile = pytest.mark.skipif(_CPU_COMPILE is not None, reason=f"fused split-BN backward: {_CPU_COMPILE}")


def _split_bn_grads(bn, x, g, impl: str):
    import copy

    b = copy.deepcopy(bn)
    b.backward_impl = impl
    xi = x.contiguous(memory_format=torch.channels_last).detach().requires_grad_()
    y = b(xi)
    y.backward(g.contiguous(memory_format=torch.channels_last))
    return b, xi, y


@pytest.mark.parametrize("impl", ["eager", "copy", pytest.param("fused", marks=needs_cpu_compile)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_split_bn_backwards_agree_with_the_reference(impl, dtype, tol, caplog) -> None:
    """moco.split_bn_backward on channels_last input: ``fused`` (torch.compile, no full-size fp32 temporaries),
    ``eager`` and ``copy`` give the fp64 NCHW reference's outputs and gradients; fused equals eager to rounding;
    the output stays channels_last; the choice is logged."""
    import logging

    from photoz_hpc.models import resnet

    bn, x, g, ref, xr, yr = split_bn_case(dtype)
    resnet._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="photoz_hpc"):
        b, xi, y = _split_bn_grads(bn, x, g, impl)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    assert xi.grad.is_contiguous(memory_format=torch.channels_last) and xi.grad.dtype == dtype
    torch.testing.assert_close(y.double(), yr, atol=tol, rtol=tol)
    torch.testing.assert_close(xi.grad.double(), xr.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(b.weight.grad.double(), ref.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.bias.grad.double(), ref.bias.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.running_var.double(), ref.running_var, rtol=1e-4, atol=1e-5)
    logged = [r.getMessage() for r in caplog.records if "split BatchNorm on channels_last" in r.getMessage()]
    assert [m.split(": ")[1].split()[0] for m in logged] == [impl], logged
    if impl == "fused":
        assert not resnet._COMPILED.get("failed"), "the fused backward fell back to eager"
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
        _, xe, _ = _split_bn_grads(bn, x, g, "eager")  # the same math, another summation order
        torch.testing.assert_close(xi.grad.double(), xe.grad.double(), atol=1e-5 if dtype == torch.float32 else 2 ** -7,
                                   rtol=1e-5)


@needs_cpu_compile
def test_split_bn_fused_backward_compiles_layer_shapes_without_falling_back(monkeypatch, caplog) -> None:
    """Layer shapes and counts n = N/S*H*W that differ (ResNet stages, another batch) reuse the dynamic graph
    (no recompile per count), and none of them runs the eager backward: no compile failure, no recompile limit."""
    import logging

    from torch._dynamo.utils import counters

    from photoz_hpc.models import resnet
    from photoz_hpc.models.resnet import SplitBatchNorm2d

    torch._dynamo.reset()
    resnet._COMPILED.clear()
    eager_calls, real_eager = [], resnet._backward_eager
    monkeypatch.setattr(resnet, "_backward_eager", lambda *a: eager_calls.append(a) or real_eager(*a))
    graphs = []
    with caplog.at_level(logging.WARNING, logger="photoz_hpc"):
        # (N, C, H, W) with 2 splits: one pattern of distinct sizes (n = 6*13*11, 5*9*7, 3*15*17: one graph),
        # then the ResNet case of square maps, and a 1x1 map (a size of 1 is specialised: its own graph)
        for shape in [(12, 16, 13, 11), (10, 24, 9, 7), (6, 40, 15, 17), (8, 32, 6, 6), (16, 8, 3, 3), (4, 64, 1, 1)]:
            torch.manual_seed(0)
            bn = SplitBatchNorm2d(shape[1], 2, backward="fused")
            _split_bn_grads(bn, torch.randn(shape), torch.randn(shape), "fused")
            graphs.append(counters["stats"]["unique_graphs"])
    assert not eager_calls and not resnet._COMPILED.get("failed")
    assert not [r for r in caplog.records if "split BatchNorm" in r.getMessage()], caplog.records
    assert graphs[0] == graphs[1] == graphs[2] >= 1, graphs  # another count n and other sizes: no recompile
    assert graphs[-1] < graphs[0] + torch._dynamo.config.recompile_limit, graphs


@needs_cpu_compile
def test_split_bn_fused_backward_past_the_recompile_limit_runs_eager(monkeypatch, caplog) -> None:
    """A shape past dynamo's recompile limit runs the eager backward (not the uncompiled math, which writes
    fp32 temporaries), with one warning; the compiled shapes stay fused (no process-wide switch)."""
    import logging

    from photoz_hpc.models import resnet

    torch._dynamo.reset()
    resnet._COMPILED.clear()
    resnet._LOGGED.clear()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    eager_calls = []
    real_eager = resnet._backward_eager
    monkeypatch.setattr(resnet, "_backward_eager", lambda *a: eager_calls.append(a) or real_eager(*a))

    def args(m, s, h, w, c):
        x5, gy = torch.randn(m, s, h, w, c), torch.randn(m, s, h, w, c)
        mean, invstd = x5.mean((0, 2, 3), keepdim=True), torch.rand(1, s, 1, 1, c) + 0.5
        return gy, x5, mean, invstd, invstd * 1.5, m * h * w

    first, other = args(3, 2, 5, 7, 4), args(3, 2, 1, 1, 4)  # a size of 1: another graph
    backward = resnet._split_bn_backward("fused")
    with caplog.at_level(logging.WARNING, logger="photoz_hpc"):
        backward(*first)
        assert not eager_calls
        got = backward(*other)
        backward(*other)
        backward(*first)
    assert len(eager_calls) == 2 and not resnet._COMPILED.get("failed")
    warned = [r.getMessage() for r in caplog.records if "recompile limit" in r.getMessage()]
    assert len(warned) == 1, caplog.records
    for a, e in zip(got, real_eager(*other), strict=True):
        torch.testing.assert_close(a, e)


def test_split_bn_fused_fallback_only_for_compile_failures(monkeypatch, caplog) -> None:
    """A compile failure switches the fused backward to eager for the process (a warning); a runtime error
    or a CUDA OOM (also one raised inside the compile) is raised, and fused stays on."""
    import logging

    from torch._dynamo.exc import BackendCompilerFailed

    from photoz_hpc.models import resnet

    def raising(exc):
        def compiled(*args):
            raise exc
        return compiled

    args = (torch.randn(2, 2, 3, 3, 4), torch.randn(2, 2, 3, 3, 4), torch.zeros(1, 2, 1, 1, 4),
            torch.ones(1, 2, 1, 1, 4), torch.ones(1, 2, 1, 1, 4), 18)
    oom = torch.OutOfMemoryError("CUDA out of memory")
    for exc in (RuntimeError("a genuine error"), oom, BackendCompilerFailed("inductor", oom, None)):
        monkeypatch.setattr(resnet, "_COMPILED", {"fused": raising(exc)})
        with pytest.raises(type(exc)):
            resnet._split_bn_backward("fused")(*args)
        assert not resnet._COMPILED.get("failed")
    monkeypatch.setattr(resnet, "_COMPILED", {"fused": raising(BackendCompilerFailed("inductor", OSError("no g++"), None))})
    with caplog.at_level(logging.WARNING, logger="photoz_hpc"):
        got = resnet._split_bn_backward("fused")(*args)
    assert resnet._COMPILED.get("failed") and "failed to compile" in caplog.text
    for a, e in zip(got, resnet._backward_eager(*args), strict=True):
        torch.testing.assert_close(a, e)
    assert resnet._split_bn_backward("fused") is resnet._backward_eager  # for the rest of the process


def test_fused_split_bn_needs_a_cpu_toolchain(monkeypatch) -> None:
    """Without a C++ compiler for Inductor, ``fused`` on a CPU resolves to ``eager`` (no failing compile);
    ``auto`` stays eager on a CPU either way."""
    from torch._inductor import config

    from photoz_hpc.models import resnet

    monkeypatch.setattr(config.cpp, "cxx", (None, "no-such-c++-compiler"))
    resnet.cpu_toolchain_missing.cache_clear()
    try:
        assert "no C++ compiler" in resnet.cpu_toolchain_missing()
        assert resnet.resolve_split_bn_backward("fused", torch.device("cpu")) == "eager"
        assert resnet.resolve_split_bn_backward("auto", torch.device("cpu")) == "eager"
    finally:
        resnet.cpu_toolchain_missing.cache_clear()


def test_split_bn_backward_setting() -> None:
    from photoz_hpc.config import load_config
    from photoz_hpc.errors import ConfigError
    from photoz_hpc.models.moco import build_moco
    from photoz_hpc.models.resnet import SplitBatchNorm2d, resolve_split_bn_backward

    assert resolve_split_bn_backward("auto", torch.device("cpu")) == "eager"  # CPU runs stay on the eager ops
    with pytest.raises(ConfigError, match="split_bn_backward"):
        SplitBatchNorm2d(8, 2, backward="bogus")
    cfg = load_config(None, ["model.arch=resnet18", "model.width=8", "loader.batch_size=8", "moco.queue_size=16",
                             "moco.bn_splits=2", "moco.split_bn_backward=copy"])
    impls = {m.backward_impl for m in build_moco(cfg).modules() if isinstance(m, SplitBatchNorm2d)}
    assert impls == {"copy"}
