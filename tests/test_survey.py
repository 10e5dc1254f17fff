"""Survey descriptions: the shipped files validate, SDSS is exactly the paper's numbers, bad files are clear errors,
subsets keep each band's facts, and the docs' table is the shipped files'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.survey import (
    SDSS_GRID,
    RedshiftGrid,
    load_survey,
    presets_table,
    shipped_surveys,
    survey_from_dict,
    survey_of_manifest,
)

REPO = Path(__file__).resolve().parents[1]


def test_sdss_is_the_paper():
    s = load_survey("sdss")
    assert s.bands == ("u", "g", "r", "i", "z") and s.pixel_scale == 0.396 and s.cutout_size == 107
    assert s.extinction_coefficients == (4.239, 3.303, 2.285, 1.698, 1.263)  # SF11 Table 6, as the paper
    assert s.input_coefficients == (5.155, 3.793, 2.751, 2.086, 1.479)  # SDSS DR12's extinction_* columns
    assert (s.crop_size, s.jitter_max) == (64, 7)
    assert s.redshift_grid == SDSS_GRID == RedshiftGrid(0.0, 0.4, 180)
    e = np.random.default_rng(0).uniform(0, 0.3, (7, 5))
    np.testing.assert_array_equal(s.sfd_ebv(e), (e / np.array(s.input_coefficients)).mean(axis=-1))


def test_every_shipped_survey_validates_and_names_its_sources():
    names = [s.name for s in shipped_surveys()]
    assert names == ["sdss", "legacy", "hsc", "lsst"]
    for s in shipped_surveys():
        assert s.spec.extinction_source and len(s.extinction_coefficients) == s.n_bands == len(s.band_labels)
        assert all(b in s.bands for b in s.rgb) and s.crop_size <= s.cutout_size
        # the coefficients decrease to the red, as every extinction curve does
        assert all(np.diff(s.reddening_vector) < 0), s.name
    legacy, hsc, lsst = (load_survey(n) for n in ("legacy", "hsc", "lsst"))
    assert legacy.bands == ("g", "r", "i", "z") and hsc.bands == tuple("grizy") and lsst.bands == tuple("ugrizy")
    assert hsc.extinction_coefficients[0] == 3.240 and lsst.extinction_coefficients[0] == 4.145


def test_grid_bins_and_edges():
    g = RedshiftGrid(0.0, 2.0, 400)
    assert len(g.edges()) == 401 and g.centres()[0] == pytest.approx(0.0025)
    np.testing.assert_array_equal(g.bins(np.array([-1.0, 0.0, 0.0049, 0.005, 1.999, 5.0])), [0, 0, 0, 1, 399, 399])
    assert RedshiftGrid.from_dict(g.to_dict()) == g and RedshiftGrid.from_edges(g.edges()) == g
    with pytest.raises(PhotozError, match="not 3 equal bins"):
        RedshiftGrid.from_edges([0.0, 0.1, 0.3, 0.4])
    with pytest.raises(ConfigError, match="z_min < z_max"):
        RedshiftGrid(0.5, 0.4, 10)


def test_subset_keeps_each_bands_facts_in_the_order_given():
    lsst = load_survey("lsst")
    sub = lsst.subset(["z", "g"])
    assert sub.bands == ("z", "g") and sub.band_labels == ("lsst-z", "lsst-g")
    assert sub.extinction_coefficients == (1.323, 3.237) and sub.input_coefficients == (1.323, 3.237)
    assert sub.spec.synthetic.psf_fwhm == [0.78, 0.87] and all(b in sub.bands for b in sub.rgb)
    assert lsst.subset(list(lsst.bands)) is lsst
    with pytest.raises(PhotozError, match="distinct bands"):
        lsst.subset(["g", "q"])


def test_a_description_round_trips_through_a_manifest():
    legacy = load_survey("legacy").subset(["g", "r", "z"])
    again = survey_of_manifest({"survey": yaml.safe_load(yaml.safe_dump(legacy.to_dict()))}, "x")
    assert again == legacy
    assert survey_of_manifest({}, "old") == load_survey("sdss")  # written before surveys existed


@pytest.mark.parametrize("change, message", [
    ({"extinction_coefficients": [1.0, 2.0]}, "'extinction_coefficients' has 2 entries, 'bands' has 5"),
    ({"rgb": ["i", "r", "q"]}, "'rgb' names bands ['q']"),
    ({"crop_size": 500}, "'crop_size' = 500 must be <= 107"),
    ({"pixle_scale": 0.4}, "unknown config key 'pixle_scale'"),
    ({"redshift_grid": {"z_min": 0.0, "z_max": 0.4, "n_bins": 1}}, "n_bins = 1"),
    ({"extinction_input": {"kind": "per_band", "coefficients": [1.0]}}, "extinction_input.coefficients"),
])
def test_bad_descriptions_are_errors_naming_the_key_and_the_file(tmp_path, change, message):
    values = yaml.safe_load((REPO / "configs" / "surveys" / "sdss.yaml").read_text())
    values.update(change)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError) as err:
        load_survey(path)
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("key", ["zeropoint", "flux_unit", "redshift_grid", "crop_size", "jitter_max", "pixel_scale"])
def test_a_file_missing_a_fact_is_an_error_not_sdss_by_default(tmp_path, key):
    values = yaml.safe_load((REPO / "configs" / "surveys" / "lsst.yaml").read_text())
    del values[key]
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=f"config key '{key}' must be set"):
        load_survey(path)


def test_a_users_file_loads_by_path_and_an_unknown_name_is_an_error(tmp_path):
    values = yaml.safe_load((REPO / "configs" / "surveys" / "hsc.yaml").read_text())
    values["name"] = "my-hsc"
    path = tmp_path / "my_hsc.yaml"
    path.write_text(yaml.safe_dump(values))
    assert load_survey(str(path)).name == "my-hsc"
    with pytest.raises(ConfigError, match="unknown survey 'hcs'"):
        load_survey("hcs")


def test_check_same_bands_names_both_lists_and_filters():
    legacy = load_survey("legacy")
    grz, sdss = legacy.subset(["g", "r", "z"]), load_survey("sdss")
    with pytest.raises(PhotozError, match=r"has bands \['g', 'r', 'z'\].*has bands \['u', 'g', 'r', 'i', 'z'\]"):
        grz.check_same_bands(sdss, "model", "data")
    with pytest.raises(PhotozError, match=r"\['g', 'r', 'z'\].*\['z', 'r', 'g'\]"):  # same bands, other order
        grz.check_same_bands(legacy.subset(["z", "r", "g"]), "model", "data")
    hsc, lsst = load_survey("hsc"), load_survey("lsst").subset(list("grizy"))
    with pytest.raises(PhotozError, match=r"\['hsc-g', .*\['lsst-g', "):  # same letters, other filters
        hsc.check_same_bands(lsst, "model", "data")
    grz.check_same_bands(legacy.subset(["g", "r", "z"]), "model", "data")  # the same: no error
    other_vector = survey_from_dict({**grz.to_dict(), "extinction_coefficients": [3.0, 2.0, 1.0]}, "mine")
    with pytest.raises(PhotozError, match=r"extinction coefficients \[3.214, 2.165, 1.211\].*\[3.0, 2.0, 1.0\]"):
        grz.check_same_bands(other_vector, "model", "data")


def test_resume_facts_ignore_prose_but_not_numbers():
    from photoz_hpc.train.resume import records_mismatch

    sdss = load_survey("sdss").to_dict()
    edited = {**sdss, "description": "typo fixed", "extinction_source": "a better citation"}
    assert records_mismatch({"survey": sdss}, {"survey": edited}) == []
    moved = {**sdss, "pixel_scale": 0.4}
    assert records_mismatch({"survey": sdss}, {"survey": moved}) == ["survey: 'sdss' bands ['u', 'g', 'r', 'i', 'z'] -> "
                                                                      "'sdss' bands ['u', 'g', 'r', 'i', 'z'] (it differs "
                                                                      "in ['pixel_scale'])"]


def test_docs_hold_the_presets_table():
    assert presets_table() in (REPO / "docs" / "surveys.md").read_text(), "regenerate: python -m photoz_hpc.survey"


def test_survey_from_dict_rejects_a_non_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        survey_from_dict(["sdss"], "manifest")  # type: ignore[arg-type]
