"""Synthetic surveys other than SDSS (legacy, hsc, lsst): file layout, PSFs, depths, colours, selection, determinism,
and the template grids behind them (checked against calibration.json's SDSS grid)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from photoz_hpc import mmu_layout
from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.sim import bandpass, cosmology, generate_survey
from photoz_hpc.sim.population import PSF_BETA, SDSS_WAVE_EFF, sample_band_population
from photoz_hpc.sim.seds import k_terms_through, template_grid
from photoz_hpc.sim.survey import render_band_chunk, resolve_plan
from photoz_hpc.survey import load_survey

SURVEYS = ("legacy", "hsc", "lsst")
N, SIZE = 5, 40


def _read(path):
    with h5py.File(path, "r") as fh:
        return {k: fh[k][...] for k in fh.keys()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("surveys")
    return {name: generate_survey(root / f"{name}.h5", n=N, seed=4, labeled=True, workers=1, chunk=3, survey=name,
                                  cutout_size=SIZE) for name in SURVEYS}


@pytest.mark.parametrize("name", SURVEYS)
def test_layout_bands_labels_scale_psf(files, name):
    survey = load_survey(name)
    bands = list(survey.spec.default_bands or survey.bands)
    d = _read(files[name])
    assert set(d) == {"object_id", "image_array", "image_band", "image_scale", "image_psf_fwhm", "ra", "dec", "EBV",
                      "z_spec"}
    assert d["image_array"].shape == (N, len(bands), SIZE, SIZE) and d["image_array"].dtype == np.float32
    assert np.all(np.isfinite(d["image_array"]))
    labels = [[v.decode() for v in row] for row in d["image_band"]]
    assert labels == [mmu_layout.labels_of(survey, bands)] * N
    np.testing.assert_allclose(d["image_scale"], survey.pixel_scale, rtol=1e-6)
    assert d["object_id"].dtype == np.int64 and len(np.unique(d["object_id"])) == N
    # per-band PSF: each galaxy's FWHM scatters (seeing) about the survey's median in that band, the band ratios kept
    median = np.asarray(survey.spec.synthetic.psf_fwhm)[[survey.bands.index(b) for b in bands]]
    ratio = d["image_psf_fwhm"] / median
    assert np.all((ratio > 0.4) & (ratio < 2.5))
    assert np.all(np.std(np.log(ratio), axis=1) < 0.1)  # one seeing per galaxy, 3% per-band jitter
    assert np.all((d["z_spec"] > 0) & (d["z_spec"] <= survey.spec.synthetic.z_max + 0.01))
    assert np.all((d["EBV"] > 0) & (d["EBV"] < 0.5))


def test_default_cutout_size_and_bands_subset_share_images(tmp_path):
    """Default size is the survey's; a band's image and every catalogue column do not depend on the other bands."""
    survey = load_survey("legacy")
    grz = _read(generate_survey(tmp_path / "grz.h5", n=2, seed=9, workers=1, survey="legacy"))
    assert grz["image_array"].shape == (2, 3, survey.cutout_size, survey.cutout_size)
    a = _read(generate_survey(tmp_path / "a.h5", n=3, seed=9, workers=1, survey="legacy", cutout_size=SIZE))
    b = _read(generate_survey(tmp_path / "b.h5", n=3, seed=9, workers=1, survey="legacy", bands=["z", "i", "g", "r"],
                              cutout_size=SIZE))
    assert [v.decode() for v in b["image_band"][0]] == ["des-z", "des-i", "des-g", "des-r"]
    for j, k in ((0, 2), (1, 3), (2, 0)):  # g r z of a = positions 2 3 0 of b
        np.testing.assert_array_equal(a["image_array"][:, j], b["image_array"][:, k])
        np.testing.assert_array_equal(a["image_psf_fwhm"][:, j], b["image_psf_fwhm"][:, k])
    for key in ("object_id", "ra", "dec", "EBV", "z_spec"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_deterministic_in_seed_and_independent_of_workers(files, tmp_path):
    ref = _read(files["hsc"])
    again = _read(generate_survey(tmp_path / "w2.h5", n=N, seed=4, workers=2, chunk=2, survey="hsc",
                                  cutout_size=SIZE))
    for key in ref:
        np.testing.assert_array_equal(ref[key], again[key], err_msg=key)
    other = _read(generate_survey(tmp_path / "s5.h5", n=2, seed=5, workers=1, survey="hsc", cutout_size=SIZE))
    assert not np.array_equal(other["image_array"], ref["image_array"][:2])
    assert not np.array_equal(other["object_id"], ref["object_id"][:2])


def _moffat_neff(fwhm: float, scale: float) -> float:
    """1 / sum(P^2) of a unit Moffat drawn by GalSim on the survey's pixels (independent of noise.py's formula)."""
    import galsim

    img = galsim.Moffat(beta=PSF_BETA, fwhm=fwhm).drawImage(nx=151, ny=151, scale=scale).array
    return 1.0 / float(np.sum((img / img.sum()) ** 2))


@pytest.mark.parametrize("name", SURVEYS)
def test_sky_noise_matches_the_published_depth(name):
    """Robust sky sigma in the empty corners = the sigma that makes the YAML's 5-sigma point-source depth at the
    median seeing (F_5 = 5 sigma sqrt(n_eff)), in the survey's flux unit, per band (within 15%)."""
    survey = load_survey(name)
    syn = survey.spec.synthetic
    plan = resolve_plan(name, list(survey.bands), 64)
    cols = render_band_chunk(plan, 21, 0, 20, labeled=False, neighbours=False)
    img = cols["image_array"].astype(np.float64)
    c = 12
    corners = np.concatenate([img[..., :c, :c], img[..., :c, -c:], img[..., -c:, :c], img[..., -c:, -c:]], axis=-1)
    flat = corners.reshape(*corners.shape[:2], -1)
    mad = 1.4826 * np.median(np.abs(flat - np.median(flat, axis=-1, keepdims=True)), axis=-1)  # (galaxy, band)
    measured = np.median(mad, axis=0)
    for b, band in enumerate(survey.bands):
        f5 = 10 ** (-0.4 * (syn.depth[b] - survey.zeropoint))
        want = f5 / (5 * np.sqrt(_moffat_neff(syn.psf_fwhm[b], survey.pixel_scale)))
        assert measured[b] == pytest.approx(want, rel=0.15), (band, measured[b], want)


