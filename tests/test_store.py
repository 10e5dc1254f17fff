"""The sharded cutout store: prepare -> verify -> open_dataset, resume, stats and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import process_env, run_cli

from photoz_hpc.data import format as store_format
from photoz_hpc.data import open_dataset
from photoz_hpc.data import prepare as prepare_mod
from photoz_hpc.data.inputs import PrepareOptions
from photoz_hpc.data.prepare import plan_shards, prepare
from photoz_hpc.data.stats import reference_median_mad
from photoz_hpc.data.verify import dataset_info, verify_dataset
from photoz_hpc.errors import DatasetError, InputDataError, PhotozError
from photoz_hpc.survey import load_survey

REPO = Path(__file__).resolve().parents[1]


def _all_images(paths):
    return np.concatenate([h5py.File(p, "r")["images"][:] for p in paths])


def test_round_trip_is_bit_exact_with_metadata(release_h5, tmp_path):
    a = release_h5("a.h5", 30, seed=1)
    b = release_h5("b.h5", 11, seed=2, labeled=False)
    out = prepare([a, b], tmp_path / "ds", samples_per_shard=8)
    ds = open_dataset(out)
    assert len(ds) == 41 and len(ds.shards) == 6
    images = _all_images([a, b])
    for i in (0, 7, 8, 29, 30, 40):
        item = ds[i]
        assert item["image"].dtype == np.float32 and item["image"].shape == (5, 107, 107)
        assert item["image"].tobytes() == images[i].tobytes()
    with h5py.File(a, "r") as fh:
        item = ds[5]
        assert item["specz_redshift"] == float(fh["specz_redshift"][5])
        assert item["ObjID"] == int(fh["ObjID"][5]) and item["specObjID"] == int(fh["specObjID"][5])
        np.testing.assert_array_equal(item["e_bv"], fh["e_bv"][5].astype(np.float64))
        assert item["ebv_sfd"] == pytest.approx(float(load_survey("sdss").sfd_ebv(fh["e_bv"][5])), rel=1e-12)
        assert item["ra"] == fh["ra"][5] and item["dec"] == fh["dec"][5]
    assert np.isnan(ds[35]["specz_redshift"])
    man = ds.manifest
    assert man["count"] == 41 and man["labeled_count"] == 30 and man["layout"] == "HWC"
    assert man["image_shape"] == [107, 107, 5] and man["dtype"] == "float32"
    assert all(len(s["sha256"]) == 64 for s in man["shards"])
    median, mad = reference_median_mad(images.transpose(0, 2, 3, 1))
    assert man["pixel_stats"]["median"] == median.tolist() and man["pixel_stats"]["mad"] == mad.tolist()
    assert verify_dataset(out)["ok"]
    info = dataset_info(out)
    assert info["count"] == 41 and info["labeled_count"] == 30
    assert 0 < info["specz_redshift"]["min"] <= info["specz_redshift"]["max"] < 0.4
    assert not (tmp_path / "ds.partial").exists()


def test_shard_plan_cuts_consecutive_rows_across_files(release_h5):
    from photoz_hpc.data.hdf5_source import validate_source

    srcs = [validate_source(release_h5("a.h5", 5)), validate_source(release_h5("b.h5", 7))]
    plans = plan_shards(srcs, 4)
    assert [p.segments for p in plans] == [((0, 0, 4),), ((0, 4, 5), (1, 0, 3)), ((1, 3, 7),)]
    with pytest.raises(PhotozError, match="samples-per-shard"):
        plan_shards(srcs, 0)


def test_interrupted_prepare_resumes_without_redoing_shards(release_h5, tmp_path, monkeypatch):
    src = release_h5("a.h5", 20)
    real_write = prepare_mod.write_shard
    calls = []

    def crash_on_third(out, plan, *args):
        calls.append(plan.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for a kill mid-run
        return real_write(out, plan, *args)

    monkeypatch.setattr(prepare_mod, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], tmp_path / "ds", samples_per_shard=4)
    assert not (tmp_path / "ds").exists() and (tmp_path / "ds.partial" / "shard-00001.json").exists()
    assert not list((tmp_path / "ds.partial").glob("shard-00002*"))  # nothing half-written kept

    calls.clear()
    monkeypatch.setattr(prepare_mod, "write_shard", lambda out, plan, *a: calls.append(plan.index) or real_write(out, plan, *a))
    out = prepare([src], tmp_path / "ds", samples_per_shard=4)
    assert calls == [2, 3, 4]
    assert verify_dataset(out)["ok"] and len(open_dataset(out)) == 20
    ref = prepare([src], tmp_path / "fresh", samples_per_shard=4)
    assert json.loads((out / "manifest.json").read_text())["shards"] == json.loads((ref / "manifest.json").read_text())["shards"]


def test_existing_dataset_needs_overwrite(release_h5, tmp_path):
    src = release_h5("a.h5", 6)
    prepare([src], tmp_path / "ds", samples_per_shard=4)
    with pytest.raises(PhotozError, match="already exists"):
        prepare([src], tmp_path / "ds")
    prepare([src], tmp_path / "ds", samples_per_shard=2, overwrite=True)
    assert len(open_dataset(tmp_path / "ds").shards) == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"images": None}, "missing required key.*images"),
        ({"e_bv": None}, "missing required key.*e_bv"),
        ({"images": np.zeros((4, 3, 107, 107), np.float32)}, "shape"),
        ({"images": np.zeros((4, 5, 107, 107), np.float64)}, "float32"),
        ({"ra": np.zeros(3)}, "'ra' has 3 rows"),
        ({"e_bv": np.zeros((4, 4))}, "'e_bv' has shape"),
        ({"specz_redshift_err": None}, "partner"),
        ({"ObjID": np.array([1.5, 2, 3, 4])}, "ObjID"),
    ],
)
def test_bad_input_is_rejected_naming_file(release_h5, tmp_path, overrides, message):
    src = release_h5("bad.h5", 4, **overrides)
    with pytest.raises(InputDataError, match=message) as err:
        prepare([src], tmp_path / "ds")
    assert "bad.h5" in str(err.value)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


def test_truncated_and_missing_hdf5(release_h5, tmp_path):
    src = release_h5("t.h5", 8)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputDataError, match="t.h5.*(truncated|corrupt)"):
        prepare([src], tmp_path / "ds")
    with pytest.raises(InputDataError, match="does not exist"):
        prepare([tmp_path / "nope.h5"], tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


def test_nan_rows_rejected_or_skipped(release_h5, tmp_path):
    images = np.random.default_rng(0).standard_normal((10, 5, 107, 107)).astype(np.float32)
    images[3, 2, 50, 50] = np.nan
    images[7, 0, 0, 0] = np.inf
    src = release_h5("nan.h5", 10, images=images)
    with pytest.raises(InputDataError, match=r"nan\.h5: row 3 has NaN/inf pixels"):
        prepare([src], tmp_path / "ds", samples_per_shard=4)
    assert not (tmp_path / "ds.partial").exists()
    out = prepare([src], tmp_path / "ds", samples_per_shard=4, bad_row_policy="skip")
    ds = open_dataset(out)
    assert len(ds) == 8 and ds.manifest["skipped_count"] == 2
    assert [s["row"] for s in ds.manifest["skipped"]] == [3, 7]
    assert ds[3]["image"].tobytes() == images[4].tobytes()


def test_corrupt_and_truncated_shards_are_caught(release_h5, tmp_path):
    out = prepare([release_h5("a.h5", 12)], tmp_path / "ds", samples_per_shard=4)
    shard = out / "shard-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[1000] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="shard-00001.bin: sha256 mismatch"):
        verify_dataset(out)
    ds = open_dataset(out)
    ds[0]  # other shards still read fine
    with pytest.raises(DatasetError, match=r"shard-00001.bin: record 0 \(sample 4\) is corrupt"):
        ds[4]
    shard.write_bytes(bytes(raw[:-100]))
    with pytest.raises(DatasetError, match="shard-00001.bin: shard is truncated"):
        open_dataset(out)
    with pytest.raises(DatasetError, match="truncated"):
        verify_dataset(out)


def test_batch_records_are_zero_copy_checked_views(release_h5, tmp_path):
    """``records_hwc`` (the loaders' batch read) gives the records ``image_hwc`` gives, as views of the shards,
    in the order asked, negative ids from the end; it CRC-checks as ``image_hwc`` does."""
    out = prepare([release_h5("a.h5", 12)], tmp_path / "ds", samples_per_shard=4)
    ds = open_dataset(out)
    ids = np.array([9, 0, 4, 4, -1, 3])
    got = ds.records_hwc(ids)
    assert len(got) == len(ids)
    for i, rec in zip(ids, got, strict=True):
        want = ds.image_hwc(int(i))
        assert rec.shape == want.shape and np.array_equal(rec, want)
        assert np.shares_memory(rec, ds.shard_images(ds.locate(int(i))[0]))  # no copy
    assert ds.records_hwc(np.array([], np.int64)) == []
    with pytest.raises(IndexError, match="outside"):
        ds.records_hwc(np.array([0, 12]))
    shard = out / "shard-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[1000] ^= 0xFF
    shard.write_bytes(bytes(raw))
    fresh = open_dataset(out)
    assert len(fresh.records_hwc(np.array([0, 8]))) == 2  # other shards still read fine
    with pytest.raises(DatasetError, match=r"shard-00001.bin: record 0 \(sample 4\) is corrupt"):
        fresh.records_hwc(np.array([0, 4]))
    assert len(open_dataset(out, verify_records=False).records_hwc(np.array([4]))) == 1  # unchecked on request


def test_missing_manifest_and_newer_format(release_h5, tmp_path):
    out = prepare([release_h5("a.h5", 4)], tmp_path / "ds")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="newer photoz-hpc"):
        open_dataset(out)
    (out / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        open_dataset(out)
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nothing")


def test_manifest_records_the_sdss_survey_and_an_old_manifest_means_sdss(release_h5, tmp_path):
    out = prepare([release_h5("a.h5", 6)], tmp_path / "ds")
    man = json.loads((out / "manifest.json").read_text())
    assert man["survey"] == load_survey("sdss").to_dict() and man["bands"] == ["u", "g", "r", "i", "z"]
    assert man["input_layout"] == "release" and man["id_field"] == "ObjID"
    assert store_format.meta_dtype_from_json(man["meta_dtype"], "test") == store_format.META_DTYPE
    ds = open_dataset(out)
    assert ds.meta.dtype == store_format.META_DTYPE and ds.object_ids.tolist() == ds.meta["ObjID"].tolist()
    for key in ("survey", "meta_dtype", "id_field", "input_layout"):  # as written before surveys existed
        del man[key]
    (out / "manifest.json").write_text(json.dumps(man))
    old = open_dataset(out)
    assert old.survey.name == "sdss" and old.bands == ("u", "g", "r", "i", "z") and old.id_field == "ObjID"
    assert old[2]["ObjID"] == ds[2]["ObjID"] and verify_dataset(out)["survey"] == "sdss"
    man["image_shape"] = [107, 107, 3]
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DatasetError, match=r"image_shape \[107, 107, 3\] does not have the 5 bands"):
        open_dataset(out)


def test_release_layout_of_another_survey_and_a_band_subset(release_h5, tmp_path):
    lsst = load_survey("lsst")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((5, 6, 20, 20)).astype(np.float32)
    e_bv = (rng.uniform(0.01, 0.1, (5, 1)) * np.array(lsst.input_coefficients)).astype(np.float32)
    src = release_h5("lsst.h5", 5, size=20, images=images, e_bv=e_bv)
    with pytest.raises(InputDataError, match=r"lsst.h5: 'images' has shape \(5, 6, 20, 20\), expected \(N, 5, H, W\)"):
        prepare([src], tmp_path / "sdss")
    ds = open_dataset(prepare([src], tmp_path / "ds", options=PrepareOptions(survey="lsst")))
    assert ds.survey.name == "lsst" and ds.image_shape == (20, 20, 6) and ds.meta["e_bv"].shape == (5, 6)
    assert ds.manifest["survey"]["cutout_size"] == 20 and ds.manifest["r_dr12"] == list(lsst.input_coefficients)
    np.testing.assert_allclose(ds.meta["ebv_sfd"], lsst.sfd_ebv(e_bv.astype(np.float64)), rtol=1e-12)
    assert ds.image_hwc(3).tobytes() == np.ascontiguousarray(images[3].transpose(1, 2, 0)).tobytes()
    sub = open_dataset(prepare([src], tmp_path / "iu", options=PrepareOptions(survey="lsst", bands=("i", "u"))))
    assert sub.bands == ("i", "u") and sub.image_hwc(3).tobytes() == np.ascontiguousarray(images[3, [3, 0]].transpose(1, 2, 0)).tobytes()
    np.testing.assert_array_equal(sub.meta["e_bv"], e_bv[:, [3, 0]].astype(np.float64))
    with pytest.raises(PhotozError, match="--labels and --no-extinction apply to Multimodal Universe input"):
        prepare([src], tmp_path / "x", options=PrepareOptions(survey="lsst", no_extinction=True))


def _cli(*args, env=None, cwd=None):
    return run_cli(*args, env=env, cwd=cwd, timeout=300)


def test_cli_prepare_verify_info(release_h5, tmp_path):
    src = release_h5("a.h5", 9)
    res = _cli("prepare", str(src), "--out", str(tmp_path / "ds"), "--samples-per-shard", "4")
    assert res.returncode == 0, res.stderr
    res = _cli("verify", str(tmp_path / "ds"))
    assert res.returncode == 0 and "9 samples in 3 shards" in res.stdout and "survey sdss, bands u g r i z" in res.stdout
    res = _cli("info", str(tmp_path / "ds"), "--json")
    assert json.loads(res.stdout)["count"] == 9
    (tmp_path / "ds" / "shard-00000.bin").write_bytes(b"x")
    res = _cli("verify", str(tmp_path / "ds"))
    assert res.returncode == 1 and "shard-00000.bin" in res.stderr and "Traceback" not in res.stderr
    res = _cli("prepare", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x"))
    assert res.returncode == 1 and "missing.h5: input file does not exist" in res.stderr


def _mpirun() -> list[str]:
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        pytest.fail("mpirun not found: install the MPI extra (launch/setup_env.sh)")
    return [exe, "-np", "2", "--oversubscribe"] if "mpich" not in os.path.realpath(exe) else [exe, "-np", "2"]


def test_prepare_under_mpirun_matches_serial(release_h5, tmp_path):
    a, b = release_h5("a.h5", 13, seed=3), release_h5("b.h5", 6, seed=4, labeled=False)
    serial = prepare([a, b], tmp_path / "serial", samples_per_shard=3)
    env = process_env()
    cmd = [*_mpirun(), sys.executable, "-m", "photoz_hpc", "prepare", str(a), str(b), "--out", str(tmp_path / "mpi"),
           "--samples-per-shard", "3", "--mpi", "mpi"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    ms = json.loads((serial / "manifest.json").read_text())
    mm = json.loads((tmp_path / "mpi" / "manifest.json").read_text())
    assert mm["pixel_stats"] == ms["pixel_stats"]
    assert mm["shards"] == ms["shards"] and mm["count"] == 19
    assert verify_dataset(tmp_path / "mpi")["ok"]


def test_out_that_is_not_a_dataset_is_never_replaced(release_h5, tmp_path):
    src = release_h5("in.h5", 4)
    with pytest.raises(PhotozError, match="not a prepared dataset"):
        prepare([src], tmp_path, overwrite=True)  # tmp_path holds the input itself
    assert src.exists()
    (tmp_path / "empty").mkdir()
    assert len(open_dataset(prepare([src], tmp_path / "empty"))) == 4  # an empty directory is fine


def test_resume_drops_temporary_files_of_a_killed_run(release_h5, tmp_path):
    src = release_h5("a.h5", 8)
    staging = tmp_path / "ds.partial"
    staging.mkdir()
    (staging / ".shard-00000.bin.tmp-12345").write_bytes(b"half a shard")
    out = prepare([src], tmp_path / "ds", samples_per_shard=4)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert verify_dataset(out)["ok"]


def test_io_error_keeps_committed_shards_for_resume(release_h5, tmp_path, monkeypatch):
    src = release_h5("a.h5", 12)
    real_write = prepare_mod.write_shard

    def disk_full_on_second(out, plan, *args):
        if plan.index == 1:
            raise OSError(28, "No space left on device")
        return real_write(out, plan, *args)

    monkeypatch.setattr(prepare_mod, "write_shard", disk_full_on_second)
    with pytest.raises(PhotozError, match="No space left.*re-run the same command to resume"):
        prepare([src], tmp_path / "ds", samples_per_shard=4)
    assert (tmp_path / "ds.partial" / "shard-00000.json").exists()
    monkeypatch.setattr(prepare_mod, "write_shard", real_write)
    assert len(open_dataset(prepare([src], tmp_path / "ds", samples_per_shard=4))) == 12


def test_group_instead_of_dataset_is_a_clear_error(release_h5, tmp_path):
    src = release_h5("g.h5", 4, ra=None)
    with h5py.File(src, "a") as fh:
        fh.create_group("ra")
    with pytest.raises(InputDataError, match="g.h5: 'ra' is not a dataset"):
        prepare([src], tmp_path / "ds")
