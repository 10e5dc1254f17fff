"""``prepare`` of Multimodal Universe image samples: survey from image_band, bit-exact pixels, ids, E(B-V), labels."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import process_env, run_cli
from test_store import _mpirun

from photoz_hpc import mmu_layout as L
from photoz_hpc.data import open_dataset
from photoz_hpc.data import prepare as prepare_mod
from photoz_hpc.data.inputs import PrepareOptions
from photoz_hpc.data.prepare import prepare
from photoz_hpc.data.stats import reference_median_mad
from photoz_hpc.data.verify import dataset_info, verify_dataset
from photoz_hpc.errors import InputDataError, PhotozError
from photoz_hpc.survey import load_survey

SIZE = 24


def _images(rng: np.random.Generator, n: int, bands: int) -> np.ndarray:
    return (rng.standard_normal((n, bands, SIZE, SIZE)) * 0.05 + rng.uniform(0, 1, (n, bands, 1, 1))).astype(np.float32)


def legacy_file(root: Path, healpix: int, n: int, seed: int, long_ids: bool = False, **extra) -> Path:
    """DR10 legacysurvey-like: des-g/r/i/z, BRICKNAME-OBJID string ids, EBV, one mask per cutout, ivar, no z_spec."""
    labels = extra.pop("_labels", L.labels_of(load_survey("legacy")))
    rng = np.random.default_rng(seed)
    ids = [f"{1000 + seed:04d}m{seed:03d}-{i}" + ("x" * 7 if long_ids and i == 0 else "") for i in range(n)]
    cols = {"ra": rng.uniform(0, 360, n), "dec": rng.uniform(-30, 30, n), "EBV": rng.uniform(0.01, 0.1, n).astype(np.float32),
            "image_ivar": rng.uniform(1, 2, (n, 4, SIZE, SIZE)).astype(np.float32),
            "image_mask": rng.uniform(size=(n, SIZE, SIZE)) > 0.1, "TYPE": np.array(["EXP"] * n)}
    cols.update(extra)
    cols = {k: v for k, v in cols.items() if v is not None}
    return L.write_mmu_file(L.healpix_file(root, "dr10_south_21", healpix), _images(rng, n, 4), labels, 0.262,
                            [1.3, 1.2, 1.1, 1.1], ids, cols, compression="lzf")


def ssl_file(root: Path, healpix: int, n: int, seed: int) -> Path:
    """ssl_legacysurvey-like: des-g/r/z, int64 ids, lower-case ebv, z_spec with missing values (-99, NaN)."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.01, 0.6, n)
    z[::5], z[1::7] = -99.0, np.nan
    cols = {"ra": rng.uniform(0, 360, n), "dec": rng.uniform(-30, 30, n), "ebv": rng.uniform(0.01, 0.1, n).astype(np.float32),
            "z_spec": z.astype(np.float32)}
    return L.write_mmu_file(L.healpix_file(root, "south", healpix), _images(rng, n, 3), ["des-g", "des-r", "des-z"],
                            0.262, [1.2, 1.1, 1.0], np.arange(n, dtype=np.int64) + 10_000 * seed, cols)


def hsc_file(root: Path, healpix: int, n: int, seed: int, **extra) -> Path:
    """hsc-like: hsc-g..hsc-y, int64 ids (beyond 2^53), per-band a_g..a_y, per-band masks, no z_spec, gzip."""
    rng = np.random.default_rng(seed)
    ebv = rng.uniform(0.01, 0.1, n)
    coef = np.asarray(load_survey("hsc").input_coefficients)
    cols = {"ra": rng.uniform(0, 360, n), "dec": rng.uniform(-30, 30, n),
            **{f"a_{b}": (ebv * c * rng.uniform(0.98, 1.02, n)).astype(np.float32) for b, c in zip("grizy", coef, strict=True)},
            "image_mask": rng.uniform(size=(n, 5, SIZE, SIZE)) > 0.1}
    cols.update(extra)
    cols = {k: v for k, v in cols.items() if v is not None}
    ids = np.arange(n, dtype=np.int64) + 36_000_000_000_000_000 + 1000 * seed
    return L.write_mmu_file(L.healpix_file(root, "pdr3_dud_22.5", healpix), _images(rng, n, 5),
                            L.labels_of(load_survey("hsc")), 0.168, 0.7, ids, cols, compression="gzip")


