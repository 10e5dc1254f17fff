"""Models of any survey: the stem reads the data's bands, the head predicts the model's redshift grid, and both
travel with the model (MoCo checkpoints, encoder.pt, fine-tuning checkpoints, photo-z models). A model is refused
on data of other bands before any work; the pdfs, catalogues and exports follow its grid; files written before
surveys existed load as SDSS with the paper's 180 bins. Tiny: width-8 ResNet-18, 16 px crops, a few steps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, blob_images, write_release_h5

from photoz_hpc.config import Config, FinetuneRunConfig, load_config
from photoz_hpc.data.inputs import PrepareOptions
from photoz_hpc.data.prepare import prepare
from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.evaluate.calibration import run_calibrate
from photoz_hpc.evaluate.catalogue import PLAN_NAME, PredictOptions, read_catalogue, run_predict
from photoz_hpc.evaluate.embeddings import embed_dataset, load_embedder
from photoz_hpc.evaluate.run import load_network, run_evaluate
from photoz_hpc.metrics import DEFAULT_Z_BINS, grid_z_bins, photoz_metrics
from photoz_hpc.models.cpu_guards import corrupting_convolutions
from photoz_hpc.models.export import load_encoder
from photoz_hpc.models.photoz_net import build_photoz_net, load_photoz_model, save_photoz_model
from photoz_hpc.models.resnet import build_encoder
from photoz_hpc.survey import SDSS_GRID, RedshiftGrid, load_survey
from photoz_hpc.train.checkpoint import list_checkpoints, load_checkpoint
from photoz_hpc.train.finetune import run_finetune
from photoz_hpc.train.pretrain import run_pretrain
from photoz_hpc.viz import lupton_rgb

SIZE = 20
#: width-8 ResNet-18 on 16 px crops (jitter 2) of 20 px cutouts.
TINY = [*TINY_MODEL, "model.embed_dim=16", "augment.crop_size=16", "augment.jitter_max=2", "loader.batch_size=8",
        "loader.backend=reference", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "train.log_every=1", "dist.backend=none", "seed=2"]
#: the crop left to the survey (that of the 20 px store: 16), resolved when the run starts.
SURVEY_CROP = [o for o in TINY if not o.startswith("augment.")] + ["augment.jitter_max=0"]
GZR = ["g", "r", "z"]
UGRIZ = ["u", "g", "r", "i", "z"]
GRID_50 = RedshiftGrid(0.0, 1.0, 50)


def _legacy_store(root: Path, n: int = 40, seed: int = 3) -> Path:
    """A 3-band (DECam g, r, z) store from a 4-band Legacy Surveys release-layout file, as prepare makes it."""
    legacy = load_survey("legacy")
    images = blob_images(n, SIZE, seed)[:, :4]
    ebv = np.random.default_rng(seed).uniform(0.01, 0.1, (n, 1)) * np.asarray(legacy.input_coefficients)
    h5 = write_release_h5(root / "legacy.h5", n, seed=seed, size=SIZE, images=images, e_bv=ebv.astype(np.float32))
    return prepare([h5], root / "gzr", samples_per_shard=32, options=PrepareOptions(survey="legacy", bands=tuple(GZR)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A 3-band and a 5-band (SDSS) store; MoCo pretraining on the 3-band one, then fine-tuning from its encoder
    on a 50-bin grid over [0, 1)."""
    root = tmp_path_factory.mktemp("surveys")
    gzr = _legacy_store(root)
    sdss = prepare([write_release_h5(root / "sdss.h5", 40, seed=4, size=SIZE, images=blob_images(40, SIZE, 4))],
                   root / "ugriz", samples_per_shard=32)
    pre = run_pretrain(load_config(None, [*SURVEY_CROP, "moco.queue_size=32", "train.max_steps=2", f"data.path={gzr}",
                                          f"out_dir={root / 'pre'}"]))
    ft_args = [*TINY, "optim.batch_ref=8", "train.max_steps=3", f"finetune.init={pre['encoder']}",
               "finetune.n_z_bins=50", "finetune.z_max=1.0"]
    ft = run_finetune(load_config(None, [*ft_args, f"data.path={gzr}", f"out_dir={root / 'ft'}"],
                                  root=FinetuneRunConfig))
    return {"root": root, "gzr": gzr, "sdss": sdss, "pre": pre, "ft": ft, "ft_args": ft_args}


# ---------------------------------------------------------------------- the bands and the grid travel with models


