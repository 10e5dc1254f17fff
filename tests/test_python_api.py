"""The Python API (``import photoz_hpc as pz``) against its command-line twins: predictions of arrays equal
``photoz-hpc predict``'s catalogue for the same galaxies (with test-time augmentation, pdfs, a temperature, an
exported model directory), embeddings equal ``embed``'s, ``search``/``anomalies`` the commands' tables,
``prepare_arrays`` the store ``prepare`` makes of the same arrays, ``finetune``/``evaluate_model`` the commands'
runs; bad inputs fail before any work with messages naming the problem; ``import photoz_hpc`` stays light.

Tiny: width-8 ResNet-18 on 16 px crops of 21 px cutouts (odd, so the centre crop's offset rounds down), 40 galaxies;
and 100 galaxies of 22 px (even) in several batches. The commands run in this process (``photoz_hpc.cli.main``) on
the same machine and threads, both sides pinned to the CPU and fp32 (``train.device=cpu``, ``--precision fp32`` /
``precision="fp32"``; on a GPU host the defaults would put one side on the GPU in bf16): the same code on the same
inputs gives the same bits, so the comparisons are exact except where a file rounds (the catalogue's float16 pdfs,
the CSV tables' 6 decimals). One test, run only where CUDA is available, compares the two with the GPU defaults."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, process_env, write_release_h5

import photoz_hpc as pz
from photoz_hpc import mmu_layout as L
from photoz_hpc.cli import main
from photoz_hpc.config import Config, FinetuneRunConfig, load_config
from photoz_hpc.data import open_dataset
from photoz_hpc.data.prepare import prepare
from photoz_hpc.errors import PhotozError
from photoz_hpc.evaluate.catalogue import read_catalogue
from photoz_hpc.evaluate.embeddings import Embeddings
from photoz_hpc.evaluate.predictions import read_predictions
from photoz_hpc.models.export import export_moco_encoder
from photoz_hpc.models.moco import build_moco
from photoz_hpc.models.photoz_net import build_photoz_net, save_photoz_model
from photoz_hpc.survey import load_survey
from photoz_hpc.train.model_export import export_model
from photoz_hpc.train.surveys import resolve_run_config

N, SIZE = 40, 21
#: both sides on the CPU in fp32 (the API side: device="cpu", precision="fp32"; predict: --precision fp32)
RUN = ["loader.backend=reference", "train.precision=fp32", "dist.backend=none", "train.device=cpu"]
FP32 = ["--precision", "fp32"]
TINY = [*TINY_MODEL, "model.embed_dim=16", "augment.crop_size=16", "augment.jitter_max=2", "seed=1", *RUN]
FT = {"model.arch": "resnet18", "model.width": 8, "augment.crop_size": 16, "augment.jitter_max": 2,
      "loader.batch_size": 8, "loader.backend": "reference", "train.precision": "fp32", "dist.backend": "none",
      "train.max_steps": 3, "train.progress": False, "train.tensorboard": False, "finetune.val_fraction": 0.25,
      "seed": 3, "train.device": "cpu"}
SUMMARIES = ("z_phot", "z_mode", "z_median", "z_lo68", "z_hi68", "z_lo95", "z_hi95", "odds", "pdf_std")


def cli(*args: str, capsys=None) -> dict | None:
    """Run a command in this process; its printed JSON when ``capsys`` is given."""
    if capsys is not None:
        capsys.readouterr()
    assert main([*map(str, args)]) == 0
    return json.loads(capsys.readouterr().out) if capsys is not None else None


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A 40-galaxy SDSS store (21 px), a photo-z model file and an encoder.pt (random init) for its bands."""
    root = tmp_path_factory.mktemp("api")
    data = prepare([write_release_h5(root / "a.h5", N, seed=4, size=SIZE)], root / "a", samples_per_shard=16)
    ds = open_dataset(data)
    survey = ds.survey
    cfg = load_config(None, TINY, root=FinetuneRunConfig)
    torch.manual_seed(0)
    net = build_photoz_net(cfg.model, survey)
    model = save_photoz_model(net, cfg.model, root / "best_model.pt", {"config": dataclasses.asdict(cfg)})
    pcfg = resolve_run_config(load_config(None, [*TINY, "moco.queue_size=64", "loader.batch_size=16"], root=Config), survey)
    moco = build_moco(pcfg, survey=survey)
    encoder = export_moco_encoder(moco, pcfg.model, root / "encoder.pt", augment_cfg=pcfg.augment)
    images = ds.images_hwc(np.arange(N)).transpose(0, 3, 1, 2)  # (N, bands, H, W), as a notebook holds them
    return {"root": root, "data": data, "model": model, "encoder": encoder, "images": np.ascontiguousarray(images),
            "ebv": ds.meta["ebv_sfd"].copy(), "ds": ds}