def _read(path: Path, key: str) -> np.ndarray:
    with h5py.File(path, "r") as fh:
        ds = fh[key]
        return ds.asstr()[:] if h5py.check_string_dtype(ds.dtype) else ds[:]


def _stored_images(ds) -> np.ndarray:
    return np.stack([ds.image_hwc(i) for i in range(len(ds))])


def test_legacysurvey_string_ids_and_ebv_round_trip_bit_exact(tmp_path):
    a = legacy_file(tmp_path / "in", 2, 9, seed=1)
    b = legacy_file(tmp_path / "in", 11, 7, seed=2, long_ids=True)  # a longer id in the second file: width from data
    out = prepare([tmp_path / "in"], tmp_path / "ds", samples_per_shard=5)  # a directory: <sample>/healpix=N/*.hdf5
    ds = open_dataset(out)
    files = sorted([a, b], key=str)
    assert ds.survey.name == "legacy" and ds.bands == ("g", "r", "i", "z") and len(ds) == 16
    images = np.concatenate([_read(f, "image_array") for f in files])
    assert _stored_images(ds).tobytes() == np.ascontiguousarray(images.transpose(0, 2, 3, 1)).tobytes()
    ids = np.concatenate([_read(f, "object_id") for f in files])
    assert ds.id_field == "object_id" and ds.object_ids.tolist() == [str(v) for v in ids]
    assert max(len(v) for v in ds.object_ids) == len("1002m002-0xxxxxxx")
    assert ds[3]["object_id"] == str(ids[3]) and isinstance(ds[3]["object_id"], str)
    ebv = np.concatenate([_read(f, "EBV") for f in files]).astype(np.float64)
    np.testing.assert_array_equal(ds.meta["ebv_sfd"], ebv)
    np.testing.assert_array_equal(ds.meta["e_bv"], ebv[:, None] * load_survey("legacy").reddening_vector)
    np.testing.assert_array_equal(ds.meta["ra"], np.concatenate([_read(f, "ra") for f in files]))
    assert np.isnan(ds.meta["specz_redshift"]).all()
    man = ds.manifest
    assert man["survey"]["name"] == "legacy" and man["survey"]["cutout_size"] == SIZE and man["input_layout"] == "mmu"
    legacy = load_survey("legacy")  # the default view (96 + 2 x 11 px) shrunk in proportion to the 24 px cutouts
    assert man["survey"]["crop_size"] == 96 * SIZE // 118 == 19 and man["survey"]["jitter_max"] == (SIZE - 19) // 2
    assert (legacy.crop_size, legacy.jitter_max) == (96, 11)
    assert man["id_field"] == "object_id" and man["labeled_count"] == 0
    assert man["mmu"]["has_mask"] == [True, True] and man["mmu"]["has_ivar"] == [True, True]
    assert man["mmu"]["extinction"][0]["columns"] == ["EBV"] and man["mmu"]["image_band"] == ["des-g", "des-r", "des-i", "des-z"]
    median, mad = reference_median_mad(images.transpose(0, 2, 3, 1))
    assert man["pixel_stats"]["median"] == median.tolist() and man["pixel_stats"]["mad"] == mad.tolist()
    assert verify_dataset(out)["survey"] == "legacy"
    info = dataset_info(out)
    assert info["survey"] == "legacy" and info["bands"] == ["g", "r", "i", "z"] and info["id_field"] == "object_id"


def test_ssl_z_spec_missing_values_are_unlabeled_and_int_ids_kept(tmp_path):
    src = ssl_file(tmp_path, 5, 20, seed=3)
    ds = open_dataset(prepare([src], tmp_path / "ds"))
    assert ds.survey.name == "legacy" and ds.bands == ("g", "r", "z")  # legacy's labels, the files' subset
    z = _read(src, "z_spec").astype(np.float64)
    usable = np.isfinite(z) & (z >= 0)
    assert 0 < usable.sum() < len(z)
    np.testing.assert_array_equal(ds.meta["specz_redshift"][usable], z[usable])
    assert np.isnan(ds.meta["specz_redshift"][~usable]).all() and ds.manifest["labeled_count"] == usable.sum()
    assert ds.meta["object_id"].dtype == np.int64 and ds.object_ids.tolist() == _read(src, "object_id").tolist()
    np.testing.assert_array_equal(ds.meta["ebv_sfd"], _read(src, "ebv").astype(np.float64))
    assert ds.manifest["mmu"]["redshift_labels"] == "z_spec column"


