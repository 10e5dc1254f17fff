"""The one CLI: help for every command, and the synth -> prepare -> verify -> open_dataset round trip."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import run_cli

from photoz_hpc.cli import build_parser
from photoz_hpc.data import open_dataset

COMMANDS = ["synth", "prepare", "verify", "info", "augment", "import-checkpoint", "pretrain", "export-encoder",
            "predict", "catalogue-verify", "calibrate", "export-qp", "embed", "search", "anomalies", "finetune",
            "evaluate", "sweep-plan", "sweep-report", "quickstart", "demo"]


_run = run_cli


def test_help_lists_every_command():
    res = _run("--help")
    assert res.returncode == 0
    for cmd in COMMANDS:
        assert cmd in res.stdout, f"'{cmd}' missing from photoz-hpc --help"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([cmd, "--help"])
    assert exc.value.code == 0
    assert f"photoz-hpc {cmd}" in capsys.readouterr().out


def test_no_command_prints_help_and_fails():
    res = _run()
    assert res.returncode == 2 and "<command>" in res.stdout


def test_synth_prepare_verify_open_round_trip(tmp_path):
    h5 = tmp_path / "survey.h5"
    res = _run("synth", "--out", str(h5), "--n", "12", "--seed", "5", "--labeled", "--workers", "2")
    assert res.returncode == 0, res.stderr
    res = _run("prepare", str(h5), "--out", str(tmp_path / "ds"), "--samples-per-shard", "5")
    assert res.returncode == 0, res.stderr
    res = _run("verify", str(tmp_path / "ds"))
    assert res.returncode == 0 and "12 samples in 3 shards" in res.stdout
    ds = open_dataset(tmp_path / "ds")
    with h5py.File(h5, "r") as fh:
        for i in range(12):
            item = ds[i]
            assert item["image"].tobytes() == fh["images"][i].tobytes()
            assert item["specz_redshift"] == float(fh["specz_redshift"][i])
            assert item["ObjID"] == int(fh["ObjID"][i])
        assert np.all(fh["specz_redshift"][:] <= 0.4)
    res = _run("info", str(tmp_path / "ds"))
    assert res.returncode == 0 and "labeled_count" in res.stdout


def test_synth_rejects_bad_arguments(tmp_path):
    res = _run("synth", "--out", str(tmp_path / "x.h5"), "--n", "0")
    assert res.returncode == 1 and "--n must be >= 1" in res.stderr
    assert not (tmp_path / "x.h5").exists()