# ---------------------------------------------------------------------- the package root


def test_import_photoz_hpc_stays_light_and_exposes_the_api():
    code = ("import sys, photoz_hpc as pz; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'photoz_hpc.launch.api' not in sys.modules; assert 'load_model' in dir(pz); pz.load_model; "
            "assert 'photoz_hpc.launch.api' in sys.modules; print(sorted(pz.__all__))")
    done = subprocess.run([sys.executable, "-c", code], env=process_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "evaluate_model" in done.stdout and "prepare_arrays" in done.stdout
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pz.nope  # noqa: B018


# ---------------------------------------------------------------------- predict


@pytest.mark.parametrize("tta, temperature", [(1, None), (4, "2.5")])
def test_predict_on_arrays_equals_the_predict_catalogue(world, tmp_path, tta, temperature):
    more = ["--tta", str(tta)] + (["--temperature", temperature] if temperature else [])
    cli("predict", "--checkpoint", world["model"], "--data", world["data"], "--out", tmp_path / "cat", "--pdf", *more,
        *FP32, *RUN)
    cat = read_catalogue(tmp_path / "cat")
    model = pz.load_model(world["model"], device="cpu")
    assert model.bands == tuple("ugriz") and model.crop_size == 16 and model.dereddens
    got = model.predict(world["images"], ebv=world["ebv"], tta=tta, pdf=True, temperature=float(temperature or 1),
                        precision="fp32")
    assert sorted(got) == sorted([*SUMMARIES, "pdf"])
    for key in SUMMARIES:  # the same code on the same bits: exactly equal
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], cat[key], err_msg=key)
    # the catalogue rounds the pdf to float16 (relative 2^-11, absolute ~3e-8 below float16's normal range)
    assert got["pdf"].shape == (N, model.grid.n_bins)
    np.testing.assert_allclose(got["pdf"], cat["pdf"].astype(np.float32), rtol=2**-11, atol=3e-8)
    assert np.allclose(got["pdf"].sum(axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def even(world) -> dict:
    """100 SDSS galaxies of 22 px cutouts (even: the centre crop's offset is exact) in a store of 3 shards."""
    root = world["root"]
    data = prepare([write_release_h5(root / "even.h5", 100, seed=6, size=22)], root / "even", samples_per_shard=40)
    ds = open_dataset(data)
    images = np.ascontiguousarray(ds.images_hwc(np.arange(100)).transpose(0, 3, 1, 2))
    return {"data": data, "images": images, "ebv": ds.meta["ebv_sfd"].copy()}


def test_predict_in_many_batches_of_even_cutouts_equals_the_catalogue(world, even, tmp_path):
    """100 galaxies, 22 px: the command in batches of 16 (the last one 4 galaxies, padded by the loader) against the
    API in batches of 16 and of its default (64 on a CPU)."""
    cli("predict", "--checkpoint", world["model"], "--data", even["data"], "--out", tmp_path / "cat", "--batch-size",
        "16", *FP32, *RUN)
    cat = read_catalogue(tmp_path / "cat")
    assert len(cat["z_phot"]) == 100
    model = pz.load_model(world["model"], device="cpu")
    by16 = model.predict(even["images"], ebv=even["ebv"], batch_size=16, precision="fp32")
    default = model.predict(even["images"], ebv=even["ebv"], precision="fp32")
    for key in SUMMARIES:  # the same batches through the same code: the same bits
        np.testing.assert_array_equal(by16[key], cat[key], err_msg=key)
    # batches of 64 against 16: exact here (eval-mode layers are per galaxy), but another CPU's kernels may sum in
    # another order for another batch shape: float32 rounding of the redshifts at most
    np.testing.assert_allclose(default["z_phot"], cat["z_phot"], rtol=1e-5, atol=1e-6)


def test_load_model_takes_predicts_overrides(world, tmp_path):
    """``predict ... augment.crop_size=12`` from Python: ``load_model(path, overrides=...)`` gives the same numbers."""
    cli("predict", "--checkpoint", world["model"], "--data", world["data"], "--out", tmp_path / "cat", *FP32, *RUN,
        "augment.crop_size=12")
    cat = read_catalogue(tmp_path / "cat")
    model = pz.load_model(world["model"], device="cpu", overrides={"augment.crop_size": 12})
    assert model.crop_size == 12 and pz.load_model(world["model"], device="cpu", overrides=["augment.crop_size=12"]
                                                   ).crop_size == 12
    got = model.predict(world["images"], ebv=world["ebv"], precision="fp32")
    np.testing.assert_array_equal(got["z_phot"], cat["z_phot"])
    plain = pz.load_model(world["model"], device="cpu").predict(world["images"], ebv=world["ebv"], precision="fp32")
    assert not np.array_equal(plain["z_phot"], got["z_phot"])  # the override changed the view


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares predict and the API with their "
                    "GPU defaults (cuda, --precision auto = bf16 where the GPU has it)")
def test_predict_on_the_gpu_with_the_defaults_matches_the_catalogue(world, tmp_path):
    """Both sides with their defaults: predict on train.device=auto (cuda), the API's device=None (cuda); both in
    predict's --precision auto (bf16 on GPUs with native bf16). The same network, crops and batch size, but the GPU
    convolution algorithms may differ between the two runs (cuDNN picks per call) and bf16 keeps 8 bits of mantissa,
    so logits agree to a few bf16 ulps: tolerances of 2e-3 in redshift (0.5% of the 0.4-wide grid) and 2e-3 in a
    pdf bin's probability."""
    cli("predict", "--checkpoint", world["model"], "--data", world["data"], "--out", tmp_path / "cat", "--pdf",
        "loader.backend=reference", "dist.backend=none")
    cat = read_catalogue(tmp_path / "cat")
    model = pz.load_model(world["model"])
    assert model.device.type == "cuda"
    got = model.predict(world["images"], ebv=world["ebv"], pdf=True)
    for key in ("z_phot", "z_median", "z_lo68", "z_hi68"):
        np.testing.assert_allclose(got[key], cat[key], rtol=0, atol=2e-3, err_msg=key)
    np.testing.assert_allclose(got["pdf"], cat["pdf"].astype(np.float32), rtol=0, atol=2e-3)


def test_predict_takes_tensors_and_any_float_precision_and_dereddens(world):
    model = pz.load_model(world["model"], device="cpu")
    images, ebv = world["images"], world["ebv"]
    ref = model.predict(images, ebv=ebv)
    assert "pdf" not in ref
    same = [model.predict(images.astype(np.float64), ebv=ebv), model.predict(torch.from_numpy(images), ebv=torch.from_numpy(ebv)),
            model.predict(images, ebv=ebv, batch_size=7)]
    for other in same[:2]:
        for key in SUMMARIES:
            np.testing.assert_array_equal(other[key], ref[key])
    for key in SUMMARIES:  # other batches: other kernels' summation order, float32 rounding at most
        np.testing.assert_allclose(same[2][key], ref[key], rtol=1e-5, atol=1e-6)
    half = model.predict(images.astype(np.float16), ebv=ebv)  # read as float32: float16's values exactly
    exact = model.predict(images.astype(np.float16).astype(np.float32), ebv=ebv)
    np.testing.assert_array_equal(half["z_phot"], exact["z_phot"])
    undereddened = model.predict(images, ebv=0.0)  # a scalar for all: the E(B-V) changes the input, and the pdf
    assert not np.array_equal(undereddened["z_phot"], ref["z_phot"])


def test_an_exported_model_directory_predicts_as_its_file(world, tmp_path):
    export_model(world["model"], tmp_path / "exported")
    from_dir = pz.load_model(tmp_path / "exported", device="cpu")
    assert from_dir.crop_size == 16 and from_dir.dereddens and from_dir.grid == pz.load_model(world["model"]).grid
    a = from_dir.predict(world["images"], ebv=world["ebv"], tta=2, pdf=True)
    b = pz.load_model(world["model"], device="cpu").predict(world["images"], ebv=world["ebv"], tta=2, pdf=True)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


# ---------------------------------------------------------------------- embeddings, search, anomalies


@pytest.mark.parametrize("feature", ["projection", "trunk"])
def test_embed_on_arrays_equals_the_embed_command(world, tmp_path, feature):
    cli("embed", "--checkpoint", world["encoder"], "--data", world["data"], "--out", tmp_path / "emb", "--feature",
        feature, *RUN)
    written = Embeddings(tmp_path / "emb").vectors()
    enc = pz.load_encoder(world["encoder"], device="cpu")
    assert enc.bands == tuple("ugriz") and enc.crop_size == 16
    got = enc.embed(world["images"], ebv=world["ebv"], feature=feature)
    assert got.dtype == np.float32 and got.shape == written.shape == (N, 16 if feature == "projection" else 64)
    assert got.shape[1] == enc.network(feature).dim  # what the docs name the width
    np.testing.assert_array_equal(got, written)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_search_and_anomalies_equal_the_commands(world, tmp_path, capsys):
    emb_dir = tmp_path / "emb"
    cli("embed", "--checkpoint", world["encoder"], "--data", world["data"], "--out", emb_dir, *RUN)
    vectors = pz.load_encoder(world["encoder"], device="cpu").embed(world["images"], ebv=world["ebv"])
    cli("search", emb_dir, "--query", "0", "7", "--k", "4", "--no-figure", "--backend", "torch", "--out",
        tmp_path / "s", capsys=capsys)
    table = _csv(tmp_path / "s" / "search.csv")
    for source in (vectors, emb_dir, torch.from_numpy(vectors)):
        hits = pz.search(source, [0, 7], k=4, backend="torch")
        assert hits["index"].shape == hits["similarity"].shape == (2, 4)
        assert [int(r["index"]) for r in table] == hits["index"].ravel().tolist()
        np.testing.assert_allclose([float(r["similarity"]) for r in table], hits["similarity"].ravel(), atol=5e-7)
        assert 0 not in hits["index"][0] and 7 not in hits["index"][1]  # never its own neighbour
    by_vector = pz.search(vectors, vectors[[7]], k=2, backend="torch")  # a vector: nothing excluded
    assert by_vector["index"][0, 0] == 7 and by_vector["similarity"][0, 0] == pytest.approx(1.0, abs=1e-5)
    cli("anomalies", emb_dir, "--k", "5", "--top", "3", "--no-figure", "--backend", "torch", "--out",
        tmp_path / "a", capsys=capsys)
    scores = pz.anomalies(vectors, k=5, backend="torch")
    written = _csv(tmp_path / "a" / "anomaly_scores.csv")
    assert scores.shape == (N,) and [int(r["index"]) for r in written] == list(range(N))
    np.testing.assert_allclose([float(r["score"]) for r in written], scores, atol=5e-7)
    np.testing.assert_array_equal(pz.anomalies(emb_dir, k=5, backend="torch"), scores)


# ---------------------------------------------------------------------- prepare from arrays


def test_prepare_arrays_equals_prepare_of_the_same_file(world, tmp_path):
    rng = np.random.default_rng(8)
    legacy = load_survey("legacy").subset(["g", "r", "z"])
    images = rng.normal(0, 1, (12, 3, 19, 19))  # float64: stored as float32, rounded once
    ebv = rng.uniform(0, 0.1, 12)
    z = np.where(np.arange(12) % 3 == 0, np.nan, rng.uniform(0.01, 0.5, 12))
    ids = [f"0001m002-{i:05d}" for i in range(12)]
    store = pz.prepare_arrays(images, tmp_path / "mine", survey=legacy, ebv=ebv, z_spec=z, object_id=ids,
                              ra=np.arange(12.0), dec=-np.arange(12.0), samples_per_shard=5)
    ds = open_dataset(store)
    assert list(ds.bands) == ["g", "r", "z"] and len(ds) == 12 and len(ds.shards) == 3
    np.testing.assert_array_equal(ds.images_hwc(np.arange(12)).transpose(0, 3, 1, 2), images.astype(np.float32))
    np.testing.assert_array_equal(ds.meta["ebv_sfd"], ebv)
    np.testing.assert_array_equal(ds.meta["specz_redshift"], z)
    assert ds.meta["object_id"].tolist() == ids and ds.meta["ra"].tolist() == list(range(12))
    assert not any(p.name.startswith(".mine.arrays") for p in tmp_path.iterdir())  # the temporary file is gone
    # the command on the same arrays written as a Multimodal Universe file
    src = L.write_mmu_file(tmp_path / "in.hdf5", images.astype(np.float32), L.labels_of(legacy), legacy.pixel_scale,
                           np.nan, ids, {"ra": np.arange(12.0), "dec": -np.arange(12.0), "EBV": ebv, "z_spec": z})
    desc = tmp_path / "legacy_grz.yaml"
    import yaml

    desc.write_text(yaml.safe_dump(legacy.to_dict()))
    cli("prepare", src, "--out", tmp_path / "cmd", "--survey", desc, "--samples-per-shard", "5")
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (store, tmp_path / "cmd"))
    for m in (a, b):
        m.pop("inputs")
        m["mmu"]["labels"] = None
    assert a == b  # survey, shards (sha256 of every record), pixel statistics
    plain = pz.prepare_arrays(world["images"][:6], tmp_path / "plain")  # SDSS, no ebv, no labels
    pds = open_dataset(plain)
    assert (pds.meta["ebv_sfd"] == 0).all() and np.isnan(pds.meta["specz_redshift"]).all()
    assert pds.meta["object_id"].tolist() == list(range(6))


