"""Compact records (issue 23): ``prepare --dtype float16`` stores half the bytes, every loader reads it and casts to
float32 after the read, views equal the float32 store's to float16 precision, values float16 cannot hold are bad
input named by file and row, and a prepare resumed with another dtype is refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, assert_loader_matches_oracle, blob_images, write_release_h5

from photoz_hpc.augment.loaders import build_loader, dali_available
from photoz_hpc.augment.pipelines import PIPELINES
from photoz_hpc.cli import main as cli_main
from photoz_hpc.config import FinetuneRunConfig, load_config
from photoz_hpc.data import open_dataset
from photoz_hpc.data import prepare as prepare_mod
from photoz_hpc.data.inputs import PrepareOptions
from photoz_hpc.data.prepare import prepare
from photoz_hpc.data.record_dtype import FLUSH_FRACTION
from photoz_hpc.data.stats import reference_median_mad
from photoz_hpc.data.verify import dataset_info, verify_dataset
from photoz_hpc.errors import DatasetError, InputDataError, PhotozError

N, LABELED, SIZE = 40, 32, 32
HALF = PrepareOptions(dtype="float16")
#: float16's unit roundoff; the views' bound below is twice it, relative to the view's largest value
EPS16 = 2.0**-11
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
DALI = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> SimpleNamespace:
    """Release-layout inputs (galaxy blobs; 32 labeled, 8 unlabeled) prepared as float32 and as float16."""
    root = tmp_path_factory.mktemp("f16")
    images = blob_images(N, SIZE, seed=4)
    h5 = [write_release_h5(root / "in.h5", LABELED, seed=4, size=SIZE, images=images[:LABELED]),
          write_release_h5(root / "un.h5", N - LABELED, seed=5, size=SIZE, images=images[LABELED:], labeled=False)]
    f32 = prepare(h5, root / "f32", samples_per_shard=16)
    f16 = prepare(h5, root / "f16", samples_per_shard=16, options=HALF)
    return SimpleNamespace(root=root, h5=h5, images=images, f32=f32, f16=f16)


def cfg_of(*overrides: str, backend: str = "reference", device: str = "cpu"):
    return load_config(None, ["loader.batch_size=8", f"loader.backend={backend}", f"loader.device={device}",
                              "augment.jitter_max=2", *overrides])


# ---------------------------------------------------------------------- the store


def test_float16_store_holds_the_rounded_pixels_in_half_the_bytes(stores):
    d32, d16 = open_dataset(stores.f32), open_dataset(stores.f16)
    m32, m16 = d32.manifest, d16.manifest
    assert (m32["dtype"], m16["dtype"]) == ("float32", "float16")
    assert d16.image_dtype == np.float16 and d32.image_dtype == np.float32
    assert m16["record_bytes"] * 2 == m32["record_bytes"] == SIZE * SIZE * 5 * 4
    for s32, s16 in zip(m32["shards"], m16["shards"], strict=True):
        assert (stores.f16 / s16["file"]).stat().st_size * 2 == (stores.f32 / s32["file"]).stat().st_size
    hwc = np.ascontiguousarray(stores.images.transpose(0, 2, 3, 1))
    rec16 = d16.images_hwc(np.arange(N))
    assert rec16.dtype == np.float16 and d32.images_hwc(np.arange(N)).tobytes() == hwc.tobytes()
    assert rec16.tobytes() == hwc.astype(np.float16).tobytes()  # rounded once, to nearest
    assert not np.array_equal(rec16.astype(np.float32), hwc)  # and that did round
    # CRCs and checksums are of the stored (float16) bytes; verify follows the dtype
    assert [zlib.crc32(r) for r in rec16] == d16.meta["crc32"].tolist()
    report = verify_dataset(stores.f16)
    assert report["ok"] and report["dtype"] == "float16" and report["partial"] == ""
    info = dataset_info(stores.f16)
    assert info["dtype"] == "float16" and dataset_info(stores.f32)["dtype"] == "float32"
    # the noise scale comes from the values loaders see: the float16 records
    median, mad = reference_median_mad(rec16.astype(np.float32))
    np.testing.assert_array_equal(d16.pixel_stats()["median"], median)
    np.testing.assert_array_equal(d16.pixel_stats()["mad"], mad)
    assert not np.array_equal(d16.pixel_stats()["mad"], d32.pixel_stats()["mad"])
    item = d16[3]
    assert item["image"].dtype == np.float32 and np.array_equal(item["image"], rec16[3].transpose(2, 0, 1))
    for name in d32.meta.dtype.names:  # the metadata are the same but for the records' CRCs
        assert (name == "crc32") != (d16.meta[name].tobytes() == d32.meta[name].tobytes()), name


def test_a_manifest_without_dtype_is_float32_and_an_unknown_one_is_refused(stores, tmp_path):
    copy = Path(shutil.copytree(stores.f32, tmp_path / "old"))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["dtype"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert open_dataset(copy).image_dtype == np.float32
    manifest["dtype"] = "bfloat16"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="record dtype 'bfloat16' is not one of"):
        open_dataset(copy)


def test_cli_prepare_dtype_and_verify_of_a_partial_node_copy(stores, tmp_path, capsys):
    out = tmp_path / "cli16"
    assert cli_main(["prepare", *map(str, stores.h5), "--out", str(out), "--samples-per-shard", "16", "--dtype",
                     "float16"]) == 0
    want = json.loads((stores.f16 / "manifest.json").read_text())["shards"]
    assert json.loads((out / "manifest.json").read_text())["shards"] == want  # same bytes as the API's
    # a node-local copy of node 0 of 2 holding shards 0 and 1: the other .bin files are absent
    (out / "shard-00002.bin").unlink()
    (out / "staged.json").write_text(json.dumps({"partition": "node", "node": 0, "nodes": 2, "shards": [0, 1],
                                                  "source": str(stores.f16)}))
    capsys.readouterr()
    assert cli_main(["verify", str(out)]) == 0
    said = capsys.readouterr().out
    assert "OK (partial copy)" in said and "2 of 3 shards (32 of 40 samples)" in said and "float16" in said
    assert verify_dataset(out)["verified_shards"] == [0, 1]
    with open(out / "shard-00001.bin", "r+b") as fh:  # a held shard is still checked
        fh.seek(100)
        fh.write(b"\x00\x7f")
    with pytest.raises(DatasetError, match="shard-00001.bin: sha256 mismatch"):
        verify_dataset(out)


# ---------------------------------------------------------------------- values float16 cannot hold


def test_overflow_is_refused_naming_file_and_row(tmp_path):
    images = blob_images(12, 16, seed=1)
    images[5, 2, 7, 7] = 7.0e4
    h5 = write_release_h5(tmp_path / "bright.h5", 12, size=16, images=images)
    with pytest.raises(InputDataError, match=r"bright\.h5: row 5: a pixel of band r is 70000, beyond float16's "
                       r"range.*--dtype float32"):
        prepare([h5], tmp_path / "ds", samples_per_shard=4, options=HALF)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()  # nothing published or kept
    assert open_dataset(prepare([h5], tmp_path / "ds32", samples_per_shard=4)).image_hwc(5)[7, 7, 2] == 7.0e4
    images[5, 2, 7, 7] = 6.5e4  # within range: rounded like any other value
    ok = prepare([write_release_h5(tmp_path / "ok.h5", 12, size=16, images=images)], tmp_path / "ok", options=HALF)
    assert open_dataset(ok).image_hwc(5)[7, 7, 2] == np.float16(6.5e4)


def test_bulk_underflow_is_refused_naming_file_and_row_a_few_flushed_pixels_are_not(tmp_path):
    images = blob_images(12, 16, seed=2)
    images[0, 1, :2, 0] = 1e-9  # 2 of 256 pixels of one band flush: under FLUSH_FRACTION, accepted
    assert 2 <= FLUSH_FRACTION * 256
    ok = prepare([write_release_h5(tmp_path / "ok.h5", 12, size=16, images=images)], tmp_path / "ok", options=HALF)
    assert (open_dataset(ok).image_hwc(0)[:2, 0, 1] == 0).all()
    images[1, 0, 0, 0] = np.nan  # skipped: the refused row keeps its input row number
    images[3, 3] *= 1e-9  # band i of row 3 in a unit float16 cannot hold
    h5 = write_release_h5(tmp_path / "faint.h5", 12, size=16, images=images)
    with pytest.raises(InputDataError, match=r"faint\.h5: row 3: 25\d of 256 non-zero pixels of band i would flush "
                       r"to 0 in float16.*flux unit is too small for float16; prepare it with --dtype float32"):
        prepare([h5], tmp_path / "ds", samples_per_shard=4, bad_row_policy="skip", options=HALF)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()
    assert len(open_dataset(prepare([h5], tmp_path / "ds32", bad_row_policy="skip"))) == 11  # float32 holds them


def test_pixels_float16_keeps_but_rounds_coarsely_are_refused(tmp_path):
    """Sky noise of 1e-7 lies in float16's subnormal range: nothing flushes, but rounding is a third of the noise."""
    rng = np.random.default_rng(4)
    images = blob_images(8, 16, seed=4)
    images[2, 4] = rng.normal(0, 1e-7, (16, 16)) + 2e-6  # band z of row 2 in a unit float16 rounds coarsely
    h5 = write_release_h5(tmp_path / "tiny.h5", 8, size=16, images=images)
    with pytest.raises(InputDataError, match=r"tiny\.h5: row 2: float16 rounds the pixels of band z by .* rms, "
                       r"\d+% of their median absolute deviation .*--dtype float32"):
        prepare([h5], tmp_path / "ds", samples_per_shard=4, options=HALF)
    images[2, 4] = rng.normal(0, 1e-2, (16, 16))  # sky noise of an SDSS-like unit, with 10 subnormal pixels
    images[2, 4, :10, 0] = rng.uniform(-5e-5, 5e-5, 10)  # (4% > FLUSH_FRACTION) rounded by ~1e-8: fine
    ok = prepare([write_release_h5(tmp_path / "ok.h5", 8, size=16, images=images)], tmp_path / "ok", options=HALF)
    assert np.abs(open_dataset(ok).image_hwc(2)[:10, 0, 4] - images[2, 4, :10, 0]).max() < 3e-8