def test_pretraining_on_3_bands_records_them_and_loaders_rebuild_a_3_channel_stem(runs):
    pre_dir = runs["root"] / "pre"
    ckpt = load_checkpoint(list_checkpoints(pre_dir / "checkpoints")[0], "pretrain")
    assert ckpt["survey"]["name"] == "legacy" and ckpt["survey"]["bands"] == GZR
    assert ckpt["model"]["encoder_q.0.conv1.weight"].shape[1] == 3
    blob = torch.load(runs["pre"]["encoder"], weights_only=True)  # plain data: weights_only loads it
    assert blob["survey"]["bands"] == GZR
    # crops resolved before anything is saved: the unset crop is the store's survey's (legacy's 96 + 2 x 11 px
    # shrunk in proportion to the 20 px cutouts: 16)
    assert (blob["augment"]["crop_size"], blob["augment"]["jitter_max"]) == (16, 0)
    assert (ckpt["config"]["augment"]["crop_size"], ckpt["config"]["augment"]["jitter_max"]) == (16, 0)
    assert "crop_size: 16" in (pre_dir / "config.yaml").read_text()
    enc = load_encoder(runs["pre"]["encoder"])
    assert enc.conv1.in_channels == 3 and enc.survey.bands == tuple(GZR)
    assert enc(torch.randn(2, 3, 20, 20)).shape == (2, 8 * 8)
    emb, _ = load_embedder(list_checkpoints(pre_dir / "checkpoints")[0], "trunk")
    assert emb.trunk.conv1.in_channels == 3 and emb.survey.bands == tuple(GZR)


def test_finetuning_records_survey_and_grid_and_the_loader_rebuilds_both(runs):
    ft_dir = runs["root"] / "ft"
    for name in ("best_model.pt", "photoz_model.pt"):
        blob = torch.load(ft_dir / name, weights_only=True)
        assert blob["survey"]["bands"] == GZR and blob["redshift_grid"] == GRID_50.to_dict() and blob["n_bins"] == 50
        net, cfg, _ = load_network(ft_dir / name)
        assert net.encoder.conv1.in_channels == 3 and net.head.out_features == 50 and net.grid == GRID_50
        np.testing.assert_allclose(net.z_centres.numpy(), GRID_50.centres(), rtol=1e-6)
        assert (cfg.finetune.z_min, cfg.finetune.z_max, cfg.finetune.n_z_bins) == (0.0, 1.0, 50)
    ckpt = load_checkpoint(list_checkpoints(ft_dir / "checkpoints")[0], "finetune")
    assert ckpt["survey"]["bands"] == GZR and ckpt["redshift_grid"] == GRID_50.to_dict()
    assert ckpt["config"]["finetune"]["n_z_bins"] == 50 and ckpt["model"]["head.weight"].shape == (50, 8 * 8)
    net, _, _ = load_network(list_checkpoints(ft_dir / "checkpoints")[0])
    assert net.grid == GRID_50 and net.encoder.conv1.in_channels == 3


def test_a_finetune_without_grid_keys_uses_the_surveys_grid(runs, tmp_path):
    s = run_finetune(load_config(None, [*TINY, "optim.batch_ref=8", "train.max_steps=1", f"data.path={runs['gzr']}",
                                        f"out_dir={tmp_path / 'ft'}"], root=FinetuneRunConfig))
    net, _, _ = load_network(s["model"])
    assert net.grid == load_survey("legacy").redshift_grid == RedshiftGrid(0.0, 0.8, 200)
    assert net.head.out_features == 200


def test_outputs_follow_the_models_50_bin_grid(runs, tmp_path):
    best = runs["root"] / "ft" / "best_model.pt"
    report = run_evaluate(best, runs["gzr"], tmp_path / "ev")
    assert report["bands"] == GZR and report["redshift_grid"] == GRID_50.to_dict()
    assert [r["z_hi"] for r in report["metrics"]["per_bin"]][-1] == 1.0  # metric bins over the model's range
    lines = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    z_phot = np.array([float(line.split(",")[4]) for line in lines[1:]])
    assert len(z_phot) == 40 and ((z_phot > 0.0) & (z_phot < 1.0)).all()

    cat = tmp_path / "cat"
    assert run_predict(best, [runs["gzr"]], cat, PredictOptions(with_pdf=True, batch_size=16))["complete"]
    plan = json.loads((cat / PLAN_NAME).read_text())
    np.testing.assert_allclose(plan["bin_edges"], np.linspace(0.0, 1.0, 51), rtol=0, atol=1e-12)
    assert plan["column_dtypes"]["pdf"] == "float16[50]" and plan["bands"] == GZR
    cols = read_catalogue(cat)
    assert cols["pdf"].shape == (40, 50)
    np.testing.assert_allclose(cols["pdf"].astype(np.float64).sum(1), 1.0, atol=5e-3)
    assert ((cols["z_lo95"] >= 0.0) & (cols["z_hi95"] <= 1.0)).all() and (cols["z_phot"] > 0.02).all()

    cal = run_calibrate(best, runs["gzr"], tmp_path / "cal", batch_size=16)
    assert cal["redshift_grid"] == GRID_50.to_dict() and cal["n_calib"] + cal["n_eval"] == 40

    qp = pytest.importorskip("qp")
    from photoz_hpc.evaluate.qp_export import ensemble_probs, export_qp

    ens = qp.read(str(export_qp(cat, tmp_path / "pdfs.hdf5")))
    np.testing.assert_allclose(np.asarray(ens.metadata["bins"]).ravel(), np.linspace(0.0, 1.0, 51), atol=1e-12)
    assert ensemble_probs(ens).shape == (40, 50)


