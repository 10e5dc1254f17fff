"""photoz_hpc.evaluate: pdf summaries, the prediction CSV and the diagnostic plots."""

from __future__ import annotations

import numpy as np
import pytest

from photoz_hpc.evaluate.pdfs import summarize_pdfs
from photoz_hpc.evaluate.plots import plot_evaluation
from photoz_hpc.evaluate.predictions import read_predictions, write_predictions
from photoz_hpc.survey import SDSS_GRID

GRID = SDSS_GRID  # the paper's: 180 bins over [0, 0.4)
EDGES, CENTRES, N_Z_BINS = GRID.edges(), GRID.centres(), GRID.n_bins
WIDTH = GRID.z_max / N_Z_BINS


def softmax_probs(z: np.ndarray, sigma: float = 0.015) -> np.ndarray:
    """Gaussian-shaped (N, 180) pdfs centred on ``z``, as a trained classifier would give."""
    logits = -0.5 * ((CENTRES[None, :] - z[:, None]) / sigma) ** 2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


# --- pdfs ----------------------------------------------------------------------------------------
def test_delta_pdfs_give_their_bin():
    bins = np.array([0, 17, 90, 179])
    probs = np.zeros((4, N_Z_BINS))
    probs[np.arange(4), bins] = 1.0
    s = summarize_pdfs(probs, GRID)
    assert np.array_equal(s["z_phot"], CENTRES[bins])
    assert np.array_equal(s["z_mode"], CENTRES[bins])
    # all mass uniform inside one bin: the 16th/84th percentiles are 16%/84% of the way across it
    np.testing.assert_allclose(s["z_lo68"], EDGES[bins] + 0.16 * WIDTH, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s["z_hi68"], EDGES[bins] + 0.84 * WIDTH, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s["pdf_std"], WIDTH / np.sqrt(12), rtol=1e-9)


def test_uniform_pdf_interval_and_std_are_analytic():
    probs = np.zeros((2, N_Z_BINS))
    probs[0] = 1.0 / N_Z_BINS  # U(0, 0.4)
    probs[1, 45:135] = 1.0 / 90  # U(0.1, 0.3)
    s = summarize_pdfs(probs, GRID)
    np.testing.assert_allclose(s["z_lo68"], [0.16 * 0.4, 0.1 + 0.16 * 0.2], atol=1e-12)
    np.testing.assert_allclose(s["z_hi68"], [0.84 * 0.4, 0.1 + 0.84 * 0.2], atol=1e-12)
    np.testing.assert_allclose(s["z_phot"], [0.2, 0.2], atol=1e-12)
    np.testing.assert_allclose(s["pdf_std"], [0.4 / np.sqrt(12), 0.2 / np.sqrt(12)], rtol=1e-9)


def test_two_peak_pdf_percentiles_and_mode():
    probs = np.zeros((1, N_Z_BINS))
    probs[0, 10], probs[0, 100] = 0.4, 0.6
    s = summarize_pdfs(probs, GRID, with_std=False)
    assert set(s) == {"z_phot", "z_mode", "z_lo68", "z_hi68"}
    assert s["z_mode"][0] == CENTRES[100]
    assert s["z_phot"][0] == pytest.approx(0.4 * CENTRES[10] + 0.6 * CENTRES[100])
    assert s["z_lo68"][0] == pytest.approx(EDGES[10] + (0.16 / 0.4) * WIDTH)
    assert s["z_hi68"][0] == pytest.approx(EDGES[100] + ((0.84 - 0.4) / 0.6) * WIDTH)


def test_custom_edges_and_renormalisation():
    edges = np.array([0.0, 0.1, 0.3, 0.6])  # unequal widths
    s = summarize_pdfs(np.array([[0.2, 0.5, 0.3 + 5e-5]]), edges=edges)  # within atol: renormalised
    p = np.array([0.2, 0.5, 0.3 + 5e-5]) / (1 + 5e-5)
    assert s["z_phot"][0] == pytest.approx(p @ [0.05, 0.2, 0.45])
    assert s["z_lo68"][0] == pytest.approx(0.1 * 0.16 / p[0])
    assert s["z_hi68"][0] == pytest.approx(0.3 + 0.3 * (0.84 - p[0] - p[1]) / p[2])


