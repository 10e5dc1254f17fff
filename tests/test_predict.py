"""Survey inference: the catalogue (every galaxy exactly once over ranks, skip and resume), its pdf summaries,
calibration on constructed pdfs with a known answer, the qp export, the Slurm script and the bad inputs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, TINY_MODEL, run_single, run_torch, write_release_h5

from photoz_hpc.cli import main as cli_main
from photoz_hpc.config import Config, FinetuneRunConfig, load_config
from photoz_hpc.data import open_dataset
from photoz_hpc.data.prepare import prepare
from photoz_hpc.errors import PhotozError
from photoz_hpc.evaluate.calibration import (
    calibrate,
    calibration_report,
    calibration_split,
    read_temperature,
    run_calibrate,
    softmax_log,
)
from photoz_hpc.evaluate.catalogue import (
    DONE_DIR,
    MANIFEST_NAME,
    PARTS_DIR,
    PredictOptions,
    block,
    read_catalogue,
    run_predict,
    verify_catalogue,
)
from photoz_hpc.evaluate.pdfs import summarize_catalogue
from photoz_hpc.models.photoz_net import build_photoz_net, save_photoz_model
from photoz_hpc.survey import SDSS_GRID
from photoz_hpc.train.inference import batch_log_probs

TINY = [*TINY_MODEL, "augment.crop_size=16", "loader.backend=reference",
        "train.precision=fp32", "dist.backend=auto", "seed=1"]
N_A, N_B = 200, 70  # galaxies of the two inputs; shards of 64 -> parts of 64, 64, 64, 8 and 64, 6
GRID = SDSS_GRID  # the paper's: 180 bins over [0, 0.4)
EDGES, CENTRES, N_Z_BINS = GRID.edges(), GRID.centres(), GRID.n_bins


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    a = prepare([write_release_h5(root / "a.h5", N_A, seed=1, size=20)], root / "a", samples_per_shard=64)
    b = prepare([write_release_h5(root / "b.h5", N_B, seed=2, size=20, labeled=False)], root / "b",
                samples_per_shard=64)
    cfg = load_config(None, TINY, root=FinetuneRunConfig)
    torch.manual_seed(0)
    net = build_photoz_net(cfg.model)
    ckpt = save_photoz_model(net, cfg.model, root / "best_model.pt", {"config": dataclasses.asdict(cfg)})
    ref = root / "reference"
    report = run_predict(ckpt, [a, b], ref, PredictOptions(with_pdf=True, batch_size=48))
    assert report["complete"] and report["rows"] == N_A + N_B
    return {"root": root, "data": [a, b], "ckpt": ckpt, "ref": ref, "cat": read_catalogue(ref)}


def _args(s: dict, out: Path, *more: str) -> list[str]:
    return ["--checkpoint", str(s["ckpt"]), "--data", *map(str, s["data"]), "--out", str(out), *more]


def _assert_exactly_once(s: dict, out: Path) -> dict:
    cat = read_catalogue(out)
    for d, (path, n) in enumerate(zip(s["data"], (N_A, N_B), strict=True)):
        sel = cat["dataset"] == d
        np.testing.assert_array_equal(cat["index"][sel], np.arange(n))
        np.testing.assert_array_equal(cat["ObjID"][sel], open_dataset(path).meta["ObjID"])
    assert len(cat["index"]) == N_A + N_B
    report = verify_catalogue(out)
    assert report["ok"] and report["rows"] == N_A + N_B and report["duplicate_objids"] == 0, report
    return cat


# ---------------------------------------------------------------------- the catalogue over ranks, skip, resume


def test_two_ranks_write_every_galaxy_exactly_once(setup, tmp_path):
    out = tmp_path / "cat"
    for rc, log in run_torch("predict_run.py", _args(setup, out, "--pdf", "--batch-size", "40")):
        assert rc == 0, log[-3000:]
    cat = _assert_exactly_once(setup, out)
    ranks = [json.loads(p.read_text())["rank"] for p in sorted((out / DONE_DIR).glob("*.json"))]
    assert ranks == [0, 0, 0, 1, 1, 1]  # contiguous blocks of parts
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["counts_per_input"] == [N_A, N_B] and len(manifest["parts"]) == 6
    assert all(len(p["sha256"]) == 64 for p in manifest["parts"])
    for key in ("z_phot", "z_median", "z_lo95", "odds", "pdf"):  # same numbers as one process, other batches
        np.testing.assert_allclose(cat[key].astype(np.float64), setup["cat"][key].astype(np.float64), atol=1e-6)


def test_rerun_skips_finished_parts_and_redoes_bad_ones(setup, tmp_path):
    out = tmp_path / "cat"
    shutil.copytree(setup["ref"], out)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / PARTS_DIR).iterdir()}
    again = run_predict(setup["ckpt"], setup["data"], out, PredictOptions(with_pdf=True, batch_size=64))
    assert (again["skipped"], again["written"], again["complete"]) == (6, 0, True)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / PARTS_DIR).iterdir()}
    (out / PARTS_DIR / "d000-s00001.parquet").unlink()
    bad = out / PARTS_DIR / "d001-s00000.parquet"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other bytes: only the checksum can tell
    bad.write_bytes(bytes(raw))
    assert not verify_catalogue(out, write_manifest=False)["ok"]
    again = run_predict(setup["ckpt"], setup["data"], out, PredictOptions(with_pdf=True, batch_size=64))
    assert (again["skipped"], again["written"]) == (4, 2)
    _assert_exactly_once(setup, out)
    with pytest.raises(PhotozError, match=r"another model, input or option \(tta differ"):
        run_predict(setup["ckpt"], setup["data"], out, PredictOptions(with_pdf=True, tta=2))


def test_verify_names_a_corrupt_part_and_marks_the_manifest_incomplete(setup, tmp_path, capsys):
    out = tmp_path / "cat"
    shutil.copytree(setup["ref"], out)
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is True
    bad = out / PARTS_DIR / "d001-s00000.parquet"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other bytes: only the checksum can tell
    bad.write_bytes(bytes(raw))
    assert cli_main(["catalogue-verify", str(out)]) == 1
    printed = capsys.readouterr()
    assert "FAILED" in printed.out and "(marked incomplete)" in printed.out
    assert f"part d001-s00000 is corrupt: the sha256 of {bad} differs from its done marker" in printed.out
    assert "missing or unfinished" not in printed.out and "redoing" not in printed.err
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False and any("d001-s00000 is corrupt" in p for p in manifest["problems"])
    report = verify_catalogue(out)
    assert report["corrupt_parts"] == ["d001-s00000"] and not report["ok"]
    # predict redoes the corrupt part and the catalogue is complete again
    again = run_predict(setup["ckpt"], setup["data"], out, PredictOptions(with_pdf=True, batch_size=64))
    assert (again["skipped"], again["written"], again["complete"]) == (5, 1, True)
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is True
    _assert_exactly_once(setup, out)


def test_array_blocks_cover_the_catalogue_and_the_last_one_finalizes(setup, tmp_path):
    out = tmp_path / "cat"
    first = run_predict(setup["ckpt"], setup["data"], out, PredictOptions(batch_size=64), block_spec="0/2")
    assert first["written"] == 3 and not first["complete"] and not (out / MANIFEST_NAME).exists()
    second = run_predict(setup["ckpt"], setup["data"], out, PredictOptions(batch_size=64), block_spec="1/2")
    assert second["written"] == 3 and second["complete"]
    _assert_exactly_once(setup, out)
    assert [len(block(list(range(7)), i, 3)) for i in range(3)] == [2, 2, 3]
    with pytest.raises(PhotozError, match="--block"):
        run_predict(setup["ckpt"], setup["data"], out, PredictOptions(), block_spec="2/2")


def test_killed_then_preempted_run_resumes_without_duplicates(setup, tmp_path):
    out = tmp_path / "cat"
    rc, log = run_single("predict_run.py", _args(setup, out, "--kill-after-parts", "2"))  # SIGKILL: a crash
    assert rc == -9, log[-3000:]
    report = verify_catalogue(out, write_manifest=False)
    assert not report["ok"] and len(report["missing_parts"]) == 4 and not (out / MANIFEST_NAME).exists()
    rc, log = run_single("predict_run.py", _args(setup, out, "--signal-after-parts", "1"))  # SIGUSR1: pre-empted
    assert rc == 75 and "2 of its 6 parts are already finished" in log, log[-3000:]
    report = json.loads(log.split("REPORT ", 1)[1].splitlines()[0])
    assert report["preempted"] and (report["skipped"], report["written"]) == (2, 1) and not report["complete"]
    assert len(list((out / DONE_DIR).glob("*.json"))) == 3
    rc, log = run_single("predict_run.py", _args(setup, out))
    assert rc == 0 and "3 of its 6 parts are already finished" in log, log[-3000:]
    _assert_exactly_once(setup, out)


def test_hdf5_parts_hold_the_same_catalogue(setup, tmp_path):
    run_predict(setup["ckpt"], setup["data"], tmp_path / "h5", PredictOptions(fmt="hdf5", with_pdf=True, batch_size=64))
    cat = _assert_exactly_once(setup, tmp_path / "h5")
    assert sorted(cat) == sorted(setup["cat"])
    for key, ref in setup["cat"].items():
        np.testing.assert_array_equal(cat[key], ref, err_msg=key)


# ---------------------------------------------------------------------- summaries, test-time augmentation


def test_catalogue_summaries_of_known_pdfs():
    probs = np.zeros((3, N_Z_BINS))
    probs[0] = 1.0 / N_Z_BINS  # U(0, 0.4)
    probs[1, 90] = 1.0  # one bin
    probs[2, [40, 120]] = 0.5  # two separated spikes
    s = summarize_catalogue(probs, GRID)
    w = EDGES[1]
    np.testing.assert_allclose([s["z_median"][0], s["z_lo95"][0], s["z_hi95"][0]], [0.2, 0.01, 0.39], atol=1e-12)
    assert s["z_mode"][0] == CENTRES[0]  # ties: the first bin
    assert s["odds"][0] == pytest.approx(0.03 * (1 + CENTRES[0]) * 2 / 0.4 - (0.03 * (1 + CENTRES[0]) - CENTRES[0]) / 0.4)
    assert s["odds"][1] == pytest.approx(1.0) and s["z_median"][1] == pytest.approx(CENTRES[90])
    np.testing.assert_allclose([s["z_lo95"][1], s["z_hi95"][1]], EDGES[90] + np.array([0.025, 0.975]) * w, atol=1e-12)
    assert s["odds"][2] == pytest.approx(0.5) and s["z_mode"][2] == CENTRES[40]  # the other spike is 0.18 away
    assert s["z_lo68"][2] < s["z_median"][2] < s["z_hi68"][2]


def test_tta_averages_the_pdf_over_exact_rotations():
    cfg = load_config(None, TINY, root=FinetuneRunConfig)
    torch.manual_seed(3)
    net = build_photoz_net(cfg.model).eval()
    x = torch.randn(4, 5, 16, 16)
    with torch.no_grad():
        manual = torch.stack([torch.softmax(net(torch.rot90(x, r, dims=(2, 3))), 1) for r in range(4)]).mean(0)
        np.testing.assert_allclose(batch_log_probs(net, x, 4).exp().numpy(), manual.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(batch_log_probs(net, x, 1).numpy(), torch.log_softmax(net(x), 1).numpy(), atol=1e-6)
        assert not torch.allclose(batch_log_probs(net, x, 2), batch_log_probs(net, x, 1))
    with pytest.raises(PhotozError, match="1 to 4"):
        batch_log_probs(net, x, 5)


# ---------------------------------------------------------------------- calibration with a known answer


def _gaussian_log_p(mu: np.ndarray, sigma: float) -> np.ndarray:
    lp = -0.5 * ((CENTRES[None, :] - mu[:, None]) / sigma) ** 2
    return lp - np.log(np.exp(lp - lp.max(1, keepdims=True)).sum(1, keepdims=True)) - lp.max(1, keepdims=True)


def _draw_from(probs: np.ndarray, rng) -> np.ndarray:
    """One redshift from each row's piecewise-constant pdf (a bin by its probability, uniform inside)."""
    k = (probs.cumsum(1) < rng.uniform(size=(len(probs), 1))).sum(1).clip(0, N_Z_BINS - 1)
    return EDGES[k] + rng.uniform(size=len(probs)) * (EDGES[k + 1] - EDGES[k])


