"""Model files are data, never code: a ``.pt`` whose unpickling runs code is handed to every command that reads a
model or checkpoint (the list comes from the CLI, so a new command cannot be forgotten) and must be refused with a
clear error and no code run; ``--trust-pickle`` is the logged opt-in; every file photoz-hpc writes loads with a
plain ``torch.load(weights_only=True)``; files of earlier versions (numpy RNG state inside) still load and resume."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, make_dataset, process_env
from test_import_checkpoint import photoz_source

from photoz_hpc.cli import build_parser, main
from photoz_hpc.config import FinetuneRunConfig, load_config
from photoz_hpc.data.splits import load_ids
from photoz_hpc.errors import DatasetError, PhotozError
from photoz_hpc.torch_files import UnsafePickleError, read_torch_file, write_torch_file
from photoz_hpc.train.checkpoint import FORMAT, find_latest_valid, load_checkpoint
from photoz_hpc.train.runtime import set_rng_state

#: Commands that read a model or checkpoint file (each must have --trust-pickle and a case below) ...
READS_MODEL = {"import-checkpoint", "resave", "pretrain", "export-encoder", "export-model", "finetune", "evaluate",
               "predict", "calibrate", "embed", "quickstart", "demo"}
#: ... and those that read none (data, catalogues, embeddings, JSON/YAML).
READS_NO_MODEL = {"synth", "prepare", "verify", "info", "stage", "augment", "catalogue-verify", "export-qp", "search",
                  "anomalies", "sweep-plan", "sweep-report"}

TINY = [*TINY_MODEL, "augment.crop_size=16", "augment.jitter_max=2", "loader.batch_size=16", "loader.backend=reference",
        "train.precision=fp32", "train.progress=false", "train.tensorboard=false", "optim.lr=0.2", "optim.batch_ref=16",
        "dist.backend=none", "seed=1"]
PRE = [*TINY, "moco.queue_size=64", "model.embed_dim=32"]


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the code a hostile file would run (it leaves None behind)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def evil_file(path: Path, marker: Path, **save_kw) -> Path:
    """A file that looks like a pretraining checkpoint and runs code when unpickled."""
    torch.save({"format": FORMAT, "task": "pretrain", "step": 1, "model": {"w": torch.zeros(2)},
                "extra": Payload(marker)}, path, **save_kw)
    return path


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def has_flag(parser: argparse.ArgumentParser, flag: str) -> bool:
    return any(flag in a.option_strings for a in parser._actions)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("safedata"), n=96, size=24)


# ---------------------------------------------------------------------- every reading command refuses


def test_every_command_is_classified_and_the_readers_have_the_opt_in():
    commands = subcommands()
    unclassified = set(commands) - READS_MODEL - READS_NO_MODEL
    assert not unclassified, f"classify these commands in tests/test_safe_load.py: {sorted(unclassified)}"
    assert not READS_MODEL & READS_NO_MODEL
    assert set(commands) >= READS_MODEL | READS_NO_MODEL, "a classified command no longer exists"
    for name, parser in commands.items():
        assert has_flag(parser, "--trust-pickle") == (name in READS_MODEL), name
    assert set(CASES) == READS_MODEL, "every command that reads a model file needs a case in CASES"


#: command -> ways it reads a model file: argv builders (dataset, tmp dir, evil file).
CASES = {
    "import-checkpoint": [lambda d, t, evil: [str(evil), str(t / "out.pt")]],
    "resave": [lambda d, t, evil: [str(evil), str(t / "out.pt")]],
    "export-encoder": [lambda d, t, evil: [str(evil), str(t / "encoder.pt")]],
    "export-model": [lambda d, t, evil: [str(evil), str(t / "model")]],
    "pretrain": [lambda d, t, evil: [*PRE, f"data.path={d}", f"out_dir={t / 'run'}", f"train.resume={evil}"],
                 # resume auto: a refused checkpoint in out_dir is an error, never skipped
                 lambda d, t, evil: [*PRE, f"data.path={d}", f"out_dir={evil.parent.parent}"]],
    "finetune": [lambda d, t, evil: [*TINY, f"data.path={d}", f"out_dir={t / 'run'}", f"finetune.init={evil}"],
                 lambda d, t, evil: [*TINY, f"data.path={d}", f"out_dir={t / 'run'}", f"train.resume={evil}"]],
    "evaluate": [lambda d, t, evil: ["--checkpoint", str(evil), "--data", str(d), "--out", str(t / "ev")]],
    "predict": [lambda d, t, evil: ["--checkpoint", str(evil), "--data", str(d), "--out", str(t / "cat"),
                                    "loader.backend=reference"]],
    "calibrate": [lambda d, t, evil: ["--checkpoint", str(evil), "--data", str(d), "--out", str(t / "cal"),
                                      "loader.backend=reference"]],
    "embed": [lambda d, t, evil: ["--checkpoint", str(evil), "--data", str(d), "--out", str(t / "emb"),
                                  "loader.backend=reference"]],
    "quickstart": [lambda d, t, evil: ["--out", str(t / "q"), f"data.path={d}", *TINY, "moco.queue_size=64",
                                       f"train.resume={evil}"]],
    "demo": [lambda d, t, evil: ["--out", str(t / "q"), f"data.path={d}", *TINY, "moco.queue_size=64",
                                 f"train.resume={evil}"]],
}


@pytest.mark.parametrize("command,route", [(c, i) for c in sorted(CASES) for i in range(len(CASES[c]))])
def test_a_file_that_runs_code_is_refused_by_every_command(tmp_path, data, capsys, command, route):
    marker = tmp_path / "PWNED"
    evil_dir = tmp_path / "evilrun" / "checkpoints"
    evil_dir.mkdir(parents=True)
    evil = evil_file(evil_dir / "ckpt_000000001.pt", marker)
    argv = [command, *CASES[command][route](data, tmp_path, evil)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert not marker.exists(), f"{argv} ran the file's code"
    assert rc == 1, (argv, err[-2000:])
    assert f"photoz-hpc {command}: error:" in err and str(evil) in err, err[-2000:]
    assert "pickled Python objects" in err and "--trust-pickle" in err and "photoz-hpc resave" in err, err[-2000:]


def test_trust_pickle_runs_the_file_and_says_so(tmp_path):
    """The opt-in: the payload does run (so the marker above would have caught it), with a WARNING naming the file."""
    marker = tmp_path / "PWNED"
    evil = evil_file(tmp_path / "evil.pt", marker)
    res = subprocess.run([sys.executable, "-m", "photoz_hpc", "resave", str(evil), str(tmp_path / "safe.pt"),
                          "--trust-pickle"], capture_output=True, text=True, env=process_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert marker.exists()
    assert "WARNING" in res.stderr and f"--trust-pickle: unpickling file {evil}" in res.stderr, res.stderr[-2000:]
    assert _plain_load(tmp_path / "safe.pt")["extra"] is None  # what the payload returned, now plain data


def test_torch_legacy_format_and_id_files_are_refused_too(tmp_path):
    marker = tmp_path / "PWNED"
    old = evil_file(tmp_path / "old_format.pt", marker, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError, match=r"old_format.pt holds pickled Python objects \(posix.mkdir\).*--trust-pickle"):
        read_torch_file(old, "checkpoint")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="ids.npy: unreadable id file"):
        load_ids(ids)
    assert not marker.exists()


def test_damaged_files_are_corrupt_and_object_arrays_are_objects(tmp_path):
    """A damaged file is not blamed on pickle (no opt-in offered); an object array inside an old-style file is."""
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    enc = tmp_path / "enc.pt"
    write_torch_file(enc, {"w": torch.zeros(1000)})
    (tmp_path / "cut.pt").write_bytes(enc.read_bytes()[:2000])
    for name in ("junk.pt", "cut.pt"):
        with pytest.raises(PhotozError, match=rf"checkpoint .*{name} is unreadable or corrupt") as info:
            read_torch_file(tmp_path / name, "checkpoint")
        assert "--trust-pickle" not in str(info.value) and not isinstance(info.value, UnsafePickleError)
    torch.save({"rng": np.array([1, "x"], dtype=object)}, tmp_path / "objects.pt")
    with pytest.raises(UnsafePickleError, match=r"objects.pt holds pickled Python objects \(numpy\."):
        read_torch_file(tmp_path / "objects.pt", "checkpoint")


# ---------------------------------------------------------------------- what photoz-hpc writes is plain data


def _plain_load(path: Path):
    """What any user can do: no allowlist, no photoz-hpc code."""
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
    return torch.load(path, weights_only=True)


def test_every_file_photoz_hpc_writes_loads_with_plain_weights_only(tmp_path, data):
    from photoz_hpc.models.paper_import import import_checkpoint
    from photoz_hpc.train.finetune import run_finetune
    from photoz_hpc.train.pretrain import run_pretrain

    pre = tmp_path / "pre"
    run_pretrain(load_config(None, [*PRE, f"data.path={data}", f"out_dir={pre}", "train.max_steps=2"]))
    ft = tmp_path / "ft"
    run_finetune(load_config(None, [*TINY, f"data.path={data}", f"out_dir={ft}", f"finetune.init={pre / 'encoder.pt'}",
                                    "train.epochs=1"], root=FinetuneRunConfig))
    assert main(["export-encoder", str(next((pre / "checkpoints").glob("ckpt_*.pt"))), str(tmp_path / "exp.pt")]) == 0
    paper = tmp_path / "paper.pth.tar"  # the authors' layout, with a numpy scalar: allowlisted, converted
    torch.save({"epoch": np.int64(3), "model_state": photoz_source(seed=3, width=8)}, paper)
    import_checkpoint(paper, tmp_path / "imported.pt")

    written = {
        "pretrain checkpoint": next((pre / "checkpoints").glob("ckpt_*.pt")), "encoder.pt": pre / "encoder.pt",
        "export-encoder": tmp_path / "exp.pt", "finetune checkpoint": next((ft / "checkpoints").glob("ckpt_*.pt")),
        "best_model.pt": ft / "best_model.pt", "photoz_model.pt": ft / "photoz_model.pt",
        "imported photo-z model": tmp_path / "imported.pt",
    }
    for kind, path in written.items():
        blob = _plain_load(path)
        assert isinstance(blob, dict) and blob["format"].startswith("photoz-hpc/"), kind
    rng = _plain_load(written["finetune checkpoint"])["rng"][0]["numpy"]
    assert isinstance(rng["key"], torch.Tensor) and rng["key"].numel() == 624


def test_the_writer_refuses_what_would_need_pickle(tmp_path):
    with pytest.raises(TypeError, match=r"\['best'\]\['sigma'\]: numpy.float64 is not plain data"):
        write_torch_file(tmp_path / "x.pt", {"best": {"sigma": np.float64(0.1)}})
    with pytest.raises(TypeError, match=r"\['rng'\]\[1\]: numpy.ndarray"):
        write_torch_file(tmp_path / "x.pt", {"rng": ("MT19937", np.zeros(3, np.uint32))})
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------- files of earlier versions


def test_old_checkpoints_with_numpy_state_load_safely_resume_and_convert(tmp_path, data):
    """Before plain RNG state, checkpoints held ``np.random.get_state()`` (an ndarray) and could hold numpy scalars:
    they load through the numpy-only allowlist, restore the numpy stream exactly, and ``resave`` makes them plain."""
    from photoz_hpc.train.pretrain import run_pretrain

    new = tmp_path / "new"
    run_pretrain(load_config(None, [*PRE, f"data.path={data}", f"out_dir={new}", "train.max_steps=2"]))
    state = torch.load(next((new / "checkpoints").glob("ckpt_*.pt")), weights_only=True)
    np.random.seed(7)
    saved = np.random.get_state()
    expected = np.random.rand(4)
    state["rng"][0]["numpy"] = saved  # what earlier versions wrote
    state["schedule"]["global_batch"] = np.int64(state["schedule"]["global_batch"])
    old_dir = tmp_path / "old" / "checkpoints"
    old_dir.mkdir(parents=True)
    old = old_dir / "ckpt_000000002.pt"
    torch.save(state, old)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(old)  # really an old-style file

    loaded = load_checkpoint(old, "pretrain")
    assert type(loaded["schedule"]["global_batch"]) is int
    np.random.seed(0)
    set_rng_state(loaded["rng"][0])
    np.testing.assert_array_equal(np.random.rand(4), expected)
    assert find_latest_valid(old_dir, "pretrain")[0] == old
    # a run resumes from it (train.resume=auto in its out_dir) and finishes
    summary = run_pretrain(load_config(None, [*PRE, f"data.path={data}", f"out_dir={old_dir.parent}",
                                              "train.max_steps=3"]))
    assert summary["start_step"] == 2 and summary["steps"] == 3

    assert main(["resave", str(old), str(tmp_path / "converted.pt")]) == 0  # no opt-in needed for our own files
    assert _plain_load(tmp_path / "converted.pt")["rng"][0]["numpy"][1].dtype == torch.uint32


def test_resave_with_trust_converts_a_pickled_file_to_plain_data(tmp_path, capsys):
    src = tmp_path / "foreign.pth.tar"
    torch.save({"args": argparse.Namespace(lr=0.03, path=Path("/x")), "best": np.float64(0.5),
                "state_dict": {"w": torch.ones(2)}}, src)
    assert main(["resave", str(src), str(tmp_path / "a.pt")]) == 1
    assert "argparse.Namespace" in capsys.readouterr().err and not (tmp_path / "a.pt").exists()
    assert main(["resave", str(src), str(tmp_path / "b.pt"), "--trust-pickle"]) == 0
    blob = _plain_load(tmp_path / "b.pt")
    assert blob["args"] == {"lr": 0.03, "path": "/x"} and blob["best"] == 0.5 and blob["state_dict"]["w"].sum() == 2


def test_the_opt_in_ends_with_the_command(tmp_path):
    marker = tmp_path / "PWNED"
    evil = evil_file(tmp_path / "evil.pt", marker)
    assert main(["resave", str(evil), str(tmp_path / "x.pt"), "--trust-pickle"]) == 0
    assert marker.exists()
    marker.rmdir()
    with pytest.raises(UnsafePickleError, match="evil.pt holds pickled Python objects"):
        read_torch_file(evil, "checkpoint")
    assert not marker.exists()