def test_a_prepare_resumed_with_another_dtype_is_refused(stores, tmp_path, monkeypatch):
    real_write = prepare_mod.write_shard
    calls = []

    def crash_on_second(out, plan, *args):
        calls.append(plan.index)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill mid-run
        return real_write(out, plan, *args)

    monkeypatch.setattr(prepare_mod, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(stores.h5, tmp_path / "ds", samples_per_shard=16, options=HALF)
    monkeypatch.setattr(prepare_mod, "write_shard", real_write)
    with pytest.raises(PhotozError, match=r"unfinished prepare with --dtype float16, this one asks for --dtype "
                       r"float32; resume it with --dtype float16"):
        prepare(stores.h5, tmp_path / "ds", samples_per_shard=16)
    assert (tmp_path / "ds.partial" / "shard-00000.json").exists()  # the refused run touched nothing
    out = prepare(stores.h5, tmp_path / "ds", samples_per_shard=16, options=HALF)
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    assert shards == json.loads((stores.f16 / "manifest.json").read_text())["shards"]
    with pytest.raises(PhotozError, match="--dtype must be one of"):
        prepare(stores.h5, tmp_path / "bad", options=PrepareOptions(dtype="float64"))


# ---------------------------------------------------------------------- loaders


def _assert_views_match(loader16, loader32, pipeline: str) -> None:
    """Same draws, same labels; views of the float16 store within float16 precision of the float32 store's."""
    keys = PIPELINES[pipeline].view_keys
    n, differs = 0, False
    for b16, b32 in zip(loader16, loader32, strict=True):
        for key in b32:
            if key not in keys:
                torch.testing.assert_close(b16[key], b32[key], rtol=0, atol=0)
        for key in keys:
            got, want = b16[key], b32[key]
            assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
            scale = want.abs().max().item()
            assert scale > 0 and (got - want).abs().max().item() <= 2 * EPS16 * scale, key
            differs |= not torch.equal(got, want)
        n += 1
    assert n == len(loader32) > 0 and differs


@pytest.mark.parametrize("pipeline", ["pretrain", "finetune", "eval"])
def test_reference_loader_reads_float16_and_matches_the_float32_store(stores, pipeline):
    cfg = cfg_of("augment.crop_size=16")
    _assert_views_match(build_loader(cfg, stores.f16, pipeline, seed=3), build_loader(cfg, stores.f32, pipeline, seed=3),
                        pipeline)


@DALI
@pytest.mark.parametrize("pipeline, crop, padded", [("pretrain", 28, True), ("finetune", 16, False),
                                                    ("eval", 16, False)])
def test_dali_cpu_reads_float16(stores, pipeline, crop, padded):
    """Both CPU feeds, cast in DALI: float16 bordered copies of the records (a rotated 28 px crop leaves the 32 px
    image), and the float16 records themselves."""
    dali = build_loader(cfg_of(f"augment.crop_size={crop}", backend="dali"), stores.f16, pipeline, seed=3)
    ref = build_loader(cfg_of(f"augment.crop_size={crop}"), stores.f16, pipeline, seed=3)
    assert_loader_matches_oracle(dali, ref, pipeline, crop, 5)
    assert dali._feeder.record_dtype == np.float16 and dali._feeder.pad == padded
    dali32 = build_loader(cfg_of(f"augment.crop_size={crop}", backend="dali"), stores.f32, pipeline, seed=3)
    dali16 = build_loader(cfg_of(f"augment.crop_size={crop}", backend="dali"), stores.f16, pipeline, seed=3)
    _assert_views_match(dali16, dali32, pipeline)


@DALI
def test_dali_gpu_feed_stages_float16_records(stores, monkeypatch):
    """The GPU path hands DALI the float16 records in (pinned) float16 staging buffers: half the bytes cross to
    the device, where the pipeline casts them (checked without CUDA; the CUDA test below runs it)."""
    from photoz_hpc.augment import dali_pipeline

    allocated = []
    monkeypatch.setattr(dali_pipeline, "_pinned_array", lambda shape, dtype: allocated.append(dtype) or np.zeros(shape, dtype))
    loader = build_loader(cfg_of("augment.crop_size=16", backend="dali"), stores.f16, "pretrain", seed=3)
    feeder = dali_pipeline._Feeder(loader.source, 0, "gpu")
    staged = feeder.host(SimpleNamespace(iteration=0))[0]
    assert feeder.record_dtype == np.float16 and allocated == [np.float16] and staged.dtype == np.float16
    assert staged.tobytes() == np.stack(feeder.delivered[0][0].images).tobytes()


@CUDA
@DALI
@pytest.mark.parametrize("pipeline", ["pretrain", "finetune", "eval"])
def test_cuda_dali_gpu_reads_float16(stores, pipeline):
    dali = build_loader(cfg_of("augment.crop_size=16", backend="dali", device="gpu"), stores.f16, pipeline, seed=3)
    ref = build_loader(cfg_of("augment.crop_size=16", device="gpu"), stores.f16, pipeline, seed=3)
    assert_loader_matches_oracle(dali, ref, pipeline, 16, 5)
    assert dali._feeder.record_dtype == np.float16
    assert all(buf.dtype == np.float16 and torch.from_numpy(buf).is_pinned() for buf, _ in dali._feeder._free)
    dali32 = build_loader(cfg_of("augment.crop_size=16", backend="dali", device="gpu"), stores.f32, pipeline, seed=3)
    dali16 = build_loader(cfg_of("augment.crop_size=16", backend="dali", device="gpu"), stores.f16, pipeline, seed=3)
    _assert_views_match(dali16, dali32, pipeline)


# ---------------------------------------------------------------------- predict and evaluate


def test_predict_and_evaluate_run_on_a_float16_store(stores):
    from photoz_hpc.evaluate.catalogue import PredictOptions, read_catalogue, run_predict
    from photoz_hpc.evaluate.run import run_evaluate
    from photoz_hpc.models.photoz_net import build_photoz_net, save_photoz_model

    cfg = load_config(None, [*TINY_MODEL, "augment.crop_size=16", "loader.backend=reference",
                             "train.precision=fp32", "seed=1"], root=FinetuneRunConfig)
    torch.manual_seed(0)
    net = build_photoz_net(cfg.model)
    ckpt = save_photoz_model(net, cfg.model, stores.root / "model.pt", {"config": dataclasses.asdict(cfg)})
    cats = {}
    for name in ("f16", "f32"):
        report = run_predict(ckpt, [getattr(stores, name)], stores.root / f"cat-{name}", PredictOptions(batch_size=16))
        assert report["complete"] and report["rows"] == N
        cats[name] = read_catalogue(stores.root / f"cat-{name}")
    np.testing.assert_array_equal(cats["f16"]["ObjID"], cats["f32"]["ObjID"])
    np.testing.assert_allclose(cats["f16"]["z_median"], cats["f32"]["z_median"], atol=1e-3)
    ev = run_evaluate(ckpt, stores.f16, stores.root / "ev16")
    assert ev["n"] == LABELED and np.isfinite(ev["metrics"]["sigma_mad"])


def test_prepare_arrays_takes_the_dtype(stores, tmp_path):
    import photoz_hpc as pz

    out = pz.prepare_arrays(stores.images[:8], tmp_path / "arr", dtype="float16")
    ds = open_dataset(out)
    assert ds.image_dtype == np.float16
    assert ds.images_hwc(np.arange(8)).tobytes() == stores.images[:8].transpose(0, 2, 3, 1).astype(np.float16).tobytes()
