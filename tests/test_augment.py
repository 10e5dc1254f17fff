"""Augmentation pipelines: DALI vs reference on the same draws, the geometry against independent oracles
(numpy.rot90, scipy.ndimage.rotate), the pipeline table, statistics, sharding, resume, errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_loader_matches_oracle, write_release_h5

from photoz_hpc.augment import draws as dr
from photoz_hpc.augment.loaders import build_loader
from photoz_hpc.augment.pipelines import PIPELINES, Pipeline, markdown_table
from photoz_hpc.augment.reference import augment_batch
from photoz_hpc.augment.sampler import PAD_ID, plan_epoch
from photoz_hpc.config import load_config
from photoz_hpc.data import open_dataset
from photoz_hpc.data.prepare import prepare
from photoz_hpc.errors import ConfigError, DatasetError
from photoz_hpc.survey import load_survey

#: benchmarks/gpu_check.sh runs these tests on the GPU path with PHOTOZ_AUGMENT_DEVICE=gpu.
DEVICE = os.environ.get("PHOTOZ_AUGMENT_DEVICE", "cpu")
VIEW_KEYS = {name: p.view_keys for name, p in PIPELINES.items()}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "augmentations.md"
#: The SDSS reddening vector (Schlafly & Finkbeiner 2011), which the release-layout test stores use.
R_SF11 = load_survey("sdss").reddening_vector


def _store(root: Path, n: int, size: int, unlabeled: int = 0) -> Path:
    """A prepared store of ``n`` labeled plus ``unlabeled`` (NaN redshift) samples of size x size."""
    inputs = [write_release_h5(root / f"in{size}.h5", n, seed=size, size=size)]
    if unlabeled:
        inputs.append(write_release_h5(root / f"un{size}.h5", unlabeled, seed=size + 1, size=size, labeled=False))
    return prepare(inputs, root / f"ds{size}", samples_per_shard=17)


@pytest.fixture(scope="module")
def ds107(tmp_path_factory):
    return open_dataset(_store(tmp_path_factory.mktemp("aug107"), 48, 107, unlabeled=12))


@pytest.fixture(scope="module")
def ds48(tmp_path_factory):
    return open_dataset(_store(tmp_path_factory.mktemp("aug48"), 40, 48))


def cfg_of(*overrides: str, batch: int = 8, backend: str = "dali"):
    return load_config(None, [f"loader.batch_size={batch}", f"loader.backend={backend}", f"loader.device={DEVICE}", *overrides])


def _raw_crop(ds, ids: np.ndarray, crop: int) -> np.ndarray:
    """Plain centre crops (B, C, S, S) of the stored records, in float64."""
    h, w, _ = ds.image_shape
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    return ds.images_hwc(ids)[:, y0 : y0 + crop, x0 : x0 + crop].transpose(0, 3, 1, 2).astype(np.float64)


# ----------------------------------------------------------------------------- DALI == reference


@pytest.mark.parametrize("pipeline", ["pretrain", "finetune", "eval"])
def test_dali_matches_reference_on_same_draws(ds107, pipeline):
    loader = build_loader(cfg_of(), ds107, pipeline, seed=3)
    ref_loader = build_loader(cfg_of(backend="reference"), ds107, pipeline, seed=3)
    assert loader.backend == "dali" and ref_loader.backend == "reference"
    assert_loader_matches_oracle(loader, ref_loader, pipeline, 64, 5)


@pytest.mark.parametrize("pipeline", ["pretrain", "finetune"])
def test_flux_factors_and_crop_are_exact_without_rotation(ds107, pipeline):
    cfg = cfg_of("augment.rotation=false", "augment.noise=false")
    loader = build_loader(cfg, ds107, pipeline, seed=1)
    batch = next(iter(loader))
    sb = loader.source.batch(0)
    want = augment_batch(sb, 64, loader.torch_device)
    for key, w in zip(VIEW_KEYS[pipeline], want, strict=True):
        assert torch.equal(batch[key].contiguous(), w)
    # and the values are literally record pixels times the per-band factor, at the jittered offset
    d = sb.views[0].draws
    rec = ds107.images_hwc(sb.index)
    mult = dr.band_multipliers(loader.source.spec, d.ebv)
    for i in range(len(sb.index)):
        dx, dy = d.shift[i]
        window = rec[i, 21 + dy : 85 + dy, 21 + dx : 85 + dx].transpose(2, 0, 1) * mult[i][:, None, None]
        np.testing.assert_array_equal(batch[VIEW_KEYS[pipeline][0]][i].cpu().numpy(), window.astype(np.float32))


def test_sizes_come_from_manifest_and_config(ds48):
    cfg = cfg_of("augment.crop_size=32", "augment.jitter_max=4", batch=5)
    for pipeline in ("pretrain", "eval"):
        loader = build_loader(cfg, ds48, pipeline)
        batch = next(iter(loader))
        want = augment_batch(loader.source.batch(0), 32, loader.torch_device)
        got = batch[VIEW_KEYS[pipeline][0]]
        assert got.shape == (5, 5, 32, 32)
        assert (got - want[0]).abs().max() <= 1e-4 * want[0].abs().max()


# ----------------------------------------------------------------------------- geometry: independent oracles
# Views drawn with angles (and jitter shifts) we set, with reddening, dereddening and noise off, against
# numpy.rot90 and scipy.ndimage.rotate of the stored records. Rotation sense: a view of angle a shows the
# cutout rotated counter-clockwise by a as displayed with row 0 at the top, i.e. np.rot90(crop, k) for
# a = 90k degrees (docs/augmentations.md, Geometry).

GEOMETRY_ONLY = ("augment.reddening=false", "augment.deredden=false", "augment.noise=false")


@pytest.fixture
def force_draws(monkeypatch):
    """``force_draws(degrees, shift)``: every batch's draws get these angles (and (dx, dy) shifts),
    functions of (n samples, view number); the backends then run on them as on any draw."""

    def force(degrees, shift=None):
        real = dr.draw_views

        def forced(spec, rng, n, ebv_sfd=None):
            views = real(spec, rng, n, ebv_sfd)
            for v, view in enumerate(views):
                view.angle = np.radians(np.asarray(degrees(n, v), dtype=np.float64))
                if shift is not None:
                    view.shift = np.asarray(shift(n, v), dtype=np.int64)
            return views

        monkeypatch.setattr(dr, "draw_views", forced)

    return force


def _quarter_turns(n: int, v: int) -> np.ndarray:
    return 90.0 * ((np.arange(n) + v) % 4)


def _records_chw(ds, ids) -> np.ndarray:
    return ds.images_hwc(ids).transpose(0, 3, 1, 2).astype(np.float64)


@pytest.mark.parametrize("backend", ["dali", "reference"])
@pytest.mark.parametrize("store, crop", [("ds107", 63), ("ds48", 32)])
def test_right_angle_views_are_rot90_of_the_centre_crop(request, force_draws, backend, store, crop):
    """(W - S) even: the crop is centred on the rotation centre, so a quarter turn is exactly np.rot90."""
    ds = request.getfixturevalue(store)
    force_draws(_quarter_turns)
    cfg = cfg_of(f"augment.crop_size={crop}", "augment.jitter=false", *GEOMETRY_ONLY, backend=backend)
    batch = next(iter(build_loader(cfg, ds, "pretrain", seed=2)))
    crops = _raw_crop(ds, batch["index"].cpu().numpy(), crop)
    for v, key in enumerate(("view1", "view2")):
        got = batch[key].cpu().numpy()
        for i, turns in enumerate((np.arange(len(got)) + v) % 4):
            want = np.rot90(crops[i], turns, axes=(1, 2))
            np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"{key} {i}")


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_default_crop_of_107_pixel_cutouts_turns_about_the_cutout_centre(ds107, force_draws, backend):
    """64 of 107 pixels: the crop (rows/cols 21..84, centre 53.0) is half a pixel up-left of the rotation
    centre (53.5), as in the authors' loader; a quarter turn is np.rot90 of the window turned with it."""
    force_draws(_quarter_turns)
    batch = next(iter(build_loader(cfg_of("augment.jitter=false", *GEOMETRY_ONLY, backend=backend), ds107, "pretrain", seed=2)))
    records = _records_chw(ds107, batch["index"].cpu().numpy())
    window = {0: (21, 21), 1: (21, 22), 2: (22, 22), 3: (22, 21)}  # quarter turns -> (first row, first column)
    for v, key in enumerate(("view1", "view2")):
        got = batch[key].cpu().numpy()
        for i, turns in enumerate((np.arange(len(got)) + v) % 4):
            r0, c0 = window[turns]
            want = np.rot90(records[i, :, r0 : r0 + 64, c0 : c0 + 64], turns, axes=(1, 2))
            np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"{key} {i}")


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_any_angle_and_jitter_match_scipy_rotate(ds107, force_draws, backend):
    """Angle a and shift (dx, dy): the crop at ((W-S)//2 + dx, (H-S)//2 + dy) of the cutout rotated by a about
    its centre, bilinear, zero outside (scipy.ndimage.rotate, order 1, 'grid-constant'). Shifts of +-7 at 45
    degrees reach past the cutout, so the zero fill is checked too."""
    ndimage = pytest.importorskip("scipy.ndimage")  # in the sim extra, which launch/setup_env.sh installs
    degrees = np.array([17.3, 45.0, 123.4, 200.0, 301.7, 45.0, 359.9, 88.8])
    shifts = np.array([[0, 0], [7, 7], [-7, 3], [2, -7], [-5, -5], [-7, 7], [1, 0], [7, -7]])
    force_draws(lambda n, v: np.resize(degrees + 31.0 * v, n), lambda n, v: np.resize(np.roll(shifts, v, axis=0), (n, 2)))
    batch = next(iter(build_loader(cfg_of(*GEOMETRY_ONLY, backend=backend), ds107, "pretrain", seed=2)))
    records = ds107.images_hwc(batch["index"].cpu().numpy()).astype(np.float64)
    zero_filled = 0
    for v, key in enumerate(("view1", "view2")):
        got = batch[key].cpu().numpy()
        for i in range(len(got)):
            turned = ndimage.rotate(records[i], np.resize(degrees + 31.0 * v, len(got))[i], axes=(1, 0),
                                    reshape=False, order=1, mode="grid-constant", cval=0.0)
            dx, dy = np.resize(np.roll(shifts, v, axis=0), (len(got), 2))[i]
            want = turned[21 + dy : 85 + dy, 21 + dx : 85 + dx].transpose(2, 0, 1)
            # DALI's CPU warp is off by up to ~1e-3 of a pixel's step (float32 coordinates), the reference by
            # ~1e-4; half a pixel off or the wrong sense is off by 10-100% of the image's scale
            scale = np.abs(want).max()
            np.testing.assert_allclose(got[i], want, rtol=0, atol=2e-4 * scale, err_msg=f"{key} {i}")
            assert np.abs(got[i] - want).mean() < 1e-5 * scale
            zero_filled += int((want == 0).all(axis=0).sum())
    assert zero_filled > 0  # some output pixels came from outside the cutout


