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
