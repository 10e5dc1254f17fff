"""export-model: a photo-z network as a directory anyone can load (safetensors weights, model card, README,
checksums). The exported network gives bit-identical outputs to the file it came from (a fine-tuning run's
best_model.pt, photoz_model.pt and checkpoint, a 3-band model on a 50-bin grid, an imported paper network); the
card records bands, grid, training data and the run's metrics with their commands; a damaged or missing file is an
error naming it; torch.hub.load works on the repository; an existing directory is never overwritten by accident.
Tiny: width-8 ResNet-18 on 16 px crops, a few steps."""

from __future__ import annotations

import builtins
import collections
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, TINY_MODEL, make_dataset, process_env, run_cli
from test_import_checkpoint import X, close, photoz_source, save_photoz, tv_trunk

from photoz_hpc import __version__
from photoz_hpc.config import FinetuneRunConfig, config_from_dict, load_config
from photoz_hpc.errors import PhotozError
from photoz_hpc.evaluate.calibration import run_calibrate
from photoz_hpc.evaluate.catalogue import PLAN_NAME, PredictOptions, read_catalogue, run_predict
from photoz_hpc.evaluate.run import load_network, run_evaluate
from photoz_hpc.launch.finetune_eval import finetune_and_evaluate
from photoz_hpc.models.export import save_encoder
from photoz_hpc.models.model_files import (
    CARD,
    CHECKSUMS,
    README,
    WEIGHTS,
    load_model_dir,
    load_photoz,
    model_digest,
    verify_model_dir,
)
from photoz_hpc.models.paper_import import import_checkpoint
from photoz_hpc.models.photoz_net import build_photoz_net, load_photoz_model, save_photoz_model
from photoz_hpc.models.resnet import build_encoder
from photoz_hpc.survey import RedshiftGrid, load_survey
from photoz_hpc.train.checkpoint import list_checkpoints, load_checkpoint
from photoz_hpc.train.model_export import export_model

TINY = [*TINY_MODEL, "augment.crop_size=16", "augment.jitter_max=2", "loader.batch_size=8", "loader.device=cpu",
        "loader.backend=reference", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "train.log_every=1", "optim.batch_ref=8", "dist.backend=none", "seed=3", "train.max_steps=4"]