# ---------------------------------------------------------------------- fine-tuning and evaluation


def test_finetune_and_evaluate_from_python_equal_the_commands(world, tmp_path, capsys):
    run_dir, summary = pz.finetune(world["data"], init=world["encoder"], out_dir=tmp_path / "py", overrides=FT)
    assert run_dir == tmp_path / "py" and (run_dir / "best_model.pt").is_file() and (run_dir / "eval").is_dir()
    ov = [f"{k}={json.dumps(v)}" for k, v in FT.items()]
    printed = cli("finetune", f"data.path={world['data']}", f"finetune.init={world['encoder']}",
                  f"out_dir={tmp_path / 'cmd'}", *ov, capsys=capsys)
    assert sorted(summary) == sorted(printed) and summary["steps"] == printed["steps"] == 3
    for key in ("first_loss", "last_loss"):  # the same loop on the same data, seeds and threads
        assert summary[key] == printed[key]
    assert summary["eval"]["metrics"] == printed["eval"]["metrics"]
    # any file the run writes that holds the network: the last checkpoint is the final export's network
    (ckpt,) = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))[-1:]
    from_ckpt = pz.load_model(ckpt, device="cpu").predict(world["images"][:8], ebv=world["ebv"][:8])
    final = pz.load_model(run_dir / "photoz_model.pt", device="cpu").predict(world["images"][:8], ebv=world["ebv"][:8])
    np.testing.assert_array_equal(from_ckpt["z_phot"], final["z_phot"])
    again_dir, again = pz.finetune(world["data"], init=world["encoder"], out_dir=tmp_path / "py", overrides=FT)
    assert again_dir == run_dir and again.get("already_finished") is True and again["eval"] == summary["eval"]

    report = pz.evaluate_model(run_dir / "best_model.pt", world["data"], tmp_path / "ev_py", overrides=RUN)
    cli("evaluate", "--checkpoint", run_dir / "best_model.pt", "--data", world["data"], "--out", tmp_path / "ev_cmd",
        *RUN, capsys=capsys)
    mine, theirs = (json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "ev_py", tmp_path / "ev_cmd"))
    assert mine["metrics"]["n"] == report["n"] == theirs["metrics"]["n"] == N  # every labeled galaxy
    assert json.dumps(mine["metrics"]) == json.dumps(theirs["metrics"])  # per-bin NaNs included
    assert json.dumps(report["metrics"]) == json.dumps(theirs["metrics"])  # what it returns is what it wrote
    assert Path(report["predictions"]) == tmp_path / "ev_py" / "predictions.csv"
    a, b = (read_predictions(p / "predictions.csv") for p in (tmp_path / "ev_py", tmp_path / "ev_cmd"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


class _StoppingLoader:
    """The training loader, sending this process ``signum`` when its second batch is fetched (a user's Ctrl-C or a
    scheduler's SIGTERM in the middle of a run); everything else is the real loader's."""

    def __init__(self, inner, signum: int) -> None:
        self.inner, self.signum, self.sent = inner, signum, False

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == 1 and not self.sent:
                self.sent = True
                os.kill(os.getpid(), self.signum)  # the trainer's handler records it (the run's flag)
            yield batch


@pytest.mark.parametrize("signum, error", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, PhotozError)])
def test_a_stopped_finetune_raises_and_the_same_call_resumes(world, tmp_path, monkeypatch, signum, error):
    from photoz_hpc.train import finetune as ft

    real = ft.finetune_loaders

    def stopping(*args, **kw):
        loader, val_loader = real(*args, **kw)
        return _StoppingLoader(loader, signum), val_loader

    monkeypatch.setattr(ft, "finetune_loaders", stopping)
    overrides = {**FT, "train.max_steps": 6, "train.checkpoint_every": 1000}
    before = signal.getsignal(signum)
    with pytest.raises(error, match=r"stopped at step (\d+) after a checkpoint .*call pz.finetune again with the same "
                       "arguments to resume") as stop:
        pz.finetune(world["data"], init=world["encoder"], out_dir=tmp_path / "run", overrides=overrides)
    step = int(re.search(r"stopped at step (\d+)", str(stop.value)).group(1))
    assert 1 <= step < 6 and (tmp_path / "run" / "checkpoints" / f"ckpt_{step:09d}.pt").is_file()
    assert not (tmp_path / "run" / "eval").exists()  # no evaluation of a half-trained run
    assert signal.getsignal(signum) is before  # the notebook's own handler is back
    if signum == signal.SIGINT:
        monkeypatch.setattr(ft, "finetune_loaders", real)
        run_dir, summary = pz.finetune(world["data"], init=world["encoder"], out_dir=tmp_path / "run",
                                       overrides=overrides)
        assert summary["start_step"] == step and summary["steps"] == 6 and summary["preempted"] is False
        assert math.isfinite(summary["eval"]["metrics"]["sigma_mad"]) and (run_dir / "eval").is_dir()