@pytest.mark.parametrize("name", SURVEYS)
def test_selection_and_redshift_range(name):
    """Every galaxy is brighter than the limit in the selection band (total magnitude, before extinction), and
    the flux limit shapes the sample: a good share sits within half a magnitude of it."""
    survey = load_survey(name)
    syn = survey.spec.synthetic
    model = resolve_plan(name, None, None).model()
    pop = sample_band_population(150, seed=3, model=model)
    m = pop["mag"][:, survey.bands.index(syn.select_band)]
    assert np.all(m <= syn.mag_limit)
    assert np.mean(m > syn.mag_limit - 0.5) > 0.2
    assert np.all((pop["z"] > 0) & (pop["z"] <= syn.z_max))
    # deeper selections reach further: the median redshift of i < 22.5 is well above that of r < 19.5
    assert (0.1 < np.median(pop["z"]) < 0.3) if name == "legacy" else (0.35 < np.median(pop["z"]) < 0.8)


@pytest.mark.parametrize(("name", "blue", "red", "z_lo", "z_hi"), [
    ("legacy", "g", "r", 0.0, 0.35),  # the 4000 A break crosses g/r at z ~ 0.35
    ("hsc", "r", "i", 0.35, 0.75),  # ... and r/i at z ~ 0.75
    ("lsst", "i", "z", 0.6, 1.0),  # ... and i/z at z ~ 1 (i - z peaks at z 1.05)
])
def test_early_type_colours_redden_where_the_break_crosses_the_filters(name, blue, red, z_lo, z_hi):
    survey = load_survey(name)
    model = resolve_plan(name, None, None).model()
    w_red = np.asarray(model.base.sed["w_bulge"])  # the luminous red-sequence SED of the calibration
    z = np.linspace(z_lo, z_hi, 15)
    k = k_terms_through(np.tile(w_red, (len(z), 1)), z, model.base.grid, model.grid)
    colour = k[:, survey.bands.index(blue)] - k[:, survey.bands.index(red)]
    assert np.all(np.diff(colour) > 0), colour
    assert colour[-1] - colour[0] > 0.4