def _source_points(spec, degrees: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Source (x, y) of every destination pixel centre of every (angle, shift) pair: (pairs * S * S, 2)."""
    angle = np.radians(np.repeat(degrees, len(shifts)))
    matrices = dr.affine_matrices(spec, angle, np.tile(shifts, (len(degrees), 1))).astype(np.float64)
    y, x = np.mgrid[: spec.crop, : spec.crop] + 0.5
    dst = np.stack([x.ravel(), y.ravel(), np.ones(x.size)])
    return np.einsum("bij,jn->bni", matrices, dst).reshape(-1, 2)


@pytest.mark.parametrize("store, crop, jitter, rotation", [
    ("ds107", 32, 4, True), ("ds107", 48, 5, True), ("ds107", 64, 7, True), ("ds107", 64, 7, False),
    ("ds107", 63, 0, True), ("ds48", 32, 0, True), ("ds48", 32, 4, True), ("ds48", 42, 3, False),
])
def test_warp_stays_inside_is_the_geometry(request, store, crop, jitter, rotation):
    """The CPU path skips the zero border exactly where no bilinear tap can leave the image: against the source
    points of every destination pixel over a 1-degree grid of angles and the extreme jitter shifts."""
    import dataclasses

    ds = request.getfixturevalue(store)
    base = build_loader(cfg_of(f"augment.crop_size={crop}", f"augment.jitter_max={jitter}"), ds, "pretrain").source.spec
    spec = dataclasses.replace(base, jitter=jitter > 0,
rotation=rotation)
    degrees = np.arange(0.0, 360.0, 1.0) if rotation else np.zeros(1)
    shifts = np.array([[dx, dy] for dx in (-jitter, 0, jitter) for dy in (-jitter, 0, jitter)])
    points = _source_points(spec, degrees, shifts)
    h, w = spec.in_hw
    inside = bool((points >= 0.5).all() and (points[:, 0] <= w - 0.5).all() and (points[:, 1] <= h - 0.5).all())
    assert dr.warp_stays_inside(spec) == inside
    offsets = points - [w / 2, h / 2]
    farthest = np.hypot(*offsets.T).max() if rotation else np.abs(offsets).max()
    assert farthest - 1e-4 <= dr.warp_reach(spec) <= farthest + (1.0 if rotation else 1e-4)  # a bound, and tight


@pytest.mark.parametrize("store, crop, overrides", [
    ("ds107", 32, ("augment.jitter_max=4",)),  # rotated, 28.3 px of 53 reached
    ("ds48", 42, ("augment.jitter_max=3", "augment.rotation=false")),  # on the edge: taps at 1/2 and 47 1/2
])
def test_dali_cpu_reads_records_without_a_border_where_the_warp_stays_inside(request, monkeypatch, store, crop, overrides):
    """Where no warp leaves the image, DALI gets the memory-mapped records themselves (no copy) and the views
    equal those from the zero-bordered copy (forced) and the reference's; crop 64 + jitter 7 keeps the border."""
    from types import SimpleNamespace

    from photoz_hpc.augment.dali_pipeline import _Feeder

    ds = request.getfixturevalue(store)
    cfg = cfg_of(f"augment.crop_size={crop}", *overrides, batch=5)
    small = build_loader(cfg, ds, "pretrain", seed=4)
    assert dr.warp_stays_inside(small.source.spec)
    records = _Feeder(small.source, 0, "cpu").host(SimpleNamespace(iteration=0))[0]
    assert isinstance(records, list) and all(r.shape == ds.image_shape for r in records)
    assert all(np.shares_memory(r, ds.shard_images(ds.locate(int(i))[0])) for r, i in zip(records, small.source.batch(0).index, strict=True))
    big = build_loader(cfg_of(), request.getfixturevalue("ds107"), "pretrain", seed=4)
    assert _Feeder(big.source, 0, "cpu").host(SimpleNamespace(iteration=0))[0].shape == (8, 109, 109, 5)
    if DEVICE != "cpu":
        return
    direct = [b["view1"].clone() for b in small]
    monkeypatch.setattr(dr, "warp_stays_inside", lambda spec: False)
    bordered = [b["view1"] for b in build_loader(cfg, ds, "pretrain", seed=4)]
    for k, (got, want) in enumerate(zip(direct, bordered, strict=True)):
        oracle = augment_batch(small.source.batch(k), crop, small.torch_device)[0]
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale
        assert (got - oracle).abs().max().item() <= 1e-4 * scale


# ----------------------------------------------------------------------------- statistics


def test_draw_statistics():
    spec = dr.resolve_spec(load_config().augment, {"image_shape": [107, 107, 5], "pixel_stats": {"median": [0] * 5, "mad": [1] * 5}}, "pretrain")
    views = dr.draw_views(spec, dr.generator(0, 9), 30000)
    shift = np.concatenate([v.shift.ravel() for v in views])
    counts = np.bincount(shift + 7)
    assert shift.min() == -7 and shift.max() == 7 and len(counts) == 15
    expected = len(shift) / 15
    assert ((counts - expected) ** 2 / expected).sum() < 40  # chi2, 14 dof: p ~ 3e-4
    angle = np.concatenate([v.angle for v in views])
    assert 0 <= angle.min() and angle.max() < 2 * np.pi
    hist = np.histogram(angle, bins=12, range=(0, 2 * np.pi))[0]
    assert ((hist - len(angle) / 12) ** 2 / (len(angle) / 12)).sum() < 35
    for key, lo, hi in (("ebv", 0, 0.5), ("scale", 1, 3)):
        x = np.concatenate([getattr(v, key) for v in views])
        assert lo <= x.min() and x.max() <= hi and abs(x.mean() - (lo + hi) / 2) < 0.01 * (hi - lo)
    # the two views of a sample read disjoint halves of the noise table
    half = spec.noise_table_size // 2
    assert views[0].noise_offset.max() + spec.field_size <= half <= views[1].noise_offset.min()


def test_reddening_follows_the_R_vector(ds107):
    cfg = cfg_of("augment.rotation=false", "augment.jitter=false", "augment.noise=false", batch=20)
    loader = build_loader(cfg, ds107, "pretrain", seed=5)
    ebvs = []
    for batch in loader:
        raw = _raw_crop(ds107, batch["index"].cpu().numpy(), 64)
        for key in ("view1", "view2"):
            ratio = (batch[key].cpu().numpy().astype(np.float64) / raw).reshape(len(raw), 5, -1)
            assert np.ptp(ratio, axis=2).max() < 1e-6  # one factor per sample and band
            ebv = -2.5 * np.log10(ratio[:, :, 0]) / R_SF11  # E(B-V) implied by each band
            np.testing.assert_allclose(ebv, ebv[:, :1].repeat(5, 1), atol=1e-6)
            ebvs.append(ebv[:, 0])
    ebvs = np.concatenate(ebvs)
    assert 0 <= ebvs.min() and ebvs.max() <= 0.5 and ebvs.std() > 0.1


def test_dereddening_uses_each_galaxys_sfd_ebv(ds107):
    cfg = cfg_of("augment.rotation=false", "augment.jitter=false", batch=10)
    batch = next(iter(build_loader(cfg, ds107, "eval")))
    ids = batch["index"].cpu().numpy()
    want = _raw_crop(ds107, ids, 64) * 10 ** (0.4 * np.outer(ds107.meta["ebv_sfd"][ids], R_SF11))[:, :, None, None]
    np.testing.assert_allclose(batch["image"].cpu().numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_pretrain_deredden_then_redden(ds107, backend):
    """augment.pretrain_deredden: the same reddening draws, applied after dividing out the galaxy's own SFD
    E(B-V), in one fused factor 10**(-0.4 R (E - E_sfd)) per sample and band."""
    geometry = ("augment.rotation=false", "augment.jitter=false", "augment.noise=false")
    observed = build_loader(cfg_of(*geometry, backend=backend), ds107, "pretrain", seed=4)
    dereddened = build_loader(cfg_of(*geometry, "augment.pretrain_deredden=true", backend=backend), ds107, "pretrain", seed=4)
    assert not observed.source.spec.deredden and dereddened.source.spec.deredden  # off by default
    for k, (a, b) in enumerate(zip(observed, dereddened, strict=True)):
        ids = a["index"].cpu().numpy()
        assert np.array_equal(ids, b["index"].cpu().numpy())
        ebv_sfd = ds107.meta["ebv_sfd"][ids]
        factor = 10 ** (0.4 * np.outer(ebv_sfd, R_SF11))[:, :, None, None]
        for v, key in enumerate(("view1", "view2")):
            np.testing.assert_allclose(b[key].cpu().numpy(), a[key].cpu().numpy() * factor, rtol=2e-6)
            red, fused = observed.source.batch(k).views[v], dereddened.source.batch(k).views[v]
            np.testing.assert_array_equal(fused.draws.ebv, red.draws.ebv - ebv_sfd)  # one E(B-V) per sample
            assert fused.mult.shape == (len(ids), 1, 1, 5)
    # without reddening it is the fine-tuning correction alone
    batch = next(iter(build_loader(cfg_of(*geometry, "augment.reddening=false", "augment.pretrain_deredden=true",
                                          backend=backend), ds107, "pretrain", seed=4)))
    ids = batch["index"].cpu().numpy()
    want = _raw_crop(ds107, ids, 64) * 10 ** (0.4 * np.outer(ds107.meta["ebv_sfd"][ids], R_SF11))[:, :, None, None]
    np.testing.assert_allclose(batch["view1"].cpu().numpy(), want, rtol=1e-6)


def test_noise_mad_is_the_raw_mad_of_every_pixel_of_every_full_cutout(ds107):
    """The noise unit: median(|x - median|) per band over all records at full size (107x107), unscaled."""
    pixels = ds107.images_hwc(np.arange(len(ds107))).reshape(-1, 5).astype(np.float64)
    mad = np.median(np.abs(pixels - np.median(pixels, axis=0)), axis=0)
    spec = build_loader(cfg_of(), ds107, "pretrain").source.spec
    np.testing.assert_allclose(spec.mad, mad, rtol=1e-6)
    np.testing.assert_allclose(dr.noise_sigmas(spec, np.array([1.0, 2.0])), np.outer([1.0, 2.0], mad), rtol=1e-6)
    crop = _raw_crop(ds107, np.arange(len(ds107)), 64).transpose(0, 2, 3, 1).reshape(-1, 5)
    crop_mad = np.median(np.abs(crop - np.median(crop, axis=0)), axis=0)
    assert np.abs(crop_mad / spec.mad - 1).max() > 100e-6  # the crop's MAD would fail the first check


def test_noise_std_is_scale_times_mad(ds107):
    cfg = cfg_of("augment.rotation=false", "augment.jitter=false", "augment.reddening=false", batch=20)
    loader = build_loader(cfg, ds107, "pretrain", seed=11)
    mad = ds107.pixel_stats()["mad"]
    scales = []
    for k, batch in enumerate(loader):
        raw = _raw_crop(ds107, batch["index"].cpu().numpy(), 64)
        views = loader.source.batch(k).views
        for v, key in enumerate(("view1", "view2")):
            noise = (batch[key].cpu().numpy() - raw).reshape(len(raw), 5, -1)
            per_band = noise.std(axis=2) / mad  # = the sample's scale draw in every band (4096 px: ~1.1% error)
            scale = np.broadcast_to(views[v].draws.scale[:, None], per_band.shape)
            np.testing.assert_allclose(per_band, scale, rtol=0.05)
            assert (np.abs(noise.mean(axis=2)) < 5 * scale * mad / np.sqrt(noise.shape[2])).all()  # zero mean
            scales.append(per_band.mean(axis=1))
    scales = np.concatenate(scales)
    assert 0.97 <= scales.min() and scales.max() <= 3.03 and scales.std() > 0.3
    assert not np.allclose(scales[: len(scales) // 2], scales[len(scales) // 2 :])


# ----------------------------------------------------------------------------- the pipeline table


def test_docs_pipeline_table_is_the_table():
    assert markdown_table() in DOCS.read_text(), "regenerate the table: python -m photoz_hpc.augment.pipelines"


@pytest.mark.parametrize("backend", ["dali", "reference"])
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_batches_carry_the_tables_keys(ds107, backend, pipeline):
    p = PIPELINES[pipeline]
    loader = build_loader(cfg_of(backend=backend), ds107, pipeline)
    batch = next(iter(loader))
    assert tuple(batch) == p.keys
    dtypes = {"z_bin": torch.int64, "redshift": torch.float32, "index": torch.int64, "valid": torch.bool}
    for key, value in batch.items():
        assert value.dtype == dtypes.get(key, torch.float32) and len(value) == 8, key
    z = ds107.meta["specz_redshift"]
    pool = np.flatnonzero(np.isfinite(z)) if p.labeled_only else np.arange(len(ds107))
    n = len(pool) // 8 if p.training else -(-len(pool) // 8)
    assert len(loader) == n


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_a_new_pipeline_is_one_table_entry(ds107, monkeypatch, backend):
    """E.g. test-time augmentation for prediction: every sample once, in order, two rotated views."""
    tta = Pipeline("tta", 2, training=False, labeled_only=False, augmentations=("rotation",),
                   deredden_switch="deredden", view_keys=("view1", "view2"))
    monkeypatch.setitem(PIPELINES, "tta", tta)
    loader = build_loader(cfg_of(backend=backend), ds107, "tta", seed=1)
    spec = loader.source.spec
    assert spec.rotation and spec.deredden and not (spec.jitter or spec.reddening or spec.noise)
    batches = list(loader)
    assert all(tuple(b) == tta.keys for b in batches)
    ids = np.concatenate([b["index"][b["valid"]].cpu().numpy() for b in batches])
    assert list(ids) == list(range(len(ds107)))
    oracle = augment_batch(loader.source.batch(0), 64, loader.torch_device)
    for key, want in zip(tta.view_keys, oracle, strict=True):
        assert (batches[0][key] - want).abs().max() <= 1e-4 * want.abs().max()
    assert not torch.allclose(batches[0]["view1"], batches[0]["view2"])


def test_pipeline_entries_are_checked():
    with pytest.raises(ValueError, match="augment.dereden is not an AugmentConfig field"):
        Pipeline("x", 1, training=False, labeled_only=False, augmentations=(), deredden_switch="dereden", view_keys=("image",))
    with pytest.raises(ValueError, match="1 view keys for 2 views"):
        Pipeline("x", 2, training=True, labeled_only=False, augmentations=(), deredden_switch="deredden", view_keys=("image",))
    with pytest.raises(ValueError, match="labels need labeled_only"):
        Pipeline("x", 1, training=True, labeled_only=False, augmentations=(), deredden_switch="deredden",
                 view_keys=("image",), label_keys=("z_bin",))
    with pytest.raises(ConfigError, match="unknown pipeline 'tta'"):
        dr.resolve_spec(load_config().augment, {"image_shape": [107, 107, 5]}, "tta")


# ----------------------------------------------------------------------------- sharding and resume


@pytest.mark.parametrize("n,world,batch", [(60, 3, 8), (61, 4, 5), (7, 3, 2), (100, 1, 32)])
def test_sharding_covers_the_set(n, world, batch):
    pool = np.arange(n)
    train = [plan_epoch(pool, batch, r, world, seed=4, epoch=2, train=True) for r in range(world)]
    ids = np.concatenate([p.ids.ravel() for p in train])
    assert len(set(ids)) == len(ids) == world * (n // world // batch) * batch
    assert len({len(p) for p in train}) == 1
    other = np.concatenate([plan_epoch(pool, batch, r, world, 4, 3, True).ids.ravel() for r in range(world)])
    assert not np.array_equal(ids, other) or len(ids) <= 1  # reshuffled per epoch
    ev = [plan_epoch(pool, batch, r, world, seed=4, epoch=0, train=False) for r in range(world)]
    assert len({len(p) for p in ev}) == 1
    got = np.concatenate([p.ids[p.valid] for p in ev])
    assert sorted(got) == list(range(n))
    assert all((p.ids[~p.valid] == PAD_ID).all() for p in ev)


def test_eval_loader_every_sample_once_across_ranks(ds107):
    seen = []
    for rank in range(4):
        for batch in build_loader(cfg_of(batch=7), ds107, "eval", rank=rank, world_size=4):
            assert batch["valid"].dtype == torch.bool
            assert (batch["index"][~batch["valid"]] == PAD_ID).all()
            seen.append(batch["index"][batch["valid"]].cpu().numpy())
    assert sorted(np.concatenate(seen)) == list(range(len(ds107)))


def test_finetune_uses_labeled_samples_only(ds107):
    loader = build_loader(cfg_of(batch=8), ds107, "finetune")
    z = ds107.meta["specz_redshift"]
    for batch in loader:
        ids = batch["index"].cpu().numpy()
        assert np.isfinite(z[ids]).all()
        np.testing.assert_array_equal(batch["redshift"].cpu().numpy(), z[ids].astype(np.float32))
        edges = np.linspace(0, 0.4, 181)
        b = batch["z_bin"].cpu().numpy()
        assert ((edges[b] <= z[ids]) & (z[ids] < edges[b + 1])).all()
    assert len(loader) == np.isfinite(z).sum() // 8


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_exact_resume(ds107, backend):
    cfg = cfg_of(batch=8, backend=backend)
    loader = build_loader(cfg, ds107, "pretrain", seed=7)
    loader.set_epoch(1)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 2
    rest = list(it)
    resumed = build_loader(cfg, ds107, "pretrain", seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    again = list(resumed)
    assert len(again) == len(rest) == len(loader) - 2
    for a, b in zip(rest, again, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key])
    loader.set_epoch(2)
    assert not torch.equal(next(iter(loader))["index"], rest[0]["index"])
    with pytest.raises(ConfigError, match="seed"):
        build_loader(cfg, ds107, "pretrain", seed=8).load_state_dict(state)


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_dali_one_pipeline_feeds_across_epoch_boundaries(ds107):
    """One pipeline for the whole run: the batches of epochs 0, 1, 2 (prefetched across each boundary) equal
    those of a freshly built loader per epoch, and the loader state still resumes exactly."""
    cfg = cfg_of(batch=8)
    loader = build_loader(cfg, ds107, "pretrain", seed=5)
    run = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        run.append(list(loader))
    assert loader.builds == 1  # never rebuilt between epochs
    for epoch, got in enumerate(run):
        fresh = build_loader(cfg, ds107, "pretrain", seed=5)
        fresh.set_epoch(epoch)
        _assert_same_batches(got, list(fresh))
    # resume mid-epoch 1 from a state taken while the pipeline had prefetched ahead
    loader.set_epoch(1)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 2 and loader.builds == 2  # a pass out of sequence: rebuilt
    rest = list(it)
    resumed = build_loader(cfg, ds107, "pretrain", seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    _assert_same_batches(list(resumed), rest)
    _assert_same_batches(rest, run[1][2:])
    resumed.set_epoch(2)  # the resumed loader then goes on into the next epoch without a rebuild
    _assert_same_batches(list(resumed), run[2])
    assert resumed.builds == 1


def test_dali_pass_abandoned_midway_does_not_leak_prefetched_batches(ds107):
    cfg = cfg_of(batch=8)
    loader = build_loader(cfg, ds107, "pretrain", seed=5)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)  # the pipeline now holds prefetched batches 1, 2 of epoch 0
    loader.set_epoch(1)
    got = list(loader)
    fresh = build_loader(cfg, ds107, "pretrain", seed=5)
    fresh.set_epoch(1)
    _assert_same_batches(got, list(fresh))
    assert list(it) == []  # the abandoned pass stops instead of drawing from the new pipeline
    ev = build_loader(cfg_of(batch=7), ds107, "eval")
    first, again = list(ev), list(ev)  # evaluation passes repeat their epoch on the same pipeline
    _assert_same_batches(first, again)
    assert ev.builds == 1


def _feed(feeder, iterations):
    """What DALI gets from ``feeder`` at each iteration (host outputs and noise fields, copied: buffers are
    reused once released) and the positions delivered; every batch is released after it, as the loader does."""
    from types import SimpleNamespace

    got = []
    for i in range(iterations):
        info = SimpleNamespace(iteration=i)
        out = [np.array(a) for a in feeder.host(info)]
        if feeder.spec.noise:
            out += [np.array(feeder.noise(v)(info)) for v in range(feeder.spec.n_views)]
        source_batch, buffer = feeder.delivered.popleft()
        got.append((feeder.delivered_at.popleft(), source_batch.index.copy(), out))
        feeder.release(buffer)
    return got


@pytest.mark.parametrize("overrides", [(), ("augment.crop_size=32", "augment.noise=false")])
def test_dali_host_work_prepared_ahead_equals_the_synchronous_feed(ds107, monkeypatch, overrides):
    """The host work of each batch (draws, records into the staging/bordered buffer) is prepared in background
    threads ``ahead`` batches before DALI asks for it; the batches, their order and positions equal the
    synchronous feed's across epoch boundaries and from a resume position, with buffers reused."""
    import threading

    from photoz_hpc.augment.dali_pipeline import EpochSources, _Feeder
    from photoz_hpc.augment.source import BatchSource

    source = build_loader(cfg_of(*overrides, batch=8), ds107, "pretrain", seed=3).source
    n = len(source)
    threads, real = [], BatchSource.batch

    def batch(self, k):
        threads.append(threading.current_thread().name)
        return real(self, k)

    monkeypatch.setattr(BatchSource, "batch", batch)
    for epoch, start in ((0, 0), (1, 3)):  # a run from the start, and a resume mid-epoch 1
        iterations = 2 * n + 1  # two epoch boundaries
        want = _feed(_Feeder(EpochSources(source, lambda e: e + 1), start, DEVICE, epoch), iterations)
        assert [pos for pos, _, _ in want[: n - start + 1]] == [(epoch, k) for k in range(start, n)] + [(epoch + 1, 0)]
        assert not any(t.startswith("photoz-dali-feed") for t in threads)
        threads.clear()
        feeder = _Feeder(EpochSources(source, lambda e: e + 1), start, DEVICE, epoch, ahead=3)
        got = _feed(feeder, iterations)
        assert feeder._scheduled == iterations - 1 + 3  # handed to the threads 3 ahead of the last asked for
        feeder.close()  # cancels what has not started
        assert threads and all(t.startswith("photoz-dali-feed") for t in threads)  # never in the calling thread
        assert iterations <= len(threads) <= iterations + 3  # each batch prepared once
        threads.clear()
        assert len(got) == len(want)
        for (pos_a, ids_a, out_a), (pos_b, ids_b, out_b) in zip(got, want, strict=True):
            assert pos_a == pos_b and np.array_equal(ids_a, ids_b)
            assert len(out_a) == len(out_b) and all(np.array_equal(a, b) for a, b in zip(out_a, out_b, strict=True))


def test_dali_loader_feeding_ahead_equals_feeding_in_the_training_thread(ds107):
    """The whole loader with its default feed (prepared ahead in threads) against ``feed_ahead = 0`` (the host work
    in the training thread): the same batches over three epochs and after a resume mid-epoch."""
    cfg = cfg_of(batch=8)
    ahead, sync = build_loader(cfg, ds107, "pretrain", seed=9), build_loader(cfg, ds107, "pretrain", seed=9)
    assert ahead.feed_ahead == cfg.loader.prefetch > 0
    sync.feed_ahead = 0
    for epoch in range(3):
        ahead.set_epoch(epoch)
        sync.set_epoch(epoch)
        _assert_same_batches(list(ahead), list(sync))
    ahead.set_epoch(1)
    it = iter(ahead)
    next(it), next(it)
    state = json.loads(json.dumps(ahead.state_dict()))
    resumed = build_loader(cfg, ds107, "pretrain", seed=9)
    resumed.feed_ahead = 0
    resumed.load_state_dict(state)
    _assert_same_batches(list(it), list(resumed))
    ahead.close()


# ----------------------------------------------------------------------------- bad input


def test_missing_pixel_stats_is_an_error(ds107, tmp_path):
    copy = shutil.copytree(ds107.root, tmp_path / "nostats")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["pixel_stats"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="pixel statistics"):
        build_loader(cfg_of(), copy, "pretrain")
    assert len(build_loader(cfg_of("augment.noise=false"), copy, "pretrain")) > 0  # not needed without noise


def test_crop_larger_than_images_is_an_error(ds48):
    with pytest.raises(ConfigError, match="does not fit the 48x48"):
        build_loader(cfg_of("augment.crop_size=64"), ds48, "pretrain")
    with pytest.raises(ConfigError, match="jitter"):
        build_loader(cfg_of("augment.crop_size=42", "augment.jitter_max=7"), ds48, "finetune")
    assert len(build_loader(cfg_of("augment.crop_size=42", "augment.jitter_max=7", batch=4), ds48, "eval")) > 0  # no jitter in eval


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_corrupt_shard_is_an_error(ds107, tmp_path, backend):
    copy = shutil.copytree(ds107.root, tmp_path / "corrupt")
    shard = copy / ds107.shards[1]["file"]
    data = bytearray(shard.read_bytes())
    data[1000:1004] = b"\x7f\x7f\x7f\x7f"
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupt"):
        for _ in build_loader(cfg_of(backend=backend), copy, "eval"):
            pass


def test_config_validation():
    with pytest.raises(ConfigError, match="ebv_max"):
        load_config(None, ["augment.ebv_min=0.6"])
    with pytest.raises(ConfigError, match="noise_method"):
        load_config(None, ["augment.noise_method=gpu"])


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_views(ds107, tmp_path):
    pytest.importorskip("matplotlib")  # the CLI draws the views (viz.py); the GPU machine's image has none
    from photoz_hpc.cli import main

    out = tmp_path / "views.npz"
    assert main(["augment", "--data", str(ds107.root), "--pipeline", "pretrain", "--n", "6", "--out", str(out), "augment.noise=false"]) == 0
    saved = np.load(out)
    assert saved["views"].shape == (6, 2, 5, 64, 64)
    assert len(set(saved["ids"])) == 6 and saved["ids"].max() < len(ds107)
    assert not np.array_equal(saved["views"][:, 0], saved["views"][:, 1])
    out = tmp_path / "eval.npz"
    assert main(["augment", "--data", str(ds107.root), "--pipeline", "eval", "--n", "4", "--out", str(out)]) == 0
    saved = np.load(out)
    assert saved["views"].shape == (4, 5, 64, 64) and list(saved["ids"]) == [0, 1, 2, 3]
    png = tmp_path / "views.png"
    assert main(["augment", "--data", str(ds107.root), "--n", "4", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["augment", "--data", str(ds107.root), "--n", "4", "--out", str(png), "augment.bogus=1"]) == 1