# ---------------------------------------------------------------------- bad inputs


def test_bad_arrays_are_errors_naming_the_problem(world):
    model = pz.load_model(world["model"], device="cpu")
    images, ebv = world["images"], world["ebv"]

    def refused(match: str, *args, error=ValueError, **kw) -> None:
        with pytest.raises(error, match=match):
            model.predict(*args, **kw)

    refused(r"\(N, H, W, bands\) layout.*transpose\(0, 3, 1, 2\)", images.transpose(0, 2, 3, 1), ebv=ebv)
    refused(r"3 bands \(axis 1 of \(40, 3, 21, 21\)\) but .* reads 5: \['u', 'g', 'r', 'i', 'z'\]", images[:, :3],
            ebv=ebv)
    refused(r"a single cutout\? .*images\[None\]", images[0], ebv=ebv[:1])
    refused(r"12x12 pixels but .* 16x16 centre crops .* at least 16x16", images[:, :, :12, :12], ebv=ebv)
    bad = images.copy()
    bad[[2, 5], 1, 3, 3] = [np.nan, np.inf]
    refused(r"2 of 40 galaxies have NaN or inf pixels \(rows \[2, 5\]\)", bad, ebv=ebv)
    refused(r"dereddens its inputs .* pass ebv=.*shape \(40,\)", images)
    refused(r"ebv has shape \(3,\)", images, ebv=ebv[:3])
    nan_ebv = ebv.copy()
    nan_ebv[4] = np.nan
    refused(r"ebv: 1 of 40 values are NaN or inf \(rows \[4\]\)", images, ebv=nan_ebv)
    refused("dtype complex", images.astype(np.complex64), ebv=ebv)
    refused(r"tta must be a whole number from 1 to 4 .*got 5", images, ebv=ebv, tta=5)
    refused(r"tta must be .*got True", images, ebv=ebv, tta=True)
    refused(r"temperature must be a positive number .*got 0", images, ebv=ebv, temperature=0)
    refused(r"temperature must be a positive number .*got True", images, ebv=ebv, temperature=True)
    refused(r"temperature must be a positive number .*got -2.0", images, ebv=ebv, temperature="-2")
    refused("temperature 'nope.json' is neither a number nor a readable calibration.json", images, ebv=ebv,
            temperature="nope.json", error=PhotozError)
    for bad_batch in (0, -3, 2.5):  # never silently the default (None is)
        refused(rf"batch_size must be a whole number >= 1 \(or None: 64 on this cpu device\), got {bad_batch}", images,
                ebv=ebv, batch_size=bad_batch)
    for option, message in (("tta", "tta"), ("temperature", "temperature"), ("batch_size", "batch_size")):
        with pytest.raises(ValueError) as err:
            model.predict(images, ebv=ebv, **{option: 0})
        assert message in str(err.value) and "--" not in str(err.value)  # no command-line flag in the API's words
    with pytest.raises(PhotozError, match="has no redshift head"):
        pz.load_model(world["encoder"])
    with pytest.raises(PhotozError, match="does not exist"):
        pz.load_model(world["root"] / "missing.pt")
    enc = pz.load_encoder(world["encoder"], device="cpu")
    with pytest.raises(ValueError, match=r"the encoder .* reads 5"):
        enc.embed(images[:, :4], ebv=ebv)
    with pytest.raises(ValueError, match="feature 'pooled'"):
        enc.embed(images, ebv=ebv, feature="pooled")
    with pytest.raises(ValueError, match=rf"batch_size must be a whole number >= 1 \(or None: "
                       rf"{enc.config.loader.batch_size} \(loader.batch_size, as embed\)\), got 0"):
        enc.embed(images, ebv=ebv, batch_size=0)
    vectors = np.eye(6, 4, dtype=np.float32)
    with pytest.raises(PhotozError, match=r"query rows \[9\] are not in 0..5"):
        pz.search(vectors, [1, 9], k=2)
    with pytest.raises(ValueError, match="query vectors have 3 dimensions, the embeddings 4"):
        pz.search(vectors, np.ones((1, 3)), k=2)
    with pytest.raises(ValueError, match=r"embeddings: 1 of 6 rows have NaN"):
        pz.anomalies(np.where(np.arange(6)[:, None] == 2, np.nan, vectors), k=2)


