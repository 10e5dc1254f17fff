"""photoz_hpc.metrics: LSST DESC qp's published values, a live comparison with qp, hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from photoz_hpc.metrics import DEFAULT_Z_BINS, format_metrics_table, photoz_metrics

# --- (a) published values -----------------------------------------------------------------------
# LSSTDESC/qp tests/qp/test_point_metrics.py (the same constants in RAIL's evaluation tests):
# SIGIQR = 0.0045947, BIAS = -0.00001576 (qp's PointBias is the median), OUTRATE = 0.0,
# SIGMAD = 0.0046489. Their tolerance is np.isclose's default; we allow half a unit in the last
# published digit instead, which is the precision the constants carry.
QP_SIGMA_IQR, QP_BIAS_MEDIAN, QP_OUTLIER_RATE, QP_SIGMA_MAD = 0.0045947, -0.00001576, 0.0, 0.0046489


def qp_published_sample() -> tuple[np.ndarray, np.ndarray]:
    """(z_phot, z_spec) of qp's published test, regenerated without qp.

    qp seeds numpy's legacy global generator with 87, draws 399 true redshifts U(0, 2.5), then Gaussian
    pdfs centred on z_true + N(0, 0.01), tabulates them on 301 points of [0, 2.5] and takes the mode on
    that grid. The mode of a tabulated unimodal symmetric pdf is the grid point nearest its centre, so
    z_phot is that grid point (the later draw of the pdf widths does not change it).
    """
    rng = np.random.RandomState(87)  # the same stream as np.random.seed(87)
    z_true = rng.uniform(high=2.5, size=399)
    centre = z_true + rng.normal(0.0, 0.01, 399)
    grid = np.linspace(0.0, 2.5, 301)
    z_phot = grid[np.argmin(np.abs(centre[:, None] - grid[None, :]), axis=1)]
    return z_phot, z_true


def test_reproduces_qp_published_point_metrics():
    z_phot, z_spec = qp_published_sample()
    m = photoz_metrics(z_phot, z_spec, z_bins=[0.0, 2.5])
    assert m["n"] == 399
    assert m["sigma_iqr"] == pytest.approx(QP_SIGMA_IQR, abs=5e-8)
    assert m["bias_median"] == pytest.approx(QP_BIAS_MEDIAN, abs=5e-9)
    assert m["outlier_rate_lsst"] == QP_OUTLIER_RATE
    assert m["sigma_mad"] == pytest.approx(QP_SIGMA_MAD, abs=5e-8)


# --- (b) live comparison with qp's own classes ----------------------------------------------------
@pytest.mark.parametrize("scatter", [0.01, 0.04])  # 3 sigma_IQR below and above the 0.06 floor
def test_matches_qp_point_metric_classes(scatter):
    pytest.importorskip("qp", reason="qp-prob (the dev extra) is not installed")
    from qp.metrics.point_estimate_metric_classes import PointBias, PointOutlierRate, PointSigmaIQR, PointSigmaMAD

    rng = np.random.default_rng(11)
    z_spec = rng.uniform(0.01, 0.4, 3000)
    z_phot = z_spec + scatter * (1 + z_spec) * rng.standard_normal(3000) + 0.003
    bad = rng.random(3000) < 0.05
    z_phot[bad] = rng.uniform(0.0, 0.6, bad.sum())
    m = photoz_metrics(z_phot, z_spec)
    assert m["sigma_mad"] == pytest.approx(PointSigmaMAD().evaluate(z_phot, z_spec), rel=1e-12)
    assert m["sigma_iqr"] == pytest.approx(PointSigmaIQR().evaluate(z_phot, z_spec), rel=1e-12)
    assert m["bias_median"] == pytest.approx(PointBias().evaluate(z_phot, z_spec), rel=1e-12)
    assert m["outlier_rate_lsst"] == PointOutlierRate().evaluate(z_phot, z_spec)
    assert 0 < m["outlier_rate_lsst"] < 0.2


# --- (c) hand-computed cases ---------------------------------------------------------------------
def test_hand_computed_five_galaxies():
    z_spec = np.array([0.0, 0.25, 0.5, 1.0, 0.25])
    z_phot = np.array([0.01, 0.225, 0.5, 1.11, 0.35])
    # dz = (zp - zs)/(1 + zs) = 0.01/1, -0.025/1.25, 0/1.5, 0.11/2, 0.1/1.25
    dz = [0.01, -0.02, 0.0, 0.055, 0.08]  # sorted: -0.02, 0, 0.01, 0.055, 0.08
    median = 0.01
    # |dz - median| = 0, 0.03, 0.01, 0.045, 0.07 -> sorted 0, 0.01, 0.03, 0.045, 0.07 -> median 0.03
    sigma_mad = 1.4826 * 0.03
    # numpy's linear percentiles of 5 sorted values: P25 = 2nd value = 0, P75 = 4th value = 0.055
    sigma_iqr = (0.055 - 0.0) / 1.349  # 0.0408: 3 sigma = 0.122 > 0.06, so nobody is an LSST outlier
    m = photoz_metrics(z_phot, z_spec)
    assert m["n"] == 5
    assert m["bias"] == pytest.approx(sum(dz) / 5)  # 0.125 / 5 = 0.025
    assert m["bias_median"] == pytest.approx(median)
    assert m["sigma_mad"] == pytest.approx(sigma_mad)
    assert m["sigma_iqr"] == pytest.approx(sigma_iqr)
    assert m["eta"] == 2 / 5  # 0.055 and 0.08 exceed 0.05
    assert m["outlier_rate_lsst"] == 0.0


def test_hand_computed_outlier_floor_and_even_count():
    z_spec = np.zeros(6)  # dz = z_phot exactly
    z_phot = np.array([0.0, 0.01, -0.01, 0.02, -0.07, 0.055])  # sorted -0.07, -0.01, 0, 0.01, 0.02, 0.055
    m = photoz_metrics(z_phot, z_spec)
    # median of 6 values = mean of the 3rd and 4th = 0.005
    assert m["bias_median"] == pytest.approx(0.005)
    assert m["bias"] == pytest.approx((0.0 + 0.01 - 0.01 + 0.02 - 0.07 + 0.055) / 6)
    # |dz - 0.005| = 0.005, 0.005, 0.015, 0.015, 0.075, 0.05 -> median (0.015 + 0.015) / 2
    assert m["sigma_mad"] == pytest.approx(1.4826 * 0.015)
    # P25 at position 1.25: -0.01 + 0.25 * 0.01; P75 at position 3.75: 0.01 + 0.75 * 0.01
    sigma_iqr = ((0.01 + 0.75 * 0.01) - (-0.01 + 0.25 * 0.01)) / 1.349  # 0.0185: 3 sigma = 0.056 < 0.06
    assert m["sigma_iqr"] == pytest.approx(sigma_iqr)
    assert m["outlier_rate_lsst"] == 1 / 6  # only |-0.07| > max(0.06, 0.056)
    assert m["eta"] == 2 / 6  # -0.07 and 0.055


def test_lsst_outlier_test_is_on_abs_dz_not_on_distance_to_median():
    # A biased sample: qp tests |dz| > max(0.06, 3 sigma_IQR), so 0.07 is an outlier even though it
    # is only 0.025 from the median; eta counts |dz| > 0.05 only.
    z_phot = np.array([0.045, 0.045, 0.045, 0.045, 0.07])
    m = photoz_metrics(z_phot, np.zeros(5))
    assert m["sigma_iqr"] == 0.0 and m["sigma_mad"] == 0.0
    assert m["outlier_rate_lsst"] == 1 / 5
    assert m["eta"] == 1 / 5


# --- (d) per-bin split ---------------------------------------------------------------------------
def test_per_bin_split_edges_empty_bins_and_outside_galaxies():
    z_spec = np.array([0.02, 0.05, 0.1, 0.12, 0.18, 0.35, 0.5])
    z_phot = z_spec + np.array([0.01, -0.01, 0.02, 0.0, 0.03, 0.1, -0.2])
    m = photoz_metrics(z_phot, z_spec, z_bins=[0.0, 0.1, 0.2, 0.3])
    assert m["n"] == 7
    rows = m["per_bin"]
    assert [(r["z_lo"], r["z_hi"]) for r in rows] == [(0.0, 0.1), (0.1, 0.2), (0.2, 0.3)]
    assert [r["n"] for r in rows] == [2, 3, 0]  # bins are [lo, hi): 0.1 goes up; 0.35, 0.5 are in no bin
    for row, sel in zip(rows[:2], (slice(0, 2), slice(2, 5)), strict=True):
        sub = photoz_metrics(z_phot[sel], z_spec[sel])
        for key in ("sigma_mad", "sigma_iqr", "eta", "bias", "bias_median", "outlier_rate_lsst", "n"):
            assert row[key] == sub[key]
    assert rows[1]["bias"] == pytest.approx((0.02 / 1.1 + 0.0 + 0.03 / 1.18) / 3)
    empty = rows[2]
    assert all(math.isnan(empty[k]) for k in ("sigma_mad", "sigma_iqr", "eta", "bias", "bias_median",
                                               "outlier_rate_lsst"))


def test_default_bins_and_json_serialisable():
    rng = np.random.default_rng(0)
    z_spec = rng.uniform(0.0, 0.3, 200)  # nothing above 0.3: the last two default bins are empty
    m = photoz_metrics(z_spec + 0.01 * rng.standard_normal(200), z_spec)
    assert [r["z_lo"] for r in m["per_bin"]] == list(DEFAULT_Z_BINS[:-1])
    assert [r["z_hi"] for r in m["per_bin"]] == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
    assert sum(r["n"] for r in m["per_bin"]) == 200
    assert [r["n"] for r in m["per_bin"][-2:]] == [0, 0]
    back = json.loads(json.dumps(m))  # NaN is written as the token NaN and read back
    assert back["sigma_mad"] == m["sigma_mad"] and math.isnan(back["per_bin"][-1]["eta"])
    for value in [v for k, v in m.items() if k != "per_bin"] + [v for r in m["per_bin"] for v in r.values()]:
        assert type(value) in (float, int)


# --- (e) bad inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize(("z_phot", "z_spec", "match"), [
    (np.zeros(3), np.zeros(4), "differ in shape"),
    (np.zeros((3, 1)), np.zeros(3), "differ in shape"),
    (np.array([]), np.array([]), "at least one galaxy"),
    (np.array([0.1, np.nan, 0.2, np.inf, 0.3]), np.full(5, 0.1), "z_phot: 2 of 5 values are not finite"),
    (np.full(3, 0.1), np.array([0.1, 0.2, -np.inf]), "z_spec: 1 of 3 values are not finite"),
    (np.full(2, 0.1), np.array([0.1, -1.0]), "<= -1"),
])
def test_bad_inputs_raise(z_phot, z_spec, match):
    with pytest.raises(ValueError, match=match):
        photoz_metrics(z_phot, z_spec)


@pytest.mark.parametrize("bins", [[0.1], [0.0, 0.2, 0.1], [[0.0, 0.1]], [0.0, np.nan]])
def test_bad_bins_raise(bins):
    with pytest.raises(ValueError, match="z_bins"):
        photoz_metrics(np.full(3, 0.1), np.full(3, 0.1), z_bins=bins)


# --- the report table ----------------------------------------------------------------------------
def test_format_metrics_table():
    a = photoz_metrics(np.array([0.01, 0.225, 0.5, 1.11, 0.35]), np.array([0.0, 0.25, 0.5, 1.0, 0.25]))
    empty = photoz_metrics(np.zeros(2), np.zeros(2), z_bins=[1.0, 2.0])["per_bin"][0]
    table = format_metrics_table({"ours": a, "empty bin": empty})
    lines = table.splitlines()
    assert lines[0] == "| method | sigma_MAD | eta (%) | bias | outlier rate LSST (%) | n |"
    assert lines[2] == "| ours | 0.04448 | 40.00 | +0.02500 | 0.00 | 5 |"
    assert lines[3] == "| empty bin | n/a | n/a | n/a | n/a | 0 |"
    with pytest.raises(KeyError, match="lack"):
        format_metrics_table({"bad": {"sigma_mad": 0.1}})
