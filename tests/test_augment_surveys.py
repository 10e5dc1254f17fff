"""Augmentations for any survey: stores of 3 (Legacy Surveys g r z), 5 (HSC) and 6 (LSST) bands, prepared from
release-layout files with the survey recorded in the manifest. The DALI CPU pipeline equals the reference for every
band count and pipeline; reddening and dereddening follow that survey's extinction vector; per-band noise uses each
band's MAD; the z_bin labels follow the grid passed down; crop and jitter default to the survey's numbers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import assert_loader_matches_oracle, write_release_h5

from photoz_hpc.augment import draws as dr
from photoz_hpc.augment.loaders import build_loader
from photoz_hpc.augment.pipelines import PIPELINES
from photoz_hpc.config import AugmentConfig, load_config
from photoz_hpc.data import open_dataset
from photoz_hpc.data.inputs import PrepareOptions
from photoz_hpc.data.prepare import prepare
from photoz_hpc.errors import ConfigError, DatasetError
from photoz_hpc.survey import RedshiftGrid, load_survey, survey_of_manifest

#: benchmarks/gpu_check.sh can run these on the DALI GPU path with PHOTOZ_AUGMENT_DEVICE=gpu, as tests/test_augment.py
DEVICE = os.environ.get("PHOTOZ_AUGMENT_DEVICE", "cpu")
SIZE, CROP, JITTER = 32, 16, 4
#: name -> (survey, the bands kept: None for all)
STORES = {"legacy": ("legacy", ("g", "r", "z")), "hsc": ("hsc", None), "lsst": ("lsst", None)}
VIEW_KEYS = {name: p.view_keys for name, p in PIPELINES.items()}
#: the paper's (Schlafly & Finkbeiner 2011, Table 6) SDSS ugriz coefficients, as the SDSS-only code had them
SF11_UGRIZ = (4.239, 3.303, 2.285, 1.698, 1.263)


def _survey_store(root, name: str, n: int = 24) -> object:
    """A prepared store of ``n`` labeled SIZE x SIZE cutouts of survey ``name`` (all its bands in the file; the
    store keeps ``STORES[name][1]``). Pixels are positive (flux ratios are taken); redshifts span [0.01, 1.9)."""
    survey_name, bands = STORES[name]
    survey = load_survey(survey_name)
    rng = np.random.default_rng(len(name))
    ebv = rng.lognormal(np.log(0.05), 0.5, n)
    images = (rng.uniform(0.05, 0.2, (n, survey.n_bands, 1, 1)) * (1 + 0.1 * rng.standard_normal(
        (n, survey.n_bands, SIZE, SIZE))) + 0.01).astype(np.float32)
    h5 = write_release_h5(
        root / f"{name}.h5", n, seed=len(name), size=SIZE, images=np.abs(images) + 1e-3,
        e_bv=(np.asarray(survey.input_coefficients)[None, :] * ebv[:, None]).astype(np.float32),
        specz_redshift=np.linspace(0.01, 1.9, n).astype(np.float32),
    )
    out = prepare([h5], root / f"ds_{name}", samples_per_shard=10,
                  options=PrepareOptions(survey=survey_name, bands=bands))
    return open_dataset(out)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("surveys")
    return {name: _survey_store(root, name) for name in STORES}


def cfg_of(*overrides: str, batch: int = 8, backend: str = "dali"):
    return load_config(None, [f"loader.batch_size={batch}", f"loader.backend={backend}", f"loader.device={DEVICE}",
                              f"augment.crop_size={CROP}", f"augment.jitter_max={JITTER}", *overrides])


def _survey(ds):
    return survey_of_manifest(ds.manifest, str(ds.root))


def _raw_crop(ds, ids: np.ndarray, crop: int = CROP) -> np.ndarray:
    """Plain centre crops (B, C, S, S) of the stored records, in float64."""
    h, w, _ = ds.image_shape
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    return ds.images_hwc(ids)[:, y0 : y0 + crop, x0 : x0 + crop].transpose(0, 3, 1, 2).astype(np.float64)


def test_stores_carry_their_survey(stores):
    """The fixtures are what the tests below assume: 3, 5 and 6 bands, the survey in the manifest."""
    for name, want in (("legacy", ("g", "r", "z")), ("hsc", ("g", "r", "i", "z", "y")),
                       ("lsst", ("u", "g", "r", "i", "z", "y"))):
        survey = _survey(stores[name])
        assert survey.bands == want and stores[name].image_shape == (SIZE, SIZE, len(want))
        assert survey.name == name and len(survey.reddening_vector) == len(want)


@pytest.mark.parametrize("pipeline", ["pretrain", "finetune", "eval"])
@pytest.mark.parametrize("name", list(STORES))
def test_dali_cpu_matches_reference_for_any_band_count(stores, name, pipeline):
    ds = stores[name]
    bands = ds.image_shape[2]
    loader = build_loader(cfg_of(), ds, pipeline, seed=3)
    ref_loader = build_loader(cfg_of(backend="reference"), ds, pipeline, seed=3)
    assert loader.backend == "dali" and ref_loader.backend == "reference"
    spec = loader.source.spec
    assert spec.bands == bands and spec.crop == CROP
    assert not dr.warp_stays_inside(spec) or pipeline == "eval"  # the bordered CPU path (rotation + jitter reach out)
    assert_loader_matches_oracle(loader, ref_loader, pipeline, CROP, bands)


@pytest.mark.parametrize("backend", ["dali", "reference"])
@pytest.mark.parametrize("name", list(STORES))
def test_reddening_follows_the_surveys_vector(stores, name, backend):
    """Reddening alone: log10(view_b / crop_b) / log10(view_r / crop_r) = R_b / R_r of this survey's vector, and
    each band implies the drawn E(B-V). (ebv_min 0.1 keeps every factor far from 1, so the logs are exact.)"""
    ds = stores[name]
    survey = _survey(ds)
    coeff = survey.reddening_vector
    r = survey.bands.index("r")
    cfg = cfg_of("augment.rotation=false", "augment.jitter=false", "augment.noise=false", "augment.ebv_min=0.1",
                 backend=backend)
    loader = build_loader(cfg, ds, "pretrain", seed=5)
    np.testing.assert_array_equal(loader.source.spec.reddening_vector, coeff)
    seen = 0
    for k, batch in enumerate(loader):
        raw = _raw_crop(ds, batch["index"].cpu().numpy())
        for v, key in enumerate(("view1", "view2")):
            log_ratio = np.log10(batch[key].cpu().numpy().astype(np.float64) / raw)  # (B, C, S, S)
            ratios = log_ratio / log_ratio[:, r : r + 1]
            want = np.broadcast_to((coeff / coeff[r])[None, :, None, None], ratios.shape)
            np.testing.assert_allclose(ratios, want, rtol=1e-4)
            ebv = -2.5 * log_ratio.mean(axis=(2, 3)) / coeff  # E(B-V) implied by each band
            drawn = loader.source.batch(k).views[v].draws.ebv
            np.testing.assert_allclose(ebv, np.broadcast_to(drawn[:, None], ebv.shape), rtol=1e-5)
            seen += len(raw)
    assert seen > 0
    # the check tells the vectors apart: SDSS's coefficients of the same bands give ratios off by > 1%
    sdss = dict(zip("ugriz", np.asarray(SF11_UGRIZ) / SF11_UGRIZ[2], strict=True))
    off = [abs(coeff[b] / coeff[r] / sdss[band] - 1) for b, band in enumerate(survey.bands) if band in sdss]
    assert max(off) > 1e-2


@pytest.mark.parametrize("name", list(STORES))
def test_dereddening_uses_the_surveys_vector(stores, name):
    ds = stores[name]
    coeff = _survey(ds).reddening_vector
    batch = next(iter(build_loader(cfg_of(batch=10), ds, "eval")))
    ids = batch["index"].cpu().numpy()
    ebv_sfd = ds.meta["ebv_sfd"][ids]
    assert ebv_sfd.min() > 0
    want = _raw_crop(ds, ids) * 10 ** (0.4 * np.outer(ebv_sfd, coeff))[:, :, None, None]
    np.testing.assert_allclose(batch["image"].cpu().numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("name", list(STORES))
def test_noise_is_each_bands_mad_times_the_scale(stores, name):
    """Noise alone: view - crop = scale x MAD_b x field, per band, with the manifest's per-band MAD (N bands)."""
    ds = stores[name]
    bands = ds.image_shape[2]
    pixels = ds.images_hwc(np.arange(len(ds))).reshape(-1, bands).astype(np.float64)
    mad = np.median(np.abs(pixels - np.median(pixels, axis=0)), axis=0)
    cfg = cfg_of("augment.rotation=false", "augment.jitter=false", "augment.reddening=false", backend="reference")
    loader = build_loader(cfg, ds, "pretrain", seed=11)
    spec = loader.source.spec
    np.testing.assert_allclose(spec.mad, mad, rtol=1e-6)
    batch = next(iter(loader))
    raw = _raw_crop(ds, batch["index"].cpu().numpy())
    for v, key in enumerate(("view1", "view2")):
        inputs = loader.source.batch(0).views[v]
        assert inputs.sigma.shape == (8, 1, 1, bands)
        sigma = np.outer(inputs.draws.scale, mad)  # (B, C)
        fields = np.stack(inputs.noise).transpose(0, 3, 1, 2)  # (B, C, S, S)
        want = raw + sigma[:, :, None, None] * fields
        np.testing.assert_allclose(batch[key].cpu().numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_z_bin_labels_follow_the_grid_passed_down(stores):
    ds = stores["legacy"]
    z = ds.meta["specz_redshift"]
    grid = RedshiftGrid(0.0, 2.0, 400)
    loader = build_loader(cfg_of(), ds, "finetune", seed=2, grid=grid)
    assert loader.source.spec.grid == grid
    default = build_loader(cfg_of(), ds, "finetune", seed=2)
    survey_grid = _survey(ds).redshift_grid
    assert default.source.spec.grid == survey_grid == RedshiftGrid(0.0, 0.8, 200)  # the survey's, by default
    differ = 0
    for batch, plain in zip(loader, default, strict=True):
        ids = batch["index"].cpu().numpy()
        np.testing.assert_array_equal(batch["z_bin"].cpu().numpy(), grid.bins(z[ids]))
        np.testing.assert_array_equal(plain["z_bin"].cpu().numpy(), survey_grid.bins(z[ids]))
        edges = grid.edges()
        b = batch["z_bin"].cpu().numpy()
        assert ((edges[b] <= z[ids]) & (z[ids] < edges[b + 1])).all()
        differ += int((batch["z_bin"] != plain["z_bin"]).sum())
    assert differ > 0


def test_crop_and_jitter_default_to_the_surveys():
    unset = AugmentConfig()
    assert unset.crop_size is None and unset.jitter_max is None
    for name, crop, jitter in (("sdss", 64, 7), ("legacy", 96, 11), ("hsc", 128, 12), ("lsst", 128, 14)):
        survey = load_survey(name)
        resolved = dr.resolve_augment(unset, survey)
        assert (resolved.crop_size, resolved.jitter_max) == (crop, jitter) == (survey.crop_size, survey.jitter_max)
        assert dr.resolve_augment(resolved, survey) == resolved  # idempotent
        assert unset.crop_size is None  # a copy: the config itself is unchanged
        explicit = dr.resolve_augment(AugmentConfig(crop_size=48, jitter_max=3), survey)
        assert (explicit.crop_size, explicit.jitter_max) == (48, 3)
    with pytest.raises(ConfigError, match=r"crop_size=200 does not fit the 160x160 pixel cutouts of survey 'hsc'"):
        dr.resolve_augment(AugmentConfig(crop_size=200), load_survey("hsc"))
    with pytest.raises(ConfigError, match="jitter_max"):
        load_config(None, ["augment.jitter_max=-1"])


def test_a_crop_and_jitter_past_the_images_name_the_survey(stores):
    ds = stores["lsst"]
    with pytest.raises(ConfigError, match=r"does not fit the 32x32 images .*survey 'lsst'.*cutouts 32x32"):
        build_loader(cfg_of("augment.crop_size=28"), ds, "pretrain")  # 28 + 2 x 4 > 32
    assert len(build_loader(cfg_of("augment.crop_size=28"), ds, "eval")) > 0  # eval does not jitter
    with pytest.raises(ConfigError, match=r"crop_size=40 does not fit the 32x32 pixel cutouts of survey 'lsst'"):
        build_loader(cfg_of("augment.crop_size=40"), ds, "eval")


def test_bands_of_the_images_and_the_survey_must_agree(stores):
    manifest = json.loads(json.dumps(stores["lsst"].manifest))
    manifest["image_shape"] = [SIZE, SIZE, 5]
    with pytest.raises(DatasetError, match=r"images have 5 bands but the manifest's survey 'lsst' has 6"):
        dr.resolve_spec(AugmentConfig(crop_size=CROP), manifest, "eval", "the store")


def test_sdss_multipliers_are_the_papers_sf11_bit_for_bit():
    """A manifest from before surveys (no 'survey') is SDSS, and its flux factors are 10**(-0.4 R E) with exactly
    the SF11 ugriz coefficients the SDSS-only code had (tests/test_sdss_regression.py pins the draws)."""
    spec = dr.resolve_spec(AugmentConfig(noise=False), {"image_shape": [107, 107, 5]}, "pretrain")
    assert spec.survey.name == "sdss" and (spec.crop, spec.jitter_max) == (64, 7)
    assert spec.reddening_vector.dtype == np.float64
    assert spec.reddening_vector.tobytes() == np.array(SF11_UGRIZ, dtype=np.float64).tobytes()
    ebv = np.random.default_rng(0).uniform(-0.1, 0.5, 64)
    want = (10.0 ** (-0.4 * np.outer(ebv, np.array(SF11_UGRIZ)))).astype(np.float32)
    assert dr.band_multipliers(spec, ebv).tobytes() == want.tobytes()


def test_docs_survey_table_is_the_shipped_surveys():
    from pathlib import Path

    from photoz_hpc.augment.pipelines import survey_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "augmentations.md").read_text()
    assert survey_table() in docs, "regenerate the table: python -m photoz_hpc.augment.pipelines"
    assert "| `hsc` | g r i z y | 0.168\" | 160 px (26.9\") | 128 px (21.5\") | +-12 px (+-2.0\") |" in survey_table()


def test_cli_writes_views_of_any_band_count(stores, tmp_path):
    from photoz_hpc.cli import main

    ds = stores["lsst"]
    tiny = [f"augment.crop_size={CROP}", f"augment.jitter_max={JITTER}"]
    out = tmp_path / "views.npz"
    assert main(["augment", "--data", str(ds.root), "--n", "4", "--out", str(out), *tiny]) == 0
    assert np.load(out)["views"].shape == (4, 2, 6, CROP, CROP)
    pytest.importorskip("matplotlib")  # the PNG is drawn by viz.py; the GPU machine's image has no matplotlib
    png = tmp_path / "views.png"
    assert main(["augment", "--data", str(stores["legacy"].root), "--n", "4", "--out", str(png), *tiny]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # previews from the survey's rgb bands (z r g of g r z)