def test_hsc_per_band_extinction_and_bands_subset_order(tmp_path):
    src = hsc_file(tmp_path, 7, 12, seed=4)
    full = open_dataset(prepare([src], tmp_path / "full"))
    survey = load_survey("hsc")
    a = np.stack([_read(src, f"a_{b}") for b in "grizy"], axis=-1).astype(np.float64)
    np.testing.assert_array_equal(full.meta["e_bv"], a)
    np.testing.assert_allclose(full.meta["ebv_sfd"], (a / np.array(survey.input_coefficients)).mean(-1), rtol=1e-12)
    assert full.object_ids.tolist() == _read(src, "object_id").tolist()  # 64-bit ids beyond 2^53 survive
    sub = open_dataset(prepare([src], tmp_path / "zg", options=PrepareOptions(bands=("z", "g"))))
    assert sub.bands == ("z", "g") and sub.image_shape == (SIZE, SIZE, 2)
    assert sub.manifest["survey"]["band_labels"] == ["hsc-z", "hsc-g"] and sub.manifest["bands"] == ["z", "g"]
    images = _read(src, "image_array")
    assert _stored_images(sub).tobytes() == np.ascontiguousarray(images[:, [3, 0]].transpose(0, 2, 3, 1)).tobytes()
    np.testing.assert_array_equal(sub.meta["e_bv"], a[:, [3, 0]])
    np.testing.assert_allclose(sub.meta["ebv_sfd"], (a[:, [3, 0]] / np.array([1.263, 3.240])).mean(-1), rtol=1e-12)
    with pytest.raises(PhotozError, match=r"no band\(s\) \['u'\]"):
        prepare([src], tmp_path / "u", options=PrepareOptions(bands=("g", "u")))