def test_pit_and_coverage_are_honest_for_exact_pdfs_and_not_for_overconfident_ones():
    rng = np.random.default_rng(7)
    n = 20000
    mu = rng.uniform(0.1, 0.3, n)
    log_p = _gaussian_log_p(mu, 0.02)
    probs = softmax_log(log_p)
    exact = calibration_report(probs, _draw_from(probs, rng), GRID, log_p)
    assert exact["pit_ks"] < 0.015  # 1.63 / sqrt(n) = 0.0115 is the 1% KS critical value
    assert exact["coverage_68"] == pytest.approx(0.68, abs=0.015)
    assert exact["coverage_95"] == pytest.approx(0.95, abs=0.008)
    assert np.allclose(exact["pit_hist"]["density"], 1.0, atol=0.12)
    np.testing.assert_allclose(exact["credibility"]["coverage"], exact["credibility"]["levels"], atol=0.02)
    for row in exact["odds_reliability"]:
        if row["n"] > 200:
            assert row["fraction_inside"] == pytest.approx(row["mean_odds"], abs=0.04)
    # the truth is twice as wide as the pdfs claim: a U-shaped PIT and too few z_spec inside the intervals
    wide = softmax_log(_gaussian_log_p(mu, 0.04))
    z_wide = _draw_from(wide, rng)
    over = calibration_report(probs, z_wide, GRID, log_p)
    assert over["pit_ks"] > 0.1 and over["coverage_68"] < 0.45 and over["coverage_95"] < 0.75
    dens = over["pit_hist"]["density"]
    assert dens[0] > 2 and dens[-1] > 2 and dens[len(dens) // 2] < 0.6
    # a temperature fitted on one half (sigma_T = sigma sqrt(T): T = 4 is the answer) fixes the other half
    calib, evaluate = calibration_split(np.arange(n), 0.5, seed=0)
    assert np.intersect1d(calib, evaluate).size == 0 and len(calib) + len(evaluate) == n
    fixed = calibrate(log_p, z_wide, calib, evaluate, GRID)
    assert fixed["temperature"] == pytest.approx(4.0, rel=0.05)
    assert fixed["after"]["coverage_68"] == pytest.approx(0.68, abs=0.02) and fixed["after"]["pit_ks"] < 0.02
    assert fixed["after"]["nll"] < fixed["before"]["nll"]
    # coverage through the PIT is coverage through the catalogue's intervals
    s = summarize_catalogue(probs, GRID)
    inside = (s["z_lo68"] <= z_wide) & (z_wide <= s["z_hi68"])
    assert over["coverage_68"] == pytest.approx(inside.mean(), abs=1e-3)
    with pytest.raises(ValueError, match="overlaps"):
        calibrate(log_p, z_wide, calib, calib[:10], GRID)


@pytest.mark.parametrize("outliers", [0.0, 0.1])
@pytest.mark.parametrize("claimed, true, sharpen", [(0.04, 0.02, True), (0.02, 0.04, False)])
def test_fitted_temperature_sharpens_underconfident_and_widens_overconfident_pdfs(claimed, true, sharpen, outliers):
    """The direction of the fit (p_T ~ p^(1/T): T < 1 sharpens): underconfident pdfs (68% coverage > 0.68) must get
    T < 1, overconfident ones T > 1, and coverage must move toward nominal on the held-out half -- also with 10%
    catastrophic outliers (z_spec uniform over the grid), which pulled an NLL fit to T > 1 on underconfident pdfs."""
    rng = np.random.default_rng(11)
    n = 12000
    mu = rng.uniform(0.1, 0.3, n)
    log_p = _gaussian_log_p(mu, claimed)
    z = _draw_from(softmax_log(_gaussian_log_p(mu, true)), rng)
    bad = rng.uniform(size=n) < outliers
    z[bad] = rng.uniform(0.0, 0.4, int(bad.sum()))
    calib, evaluate = calibration_split(np.arange(n), 0.5, seed=1)
    fit = calibrate(log_p, z, calib, evaluate, GRID)
    before, after = fit["before"]["coverage_68"], fit["after"]["coverage_68"]
    assert (before > 0.68) == sharpen and (fit["temperature"] < 1.0) == sharpen, fit["temperature"]
    assert abs(after - 0.68) < abs(before - 0.68) and after == pytest.approx(0.68, abs=0.03), (before, after)
    assert abs(fit["after"]["coverage_95"] - 0.95) < abs(fit["before"]["coverage_95"] - 0.95) or outliers
    if not outliers:  # sigma_T = sigma sqrt(T): the exact answer is (true / claimed)^2
        assert fit["temperature"] == pytest.approx((true / claimed) ** 2, rel=0.05)


def test_calibrate_command_writes_numbers_and_figure(setup, tmp_path):
    a = setup["data"][0]
    report = run_calibrate(setup["ckpt"], a, tmp_path / "cal", calib_fraction=0.5, batch_size=64, overrides=TINY[3:4])
    assert report["n_calib"] + report["n_eval"] == N_A and 0.05 <= report["temperature"] <= 20
    saved = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert saved["temperature"] == report["temperature"] and set(saved["after"]) >= {"pit_hist", "coverage_68", "nll"}
    assert (tmp_path / "cal" / "calibration.png").stat().st_size > 5000
    assert read_temperature(str(tmp_path / "cal" / "calibration.json")) == report["temperature"]
    assert read_temperature("1.5") == 1.5
    with pytest.raises(PhotozError, match="neither a number"):
        read_temperature(str(tmp_path / "nothing.json"))


# ---------------------------------------------------------------------- qp


def test_qp_export_round_trips(setup, tmp_path):
    qp = pytest.importorskip("qp")
    from photoz_hpc.evaluate.qp_export import ensemble_probs, export_qp

    path = export_qp(setup["ref"], tmp_path / "pdfs.hdf5")
    ens = qp.read(str(path))
    cat = setup["cat"]
    probs = cat["pdf"].astype(np.float64)
    probs /= probs.sum(1, keepdims=True)
    assert ens.npdf == N_A + N_B
    np.testing.assert_allclose(ensemble_probs(ens), probs, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(ens.ancil["ObjID"]), cat["ObjID"])
    np.testing.assert_allclose(np.asarray(ens.ancil["zmode"]), cat["z_mode"])
    # qp's own statistics of the exported pdfs agree with the catalogue's (float16 pdfs: ~1e-3 relative)
    np.testing.assert_allclose(np.asarray(ens.mean()).ravel(), cat["z_phot"], atol=2e-4)
    np.testing.assert_allclose(np.asarray(ens.median()).ravel(), cat["z_median"], atol=2e-4)
    np.testing.assert_allclose(np.asarray(ens.cdf(np.full((1, 1), 0.2))).ravel(),
                               np.cumsum(probs, 1)[:, 89], atol=1e-9)
    no_pdf = tmp_path / "nopdf"
    run_predict(setup["ckpt"], setup["data"], no_pdf, PredictOptions(batch_size=64), block_spec="0/6")
    with pytest.raises(PhotozError, match="holds no pdfs"):
        export_qp(no_pdf, tmp_path / "x.hdf5")



def test_export_qp_and_info_bad_paths_are_clear_errors(setup, tmp_path, capsys):
    pytest.importorskip("qp")
    cases = [(["export-qp", str(tmp_path / "nowhere"), str(tmp_path / "p.hdf5")],
              f"{tmp_path / 'nowhere'}: no such catalogue directory"),
             (["export-qp", str(setup["data"][0]), str(tmp_path / "p.hdf5")], "not a photo-z catalogue"),
             (["export-qp", str(setup["ref"]), str(tmp_path / "p.xyz")], "qp cannot write a file with suffix '.xyz'"),
             (["info", str(setup["root"] / "a.h5")],
              f"{setup['root'] / 'a.h5'} is a file, not a prepared dataset directory"),
             (["info", str(setup["root"] / "missing")], "dataset directory does not exist")]
    for argv, message in cases:
        assert cli_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"photoz-hpc {argv[0]}: error: " in err and message in err and "Traceback" not in err, (argv, err)
    assert cli_main(["info", str(setup["root"] / "a.h5")]) == 1
    assert f"photoz-hpc prepare {setup['root'] / 'a.h5'} --out DIR" in capsys.readouterr().err
    assert not (tmp_path / "p.xyz").exists() and not list(tmp_path.glob(".tmp-*"))


# ---------------------------------------------------------------------- bad inputs: clear errors before any work


def _patched(src: Path, dst: Path, image_shape: list[int]) -> Path:
    """A copy of ``src`` whose manifest claims another image shape of the same record size."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["image_shape"] = image_shape
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_bad_checkpoint_wrong_kind_or_wrong_images_fail_before_any_work(setup, tmp_path, capsys):
    from photoz_hpc.models.moco import build_moco
    from photoz_hpc.train.checkpoint import save_checkpoint

    a = setup["data"][0]
    out = tmp_path / "never"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    pcfg = load_config(None, [*TINY_MODEL, "moco.queue_size=64", "loader.batch_size=16"],
                       root=Config)
    moco = save_checkpoint(tmp_path / "moco", 3, {"task": "pretrain", "model": build_moco(pcfg).state_dict(),
                                                  "config": dataclasses.asdict(pcfg)})
    four_bands = _patched(a, tmp_path / "four_bands", [20, 25, 4])  # 20*20*5 = 20*25*4 floats per record
    small = _patched(a, tmp_path / "small", [10, 40, 5])  # 10 px high: no 16x16 crop fits
    cases = [(garbage, [a], "unreadable"), (moco, [a], r"pretraining \(MoCo\) checkpoint"),
             (setup["ckpt"], [a, four_bands], r"image_shape \[20, 25, 4\] does not have the 5 bands"),
             (setup["ckpt"], [small], r"images are 10x40 pixels .* at least 16x16"),
             (setup["ckpt"], [tmp_path / "missing"], "does not exist")]
    for ckpt, data, message in cases:
        with pytest.raises(PhotozError, match=message):
            run_predict(ckpt, data, out, PredictOptions())
        assert not out.exists(), message
    rc = cli_main(["predict", "--checkpoint", str(moco), "--data", str(a), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "photoz-hpc predict: error:" in err and "MoCo" in err and not out.exists()


def test_predict_refuses_a_directory_holding_another_commands_outputs(setup, tmp_path, capsys):
    out = tmp_path / "evaluate-best_model-a"  # an evaluate directory
    out.mkdir()
    (out / "metrics.json").write_text('{"command": "evaluate"}')
    (out / "predictions.csv").write_text("index,ObjID\n")
    rc = cli_main(["predict", *_args(setup, out)])
    err = capsys.readouterr().err
    assert rc == 1 and f"--out {out} is not a catalogue" in err and "metrics.json, predictions.csv" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.csv"]  # nothing added
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_predict(setup["ckpt"], setup["data"], empty, PredictOptions(batch_size=48))["complete"]


# ---------------------------------------------------------------------- the Slurm script, run without Slurm


def test_slurm_predict_script_runs_and_verifies_without_slurm(setup, tmp_path, capsys):
    script = REPO / "slurm" / "predict.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PHOTOZ_CHECKPOINT=str(setup["ckpt"]), PHOTOZ_DATA=" ".join(map(str, setup["data"])),
               PHOTOZ_CATALOGUE=str(tmp_path / "cat"), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    res = subprocess.run(["bash", str(script), "--batch-size", "64"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert json.loads(res.stdout)["complete"] is True
    (tmp_path / "cat" / MANIFEST_NAME).unlink()
    res = subprocess.run(["bash", str(script), "--verify"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "OK: 270 of 270 galaxies in 6 of 6 parts" in res.stdout, res.stdout + res.stderr
    assert (tmp_path / "cat" / MANIFEST_NAME).exists()
    (tmp_path / "cat" / DONE_DIR / "d000-s00002.json").unlink()
    assert cli_main(["catalogue-verify", str(tmp_path / "cat")]) == 1
    assert "1 of 6 parts are missing or unfinished: d000-s00002" in capsys.readouterr().out
    env.pop("PHOTOZ_CHECKPOINT")
    res = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "set PHOTOZ_CHECKPOINT" in res.stderr