def test_legacy_colours_agree_with_sdss_at_low_redshift():
    """DECam g-r and r-z of the red-sequence SED are close to SDSS g-r and r-z (similar filters) at z 0.1."""
    survey = load_survey("legacy")
    model = resolve_plan("legacy", list(survey.bands), None).model()
    w = np.asarray(model.base.sed["w_bulge"])[None, :]
    z = np.array([0.1])
    decam = k_terms_through(w, z, model.base.grid, model.grid)[0]
    sdss = k_terms_through(w, z, model.base.grid, template_grid())[0]
    assert abs((decam[0] - decam[1]) - (sdss[1] - sdss[2])) < 0.12  # DECam g is redder than SDSS g
    assert abs((decam[1] - decam[3]) - (sdss[2] - sdss[4])) < 0.12


def test_sdss_grid_recomputed_through_kcorrect_responses_matches_calibration():
    """The integrator reproduces calibration.json's grid (kcorrect's own Amatrix of the same templates and SDSS
    responses): with kcorrect's cubic interpolation to 0.12%, with the linear one the shipped grids use to 1.1%
    (the emission-line template on the 50 A-sampled responses), 0.005 mag in the red-sequence colours."""
    from photoz_hpc.sim.params import load_calibration

    cal = load_calibration()["template_grid"]
    z, ref = np.asarray(cal["z"]), np.asarray(cal["maggies"])
    responses = [f"kcorrect:{r}" for r in cal["responses"]]
    cubic = bandpass.compute_grid(responses, z[::4], kind="cubic")
    assert np.max(np.abs(cubic / ref[::4] - 1)) < 2e-3
    linear = bandpass.compute_grid(responses, z)
    assert np.max(np.abs(linear / ref - 1)) < 1.5e-2
    assert np.median(np.abs(linear / ref - 1)) < 2e-4
    w = np.asarray(load_calibration()["sed_model"]["w_bulge"])
    c = w / ref[0, :, 2]
    col = lambda m: -2.5 * np.log10(np.einsum("t,ztb->zb", c, m)[:, :-1] / np.einsum("t,ztb->zb", c, m)[:, 1:])  # noqa: E731
    assert np.max(np.abs(col(linear) - col(ref))) < 5e-3
    # the SDSS effective wavelengths the colour residuals are placed at
    got = [bandpass.effective_wavelength(*bandpass.response_curve(r)) for r in responses]
    np.testing.assert_allclose(got, SDSS_WAVE_EFF, atol=0.01)


def test_shipped_template_grids_are_what_the_builder_makes():
    for family in bandpass.FAMILIES:
        with open(bandpass.GRID_DIR / f"{family}.json") as fh:
            doc = json.load(fh)
        assert doc["filters"] == bandpass.family_filters(family)
        rows = [0, 100, 400]  # z 0, 0.5, 2.0
        z = np.asarray(doc["z"])[rows]
        np.testing.assert_allclose(bandpass.compute_grid(doc["filters"], z), np.asarray(doc["maggies"])[rows],
                                   rtol=1e-6)


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="release layout"):
        generate_survey(tmp_path / "x.h5", n=1, seed=0, survey="sdss", bands=["g", "r"])
    with pytest.raises(ConfigError, match="--cutout-size"):
        generate_survey(tmp_path / "x.h5", n=1, seed=0, survey="sdss", cutout_size=64)
    with pytest.raises(PhotozError, match="distinct bands"):
        generate_survey(tmp_path / "x.h5", n=1, seed=0, survey="legacy", bands=["g", "y"])
    with pytest.raises(ConfigError, match="no template grid for filters"):
        bandpass.load_band_grid(("decam2014-g", "bessell-V"), 1.0)
    with pytest.raises(ConfigError, match="beyond the template grids"):
        bandpass.load_band_grid(("decam2014-g",), 5.0)
    values = load_survey("legacy").to_dict()
    values["synthetic"]["mag_limit"] = 5.0  # brighter than any galaxy of the population at z <= 0.8
    from photoz_hpc.survey import survey_from_dict

    with pytest.raises(ConfigError, match="no galaxy of the population"):
        generate_survey(tmp_path / "x.h5", n=1, seed=0, survey=survey_from_dict(values, "test"))
    # a survey described without a synthetic section cannot be synthesised
    values = load_survey("legacy").to_dict()
    values["name"], values["synthetic"] = "mine", {"filters": []}
    with pytest.raises(ConfigError, match="no synthetic section"):
        generate_survey(tmp_path / "x.h5", n=1, seed=0, survey=survey_from_dict(values, "test"))
    assert list(tmp_path.iterdir()) == []