def test_missing_extinction_is_an_error_unless_no_extinction(tmp_path, caplog):
    src = hsc_file(tmp_path, 1, 6, seed=5, a_i=None)
    with pytest.raises(InputDataError, match=r"001-of-001.hdf5: no Galactic extinction.*a_i.*--no-extinction"):
        prepare([src], tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()
    ds = open_dataset(prepare([src], tmp_path / "ds", options=PrepareOptions(no_extinction=True)))
    assert (ds.meta["ebv_sfd"] == 0).all() and (ds.meta["e_bv"] == 0).all()
    assert ds.manifest["mmu"]["no_extinction"] is True and "none" in ds.manifest["mmu"]["extinction"][0]["source"]
    assert "--no-extinction: E(B-V) = 0 is stored although" in caplog.text  # its a_g ... a_z are ignored, said so
    # a subset without the band that lacks a_<band> needs no flag
    ds = open_dataset(prepare([src], tmp_path / "grz", options=PrepareOptions(bands=("g", "r", "z"))))
    assert (ds.meta["ebv_sfd"] > 0).all()


def test_unknown_mismatched_and_differing_band_lists_are_errors(tmp_path):
    odd = legacy_file(tmp_path / "odd", 1, 4, seed=6, _labels=["decam-g", "decam-r", "decam-i", "decam-z"])
    with pytest.raises(InputDataError, match=r"odd/.*image_band \['decam-g'.*matches no shipped survey.*--survey FILE"):
        prepare([odd], tmp_path / "ds")
    leg = legacy_file(tmp_path / "leg", 1, 4, seed=7)
    with pytest.raises(InputDataError, match=r"does not match survey 'hsc'"):
        prepare([leg], tmp_path / "ds", options=PrepareOptions(survey="hsc"))
    ssl = ssl_file(tmp_path / "ssl", 1, 4, seed=8)
    with pytest.raises(InputDataError, match=r"ssl/.*image_band \['des-g', 'des-r', 'des-z'\] differs from .*leg/"):
        prepare([leg, ssl], tmp_path / "ds")
    wrong_scale = tmp_path / "scale.hdf5"
    L.write_mmu_file(wrong_scale, np.zeros((3, 4, SIZE, SIZE), np.float32), L.labels_of(load_survey("legacy")), 0.3,
                     1.0, [1, 2, 3], {"ra": np.zeros(3), "dec": np.zeros(3), "EBV": np.zeros(3)})
    with pytest.raises(InputDataError, match=r"scale.hdf5: image_band .* at 0.3 arcsec/px matches no shipped survey"):
        prepare([wrong_scale], tmp_path / "ds")
    mixed = tmp_path / "mixed.hdf5"
    with h5py.File(leg, "r") as fh, h5py.File(mixed, "w") as out:
        for key in fh:
            out.create_dataset(key, data=fh[key][:])
        bands = fh["image_band"][:]
    bands[2] = [b"des-z", b"des-r", b"des-i", b"des-g"]
    with h5py.File(mixed, "a") as out:
        out["image_band"][...] = bands
    with pytest.raises(InputDataError, match=r"mixed.hdf5: 'image_band' differs between rows"):
        prepare([mixed], tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


def test_duplicate_ids_mixed_layouts_and_bad_pixels(tmp_path, release_h5):
    a = ssl_file(tmp_path / "a", 1, 5, seed=9)
    b = ssl_file(tmp_path / "b", 1, 5, seed=9)  # the same ids again
    with pytest.raises(InputDataError, match=r"object_id 90000 occurs twice"):
        prepare([a, b], tmp_path / "ds")
    with pytest.raises(InputDataError, match="mix the release layout"):
        prepare([a, release_h5("r.h5", 3)], tmp_path / "ds")
    with h5py.File(a, "a") as fh:
        fh["image_array"][3, 1, 2, 2] = np.nan
    with pytest.raises(InputDataError, match=r"a/south/healpix=1/001-of-001.hdf5: row 3 has NaN/inf pixels"):
        prepare([a], tmp_path / "ds")
    ds = open_dataset(prepare([a], tmp_path / "ds", bad_row_policy="skip"))
    assert len(ds) == 4 and 90003 not in ds.object_ids.tolist() and ds.manifest["skipped"][0]["row"] == 3


def _write_csv(path: Path, rows: list[tuple], header=("object_id", "z_spec")) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_labels_csv_join_reports_ids_without_images(tmp_path, caplog):
    src = hsc_file(tmp_path, 3, 10, seed=10)
    ids = _read(src, "object_id").tolist()
    rows = [(ids[0], 0.31), (ids[2], 0.5), (ids[4], ""), (ids[5], -1), (123, 0.2), (456, 0.3)]
    labels = _write_csv(tmp_path / "labels.csv", rows)
    ds = open_dataset(prepare([src], tmp_path / "ds", options=PrepareOptions(labels=str(labels))))
    z = ds.meta["specz_redshift"]
    assert z[0] == 0.31 and z[2] == 0.5 and np.isnan(np.delete(z, [0, 2])).all()
    report = ds.manifest["mmu"]["labels"]
    assert report["rows"] == 6 and report["matched"] == 4 and report["labeled_images"] == 2
    assert report["not_in_images"] == 2 and report["not_in_images_examples"] == [123, 456]
    assert ds.manifest["labeled_count"] == 2 and ds.manifest["mmu"]["redshift_labels"] == "labels file"
    assert "2 of 6 ids" in caplog.text and "have no image" in caplog.text
    other_key = _write_csv(tmp_path / "zbest.csv", [(ids[1], 0.7)], header=("object_id", "zbest"))
    ds = open_dataset(prepare([src], tmp_path / "zb", options=PrepareOptions(labels=str(other_key), redshift_key="zbest")))
    assert ds.meta["specz_redshift"][1] == 0.7 and ds.manifest["labeled_count"] == 1


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([(1, 0.1), (1, 0.2)], ("object_id", "z_spec"), "duplicate object_id"),
        ([(1, 0.1)], ("id", "z_spec"), r"lacks column\(s\) \['object_id'\]"),
        ([(1, "high")], ("object_id", "z_spec"), "row 1 of column 'z_spec' is not a number"),
        ([("abc", 0.1)], ("object_id", "z_spec"), "must hold integer ids"),
        ([], ("object_id", "z_spec"), "has no rows"),
    ],
)
def test_bad_labels_file_is_rejected_naming_it(tmp_path, rows, header, message):
    src = hsc_file(tmp_path, 3, 4, seed=11)
    bad = _write_csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(InputDataError, match=f"bad.csv: .*{message}"):
        prepare([src], tmp_path / "ds", options=PrepareOptions(labels=str(bad)))
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


