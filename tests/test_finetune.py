"""Fine-tuning and evaluation: label subsets, initialisation, learning rates, resume, 2 ranks = 1 rank,
exactly-once validation, a learnable end-to-end case, and the bad inputs that must fail clearly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    TINY_MODEL,
    make_dataset,
    run_cli,
    run_ranks,
    run_single,
    write_release_h5,
)

from photoz_hpc.comm.base import Comm
from photoz_hpc.config import Config, FinetuneRunConfig, load_config
from photoz_hpc.data import open_dataset
from photoz_hpc.data.prepare import prepare
from photoz_hpc.data.splits import holdout_split, nested_subset
from photoz_hpc.errors import ConfigError, DatasetError, PhotozError
from photoz_hpc.evaluate.run import load_network
from photoz_hpc.models.moco import build_moco
from photoz_hpc.train.checkpoint import export_checkpoint_encoder, save_checkpoint
from photoz_hpc.train.finetune import FinetuneTask, finetune_loaders, run_finetune, select_data

TINY = [*TINY_MODEL, "augment.crop_size=16", "augment.jitter_max=2", "loader.batch_size=16",
        "loader.backend=reference", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "train.log_every=1", "optim.lr=0.2", "optim.batch_ref=16", "dist.backend=none", "seed=1"]


def ft_config(data: Path, out: Path, *more: str) -> FinetuneRunConfig:
    return load_config(None, [*TINY, f"data.path={data}", f"out_dir={out}", *more], root=FinetuneRunConfig)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ftdata"), n=160, size=24)


def redshift_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An easy learnable case: the colour (band flux ratios) of each blob is a smooth function of z."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.02, 0.38, n)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    sigma = rng.uniform(2.0, 4.0, (n, 1, 1))
    profile = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
    colours = np.exp(-np.outer(z, np.arange(5)) * 6.0)  # redder with z
    images = colours[:, :, None, None] * profile[:, None] + rng.normal(0, 0.01, (n, 5, size, size))
    return images.astype(np.float32), z.astype(np.float32)


# ---------------------------------------------------------------------- label subsets


def test_label_subsets_are_nested_reproducible_and_validation_is_held_out():
    ids = np.arange(10, 1010)
    train, val = holdout_split(ids, 0.2, seed=4)
    assert len(val) == 200 and len(np.intersect1d(train, val)) == 0 and len(np.union1d(train, val)) == 1000
    np.testing.assert_array_equal(holdout_split(ids[::-1], 0.2, seed=4)[1], val)  # order of the input: irrelevant
    fractions = [0.025, 0.0625, 0.125, 0.25, 0.5, 1.0]
    subsets = [nested_subset(train, f, seed=7) for f in fractions]
    assert [len(s) for s in subsets] == [20, 50, 100, 200, 400, 800]
    for small, large in zip(subsets, subsets[1:], strict=False):
        assert np.isin(small, large).all()
    np.testing.assert_array_equal(nested_subset(train, 0.125, seed=7), subsets[2])
    assert not np.array_equal(nested_subset(train, 0.125, seed=8), subsets[2])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="label_fraction"):
            nested_subset(train, bad, seed=0)


def test_fraction_out_of_range_is_a_config_error(tmp_path, data):
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"finetune.label_fraction.*\(0, 1\].*command-line override"):
            ft_config(data, tmp_path, f"finetune.label_fraction={bad}")


def test_subset_is_written_and_a_changed_selection_is_refused(tmp_path, data):
    cfg = ft_config(data, tmp_path / "run", "finetune.label_fraction=0.5", "train.max_steps=2")
    run_finetune(cfg)
    train_ids = np.load(tmp_path / "run" / "train_ids.npy")
    np.testing.assert_array_equal(train_ids, select_data(cfg).train_ids)
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert labels["n_train"] == len(train_ids) == 64 and labels["n_val"] == 32
    other = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, subset_seed=9))
    with pytest.raises(ConfigError, match=r"another run .*finetune.subset_seed: 0 -> 9"):
        run_finetune(other)  # the checkpoint's config differs
    with pytest.raises(ConfigError, match="other galaxies"):  # no resume, but the run's selection is pinned
        run_finetune(dataclasses.replace(other, train=dataclasses.replace(cfg.train, resume="never")))


# ---------------------------------------------------------------------- initialisation and learning rates


def _task(cfg: FinetuneRunConfig) -> FinetuneTask:
    comm = Comm()
    data_sel = select_data(cfg)
    loader, val_loader = finetune_loaders(cfg, comm, data_sel)
    return FinetuneTask(cfg, comm, torch.device("cpu"), len(loader), data_sel, val_loader)


def _moco_checkpoint(tmp_path: Path, data: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    pcfg = load_config(None, [*TINY_MODEL, "moco.queue_size=64", "loader.batch_size=16",
                              f"data.path={data}", "seed=11"], root=Config)
    moco = build_moco(pcfg)
    with torch.no_grad():
        for p in moco.parameters():
            p.add_(0.01)  # not the initialisation anyone else would draw
    ckpt = save_checkpoint(tmp_path / "ck", 7, {"task": "pretrain", "model": moco.state_dict(),
                                                "config": dataclasses.asdict(pcfg)})
    return ckpt, {k: v.clone() for k, v in moco.encoder.state_dict().items()}


def test_init_from_moco_checkpoint_from_encoder_export_and_from_scratch(tmp_path, data):
    ckpt, trunk = _moco_checkpoint(tmp_path, data)
    enc = export_checkpoint_encoder(ckpt, tmp_path / "encoder.pt")
    for init in (ckpt, enc):
        net = _task(ft_config(data, tmp_path / "a", f"finetune.init={init}")).model
        for k, v in trunk.items():
            torch.testing.assert_close(net.encoder.state_dict()[k], v, msg=f"{init}: {k}")
    scratch = _task(ft_config(data, tmp_path / "b", "finetune.init=none")).model
    assert not torch.equal(scratch.encoder.conv1.weight, trunk["conv1.weight"])
    with pytest.raises(ConfigError, match="model.width=8"):
        _task(ft_config(data, tmp_path / "c", f"finetune.init={enc}", "model.width=16"))


def test_backbone_lr_is_ten_times_smaller_and_a_probe_freezes_the_trunk(tmp_path, data):
    task = _task(ft_config(data, tmp_path / "a"))
    loader = finetune_loaders(task.cfg, task.comm, task.data)[0]
    loader.set_epoch(0)
    trunk_before = task.model.encoder.conv1.weight.detach().clone()
    task.train_batch(next(iter(loader)))
    groups = {g["name"]: g for g in task.optimizer.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.1 * groups["head"]["lr"]) and groups["head"]["lr"] > 0
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in task.model.encoder.parameters()}
    assert not torch.equal(task.model.encoder.conv1.weight, trunk_before)

    probe = _task(ft_config(data, tmp_path / "b", "finetune.freeze_backbone=true"))
    before = {k: v.clone() for k, v in probe.model.encoder.state_dict().items()}
    head_before = probe.model.head.weight.detach().clone()
    probe.train_batch(next(iter(loader)))
    for k, v in probe.model.encoder.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(v, before[k]), k
    assert not torch.equal(probe.model.head.weight, head_before)


# ---------------------------------------------------------------------- learning, evaluation, resume


def test_finetune_learns_an_easy_case_and_evaluate_writes_its_outputs(tmp_path):
    images, z = redshift_images(640, 24, seed=2)
    h5 = write_release_h5(tmp_path / "z.h5", 640, seed=3, size=24, images=images, specz_redshift=z)
    ds = prepare([h5], tmp_path / "zdata", samples_per_shard=256, overwrite=True)
    cfg = ft_config(ds, tmp_path / "run", "train.epochs=8", "loader.batch_size=32", "optim.lr=0.8",
                    "optim.batch_ref=32", "optim.schedule=step", "optim.milestones=[6]", "augment.rotation=false",
                    "finetune.backbone_lr_scale=1.0")
    summary = run_finetune(cfg)
    net, _, meta = load_network(summary["best_model"])
    best = meta["val_metrics"]
    val_z = z[np.load(tmp_path / "run" / "val_ids.npy")].astype(np.float64)
    mean_z = z[np.load(tmp_path / "run" / "train_ids.npy")].mean()
    from photoz_hpc.metrics import photoz_metrics

    chance = photoz_metrics(np.full_like(val_z, mean_z), val_z)
    assert best["sigma_mad"] < 0.5 * chance["sigma_mad"], (best, chance)
    assert best["eta"] < chance["eta"]
    assert summary["best_val"]["sigma_mad"] == pytest.approx(best["sigma_mad"])

    out = tmp_path / "eval"
    res = run_cli("evaluate", "--checkpoint", summary["best_model"], "--data", str(ds),
                  "--ids", str(tmp_path / "run" / "val_ids.npy"), "--out", str(out), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["n"] == len(val_z) and report["metrics"]["sigma_mad"] == pytest.approx(best["sigma_mad"], rel=1e-5)
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["index", "ObjID", "specObjID", "z_spec"] and {"z_phot", "z_mode", "z_lo68", "z_hi68"} <= set(header)
    for png in ("zphot_vs_zspec.png", "dz_vs_zspec.png", "pdfs.png"):
        assert (out / png).stat().st_size > 1000


def _losses(out: Path) -> dict[int, float]:
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def test_sigkill_resume_reproduces_finetune_losses(tmp_path, data):
    more = [*TINY, f"data.path={data}", "train.max_steps=11", "train.checkpoint_every=4"]  # 8 steps per epoch

    def run(out: Path, kill_after: int = 0):
        args = ([f"--kill-after={kill_after}"] if kill_after else []) + [*more, f"out_dir={out}"]
        return run_single("finetune_run.py", args)

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    rc, log = run(ref)
    assert rc == 0, log[-3000:]
    rc, log = run(cut, kill_after=6)
    assert rc == -9, log[-3000:]
    rc, log = run(cut)
    assert rc == 0 and "resumed from" in log and "at step 4" in log, log[-3000:]
    a, b = _losses(ref), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 12))
    for step in range(5, 12):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}"
    assert len({round(a[s], 5) for s in range(5, 12)}) > 3
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, cut))
    assert sb["best_val"]["sigma_mad"] == pytest.approx(sa["best_val"]["sigma_mad"], rel=1e-6)


@pytest.fixture(scope="module")
def equivalence_reference(tmp_path_factory, data) -> dict:
    out = tmp_path_factory.mktemp("fteq") / "ref.pt"
    rc, log = run_single("finetune_equivalence.py", ["--backend", "none", "--data", str(data), "--out", str(out)])
    assert rc == 0, log[-3000:]
    return torch.load(out, weights_only=True)


def _compare(ref: dict, got: dict) -> None:
    """float32 with tolerances (unlike the MoCo equivalence, which needed float64): each rank's BatchNorm and the
    one-rank split BatchNorm compute the same sub-batch statistics, and nothing cancels, so the two runs differ
    by at most 0.8% of these tolerances over the 5 steps (measured on AMD EPYC, ATEN_CPU_CAPABILITY avx2 and
    default, 2026-12-06): a margin of over 100x for other CPUs, not a bit-level agreement."""
    assert got["world"] == 2 and ref["world"] == 1
    for step, (a, b) in enumerate(zip(ref["records"], got["records"], strict=True)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {step} loss"
        assert b["lr"] == a["lr"]
        torch.testing.assert_close(b["weights"], a["weights"], rtol=1e-4, atol=1e-5, msg=f"step {step} weights")
    # validation: every validation galaxy exactly once, in id order, with the same predictions
    np.testing.assert_array_equal(got["index"], ref["val_ids"])
    np.testing.assert_array_equal(ref["index"], ref["val_ids"])
    np.testing.assert_allclose(got["z_phot"], ref["z_phot"], rtol=1e-4, atol=1e-5)
    assert got["val"]["sigma_mad"] == pytest.approx(ref["val"]["sigma_mad"], rel=1e-4)


@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_two_ranks_equal_one_rank(tmp_path, data, equivalence_reference, backend):
    out = tmp_path / f"{backend}.pt"
    for rc, log in run_ranks(backend, "finetune_equivalence.py", ["--backend", backend, "--data", str(data),
                                                                 "--out", str(out)]):
        assert rc == 0, log[-3000:]
    _compare(equivalence_reference, torch.load(out, weights_only=True))


# ---------------------------------------------------------------------- bad inputs


def test_bad_inputs_fail_clearly(tmp_path, data, release_h5):
    unlabeled = prepare([release_h5("u.h5", 32, labeled=False, size=24)], tmp_path / "unlabeled", samples_per_shard=32)
    with pytest.raises(DatasetError, match="no sample has a spectroscopic redshift"):
        run_finetune(ft_config(unlabeled, tmp_path / "u"))

    ckpt, _ = _moco_checkpoint(tmp_path, data)
    with pytest.raises(PhotozError, match="pretraining .*checkpoint.*no redshift head"):
        load_network(ckpt)
    run_finetune(ft_config(data, tmp_path / "ft", "train.max_steps=2"))
    ft_ckpt = next((tmp_path / "ft" / "checkpoints").glob("ckpt_*.pt"))
    with pytest.raises(PhotozError, match="is a fine-tuning checkpoint"):
        run_finetune(ft_config(data, tmp_path / "x", f"finetune.init={ft_ckpt}"))
    with pytest.raises(PhotozError, match="is a finetune checkpoint, but a pretrain checkpoint is needed"):
        from photoz_hpc.train.pretrain import run_pretrain

        run_pretrain(load_config(None, [*TINY, "moco.queue_size=64", f"data.path={data}", f"out_dir={tmp_path / 'ft'}"]))

    # a separate validation set that shares galaxies (same ObjIDs) with the training set
    twin = prepare([Path(data).parent / "release.h5"], tmp_path / "twin", samples_per_shard=128)
    with pytest.raises(ConfigError, match="overlaps training"):
        run_finetune(ft_config(data, tmp_path / "ov", f"finetune.val_data={twin}"))
    assert len(open_dataset(twin)) == len(open_dataset(data))


# ---------------------------------------------------------------------- resume: the same run only


def _files(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file() and ".photoz-run.lock" not in p.name}


def test_resume_refuses_another_init_or_lr_and_a_finished_run_writes_nothing(tmp_path, data):
    from photoz_hpc.launch.photoz_cli import finetune_and_evaluate

    ckpt, _ = _moco_checkpoint(tmp_path, data)
    enc = export_checkpoint_encoder(ckpt, tmp_path / "encoder.pt")
    out = tmp_path / "ssl"
    first = finetune_and_evaluate(ft_config(data, out, f"finetune.init={enc}", "train.max_steps=3",
                                            "train.checkpoint_every=2"))
    assert first["eval"]["metrics"]["n"] == 32
    before = _files(out)
    assert {"config.yaml", "summary.json", "labels.json", "train_ids.npy", "best_model.pt", "eval/metrics.json"} <= set(before)

    again = finetune_and_evaluate(ft_config(data, out, f"finetune.init={enc}", "train.max_steps=3",
                                            "train.checkpoint_every=2", "train.log_every=5"))
    assert again["already_finished"] is True and again["eval"] == first["eval"]
    assert _files(out) == before  # no config.yaml, summary.json, labels or evaluation rewritten

    with pytest.raises(ConfigError, match=rf"finetune.init: '{enc}' -> 'none'"):  # the supervised baseline
        finetune_and_evaluate(ft_config(data, out, "finetune.init=none", "train.max_steps=6"))
    other = make_dataset(tmp_path / "other", n=160, size=24, seed=4)
    with pytest.raises(ConfigError) as err:
        run_finetune(ft_config(data, out, f"finetune.init={enc}", f"data.path={other}", "optim.lr=0.05",
                               "train.max_steps=6"))
    assert "data.path" in str(err.value) and "(other data)" in str(err.value) and "optim.lr: 0.2 -> 0.05" in str(err.value)
    assert _files(out) == before
    assert yaml_init(out) == str(enc)


def yaml_init(out: Path) -> str:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())["finetune"]["init"]


# ---------------------------------------------------------------------- a failed start pins nothing


def test_a_run_that_never_trained_pins_no_selection_and_the_advice_is_true(tmp_path, data):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:  # 128 training galaxies at label_fraction 1.0, batch 200
        run_finetune(ft_config(data, out, "loader.batch_size=200"))
    msg = str(err.value)
    assert "128 training galaxies" in msg and "loader.batch_size <= 128" in msg and "label_fraction" not in msg
    left = {p.name for p in out.iterdir()} if out.exists() else set()
    assert not left & {"labels.json", "train_ids.npy", "val_ids.npy", "config.yaml", "checkpoints"}, left
    with pytest.raises(ConfigError, match=r"loader.batch_size <= 64, or raise finetune.label_fraction \(now 0.5\)"):
        run_finetune(ft_config(data, out, "loader.batch_size=100", "finetune.label_fraction=0.5"))
    # following the advice works in the same out_dir, also over files a run that never checkpointed left behind
    out.mkdir(exist_ok=True)
    np.save(out / "train_ids.npy", np.arange(5))
    s = run_finetune(ft_config(data, out, "finetune.label_fraction=0.5", "train.max_steps=2"))
    assert s["steps"] == 2 and s["n_train"] == 64
    np.testing.assert_array_equal(np.load(out / "train_ids.npy"),
                                  select_data(ft_config(data, out, "finetune.label_fraction=0.5")).train_ids)


# ---------------------------------------------------------------------- which network is kept


def test_best_network_rule_guards_against_outlier_dominated_validations():
    from photoz_hpc.train.finetune import selection_key

    early = {"sigma_mad": 0.010, "eta": 0.72}  # a narrow core, most galaxies outlying (the epoch 0)
    later = {"sigma_mad": 0.030, "eta": 0.30}
    best = {"sigma_mad": 0.020, "eta": 0.10}
    assert min([early, later, best], key=lambda m: selection_key(m, 0.5)) is best
    assert min([early, later], key=lambda m: selection_key(m, 0.5)) is later
    assert min([early, later], key=lambda m: selection_key(m, 1.0)) is early  # sigma_MAD alone, on request
    worse = {"sigma_mad": 0.005, "eta": 0.90}
    assert min([early, worse], key=lambda m: selection_key(m, 0.5)) is early  # none qualifies: the lowest eta


def test_finetune_keeps_the_epoch_the_rule_picks(tmp_path, data, monkeypatch):
    """Validations scripted per epoch: the default keeps epoch 2 (eta 30%) over epoch 0 (sigma_MAD lower, eta 72%);
    finetune.select_max_eta=1 keeps epoch 0; best_model.pt holds the kept epoch's weights."""
    from photoz_hpc.train import finetune as ft_mod

    scripted = [(0.010, 0.72), (0.050, 0.40), (0.030, 0.30)]

    def fake_validate(self):
        self.sync_buffers()
        sigma, eta = scripted[self.step // self.steps_per_epoch - 1]
        return {"sigma_mad": sigma, "eta": eta, "bias": 0.0, "n": 32, "outlier_rate_lsst": eta}

    monkeypatch.setattr(ft_mod.FinetuneTask, "validate", fake_validate)
    for max_eta, epoch in ((None, 2), (1.0, 0)):
        out = tmp_path / f"eta{max_eta}"
        more = [] if max_eta is None else [f"finetune.select_max_eta={max_eta}"]
        s = run_finetune(ft_config(data, out, "train.epochs=3", "finetune.label_fraction=0.25", *more))
        assert s["best_val"]["epoch"] == epoch and s["best_val"]["eta"] == scripted[epoch][1], s["best_val"]
        saved = torch.load(out / "best_model.pt", weights_only=True)
        assert saved["epoch"] == epoch