# ---------------------------------------------------------------------- a model on data of other bands


def _names_both(exc: pytest.ExceptionInfo) -> None:
    msg = str(exc.value)
    assert str(GZR) in msg and str(UGRIZ) in msg, msg


def test_a_3_band_model_on_5_band_data_fails_before_any_work(runs, tmp_path):
    best, enc, sdss = runs["root"] / "ft" / "best_model.pt", runs["pre"]["encoder"], runs["sdss"]
    for name, call in [("ev", lambda out: run_evaluate(best, sdss, out)),
                       ("cat", lambda out: run_predict(best, [runs["gzr"], sdss], out, PredictOptions())),
                       ("cal", lambda out: run_calibrate(best, sdss, out)),
                       ("emb", lambda out: embed_dataset(enc, sdss, out, "trunk", ["loader.backend=reference"]))]:
        with pytest.raises(PhotozError, match="a model only applies to data of the same bands") as exc:
            call(tmp_path / name)
        _names_both(exc)
        assert not (tmp_path / name).exists(), name  # nothing written
    out = tmp_path / "ft"
    with pytest.raises(PhotozError, match=r"finetune.init .*encoder.pt has bands") as exc:
        run_finetune(load_config(None, [*runs["ft_args"], f"data.path={sdss}", f"out_dir={out}"],
                                 root=FinetuneRunConfig))
    _names_both(exc)
    assert not out.exists() or not list(out.iterdir())  # at most the empty directory its run lock was taken in
    # and an SDSS model on the 3-band data
    cfg = load_config(None, [*TINY, f"data.path={sdss}"], root=FinetuneRunConfig)
    sdss_model = save_photoz_model(build_photoz_net(cfg.model), cfg.model, tmp_path / "sdss.pt",
                                   {"config": dataclasses.asdict(cfg)})
    with pytest.raises(PhotozError, match=r"\(survey 'sdss'\) but dataset .*gzr has bands .* \(survey 'legacy'\)") as exc:
        run_predict(sdss_model, [runs["gzr"]], tmp_path / "cat2", PredictOptions())
    _names_both(exc)


def test_a_validation_set_of_other_bands_is_refused_before_any_work(runs, tmp_path):
    out = tmp_path / "ft"
    with pytest.raises(PhotozError, match=r"has bands \['g', 'r', 'z'\].*has bands \['u', 'g', 'r', 'i', 'z'\]"):
        run_finetune(load_config(None, [*TINY, "optim.batch_ref=8", "train.max_steps=1", f"data.path={runs['gzr']}",
                                        f"finetune.val_data={runs['sdss']}", f"out_dir={out}"], root=FinetuneRunConfig))
    assert not out.exists() or not list(out.iterdir())


def test_resume_on_another_surveys_data_names_both_surveys(runs, tmp_path):
    out = tmp_path / "ft"
    args = [*TINY, "optim.batch_ref=8", "train.max_steps=1"]
    run_finetune(load_config(None, [*args, f"data.path={runs['gzr']}", f"out_dir={out}"], root=FinetuneRunConfig))
    with pytest.raises(ConfigError, match=r"survey: 'legacy' bands \['g', 'r', 'z'\] -> 'sdss' bands \['u', 'g'"):
        run_finetune(load_config(None, [*args, "train.max_steps=2", f"data.path={runs['sdss']}", f"out_dir={out}"],
                                 root=FinetuneRunConfig))
    with pytest.raises(ConfigError, match=r"redshift grid: 200 bins over \[0.0, 0.8\) -> 50 bins over \[0.0, 1.0\)"):
        run_finetune(load_config(None, [*args, "train.max_steps=2", "finetune.n_z_bins=50", "finetune.z_max=1.0",
                                        f"data.path={runs['gzr']}", f"out_dir={out}"], root=FinetuneRunConfig))