def test_labels_parquet_with_string_ids(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = legacy_file(tmp_path / "in", 4, 6, seed=12)
    ids = _read(src, "object_id").tolist()
    pq.write_table(pa.table({"object_id": [ids[1], ids[3], "nosuch-1"], "z_spec": [0.12, 0.4, 0.3]}), tmp_path / "z.parquet")
    ds = open_dataset(prepare([src], tmp_path / "ds", options=PrepareOptions(labels=str(tmp_path / "z.parquet"))))
    z = ds.meta["specz_redshift"]
    assert z[1] == 0.12 and z[3] == 0.4 and np.isnan(z[[0, 2, 4, 5]]).all()
    assert ds.manifest["mmu"]["labels"]["not_in_images_examples"] == ["nosuch-1"]


def test_labels_parquet_with_float_ids_is_an_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = hsc_file(tmp_path, 3, 4, seed=11)
    ids = _read(src, "object_id").astype(np.float64)  # a float column: ids above 2**53 have lost digits
    pq.write_table(pa.table({"object_id": ids, "z_spec": np.full(len(ids), 0.2)}), tmp_path / "z.parquet")
    with pytest.raises(InputDataError, match=r"z.parquet: column 'object_id' holds non-integer values"):
        prepare([src], tmp_path / "ds", options=PrepareOptions(labels=str(tmp_path / "z.parquet")))


def test_interrupted_mmu_prepare_resumes_and_settings_must_match(tmp_path, monkeypatch):
    src = hsc_file(tmp_path, 2, 14, seed=13)
    reference = prepare([src], tmp_path / "ref", samples_per_shard=4)
    real_write = prepare_mod.write_shard
    written = []

    def fail_on_third(out, plan, *args):
        if plan.index == 2:
            raise OSError(5, "Input/output error")
        written.append(plan.index)
        return real_write(out, plan, *args)

    monkeypatch.setattr(prepare_mod, "write_shard", fail_on_third)
    with pytest.raises(PhotozError, match="re-run the same command to resume"):
        prepare([src], tmp_path / "ds", samples_per_shard=4)
    with pytest.raises(PhotozError, match="unfinished prepare of different inputs or settings"):
        prepare([src], tmp_path / "ds", samples_per_shard=4, options=PrepareOptions(bands=("g", "r")))
    written.clear()
    monkeypatch.setattr(prepare_mod, "write_shard", lambda out, plan, *a: (written.append(plan.index), real_write(out, plan, *a))[1])
    out = prepare([src], tmp_path / "ds", samples_per_shard=4)
    assert written == [2, 3]  # shards 0 and 1 were committed by the failed run
    assert json.loads((out / "manifest.json").read_text())["shards"] == json.loads((reference / "manifest.json").read_text())["shards"]
    assert verify_dataset(out)["ok"]


def test_cli_prepare_mmu_directory_verify_info(tmp_path, capsys):
    from photoz_hpc.cli import main

    ssl_file(tmp_path / "in", 1, 6, seed=14)
    ssl_file(tmp_path / "in", 2, 5, seed=15)
    assert main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "ds"), "--bands", "r,g", "--mpi", "serial"]) == 0
    assert main(["verify", str(tmp_path / "ds")]) == 0
    assert "survey legacy, bands r g" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "ds"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["survey"] == "legacy" and info["bands"] == ["r", "g"] and info["count"] == 11
    assert main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "x"), "--bands", "g,g"]) == 1
    assert "must list distinct band names" in capsys.readouterr().err
    res = run_cli("prepare", str(tmp_path / "in"), "--out", str(tmp_path / "y"), "--labels", str(tmp_path / "no.csv"))
    assert res.returncode == 1 and "no.csv: labels file does not exist" in res.stderr


def test_mmu_prepare_under_mpirun_matches_serial(tmp_path):
    a, b = legacy_file(tmp_path / "in", 1, 7, seed=16), legacy_file(tmp_path / "in", 2, 6, seed=17, long_ids=True)
    serial = prepare([a, b], tmp_path / "serial", samples_per_shard=3)
    cmd = [*_mpirun(), sys.executable, "-m", "photoz_hpc", "prepare", str(a), str(b), "--out", str(tmp_path / "mpi"),
           "--samples-per-shard", "3", "--mpi", "mpi"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=process_env(), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    ms = json.loads((serial / "manifest.json").read_text())
    mm = json.loads((tmp_path / "mpi" / "manifest.json").read_text())
    assert mm["shards"] == ms["shards"] and mm["pixel_stats"] == ms["pixel_stats"] and mm["meta_dtype"] == ms["meta_dtype"]
    assert open_dataset(tmp_path / "mpi").object_ids.tolist() == open_dataset(serial).object_ids.tolist()
