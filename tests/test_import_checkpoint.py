"""Importing the paper authors' checkpoints: every tensor lands, none is left over, same outputs.

The sources are built here in the authors' published layout (torchvision ResNet-50 names, a 5-band
7x7 stride-1 stem, no max-pool, ``fc`` = Linear(2048, 180); MoCo keys ``encoder_{q,k}.*`` with the MLP
``fc.0`` / ``fc.2`` and ``queue`` / ``queue_ptr``; DDP ``module.`` prefix; the checkpoint dicts of their
``train.py`` and of facebookresearch/moco ``main_moco.py``), with random tensors, and run by a small
functional forward written from that layout, independent of ``photoz_hpc.models.resnet``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from photoz_hpc.errors import PhotozError
from photoz_hpc.models.cli import register
from photoz_hpc.models.export import ENCODER_FORMAT, load_encoder
from photoz_hpc.models.paper_import import import_checkpoint
from photoz_hpc.models.photoz_net import PHOTOZ_MODEL_FORMAT, load_photoz_model

LAYERS = (3, 4, 6, 3)  # ResNet-50
X = torch.randn(2, 5, 32, 32, generator=torch.Generator().manual_seed(7))


# --- the authors' layout -------------------------------------------------------------------------------

def _bn(g: torch.Generator, prefix: str, c: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(c, generator=g) * 0.5 + 0.5,
        f"{prefix}.bias": torch.randn(c, generator=g) * 0.1,
        f"{prefix}.running_mean": torch.randn(c, generator=g) * 0.1,
        f"{prefix}.running_var": torch.rand(c, generator=g) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(1000, dtype=torch.long),
    }


def _conv(g: torch.Generator, cout: int, cin: int, k: int) -> torch.Tensor:
    return torch.randn(cout, cin, k, k, generator=g) * math.sqrt(2.0 / (cin * k * k))


def _linear(g: torch.Generator, prefix: str, cout: int, cin: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.randn(cout, cin, generator=g) / math.sqrt(cin),
            f"{prefix}.bias": torch.randn(cout, generator=g) * 0.1}


def tv_resnet50(seed: int, width: int = 64, stem: int = 7) -> dict[str, torch.Tensor]:
    """State dict of torchvision's ResNet-50 with the authors' stem (5 bands, ``stem`` x ``stem``), no fc."""
    g = torch.Generator().manual_seed(seed)
    sd = {"conv1.weight": _conv(g, width, 5, stem), **_bn(g, "bn1", width)}
    cin = width
    for i, n in enumerate(LAYERS):
        planes = width * 2**i
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            sd[f"{p}.conv1.weight"] = _conv(g, planes, cin, 1)
            sd.update(_bn(g, f"{p}.bn1", planes))
            sd[f"{p}.conv2.weight"] = _conv(g, planes, planes, 3)
            sd.update(_bn(g, f"{p}.bn2", planes))
            sd[f"{p}.conv3.weight"] = _conv(g, 4 * planes, planes, 1)
            sd.update(_bn(g, f"{p}.bn3", 4 * planes))
            if j == 0:
                sd[f"{p}.downsample.0.weight"] = _conv(g, 4 * planes, cin, 1)
                sd.update(_bn(g, f"{p}.downsample.1", 4 * planes))
            cin = 4 * planes
    return sd


def photoz_source(seed: int = 1, width: int = 64) -> dict[str, torch.Tensor]:
    """The fine-tuned photo-z network: ResNet-50 + ``fc`` Linear(2048, 180)."""
    sd = tv_resnet50(seed, width)
    sd.update(_linear(torch.Generator().manual_seed(seed + 100), "fc", 180, 32 * width))
    return sd


def moco_source(seed: int = 2, width: int = 64, dim: int = 128, queue: int = 512) -> dict[str, torch.Tensor]:
    """MoCo v2 (main_moco.py with --mlp): both encoders with the MLP head ``fc.0`` / ``fc.2``, the queue."""
    sd: dict[str, torch.Tensor] = {}
    feat = 32 * width
    for n, enc in enumerate(("encoder_q", "encoder_k")):
        g = torch.Generator().manual_seed(seed + 10 * n + 1)
        part = {**tv_resnet50(seed + 10 * n, width), **_linear(g, "fc.0", feat, feat), **_linear(g, "fc.2", dim, feat)}
        sd.update({f"{enc}.{k}": v for k, v in part.items()})
    sd["queue"] = F.normalize(torch.randn(dim, queue, generator=torch.Generator().manual_seed(seed)), dim=0)
    sd["queue_ptr"] = torch.tensor([256], dtype=torch.long)
    return sd


def tv_trunk(sd: dict[str, torch.Tensor], x: torch.Tensor, p: str = "") -> torch.Tensor:
    """torchvision ResNet-50 forward in eval mode, authors' stem (stride 1, padding k // 2, no max-pool)."""

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}{name}.running_mean"], sd[f"{p}{name}.running_var"],
                            sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"], False, 0.0, 1e-5)

    w = sd[f"{p}conv1.weight"]
    x = F.relu(bn(F.conv2d(x, w, stride=1, padding=w.shape[-1] // 2), "bn1"))
    for i, n in enumerate(LAYERS):
        for j in range(n):
            b, s = f"layer{i + 1}.{j}", 2 if (i > 0 and j == 0) else 1
            out = F.relu(bn(F.conv2d(x, sd[f"{p}{b}.conv1.weight"]), f"{b}.bn1"))
            out = F.relu(bn(F.conv2d(out, sd[f"{p}{b}.conv2.weight"], stride=s, padding=1), f"{b}.bn2"))
            out = bn(F.conv2d(out, sd[f"{p}{b}.conv3.weight"]), f"{b}.bn3")
            if f"{p}{b}.downsample.0.weight" in sd:
                x = bn(F.conv2d(x, sd[f"{p}{b}.downsample.0.weight"], stride=s), f"{b}.downsample.1")
            x = F.relu(out + x)
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def tv_mlp(sd: dict[str, torch.Tensor], feat: torch.Tensor, p: str) -> torch.Tensor:
    h = F.relu(F.linear(feat, sd[f"{p}fc.0.weight"], sd[f"{p}fc.0.bias"]))
    return F.linear(h, sd[f"{p}fc.2.weight"], sd[f"{p}fc.2.bias"])


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def save_photoz(path: Path, sd: dict[str, torch.Tensor], ddp: bool, wrapped: bool) -> Path:
    state = {("module." + k if ddp else k): v for k, v in sd.items()}
    blob = state if not wrapped else {"iters": 4096, "epoch": 64, "model_state": state,
                                      "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}
    torch.save(blob, path)
    return path


def save_moco(path: Path, sd: dict[str, torch.Tensor], ddp: bool, wrapped: bool) -> Path:
    state = {("module." + k if ddp else k): v for k, v in sd.items()}
    blob = state if not wrapped else {"epoch": 101, "arch": "resnet50", "state_dict": state,
                                      "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0]}]}}
    torch.save(blob, path)
    return path


@pytest.fixture(scope="module")
def photoz_sd() -> dict[str, torch.Tensor]:
    return photoz_source()


@pytest.fixture(scope="module")
def moco_sd() -> dict[str, torch.Tensor]:
    return moco_source()


@pytest.fixture(scope="module")
def small_sd() -> dict[str, torch.Tensor]:
    """A width-8 ResNet-50 photo-z source: same keys and structure, cheap for the error cases."""
    return photoz_source(seed=3, width=8)


# --- good inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ddp, wrapped", [(True, True), (False, False), (True, False)])
def test_photoz_model_imports_every_tensor_and_gives_the_same_output(tmp_path, photoz_sd, ddp, wrapped) -> None:
    src = save_photoz(tmp_path / "photoz_finetuned_model.pth.tar", photoz_sd, ddp, wrapped)
    report = import_checkpoint(src, tmp_path / "photoz_model.pt")
    assert report["kind"] == "photoz" and report["format"] == PHOTOZ_MODEL_FORMAT
    assert (report["arch"], report["width"], report["stem_kernel"], report["n_bins"]) == ("resnet50", 64, 7, 180)
    assert report["n_tensors"] == report["n_written"] == len(photoz_sd) and report["ddp_prefix"] is ddp

    net, blob = load_photoz_model(tmp_path / "photoz_model.pt")
    ours = net.state_dict()
    assert len(ours) == len(photoz_sd)  # nothing left over, nothing invented
    for key, value in photoz_sd.items():
        mine = ours["head." + key[3:]] if key.startswith("fc.") else ours["encoder." + key]
        assert torch.equal(mine, value), key
    assert blob["source"].get("epoch") == (64 if wrapped else None)
    # the paper's data: SDSS ugriz and its 180 bins over [0, 0.4), recorded so other bands are refused
    assert blob["survey"]["name"] == "sdss" and blob["survey"]["bands"] == ["u", "g", "r", "i", "z"]
    assert blob["redshift_grid"] == {"z_min": 0.0, "z_max": 0.4, "n_bins": 180} and net.grid.n_bins == 180
    assert report["bands"] == ["u", "g", "r", "i", "z"] and report["redshift_grid"] == blob["redshift_grid"]
    with torch.no_grad():
        ref = F.linear(tv_trunk(photoz_sd, X), photoz_sd["fc.weight"], photoz_sd["fc.bias"])
        close(net(X), ref)


@pytest.mark.parametrize("ddp, wrapped", [(True, True), (False, False)])
def test_moco_checkpoint_becomes_an_encoder_export_with_the_same_features(tmp_path, moco_sd, ddp, wrapped) -> None:
    src = save_moco(tmp_path / "pretrained_paper_model.pth.tar", moco_sd, ddp, wrapped)
    report = import_checkpoint(src, tmp_path / "encoder.pt")
    assert report["kind"] == "moco" and report["format"] == ENCODER_FORMAT
    assert (report["arch"], report["width"], report["stem_kernel"], report["embed_dim"]) == ("resnet50", 64, 7, 128)
    assert report["n_tensors"] == len(moco_sd)

    blob = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert blob["format"] == ENCODER_FORMAT and blob["model"]["stem_kernel"] == 7
    assert blob["survey"]["name"] == "sdss" and report["survey"] == "sdss"
    q = {k[len("encoder_q."):]: v for k, v in moco_sd.items() if k.startswith("encoder_q.")}
    trunk = {k: v for k, v in q.items() if not k.startswith("fc.")}
    assert blob["state_dict"].keys() == trunk.keys()  # the query trunk, all of it
    assert all(torch.equal(blob["state_dict"][k], v) for k, v in trunk.items())
    head = blob["projection_head"]
    assert head.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(torch.equal(head[k], q["fc." + k]) for k in head)
    assert not torch.equal(blob["state_dict"]["conv1.weight"], moco_sd["encoder_k.conv1.weight"])
    if wrapped:
        assert blob["source"]["epoch"] == 101 and blob["source"]["arch"] == "resnet50"

    encoder = load_encoder(tmp_path / "encoder.pt")
    with torch.no_grad():
        ref = tv_trunk(moco_sd, X, "encoder_q.")
        feats = encoder(X)
        close(feats, ref)
        mlp = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128))
        mlp.load_state_dict(head)
        close(mlp(feats), tv_mlp(moco_sd, ref, "encoder_q."))


def test_transpose_hw_reproduces_the_authors_swapped_axes(tmp_path, small_sd) -> None:
    src = save_photoz(tmp_path / "src.pth.tar", small_sd, ddp=True, wrapped=True)
    report = import_checkpoint(src, tmp_path / "out.pt", transpose_hw=True)
    assert report["transpose_hw"] is True and report["width"] == 8
    net, blob = load_photoz_model(tmp_path / "out.pt")
    assert blob["source"]["transpose_hw"] is True
    x = torch.randn(2, 5, 20, 20, generator=torch.Generator().manual_seed(3))  # even and odd sizes after strides
    with torch.no_grad():
        ref = F.linear(tv_trunk(small_sd, x.transpose(-1, -2)), small_sd["fc.weight"], small_sd["fc.bias"])
        close(net(x), ref)


def test_cli_command_prints_the_report(tmp_path, small_sd, capsys) -> None:
    src = save_photoz(tmp_path / "src.pth.tar", small_sd, ddp=False, wrapped=True)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["import-checkpoint", str(src), str(tmp_path / "out.pt")])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "photoz" and Path(report["out"]).is_file()


# --- bad inputs ----------------------------------------------------------------------------------------

def _expect(tmp_path: Path, blob, *needles: str, name: str = "bad.pth.tar", **kw) -> str:
    src = tmp_path / name
    torch.save(blob, src)
    with pytest.raises(PhotozError) as err:
        import_checkpoint(src, tmp_path / "out.pt", **kw)
    msg = str(err.value)
    assert str(src) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert not (tmp_path / "out.pt").exists()
    return msg


def test_random_dict_and_non_dicts_are_rejected(tmp_path) -> None:
    _expect(tmp_path, {"foo": torch.randn(3), "bar": torch.randn(2, 2)}, "unrecognised layout", "bar, foo")
    _expect(tmp_path, {"epoch": 3, "net": {"a": 1}}, "neither a checkpoint", "epoch, net")
    _expect(tmp_path, [torch.randn(2)], "found list")
    _expect(tmp_path, {"model_state": {"conv1.weight": "not a tensor"}}, "not tensors", "conv1.weight")


def test_wrong_shapes_are_listed(tmp_path, small_sd) -> None:
    sd = dict(small_sd)
    sd["layer2.0.conv2.weight"] = torch.randn(16, 16, 5, 5)
    sd["fc.weight"] = torch.randn(180, 100)
    _expect(tmp_path, {"model_state": sd}, "2 shape mismatches", "layer2.0.conv2.weight (16, 16, 5, 5) (ours (16, 16, 3, 3))",
            "fc.weight (180, 100) (ours (180, 256))")
    sd = dict(small_sd, **{"conv1.weight": torch.randn(8, 3, 7, 7)})
    _expect(tmp_path, sd, "3 input channels", "SDSS checkpoints only", "ugriz")


def test_missing_and_leftover_keys_are_listed(tmp_path, small_sd) -> None:
    sd = {f"module.{k}": v for k, v in small_sd.items() if k != "layer3.2.bn2.running_var"}
    _expect(tmp_path, {"model_state": sd}, "1 keys missing from the source: layer3.2.bn2.running_var")
    sd = dict(small_sd, **{"fc.1.weight": torch.randn(3), "layer5.0.conv1.weight": torch.randn(2)})
    _expect(tmp_path, sd, "unmapped source keys", "fc.1.weight")
    # a fourth block in layer4 renames like the trunk, but our ResNet-50 has no such block: left over
    sd = dict(small_sd, **{"layer4.3.conv1.weight": torch.randn(64, 256, 1, 1)})
    _expect(tmp_path, sd, "source keys our network lacks", "layer4.3.conv1.weight")
    photo = {k: v for k, v in small_sd.items() if not k.startswith("fc.")}
    _expect(tmp_path, photo, "keys missing from the source", "fc.bias, fc.weight")


def test_moco_problems_are_listed(tmp_path) -> None:
    sd = moco_source(seed=5, width=8, dim=16, queue=64)
    del sd["encoder_k.layer1.0.bn1.running_mean"]
    sd["encoder_q.fc.weight"] = torch.randn(16, 256)  # a MoCo v1 (no MLP) head
    msg = _expect(tmp_path, {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
                  "MoCo pretraining checkpoint", "encoder_k.layer1.0.bn1.running_mean", "encoder_q.fc.weight")
    assert "unmapped source keys" in msg and "keys missing" in msg
    sd = moco_source(seed=5, width=8, dim=16, queue=64)
    _expect(tmp_path, {"arch": "resnet18", "state_dict": sd}, "says arch 'resnet18'")


def test_files_that_are_not_plain_checkpoints(tmp_path, small_sd) -> None:
    with pytest.raises(PhotozError, match="does not exist"):
        import_checkpoint(tmp_path / "nope.pth.tar", tmp_path / "out.pt")
    (tmp_path / "junk.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(PhotozError, match="junk.pth.tar is unreadable"):
        import_checkpoint(tmp_path / "junk.pth.tar", tmp_path / "out.pt")
    # Python objects besides tensors are refused unless the user trusts the file
    blob = {"args": argparse.Namespace(lr=0.03), "model_state": small_sd}
    _expect(tmp_path, blob, "--trust-pickle", name="pickled.pth.tar")
    assert import_checkpoint(tmp_path / "pickled.pth.tar", tmp_path / "ok.pt", trust_pickle=True)["kind"] == "photoz"
    # our own files are not imported again
    _expect(tmp_path, torch.load(tmp_path / "ok.pt", weights_only=True), "already a photoz-hpc file")
