"""The 5-band ResNet: stride-1 stem, configurable depth/width/kernel, exported encoder round trip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_split_bn_backwards_agree_with_the_reference(dtype, tol, caplog) -> None:
    """moco.split_bn_backward on channels_last input: ``fused`` (torch.compile, no full-size fp32 temporaries),
    ``eager`` and ``copy`` give the fp64 NCHW reference's outputs and gradients; fused equals eager to rounding;
    the output stays channels_last; the choice is logged."""
    import copy
    import logging

    from photoz_hpc.models import resnet
    from photoz_hpc.models.resnet import SplitBatchNorm2d

    torch.manual_seed(0)
    bn = SplitBatchNorm2d(16, 4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = (torch.randn(32, 16, 9, 7) * 2 + 0.5).to(dtype)
    g = torch.randn(32, 16, 9, 7).to(dtype)
    ref = copy.deepcopy(bn).double()
    xr = x.double().requires_grad_()
    yr = ref(xr)
    yr.backward(g.double())
    got = {}
    resnet._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="photoz_hpc"):
        for impl in ("eager", "fused", "copy"):
            b = copy.deepcopy(bn)
            b.backward_impl = impl
            xi = x.contiguous(memory_format=torch.channels_last).detach().requires_grad_()
            y = b(xi)
            y.backward(g.contiguous(memory_format=torch.channels_last))
            assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
            assert xi.grad.is_contiguous(memory_format=torch.channels_last) and xi.grad.dtype == dtype
            torch.testing.assert_close(y.double(), yr, atol=tol, rtol=tol)
            torch.testing.assert_close(xi.grad.double(), xr.grad, atol=tol, rtol=tol)
            torch.testing.assert_close(b.weight.grad.double(), ref.weight.grad, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(b.bias.grad.double(), ref.bias.grad, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(b.running_var.double(), ref.running_var, rtol=1e-4, atol=1e-5)
            got[impl] = (xi.grad.double(), b.weight.grad.double(), b.bias.grad.double())
    assert not resnet._COMPILED.get("failed"), "the fused backward fell back to eager"
    for a, e in zip(got["fused"], got["eager"], strict=True):  # the same math, another summation order
        torch.testing.assert_close(a, e, atol=1e-5 if dtype == torch.float32 else 2 ** -7, rtol=1e-5)
    logged = [r.getMessage() for r in caplog.records if "split BatchNorm on channels_last" in r.getMessage()]
    assert [m.split(": ")[1].split()[0] for m in logged] == ["eager", "fused", "copy"], logged


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
