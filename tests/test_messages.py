"""Messages, tables and figures say what the code does (issue 26, item 12): an encoder.pt handed to evaluate
says to fine-tune it first, one rank is "1 rank", a spread is printed without a sign, and a count colour
bar is ticked with plain integers."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import make_dataset, tiny_overrides

from photoz_hpc.errors import PhotozError


def test_evaluate_on_an_encoder_export_says_fine_tune_it_first(tmp_path):
    from photoz_hpc.evaluate.run import load_network
    from photoz_hpc.models.export import save_encoder
    from photoz_hpc.models.resnet import build_encoder

    model = SimpleNamespace(arch="resnet18", width=8, stem_kernel=3, embed_dim=16)
    path = save_encoder(build_encoder(model).state_dict(), None, vars(model), tmp_path / "encoder.pt")
    with pytest.raises(PhotozError, match=r"encoder export.*Fine-tune it first \(photoz-hpc finetune finetune.init="):
        load_network(path)


def test_the_start_line_of_a_one_rank_run_says_1_rank(tmp_path):
    from photoz_hpc.config import load_config
    from photoz_hpc.logs import setup_logging
    from photoz_hpc.train.pretrain import run_pretrain

    data = make_dataset(tmp_path / "data", n=64)
    cfg = load_config(None, tiny_overrides(data, tmp_path / "run", 16, 32, (
        "train.max_steps=1", "train.export_encoder=false", "dist.backend=none", "train.device=cpu")))
    logger = setup_logging("INFO", rank=0)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        run_pretrain(cfg)
    finally:
        logger.removeHandler(handler)
    start = [r for r in records if re.search(r"\d+ ranks? \(", r)]
    assert start and all(" 1 rank (" in r for r in start), start


def test_a_spread_in_the_sweep_report_has_no_sign():
    from photoz_hpc.launch.sweep_report import _pm

    assert _pm({"bias": {"mean": -0.00123, "std": 0.0}}, "bias", spec="+.4f") == "-0.0012 ± 0.0000"
    assert _pm({"bias": {"mean": 0.002, "std": 0.0005}}, "bias", spec="+.4f") == "+0.0020 ± 0.0005"


def test_the_zphot_vs_zspec_colour_bar_has_plain_integer_ticks(tmp_path, monkeypatch):
    from photoz_hpc.evaluate import plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi=110: (figures.append(fig), save(fig, path, dpi))[1])
    rng = np.random.default_rng(0)
    z_spec = rng.uniform(0.02, 0.3, 300)
    z_phot = z_spec + rng.normal(0, 0.01, 300)
    from photoz_hpc.survey import SDSS_GRID

    plots.plot_evaluation(tmp_path, z_phot, z_spec, None, "t", SDSS_GRID)
    fig = figures[0]  # zphot_vs_zspec.png
    fig.canvas.draw()
    bar = fig.axes[-1]
    lo, hi = bar.get_ylim()
    labels = [t.get_text() for t in bar.yaxis.get_ticklabels(which="both")
              if lo <= t.get_position()[1] <= hi and t.get_text()]
    assert labels and all(re.fullmatch(r"\d+", t) for t in labels), labels