@pytest.mark.parametrize(("probs", "match"), [
    (np.full(N_Z_BINS, 1 / N_Z_BINS), r"shape \(N >= 1, 180\)"),
    (np.full((2, 10), 0.1), r"shape \(N >= 1, 180\)"),
    (np.zeros((0, N_Z_BINS)), r"shape \(N >= 1, 180\)"),
    (np.vstack([np.full(N_Z_BINS, np.nan), np.full(N_Z_BINS, 1 / N_Z_BINS)]), "1 of 2 rows contain NaN"),
    (np.vstack([np.r_[-0.1, 1.1, np.zeros(N_Z_BINS - 2)]] * 3), "3 of 3 rows have negative"),
    (np.vstack([np.full(N_Z_BINS, 1 / N_Z_BINS), np.full(N_Z_BINS, 0.9 / N_Z_BINS)]), "1 of 2 rows do not sum to 1"),
])
def test_bad_probs_raise(probs, match):
    with pytest.raises(ValueError, match=match):
        summarize_pdfs(probs, GRID)


# --- predictions CSV -----------------------------------------------------------------------------
def test_predictions_csv_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(1)
    n = 50
    z_spec = rng.uniform(0.01, 0.35, n)
    summary = summarize_pdfs(softmax_probs(z_spec + 0.01 * rng.standard_normal(n)), GRID)
    ids = {"index": np.arange(n), "ObjID": 1237650000000000000 + np.arange(n, dtype=np.int64) * 7919,
           "specObjID": np.full(n, 2**63 - 1, dtype=np.int64)}
    path = write_predictions(tmp_path / "out" / "predictions.csv", ids, z_spec, summary)
    assert [p.name for p in path.parent.iterdir()] == ["predictions.csv"]  # no temporary left behind
    header = path.read_text().splitlines()[0]
    assert header == "index,ObjID,specObjID,z_spec,z_phot,z_mode,z_lo68,z_hi68,pdf_std"
    back = read_predictions(path)
    assert list(back) == header.split(",")
    for name, values in ids.items():
        assert back[name].dtype == np.int64 and np.array_equal(back[name], values)
    assert np.array_equal(back["z_spec"], z_spec)
    for key, values in summary.items():
        assert back[key].dtype == np.float64 and np.array_equal(back[key], values)


def test_predictions_unsigned_ids_and_bad_columns(tmp_path):
    summary = {k: np.array([0.1, 0.2]) for k in ("z_phot", "z_mode", "z_lo68", "z_hi68")}
    big = np.array([2**63, 2**64 - 1], dtype=np.uint64)  # beyond int64: read back as uint64
    back = read_predictions(write_predictions(tmp_path / "p.csv", {"specObjID": big}, [0.1, 0.2], summary))
    assert back["specObjID"].dtype == np.uint64 and np.array_equal(back["specObjID"], big)
    assert "pdf_std" not in back
    with pytest.raises(ValueError, match="must be integers"):
        write_predictions(tmp_path / "q.csv", {"ObjID": np.array([1.0, 2.0])}, [0.1, 0.2], summary)
    with pytest.raises(ValueError, match="differ in length"):
        write_predictions(tmp_path / "q.csv", {"index": np.arange(3)}, [0.1, 0.2], summary)
    with pytest.raises(ValueError, match="lacks"):
        write_predictions(tmp_path / "q.csv", {}, [0.1, 0.2], {"z_phot": summary["z_phot"]})
    with pytest.raises(ValueError, match="reserved"):
        write_predictions(tmp_path / "q.csv", {"z_phot": np.arange(2)}, [0.1, 0.2], summary)
    assert not (tmp_path / "q.csv").exists()