#: a fixed input: 5-band 16 px cutouts
IMAGES = torch.randn(3, 5, 16, 16, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A finished tiny fine-tuning run (finetune + its validation evaluation into eval/) and an evaluate of its
    best_model.pt into evaluate-*/ next to it."""
    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root / "data", n=48, size=20, seed=2)
    ft = root / "ft"
    summary = finetune_and_evaluate(load_config(None, [*TINY, f"data.path={data}", f"out_dir={ft}"],
                                                root=FinetuneRunConfig))
    report = run_evaluate(ft / "best_model.pt", data, None)
    return {"root": root, "data": data, "ft": ft, "summary": summary, "evaluate": report}


def _outputs(net: torch.nn.Module, x: torch.Tensor = IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = net(x)
    return logits, logits.softmax(-1)


def _same_network(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor = IMAGES) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    for u, v in zip(_outputs(a, x), _outputs(b, x), strict=True):
        assert torch.equal(u, v)  # bit-identical logits and pdfs, same CPU code path


# ---------------------------------------------------------------------- round trips


def test_best_model_round_trips_bit_identically_and_the_card_records_the_run(run, tmp_path):
    ft, best = run["ft"], run["ft"] / "best_model.pt"
    report = export_model(best, tmp_path / "model")
    assert report["files"] == sorted([WEIGHTS, CARD, README, CHECKSUMS]) and report["bands"] == list("ugriz")
    net, card = load_model_dir(tmp_path / "model")
    ref, cfg, _ = load_network(best)  # what evaluate and predict load
    _same_network(net, ref)
    assert net.grid == ref.grid and net.survey.bands == ref.survey.bands and not net.training

    blob = torch.load(best, weights_only=True)
    assert card["bands"] == list("ugriz") and card["survey"] == blob["survey"]
    assert card["redshift_grid"] == blob["redshift_grid"] == {"z_min": 0.0, "z_max": 0.4, "n_bins": 180}
    assert card["architecture"] | {"n_parameters": 0} == {
        "network": "PhotoZNet", "arch": "resnet18", "width": 8, "stem_kernel": 3, "input_bands": 5, "feature_dim": 64,
        "n_bins": 180, "n_parameters": 0}
    assert card["architecture"]["n_parameters"] == sum(p.numel() for p in ref.parameters())
    assert card["input"] == {"crop_size": 16, "deredden": True}
    assert card["config"] == blob["config"]  # the training config: what evaluate reads its settings from
    assert config_from_dict(card["config"], FinetuneRunConfig) == config_from_dict(blob["config"], FinetuneRunConfig)
    # training data: labels.json and the identity the run's checkpoints record
    labels = json.loads((ft / "labels.json").read_text())
    tr = card["training"]
    assert (tr["n_train"], tr["n_val"], tr["dataset"]) == (labels["n_train"], labels["n_val"], labels["train_data"])
    assert tr["method"] == "supervised" and tr["step"] == blob["step"]
    ckpt = load_checkpoint(list_checkpoints(ft / "checkpoints")[0], "finetune")
    assert tr["dataset_identity"] == {k: v for k, v in ckpt["datasets"].items() if v} != {}
    # metrics: the final validation evaluation (eval/) and the evaluate run next to it, with their commands
    val = card["metrics"]["validation"]
    ev = json.loads((ft / "eval" / "metrics.json").read_text())
    assert val["metrics"]["sigma_mad"] == ev["metrics"]["sigma_mad"] and val["metrics"]["n"] == ev["metrics"]["n"]
    assert val["command"] == f"photoz-hpc finetune --config {ft / 'config.yaml'}"
    (test,) = card["metrics"]["test"]
    assert test["metrics"]["eta"] == run["evaluate"]["metrics"]["eta"]
    assert test["command"].startswith(f"photoz-hpc evaluate --checkpoint {best.resolve()} --data ")
    assert test["n_training_galaxies"] == run["evaluate"]["n_training_galaxies"] > 0  # same data: flagged
    # provenance and house facts
    assert card["source"]["kind"] == "photo-z model file" and card["source"]["file"] == str(best.resolve())
    assert card["photoz_hpc_version"] == __version__
    assert card["license"] == (REPO / "LICENSE").read_text().splitlines()[0]
    text = (tmp_path / "model" / README).read_text()
    assert "u g r i z" in text and "180 bins" in text and f"{val['metrics']['sigma_mad']:.5g}" in text
    assert "trained the network: optimistic" in text and test["command"] in text


def test_final_model_and_checkpoint_round_trip_and_record_only_their_own_metrics(run, tmp_path):
    ft = run["ft"]
    final = ft / "photoz_model.pt"
    export_model(final, tmp_path / "final")
    net, card = load_model_dir(tmp_path / "final")
    _same_network(net, load_network(final)[0])
    blob = torch.load(final, weights_only=True)
    val = card["metrics"]["validation"]  # the validation the file records; eval/ evaluated best_model.pt
    assert val["source"].startswith("validation during fine-tuning")
    assert val["metrics"]["sigma_mad"] == blob["val_metrics"]["sigma_mad"]
    assert card["metrics"]["test"] == "not recorded"  # the evaluate run was of best_model.pt

    ckpt = list_checkpoints(ft / "checkpoints")[0]
    export_model(ckpt, tmp_path / "ckpt")
    net, card = load_model_dir(tmp_path / "ckpt")
    _same_network(net, load_network(ckpt)[0])
    assert card["source"]["kind"] == "fine-tuning checkpoint" and card["training"]["n_train"] > 0
    assert card["training"]["dataset_identity"]["data.path"] == load_checkpoint(ckpt)["datasets"]["data.path"]


def test_metrics_of_another_version_of_the_file_or_of_no_recorded_digest_are_left_out(run, tmp_path):
    """A best_model.pt replaced after its evaluations (a rerun, a copy over it) keeps none of their metrics: the card
    credits a metrics.json only when the digest it records of the network it evaluated is the exported file's; one
    of another digest or of none (written before digests were recorded) is named in the card with why."""
    ft = tmp_path / "ft"
    shutil.copytree(run["ft"], ft)
    best = ft / "best_model.pt"
    (ev,) = [p for p in ft.glob("evaluate-*/metrics.json")]
    for report_file in (ft / "eval" / "metrics.json", ev):
        report = json.loads(report_file.read_text())
        assert report["checkpoint_sha256"] == model_digest(run["ft"] / "best_model.pt")  # what evaluate recorded
        report["checkpoint"] = str(best)  # the copy's evaluations are of the copy's file
        report_file.write_text(json.dumps(report))
    report = export_model(best, tmp_path / "same")  # the same bytes: both credited
    assert report["validation"] == "recorded" and report["test"] == 1 and report["excluded"] == []
    assert "excluded" not in json.loads((tmp_path / "same" / CARD).read_text())["metrics"]

    blob = torch.load(best, weights_only=True)  # another version of best_model.pt at the same path
    key = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][key] = blob["state_dict"][key] + 1e-3
    torch.save(blob, best)
    report = export_model(best, tmp_path / "other")
    card = json.loads((tmp_path / "other" / CARD).read_text())
    assert card["source"]["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    val = card["metrics"]["validation"]  # the file's own record of its validation, not eval/'s
    assert val["source"].startswith("validation during fine-tuning") and "file" not in val
    assert card["metrics"]["test"] == "not recorded" and report["test"] == "not recorded"
    excluded = {(e["set"], Path(e["file"]).name, e["why"]) for e in card["metrics"]["excluded"]}
    assert excluded == {("validation", "metrics.json", "evaluated another version of the file"),
                        ("test", "metrics.json", "evaluated another version of the file")}
    assert {Path(e["file"]).parent for e in card["metrics"]["excluded"]} == {ft / "eval", ev.parent}
    readme = (tmp_path / "other" / README).read_text()
    assert f"- test: {ev}: evaluated another version of the file" in readme

    shutil.copy2(run["ft"] / "best_model.pt", best)  # the evaluated bytes again, but reports of before digests
    for report_file in (ft / "eval" / "metrics.json", ev):
        report = json.loads(report_file.read_text())
        del report["checkpoint_sha256"]
        report_file.write_text(json.dumps(report))
    card = json.loads(Path(export_model(best, tmp_path / "old")["out"], CARD).read_text())
    assert card["metrics"]["test"] == "not recorded"
    assert card["metrics"]["validation"]["source"].startswith("validation during fine-tuning")
    assert {(e["set"], e["why"]) for e in card["metrics"]["excluded"]} == {("validation", "no digest recorded"),
                                                                         ("test", "no digest recorded")}


def test_loading_reads_each_file_once_and_records_the_digest_of_those_bytes(exported, tmp_path, monkeypatch):
    """No check-then-read-again: each file of a model directory (and a model file) is opened once per load, and the
    digest evaluate and predict record is of the bytes loaded."""
    opened: collections.Counter = collections.Counter()
    real_open = io.open

    def counting(file, *args, **kw):
        if isinstance(file, (str, Path)):
            opened[Path(file).name] += 1
        return real_open(file, *args, **kw)

    monkeypatch.setattr(builtins, "open", counting)
    monkeypatch.setattr(io, "open", counting)
    net, cfg, meta = load_network(exported)
    assert opened == {CHECKSUMS: 1, CARD: 1, WEIGHTS: 1, README: 1}
    assert meta["checkpoint_sha256"] == hashlib.sha256((exported / CHECKSUMS).read_bytes()).hexdigest()
    opened.clear()
    _, _, meta = load_network(tmp_path / "m.pt")
    assert opened == {"m.pt": 1}
    assert meta["checkpoint_sha256"] == hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest()
    monkeypatch.undo()
    _same_network(net, load_photoz_model(tmp_path / "m.pt")[0])


def test_a_3_band_model_on_a_50_bin_grid_round_trips_with_its_bands_and_grid(tmp_path):
    survey = load_survey("legacy").subset(["g", "r", "z"])
    grid = RedshiftGrid(0.0, 1.0, 50)
    cfg = load_config(None, TINY_MODEL, root=FinetuneRunConfig)
    torch.manual_seed(5)
    net = build_photoz_net(cfg.model, survey, grid)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, so they must travel too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    save_photoz_model(net, cfg.model, tmp_path / "gzr.pt")
    report = export_model(tmp_path / "gzr.pt", tmp_path / "gzr")
    assert report["bands"] == ["g", "r", "z"] and report["redshift_grid"] == grid.to_dict()
    back, card = load_model_dir(tmp_path / "gzr")
    assert back.survey.bands == ("g", "r", "z") and back.grid == grid and back.encoder.conv1.in_channels == 3
    assert card["survey"] == survey.to_dict() and card["n_bins"] == 50 and card["architecture"]["input_bands"] == 3
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    _same_network(back, load_photoz_model(tmp_path / "gzr.pt")[0], x)
    _same_network(back, net.eval(), x)
    assert card["metrics"] == {"validation": "not recorded", "test": "not recorded"}
    assert "Validation metrics: not recorded" in (tmp_path / "gzr" / README).read_text()


def test_an_imported_paper_network_exports_with_the_authors_outputs(tmp_path):
    sd = photoz_source(seed=3, width=8)  # the authors' layout (tests/test_import_checkpoint.py), ResNet-50
    src = save_photoz(tmp_path / "photoz_finetuned_model.pth.tar", sd, ddp=True, wrapped=True)
    import_checkpoint(src, tmp_path / "paper.pt")
    export_model(tmp_path / "paper.pt", tmp_path / "paper")
    net, card = load_model_dir(tmp_path / "paper")
    _same_network(net, load_photoz_model(tmp_path / "paper.pt")[0], X)
    with torch.no_grad():
        close(net(X), torch.nn.functional.linear(tv_trunk(sd, X), sd["fc.weight"], sd["fc.bias"]))
    assert card["bands"] == list("ugriz") and card["redshift_grid"]["n_bins"] == 180
    assert card["architecture"]["arch"] == "resnet50" and card["architecture"]["stem_kernel"] == 7
    assert card["source"]["kind"] == "photo-z network imported by import-checkpoint"
    assert "Hayat et al. 2021" in card["training"]["origin"] and card["training"]["imported_from"]["epoch"] == 64
    assert card["input"] == {"crop_size": 64, "deredden": True}  # SDSS, the paper's view


# ---------------------------------------------------------------------- refusals and damage


@pytest.fixture
def exported(tmp_path) -> Path:
    cfg = load_config(None, TINY_MODEL, root=FinetuneRunConfig)
    save_photoz_model(build_photoz_net(cfg.model), cfg.model, tmp_path / "m.pt")
    return Path(export_model(tmp_path / "m.pt", tmp_path / "model")["out"])


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(PhotozError) as err:
        load_model_dir(path)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    return str(err.value)


def test_a_damaged_or_missing_file_is_an_error_naming_it(exported):
    assert set(verify_model_dir(exported)) == {WEIGHTS, CARD, README}
    weights = exported / WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit inside the tensor data: the file still parses, the checksum does not match
    weights.write_bytes(bytes(raw))
    _refused(exported, str(weights), "does not match its checksum")
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    load_model_dir(exported)  # repaired: loads again

    card = exported / CARD
    text = card.read_text()
    card.write_text(text.replace('"n_bins": 180', '"n_bins": 90', 1))  # an edit that would build another head
    _refused(exported, str(card), "does not match its checksum")
    card.unlink()
    _refused(exported, str(card), "is missing")
    card.write_text(text)
    (exported / README).write_text("edited\n")
    _refused(exported, str(exported / README))
    (exported / CHECKSUMS).unlink()
    _refused(exported, str(exported / CHECKSUMS), "is missing")


def test_the_digest_names_the_content_and_checks_it_first(exported, tmp_path):
    digest = model_digest(exported)
    assert digest == hashlib.sha256((exported / CHECKSUMS).read_bytes()).hexdigest()
    assert model_digest(tmp_path / "m.pt") == hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest()
    (exported / README).write_text("edited\n")
    with pytest.raises(PhotozError, match="README.md does not match"):
        model_digest(exported)


def test_a_checksum_list_that_leaves_out_the_weights_is_refused(exported):
    listing = exported / CHECKSUMS
    listing.write_text("".join(line + "\n" for line in listing.read_text().splitlines() if WEIGHTS not in line))
    _refused(exported, str(listing), f"does not list {WEIGHTS}")


def test_an_existing_directory_is_refused_unless_overwrite(exported, tmp_path):
    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    with pytest.raises(PhotozError, match="--overwrite"):
        export_model(tmp_path / "m.pt", exported)
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before  # untouched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PhotozError, match="not empty"):
        export_model(tmp_path / "m.pt", tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    export_model(tmp_path / "m.pt", exported, overwrite=True)
    assert json.loads((exported / CARD).read_text())["date"] and load_model_dir(exported)
    (tmp_path / "empty").mkdir()
    export_model(tmp_path / "m.pt", tmp_path / "empty")  # an empty directory is no one's work
    assert (tmp_path / "empty" / WEIGHTS).is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary or moved-aside directory left behind


def test_encoders_and_other_files_are_refused_with_what_to_do(tmp_path):
    cfg = load_config(None, TINY_MODEL, root=FinetuneRunConfig)
    save_encoder(build_encoder(cfg.model).state_dict(), None, cfg.model, tmp_path / "encoder.pt")
    with pytest.raises(PhotozError, match="no redshift head.*finetune.init="):
        export_model(tmp_path / "encoder.pt", tmp_path / "out")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(PhotozError, match="neither a photo-z model file nor a fine-tuning checkpoint"):
        export_model(tmp_path / "other.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- loaders, torch.hub, CLI


def test_load_photoz_takes_a_directory_or_a_model_file(exported, tmp_path):
    from_dir, card = load_photoz(exported)
    from_file, blob = load_photoz(tmp_path / "m.pt")
    _same_network(from_dir, from_file)
    assert card["model"] == blob["model"] and card["redshift_grid"] == blob["redshift_grid"]


def test_torch_hub_loads_the_directory_from_the_repository(exported, tmp_path):
    # in a fresh process: torch.hub imports hubconf.py from the repository root, as a user's session would
    script = (f"import torch\nnet = torch.hub.load({str(REPO)!r}, 'photoz_model', path={str(exported)!r}, "
              f"source='local')\nx = torch.load({str(tmp_path / 'x.pt')!r})\ntorch.save(net(x).detach(), "
              f"{str(tmp_path / 'y.pt')!r})\nprint(type(net).__name__, net.grid.n_bins, ''.join(net.survey.bands))")
    torch.save(IMAGES, tmp_path / "x.pt")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=process_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PhotoZNet", "180", "ugriz"]
    net, _ = load_model_dir(exported)
    assert torch.equal(torch.load(tmp_path / "y.pt"), _outputs(net)[0])


def test_the_command_line_exports_and_refuses_to_overwrite(tmp_path):
    cfg = load_config(None, TINY_MODEL, root=FinetuneRunConfig)
    save_photoz_model(build_photoz_net(cfg.model), cfg.model, tmp_path / "m.pt")
    env = process_env()
    first = run_cli("export-model", str(tmp_path / "m.pt"), str(tmp_path / "out"), env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["out"] == str(tmp_path / "out") and (tmp_path / "out" / WEIGHTS).is_file()
    again = run_cli("export-model", str(tmp_path / "m.pt"), str(tmp_path / "out"), env=env)
    assert again.returncode == 1 and "--overwrite" in again.stderr and str(tmp_path / "out") in again.stderr
    assert run_cli("export-model", str(tmp_path / "m.pt"), str(tmp_path / "out"), "--overwrite", env=env).returncode == 0
    listing = run_cli("--help", env=env)
    assert "export-model" in listing.stdout


def test_evaluate_predict_and_calibrate_take_the_exported_directory(run, tmp_path):
    best, data = run["ft"] / "best_model.pt", run["data"]
    model = tmp_path / "model"
    export_model(best, model)
    from_dir = run_evaluate(model, data, tmp_path / "ev_dir")
    from_file = run_evaluate(best, data, tmp_path / "ev_file")
    assert json.dumps(from_dir["metrics"]) == json.dumps(from_file["metrics"])  # NaN in empty bins: compared as text
    assert from_dir["bands"] == list("ugriz")
    a = (tmp_path / "ev_dir" / "predictions.csv").read_text().splitlines()
    b = (tmp_path / "ev_file" / "predictions.csv").read_text().splitlines()
    assert a == b
    for src, name in ((model, "cat_dir"), (best, "cat_file")):
        assert run_predict(src, [data], tmp_path / name, PredictOptions(batch_size=16))["complete"]
    plan = json.loads((tmp_path / "cat_dir" / PLAN_NAME).read_text())
    assert plan["checkpoint_sha256"] == model_digest(model) and "checkpoint_sha256" not in plan["model"]
    for name, src in (("ev_dir", model), ("ev_file", best)):  # evaluate records the digest of what it evaluated
        assert json.loads((tmp_path / name / "metrics.json").read_text())["checkpoint_sha256"] == model_digest(src)
    za = read_catalogue(tmp_path / "cat_dir")["z_phot"]
    zb = read_catalogue(tmp_path / "cat_file")["z_phot"]
    np.testing.assert_array_equal(np.asarray(za), np.asarray(zb))
    cal = run_calibrate(model, data, tmp_path / "cal")
    assert cal["redshift_grid"]["n_bins"] == 180
    raw = bytearray((model / WEIGHTS).read_bytes())
    raw[-1] ^= 0xFF
    (model / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(PhotozError, match="does not match its checksum"):
        run_evaluate(model, data, tmp_path / "ev_bad")
    assert not (tmp_path / "ev_bad").exists()