def test_cli_with_a_survey_file_and_prepare_reads_the_result(tmp_path):
    """``synth --survey FILE --bands --cutout-size`` writes an MMU file that ``prepare`` recognises as that survey."""
    import shutil

    from photoz_hpc.cli import main
    from photoz_hpc.config import packaged_config
    from photoz_hpc.data.prepare import prepare

    yaml = tmp_path / "my_hsc.yaml"
    shutil.copy(packaged_config("surveys/hsc.yaml"), yaml)
    out = tmp_path / "h.h5"
    assert main(["synth", "--survey", str(yaml), "--bands", "g,r,i", "--cutout-size", "32", "--n", "3",
                 "--labeled", "--workers", "1", "--out", str(out)]) == 0
    d = _read(out)
    assert [v.decode() for v in d["image_band"][0]] == ["hsc-g", "hsc-r", "hsc-i"]
    store = prepare([out], tmp_path / "store", samples_per_shard=10, overwrite=True)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["survey"]["name"] == "hsc" and manifest["bands"] == ["g", "r", "i"]
    assert manifest["count"] == 3


def test_cosmology_grid_extension_keeps_sdss_distances():
    """The distance grid goes on to z 4 in the same steps; below z 1 it is the original grid, bit for bit."""
    z = np.linspace(0.0, 1.0, 4001)
    inv_e = 1.0 / np.sqrt(cosmology.OM0 * (1 + z) ** 3 + (1 - cosmology.OM0))
    dc = np.concatenate([[0.0], np.cumsum(0.5 * (inv_e[1:] + inv_e[:-1]) * np.diff(z))]) * cosmology.C_KMS / cosmology.H0
    probe = np.array([0.002, 0.0731, 0.25, 0.4, 0.99])
    np.testing.assert_array_equal(cosmology.comoving_distance(probe), np.interp(probe, z, dc))
    from astropy.cosmology import FlatLambdaCDM

    ref = FlatLambdaCDM(H0=70, Om0=0.3, Tcmb0=0)
    zz = np.array([1.5, 2.0, 3.0])
    np.testing.assert_allclose(cosmology.distance_modulus(zz), ref.distmod(zz).value, atol=2e-3)


def test_colour_residuals_carried_by_rest_wavelength():
    """Through the SDSS bands at a z inside each prototype's range the carried residual is the SDSS one; a band
    observing rest-frame u (i at z ~ 1.1) gets the prototype's u residual; bluer than rest u it is held there."""
    from photoz_hpc.sim.population import band_residuals, colour_residuals, survey_model

    sed = survey_model().sed
    zr = np.asarray(sed["resid_z_range"])
    k = np.arange(len(zr))
    normals = np.random.default_rng(1).standard_normal((len(k), 5))
    z = zr.mean(axis=1)
    np.testing.assert_allclose(band_residuals(k, z, normals, sed, SDSS_WAVE_EFF), colour_residuals(k, z, normals, sed),
                               atol=1e-12)
    z_hi = np.full(len(k), 1.3)
    rest_u = colour_residuals(k, z_hi, normals, sed)[:, 0]  # z clipped to the range: the prototype's u residual
    zc = np.clip(z_hi, zr[:, 0], zr[:, 1])
    at_u = SDSS_WAVE_EFF[0] / (1 + zc) * (1 + z_hi)  # the observed wavelength that sees rest-frame u at z 1.3
    np.testing.assert_allclose(band_residuals(k, z_hi, normals, sed, np.array([at_u[0]]))[0], rest_u[0], atol=1e-12)
    np.testing.assert_allclose(band_residuals(k, z_hi, normals, sed, np.array([3000.0]))[:, 0], rest_u, atol=1e-12)