# --- plots ---------------------------------------------------------------------------------------
def test_plots_write_non_empty_pngs(tmp_path):
    rng = np.random.default_rng(2)
    n = 400
    z_spec = rng.uniform(0.01, 0.38, n)
    probs = softmax_probs(np.clip(z_spec + 0.015 * rng.standard_normal(n), 0, 0.4))
    z_phot = summarize_pdfs(probs, GRID)["z_phot"]
    paths = plot_evaluation(tmp_path / "plots", z_phot, z_spec, probs, "test run", GRID)
    assert [p.name for p in paths] == ["zphot_vs_zspec.png", "dz_vs_zspec.png", "pdfs.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)
    assert [p.name for p in plot_evaluation(tmp_path / "no_pdfs", z_phot, z_spec, None, "points", GRID)] == \
        ["zphot_vs_zspec.png", "dz_vs_zspec.png"]
    with pytest.raises(ValueError, match="rows for"):
        plot_evaluation(tmp_path / "bad", z_phot, z_spec, probs[:10], "bad", GRID)


# --- the evaluate command: its own output directory, the training-galaxy warning --------------------------------
@pytest.fixture(scope="module")
def ft_run(tmp_path_factory) -> dict:
    """A fine-tuning run directory as ``finetune`` leaves it: best_model.pt, train/val ids, labels.json and its
    own validation results in eval/ (a random tiny network: only the bookkeeping is under test)."""
    import dataclasses
    import json

    import torch
    from helpers import TINY_MODEL, write_release_h5

    from photoz_hpc.config import FinetuneRunConfig, load_config
    from photoz_hpc.data.prepare import prepare
    from photoz_hpc.models.photoz_net import build_photoz_net, save_photoz_model

    root = tmp_path_factory.mktemp("evaluate")
    data = prepare([write_release_h5(root / "a.h5", 40, seed=1, size=20)], root / "labeled", samples_per_shard=64)
    cfg = load_config(None, [*TINY_MODEL, "augment.crop_size=16", "loader.backend=reference", "train.precision=fp32",
                             f"data.path={data}"], root=FinetuneRunConfig)
    run = root / "run"
    run.mkdir()
    torch.manual_seed(0)
    ckpt = save_photoz_model(build_photoz_net(cfg.model), cfg.model, run / "best_model.pt",
                             {"config": dataclasses.asdict(cfg)})
    np.save(run / "train_ids.npy", np.arange(0, 30))
    np.save(run / "val_ids.npy", np.arange(30, 40))
    (run / "labels.json").write_text(json.dumps({"train_data": str(data), "val_data": str(data)}))
    (run / "eval").mkdir()
    own = json.dumps({"command": "finetune", "n": 10, "metrics": {}})
    (run / "eval" / "metrics.json").write_text(own)
    return {"data": data, "run": run, "ckpt": ckpt, "own": own}


def test_evaluate_default_out_leaves_the_runs_results_and_warns_about_training_galaxies(ft_run, capsys):
    import json

    from photoz_hpc.cli import main

    run = ft_run["run"]
    assert main(["evaluate", "--checkpoint", str(ft_run["ckpt"]), "--data", str(ft_run["data"])]) == 0
    assert (run / "eval" / "metrics.json").read_text() == ft_run["own"]  # the run's validation results untouched
    out = run / f"evaluate-best_model-{ft_run['data'].name}"
    report = json.loads((out / "metrics.json").read_text())
    assert report["command"] == "evaluate" and report["n"] == 40 and report["n_training_galaxies"] == 30
    err = capsys.readouterr().err
    assert "30 of the evaluated galaxies trained this network" in err and "val_ids.npy" in err

    # held-out galaxies: no warning, their own default directory
    assert main(["evaluate", "--checkpoint", str(ft_run["ckpt"]), "--data", str(ft_run["data"]),
                 "--ids", str(run / "val_ids.npy")]) == 0
    report = json.loads((run / f"evaluate-best_model-{ft_run['data'].name}-val_ids" / "metrics.json").read_text())
    assert report["n"] == 10 and report["n_training_galaxies"] == 0
    assert "trained this network" not in capsys.readouterr().err


def test_evaluate_refuses_another_commands_directory(ft_run, capsys, tmp_path):
    from photoz_hpc.cli import main

    run = ft_run["run"]
    args = ["evaluate", "--checkpoint", str(ft_run["ckpt"]), "--data", str(ft_run["data"])]
    assert main([*args, "--out", str(run / "eval")]) == 1
    err = capsys.readouterr().err
    assert f"--out {run / 'eval'} holds the outputs of 'finetune' (metrics.json)" in err
    assert (run / "eval" / "metrics.json").read_text() == ft_run["own"]
    assert main([*args, "--out", str(run)]) == 1  # the run directory itself
    assert f"--out {run} holds the outputs of another command" in capsys.readouterr().err

    # an evaluate directory: the same evaluation again is fine, another network's or other ids are refused
    out = tmp_path / "ev"
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(out)]) == 0
    before = (out / "metrics.json").read_text()
    assert main([*args, "--out", str(out), "--ids", str(run / "val_ids.npy")]) == 1
    assert "holds the evaluation of" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before
