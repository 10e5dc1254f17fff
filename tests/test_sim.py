"""Synthetic SDSS survey generator: layout, determinism, physics sanity, photometry, atomic writes."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from photoz_hpc.sim import cosmology, generate_survey
from photoz_hpc.sim.population import draw_galaxy, sample_population, sed_weights, survey_model
from photoz_hpc.sim.render import render_galaxy
from photoz_hpc.sim.sky import extinction
from photoz_hpc.survey import load_survey
from photoz_hpc.viz import lupton_rgb, save_grid

N = 24
SDSS = load_survey("sdss")
CUTOUT_SIZE, NMGY_ZEROPOINT = SDSS.cutout_size, SDSS.zeropoint
#: the release's e_bv = DR12 coefficients x SFD E(B-V) (sdss.yaml extinction_input)
R_DR12 = np.asarray(SDSS.input_coefficients)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    return generate_survey(tmp_path_factory.mktemp("s") / "lab.h5", n=N, seed=3, labeled=True, workers=1, chunk=10)


def _read(path):
    with h5py.File(path, "r") as fh:
        return {k: fh[k][...] for k in fh.keys()}


def test_layout_keys_dtypes(labeled):
    d = _read(labeled)
    assert set(d) == {"images", "e_bv", "ra", "dec", "ObjID", "specObjID", "specz_redshift", "specz_redshift_err"}
    assert d["images"].shape == (N, 5, CUTOUT_SIZE, CUTOUT_SIZE) and d["images"].dtype == np.float32
    assert d["e_bv"].shape == (N, 5) and d["e_bv"].dtype == np.float32
    assert d["ra"].dtype == np.float64 and d["dec"].dtype == np.float64
    assert d["ObjID"].dtype == np.int64 and len(np.unique(d["ObjID"])) == N
    assert d["specObjID"].dtype == np.int64 and len(np.unique(d["specObjID"])) == N
    assert d["specz_redshift"].dtype == np.float32 and d["specz_redshift_err"].dtype == np.float32
    assert np.all(np.isfinite(d["images"]))
    assert np.all((d["specz_redshift_err"] > 1e-6) & (d["specz_redshift_err"] < 5e-4))
    assert np.all((d["ra"] >= 0) & (d["ra"] < 360) & (d["dec"] > -15) & (d["dec"] < 75))


def test_unlabeled_lacks_specz_and_matches_labeled_images(labeled, tmp_path):
    p = generate_survey(tmp_path / "unl.h5", n=6, seed=3, labeled=False, workers=1)
    d = _read(p)
    assert "specz_redshift" not in d and "specz_redshift_err" not in d
    np.testing.assert_array_equal(d["images"], _read(labeled)["images"][:6])


def test_deterministic_and_independent_of_workers(labeled, tmp_path):
    p2 = generate_survey(tmp_path / "w2.h5", n=N, seed=3, workers=2, chunk=7)
    a, b = _read(labeled), _read(p2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    other = _read(generate_survey(tmp_path / "s4.h5", n=4, seed=4, workers=1))
    assert not np.array_equal(other["images"], a["images"][:4])


def test_e_bv_is_dr12_extinction_of_sfd(labeled):
    e = _read(labeled)["e_bv"].astype(np.float64)
    ebv = SDSS.sfd_ebv(e)
    np.testing.assert_allclose(e, ebv[:, None] * R_DR12[None, :], rtol=1e-5)
    assert np.all((ebv > 0) & (ebv < 0.5))


def test_ebv_distribution_realistic():
    ebv = sample_population(300, seed=11)["ebv"]
    assert 0.02 < np.median(ebv) < 0.04
    assert np.quantile(ebv, 0.9) < 0.1 and ebv.max() < 0.5


def test_redshift_range_and_flux_limit():
    model = survey_model()
    pop = sample_population(300, seed=5, model=model)
    assert np.all((pop["z"] >= model.sel["z_min"]) & (pop["z"] <= 0.4))
    # model mags can exceed the Petrosian limit only through the calibrated Petrosian scatter (drawn within 4 sigma)
    sel = model.sel
    assert pop["mag"][:, 2].max() <= sel["r_lim"] + 0.05 + max(0.0, 4 * sel["petro_sigma"] - sel["petro_offset"])
    assert np.mean(pop["mag"][:, 2] <= sel["r_lim"]) > 0.9


def test_population_statistics_match_calibration():
    pop = sample_population(300, seed=7)
    assert 0.07 <= np.median(pop["z"]) <= 0.13
    gr = pop["mag"][:, 1] - pop["mag"][:, 2]
    ri = pop["mag"][:, 2] - pop["mag"][:, 3]
    assert np.corrcoef(pop["z"], gr)[0, 1] > 0.4
    assert np.corrcoef(pop["z"], ri)[0, 1] > 0.3
    assert 0.3 < pop["red"].mean() < 0.7


def test_pixel_photometry_recovers_model_magnitudes():
    model = survey_model()
    d_noiseless, d_noisy = [], []
    rng = np.random.default_rng(0)
    from photoz_hpc.sim.noise import add_noise

    for i in range(40):
        g = draw_galaxy(9, i, model)
        if g["r50"] > 4.0:
            continue
        a = extinction(g["ebv"])
        img = render_galaxy(g, a, neighbours=False)
        mag = NMGY_ZEROPOINT - 2.5 * np.log10(img.sum(axis=(1, 2))) - a
        d_noiseless.append(mag - g["mag"])
        noisy = add_noise(img, g["sky_dmag"], rng)
        d_noisy.append(NMGY_ZEROPOINT - 2.5 * np.log10(noisy[2].sum()) - a[2] - g["mag"][2])
    assert len(d_noiseless) > 15
    assert np.max(np.abs(d_noiseless)) < 0.05
    assert np.median(np.abs(d_noisy)) < 0.05


def test_bulge_redder_than_disk():
    model = survey_model()
    diffs = []
    for i in range(30):
        g = draw_galaxy(2, i, model)
        if 0.1 < g["bulge_frac"] < 0.9:
            diffs.append((g["bulge_mag"][1] - g["bulge_mag"][2]) - (g["disk_mag"][1] - g["disk_mag"][2]))
    assert len(diffs) > 5 and np.median(diffs) > 0.0


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import photoz_hpc.sim.survey as survey

    def boom(*a, **k):
        raise RuntimeError("render failed")

    monkeypatch.setattr(survey, "render_chunk", boom)
    out = tmp_path / "fail.h5"
    with pytest.raises(RuntimeError):
        survey.generate_survey(out, n=4, seed=1, workers=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cosmology_matches_astropy():
    from astropy.cosmology import FlatLambdaCDM

    ref = FlatLambdaCDM(H0=70, Om0=0.3, Tcmb0=0)
    z = np.array([0.01, 0.1, 0.3])
    np.testing.assert_allclose(cosmology.distance_modulus(z), ref.distmod(z).value, atol=2e-3)
    np.testing.assert_allclose(cosmology.angular_diameter_distance(z), ref.angular_diameter_distance(z).value,
                               rtol=1e-4)


def test_lupton_rgb_and_grid(labeled, tmp_path):
    imgs = _read(labeled)["images"][:4]
    rgb = lupton_rgb(imgs)
    assert rgb.shape == (4, CUTOUT_SIZE, CUTOUT_SIZE, 3) and rgb.dtype == np.uint8 and rgb.max() > 100
    p = save_grid(imgs, [f"z={i}" for i in range(4)], tmp_path / "g.png", ncols=2)
    assert p.stat().st_size > 1000


def test_calibration_regression_against_shipped_reference():
    """The population model still matches the real MGS summary numbers shipped in calibration.json["reference"].

    2000 draws give ~450 (~360) galaxies in z 0.05-0.08 (0.11-0.14): the median's sampling error is ~0.015 mag
    in g-r and ~0.03 in u-g and r, ~0.0015 in median z. Tolerances = calibrated offset (< 0.08 in these bins) plus
    ~3 sigma; the version-1 calibration (g-r -0.085, u-g -0.17, r +0.27 mag at z 0.05-0.08) fails them, and the
    version-3 n(z) tail (4.3% above z 0.2) fails the tail check.
    """
    from photoz_hpc.sim.params import load_calibration

    ref = load_calibration()["reference"]
    pop = sample_population(2000, seed=31)
    z, mag = pop["z"], pop["mag"]
    assert abs(np.median(z) - ref["z_quantiles"]["0.5"]) < 0.008
    assert abs(np.quantile(z, 0.9) - ref["z_quantiles"]["0.9"]) < 0.015
    # n(z) tail: 2.5% of the catalogue above z 0.2 (sampling sd at 2000 draws 0.35%); version 3 had 4.3%
    assert abs(np.mean(z > 0.2) - ref["frac_z_gt_0.2"]) < 0.011
    for b in ref["bins"]:
        sel = (z >= b["z"][0]) & (z < b["z"][1])
        assert sel.sum() > 250
        m = mag[sel]
        assert abs(np.median(m[:, 1] - m[:, 2]) - b["g-r_median"]) < 0.07, b
        assert abs(np.median(m[:, 0] - m[:, 1]) - b["u-g_median"]) < 0.12, b
        assert abs(np.median(m[:, 2]) - b["r_median"]) < 0.12, b
        p16, p84 = np.percentile(m[:, 1] - m[:, 2], [16, 84])
        assert abs(0.5 * (p84 - p16) - b["g-r_sigma68"]) < 0.05, b


def test_tail_term_and_baldry_divider():
    from photoz_hpc.sim.calibrate import baldry_red, tail_term
    from photoz_hpc.sim.seds import template_grid

    z_real = np.r_[np.full(975, 0.1), np.full(25, 0.3)]  # 2.5% above z 0.2
    assert tail_term(z_real, z_real) == 0.0
    assert tail_term(np.r_[np.full(957, 0.1), np.full(43, 0.3)], z_real) == pytest.approx(0.018 / np.sqrt(0.025))
    grid = template_grid()
    sed = survey_model().sed
    proto = np.asarray(sed["prototypes"]) / grid.rest_r
    red = baldry_red(proto, np.full(len(proto), -21.0), grid)
    # the divider agrees with the prototypes' own red fractions where those are clear-cut
    clear = np.abs(np.asarray(sed["prototype_red"]) - 0.5) > 0.4
    np.testing.assert_array_equal(red[clear], np.asarray(sed["prototype_red"])[clear] > 0.5)


def test_aperture_weights_and_photometry(labeled):
    from photoz_hpc.sim.difficulty import APERTURE_RADIUS_PX, aperture_photometry, aperture_weights

    w = aperture_weights()
    assert abs(w.sum() - np.pi * APERTURE_RADIUS_PX**2) < 0.5
    assert w[CUTOUT_SIZE // 2, CUTOUT_SIZE // 2] == 1.0 and w[0, 0] == 0.0
    np.testing.assert_allclose(w, w.T)
    phot = aperture_photometry(labeled)
    assert phot["mag"].shape == (N, 5) and np.all(np.isfinite(phot["mag"]))
    assert np.all(phot["mag"][:, 2] > 13.0) and np.median(phot["mag"][:, 2]) < 19.5


def test_type_dependent_evolution_and_bulge_blend():
    from photoz_hpc.sim.population import _bulge_disk, type_evolution

    model = survey_model()
    lf, sed = model.lf, model.sed
    assert sed["dq_blue"] > 0  # calibrated: blue galaxies brighten faster than red ones
    m = np.array([-22.5, -22.5, -18.0])
    boost = type_evolution(m, np.array([0.1, 0.25, 0.25]), lf, sed["dq_blue"])
    assert boost[0] == pytest.approx(1.0) and boost[1] > 1.2 and abs(boost[2] - 1.0) < 0.1
    w = np.array([0.1, 0.5, 0.2, 0.1, 0.1])
    for abs_r in (-22.0, -17.0):
        wb, wd = _bulge_disk(w, 0.3, sed, abs_r)
        np.testing.assert_allclose(0.3 * wb + 0.7 * wd, w, atol=1e-9)
    wb_faint, _ = _bulge_disk(w, 0.3, sed, -17.0)
    np.testing.assert_allclose(wb_faint, w)  # no colour gradient in low-luminosity galaxies


def test_evolution_cap_bounds_the_blue_weight():
    from photoz_hpc.sim.population import EVOLUTION_CAP_DEFAULT, EVOLUTION_FLOOR, type_evolution

    model = survey_model()
    lf, sed = model.lf, model.sed
    m, z = np.array([-23.5, -23.5, -19.0]), np.array([0.3, 0.3, 0.05])
    free = type_evolution(m, z, lf, sed["dq_blue"], cap=1e9)
    assert free[0] > 3.0  # a luminous galaxy at z 0.3: the Schechter ratio runs away without a cap
    capped = type_evolution(m, z, lf, sed["dq_blue"], cap=sed.get("evolution_cap", EVOLUTION_CAP_DEFAULT))
    assert capped[0] == pytest.approx(sed.get("evolution_cap", EVOLUTION_CAP_DEFAULT))
    assert capped[2] == pytest.approx(max(free[2], EVOLUTION_FLOOR))  # the cap leaves unclipped weights alone
    # the calibration's cap reaches the generator: a lower cap keeps more luminous z > 0.25 galaxies red
    rng = np.random.default_rng(0)
    mags, zs = rng.uniform(-23.5, -22.5, 4000), np.full(4000, 0.28)
    u, normals = rng.random(4000), np.zeros((4000, 5))
    red = [sed_weights(mags, u, normals, {**sed, "evolution_cap": c}, zs, lf)[1].mean() for c in (2.0, 1e9)]
    assert red[0] > red[1] + 0.1, red
    from photoz_hpc.sim.calibrate import EVOLUTION_CAP

    assert sed["evolution_cap"] == EVOLUTION_CAP  # the shipped calibration was made with today's constant


def test_pooled_predictions_cross_validate_each_block(monkeypatch):
    from photoz_hpc.sim import difficulty

    monkeypatch.setattr(difficulty, "N_TREES", 8)
    rng = np.random.default_rng(3)
    z = rng.uniform(0.02, 0.3, 1200)
    mag = 17.0 + rng.normal(0, 0.3, (1200, 5)) + np.outer(z, [8.0, 5.0, 3.0, 2.0, 1.5])
    got = difficulty.pooled_predict(mag, z, block=500, n_jobs=1)
    # blocks 0-500 and 500-1200 (the 200-galaxy tail is shorter than half a block and joins the second)
    want = np.concatenate([difficulty.cv_predict(mag[:500], z[:500], 0, 1),
                           difficulty.cv_predict(mag[500:], z[500:], 1, 1)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(difficulty.pooled_predict(mag, z, block=5000, n_jobs=1),
                                  difficulty.cv_predict(mag, z, 0, 1))


def test_difficulty_verdicts_and_pooled_cli(tmp_path, labeled, monkeypatch):
    from photoz_hpc.sim import difficulty

    wide, narrow = {"p2.5": 0.5, "p97.5": 2.0}, {"p2.5": 1.4, "p97.5": 1.9}
    assert difficulty.verdict(1.1, narrow) == "meets"
    assert difficulty.verdict(1.6, wide) == "consistent" and difficulty.verdict(1.6, narrow) == "misses"
    assert difficulty.verdict(float("nan"), wide) == "" and difficulty.verdict(0.5, None) == "misses"
    # the command pools two files into one sample (blocks of --block) and writes ratios, intervals and verdicts
    monkeypatch.setattr(difficulty, "N_TREES", 8)
    cat = tmp_path / "cat.txt"
    phot = difficulty.aperture_photometry(labeled)
    rows = [[z, *m, *(m[:-1] - m[1:]), *np.full(5, 0.02)] for z, m in zip(phot["z"], phot["mag"], strict=True)]
    np.savetxt(cat, rows)
    out = tmp_path / "d.json"
    difficulty.main(["--file", str(labeled), str(labeled), "--catalogue", str(cat), "--block", str(N),
                     "--bootstrap", "20", "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["synth"]["n"] == 2 * N and got["real"]["n"] == N
    assert set(got["verdicts"]["overall"]) == {"sigma_mad", "eta"} and len(got["verdicts"]["per_bin"]) == 5
    assert got["bootstrap"]["n_boot"] == 20


def test_bootstrap_ratio_intervals_cover_truth_and_resolve_an_excess():
    from photoz_hpc.sim.difficulty import Z_EDGES, bootstrap_ratios

    rng = np.random.default_rng(5)

    def sample(n, outlier_frac):
        zs = rng.uniform(0.0, 0.4, n)
        dz = rng.normal(0, 0.015, n)
        bad = rng.random(n) < outlier_frac
        dz[bad] = rng.choice([-1, 1], bad.sum()) * rng.uniform(0.06, 0.15, bad.sum())
        return zs + dz * (1 + zs), zs

    real = sample(5000, 0.02)
    same = bootstrap_ratios(sample(20000, 0.02), real, n_boot=200)
    double = bootstrap_ratios(sample(20000, 0.04), real, n_boot=200)
    assert same["overall"]["eta"]["p2.5"] < 1.0 < same["overall"]["eta"]["p97.5"]
    assert same["overall"]["sigma_mad"]["p2.5"] < 1.0 < same["overall"]["sigma_mad"]["p97.5"]
    assert double["overall"]["eta"]["p2.5"] > 1.4  # a 2x excess is resolved overall ...
    per_bin = [b["eta"] for b in double["per_bin"]]
    assert len(per_bin) == len(Z_EDGES) - 1
    # ... while one real bin of ~600 galaxies (~12 outliers) only bounds it loosely
    assert all(b["p97.5"] - b["p2.5"] > 0.8 for b in per_bin), per_bin


def test_noise_depths_calibrated_and_not_deeper_than_sky():
    from photoz_hpc.sim.noise import noise_model, sky_limited_depth
    from photoz_hpc.sim.params import load_calibration

    depth = np.asarray(load_calibration()["noise"]["depth_5sigma"])
    assert np.all(depth <= sky_limited_depth() + 1e-3)
    # the SDSS single-epoch 5-sigma point-source depths are ~22.1, 23.1, 22.7, 22.2, 20.7 (sky-limited in g, r, i)
    assert np.all(np.abs(depth - np.array([22.1, 23.0, 22.5, 22.0, 20.7])) < 0.35)
    _, extra = noise_model()
    assert np.all(extra >= 0)


@pytest.mark.timeout(240)
def test_difficulty_regression_against_shipped_reference(tmp_path):
    """Random-forest photo-z on rendered aperture photometry is as hard as on the real MGS (shipped reference).

    calibration.json["reference"]["difficulty"]["small"]: the real catalogue cut to the same 800 galaxies (mean
    of 10 subsets; their sd is 4% in sigma_MAD and 23% in the outlier rate). This sample (seed 7) gives ratios
    1.06 and 1.10 (calibration v5; v4 1.04 and 1.26, v3 1.05 and 1.21); other 800-galaxy slices of the v5 seed 7
    and 8 surveys 0.95-1.02 and 0.49-1.43. Regressions measured on the same sample (v3) fail: whole-stamp sums instead of the aperture (1.40, 3.8), 0.03 mag extra scatter in g (1.16,
    1.9), 5x the pixel-noise variance (1.16, 1.9). (Calibration version 2, 1.55x the real outlier rate on 5000
    galaxies, is within the sampling noise of 800: 1.04-1.09 and 1.10-1.43.)
    """
    from photoz_hpc.sim.calibrate import DIFFICULTY_TEST_N
    from photoz_hpc.sim.difficulty import aperture_photometry, difficulty
    from photoz_hpc.sim.params import load_calibration

    ref = load_calibration()["reference"]["difficulty"]["small"]
    assert ref["n"] == DIFFICULTY_TEST_N
    path = generate_survey(tmp_path / "diff.h5", n=DIFFICULTY_TEST_N, seed=7, labeled=True, workers=2, chunk=100)
    phot = aperture_photometry(path)
    got = difficulty(phot["mag"], phot["z"])
    ratio_sigma, ratio_eta = got["sigma_mad"] / ref["sigma_mad"], got["eta"] / ref["eta"]
    assert 0.85 < ratio_sigma < 1.13, (got["sigma_mad"], ref)
    assert 0.4 < ratio_eta < 1.75, (got["eta"], ref)