# ---------------------------------------------------------------------- files written before surveys existed


def test_files_without_survey_or_grid_load_as_sdss_with_180_bins(tmp_path):
    cfg = load_config(None, TINY, root=FinetuneRunConfig)
    torch.manual_seed(0)
    net = build_photoz_net(cfg.model)
    assert net.survey.bands == tuple(UGRIZ) and net.grid == SDSS_GRID
    path = save_photoz_model(net, cfg.model, tmp_path / "new.pt", {"config": dataclasses.asdict(cfg)})
    old = torch.load(path, weights_only=True)
    assert old.pop("survey")["name"] == "sdss" and old.pop("redshift_grid") == SDSS_GRID.to_dict()
    torch.save(old, tmp_path / "old.pt")
    back, _ = load_photoz_model(tmp_path / "old.pt")
    assert back.encoder.conv1.in_channels == 5 and back.head.out_features == 180 and back.grid == SDSS_GRID
    x = torch.randn(2, 5, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x), net.eval()(x))
    old["n_bins"] = 50  # a head of 50 bins with no grid recorded cannot be the paper's grid
    torch.save(old, tmp_path / "bad.pt")
    with pytest.raises(PhotozError, match="head has 50 bins but the file records no redshift grid"):
        load_photoz_model(tmp_path / "bad.pt")

    pcfg = load_config(None, [*TINY_MODEL, "model.embed_dim=16"], root=Config)
    enc = build_encoder(pcfg.model)
    torch.save({"format": "photoz-hpc/encoder/1", "model": dataclasses.asdict(pcfg.model),
                "state_dict": enc.state_dict(), "step": 0}, tmp_path / "enc_old.pt")  # no survey, no augment
    loaded = load_encoder(tmp_path / "enc_old.pt")
    assert loaded.conv1.in_channels == 5 and loaded.survey.name == "sdss"


# ---------------------------------------------------------------------- the pieces


def test_stem_grid_metrics_preview_and_cpu_guard_follow_the_survey():
    legacy = load_survey("legacy").subset(GZR)
    cfg = load_config(None, TINY_MODEL, root=Config)
    net = build_photoz_net(cfg.model, legacy, GRID_50)
    assert net.encoder.conv1.in_channels == 3 and net.head.out_features == 50 and net.survey is legacy
    assert corrupting_convolutions(net) == []  # a 3-channel stem is 3x3 stride 1: not the oneDNN defect's shape
    narrow = build_encoder(dataclasses.replace(cfg.model, width=4), survey=legacy)
    assert [n for n, _ in corrupting_convolutions(narrow)] == ["layer2.0.downsample.0"]
    assert grid_z_bins(GRID_50) == (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    assert DEFAULT_Z_BINS == grid_z_bins(SDSS_GRID) == tuple(round(0.05 * i, 12) for i in range(9))
    m = photoz_metrics(np.array([0.6, 0.9]), np.array([0.62, 0.88]), z_bins=grid_z_bins(GRID_50))
    assert [r["n"] for r in m["per_bin"]][4:8] == [1, 0, 0, 1]
    # previews: the survey's rgb bands (legacy g r z: z red, r green, g blue), not SDSS's i r g
    images = np.zeros((1, 3, 4, 4))
    images[0, 2] = 1.0  # flux in z only
    rgb = lupton_rgb(images, survey=legacy)
    assert rgb[0, 0, 0, 0] > 0 and rgb[0, 0, 0, 1] == rgb[0, 0, 0, 2] == 0
    with pytest.raises(ValueError, match="images have 3 bands but survey 'sdss' has 5"):
        lupton_rgb(images)


def test_previews_stretch_in_nanomaggies_whatever_the_flux_unit():
    from photoz_hpc.survey import survey_from_dict

    lsst = load_survey("lsst")  # nJy: AB zero point 31.4
    in_nmgy = survey_from_dict({**lsst.to_dict(), "zeropoint": 22.5, "flux_unit": "nanomaggy"}, "lsst in nanomaggies")
    galaxy = np.random.default_rng(1).uniform(0.0, 2.0, (2, 6, 12, 12))  # nanomaggies
    njy = galaxy * 10 ** (0.4 * (31.4 - 22.5))
    same = lupton_rgb(njy, survey=lsst).astype(int) - lupton_rgb(galaxy, survey=in_nmgy)
    assert np.abs(same).max() <= 1  # equal up to the last uint8 rounding (the unit change is one multiplication)
    assert not np.array_equal(lupton_rgb(njy, survey=in_nmgy), lupton_rgb(galaxy, survey=in_nmgy))