def test_bad_inputs_to_prepare_and_finetune_fail_before_any_work(world, tmp_path):
    images = world["images"][:4]
    with pytest.raises(ValueError, match=r"reads 5: \['u', 'g', 'r', 'i', 'z'\] \(survey 'sdss'\)"):
        pz.prepare_arrays(images[:, :3], tmp_path / "x")
    with pytest.raises(ValueError, match="object_id 1 occurs 2 times"):
        pz.prepare_arrays(images, tmp_path / "x", object_id=[0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"ebv has shape \(2,\)"):
        pz.prepare_arrays(images, tmp_path / "x", ebv=[0.1, 0.2])
    bad = images.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        pz.prepare_arrays(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="finetune.init given both as an argument and in overrides"):
        pz.finetune(world["data"], init="none", out_dir=tmp_path / "ft", overrides={"finetune.init": "none"})
    with pytest.raises(PhotozError, match="train.epochs"):
        pz.finetune(world["data"], out_dir=tmp_path / "ft", overrides={"train.epochs": -1})
    for value in (float("nan"), np.float32("inf"), [0.1, float("-inf")]):  # JSON's NaN/Infinity: YAML strings
        with pytest.raises(ValueError, match=r"overrides: optim.lr=.* is not a finite number"):
            pz.finetune(world["data"], out_dir=tmp_path / "ft", overrides={"optim.lr": value})
    assert not (tmp_path / "ft").exists()
