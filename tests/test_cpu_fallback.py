"""Every shipped config runs on a machine without a GPU: a GPU setting from a config file (or from the config a
model was trained with) falls back to the CPU with one WARNING saying what changed and how to silence it; a GPU
asked for on the command line is an error before any work, saying how to run on the CPU. The real commands run
here with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``), so the test means the same on a machine with a GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_dataset, process_env, run_cli

from photoz_hpc.comm import devices
from photoz_hpc.comm.devices import check_gpu_requests, gpu_or_cpu
from photoz_hpc.config import Config, FinetuneRunConfig, load_config
from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.launch.sweep import load_sweep, task_configs
from photoz_hpc.train.runtime import resolve_device

NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}
#: tiny sizes on top of a shipped config (no device setting: that stays the config's)
SMALL = ["model.arch=resnet18", "model.width=8", "augment.crop_size=16", "augment.jitter_max=2",
         "loader.batch_size=8", "optim.batch_ref=8", "train.max_steps=2", "train.progress=false",
         "train.tensorboard=false", "train.log_every=1", "loader.num_threads=1", "loader.num_workers=0"]
FALLBACK = "loader.device=gpu (from the config) but this machine has no CUDA device: running on the CPU instead"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("cpudata"), n=48, size=20, seed=4)


def _run(*args: str):
    return run_cli(*args, env=process_env(NO_GPU), cwd=REPO, timeout=600)


def test_finetune_with_the_shipped_config_runs_on_the_cpu_with_one_warning(data, tmp_path):
    out = tmp_path / "ft"
    res = _run("finetune", "--config", "configs/finetune.yaml", f"data.path={data}", f"out_dir={out}", *SMALL)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count(FALLBACK) == 1, res.stderr[-3000:]  # once for the run's loaders and its evaluation
    assert "Set loader.device=cpu to silence this warning" in res.stderr
    assert (out / "best_model.pt").is_file() and (out / "eval" / "metrics.json").is_file()
    assert "device: gpu" in (out / "config.yaml").read_text()  # the config as asked; the log says what ran
    # evaluate reads the model's config (loader.device=gpu): the same fallback, the same single warning
    ev = _run("evaluate", "--checkpoint", str(out / "best_model.pt"), "--data", str(data), "--out", str(tmp_path / "ev"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert ev.stderr.count(FALLBACK) == 1 and (tmp_path / "ev" / "metrics.json").is_file()
    # silenced by saying so
    quiet = _run("finetune", "--config", "configs/finetune.yaml", f"data.path={data}", f"out_dir={tmp_path / 'q'}",
                 *SMALL, "loader.device=cpu")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "no CUDA device" not in quiet.stderr


def test_pretrain_with_the_shipped_config_runs_on_the_cpu_with_one_warning(data, tmp_path):
    out = tmp_path / "pre"
    res = _run("pretrain", "--config", "configs/pretrain.yaml", f"data.path={data}", f"out_dir={out}", *SMALL,
               "moco.queue_size=16", "model.embed_dim=16")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count(FALLBACK) == 1, res.stderr[-3000:]
    assert (out / "encoder.pt").is_file()


@pytest.mark.parametrize("command,config,asked", [("finetune", "configs/finetune.yaml", "loader.device=gpu"),
                                                  ("pretrain", "configs/pretrain.yaml", "train.device=cuda")])
def test_a_gpu_asked_for_on_the_command_line_is_an_error_that_says_how_to_use_the_cpu(data, tmp_path, command,
                                                                                      config, asked):
    out = tmp_path / "run"
    res = _run(command, "--config", config, f"data.path={data}", f"out_dir={out}", *SMALL, asked)
    assert res.returncode == 1
    key = asked.split("=")[0]
    assert f"{asked} on the command line, but this machine has no CUDA device" in res.stderr, res.stderr[-2000:]
    assert f"To run on its CPU, pass {key}=cpu instead" in res.stderr
    assert not out.exists()  # before any work


# ---------------------------------------------------------------------- in-process units


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_fallen_back", set())  # this test's warnings, whatever ran before
    for var in devices.GPU_ALLOCATION_VARS:  # a CPU machine: no scheduler gave this process GPUs
        monkeypatch.delenv(var, raising=False)


def test_config_settings_fall_back_once_and_explicit_ones_are_refused(no_cuda, caplog):
    with caplog.at_level(logging.WARNING, logger="photoz_hpc"):
        assert resolve_device("cuda", 0) == torch.device("cpu")
        assert resolve_device("cuda", 0) == torch.device("cpu")
        assert gpu_or_cpu("loader.device", "gpu") == gpu_or_cpu("loader.device", "gpu") == "cpu"
        assert gpu_or_cpu("loader.device", "cpu") == "cpu" and resolve_device("auto", 0) == torch.device("cpu")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("train.device=cuda (from the config)" in m for m in messages) == 1
    assert sum("loader.device=gpu (from the config)" in m for m in messages) == 1
    check_gpu_requests(["loader.device=cpu", "train.device=auto", "data.path=x"])  # nothing asked of a GPU
    with pytest.raises(ConfigError, match="loader.device=gpu train.device=cuda on the command line.*pass "
                                          "loader.device=cpu train.device=cpu instead"):
        check_gpu_requests(["loader.device=gpu", "train.device=cuda"])


@pytest.mark.parametrize("var, value", [("SLURM_GPUS_ON_NODE", "4"), ("SLURM_JOB_GPUS", "0,1"),
                                        ("CUDA_VISIBLE_DEVICES", "0"), ("CUDA_VISIBLE_DEVICES", "GPU-5f1c")])
def test_gpus_allocated_but_not_visible_stop_instead_of_falling_back(no_cuda, monkeypatch, var, value):
    """A GPU job whose CUDA does not start (driver, container, binding) must not train for hours on the CPU."""
    monkeypatch.setenv(var, value)
    with pytest.raises(PhotozError, match=f"this job was given GPUs \\({var}={value}\\).*sees no CUDA device"):
        gpu_or_cpu("loader.device", "gpu")
    with pytest.raises(PhotozError, match="not falling back to the CPU"):
        resolve_device("cuda", 0)
    assert gpu_or_cpu("loader.device", "cpu") == "cpu"  # a CPU setting is not a GPU request


@pytest.mark.parametrize("var, value", [("SLURM_GPUS_ON_NODE", "0"), ("CUDA_VISIBLE_DEVICES", ""),
                                        ("CUDA_VISIBLE_DEVICES", "-1")])
def test_no_gpus_allocated_still_falls_back(no_cuda, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert gpu_or_cpu("loader.device", "gpu") == "cpu"


def test_with_a_gpu_nothing_changes(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "_fallen_back", set())
    with caplog.at_level(logging.WARNING, logger="photoz_hpc"):
        assert gpu_or_cpu("loader.device", "gpu") == "gpu" and gpu_or_cpu("train.device", "cuda") == "cuda"
        check_gpu_requests(["loader.device=gpu", "train.device=cuda"])
    assert not caplog.records


def _shipped_run_configs() -> list[tuple[str, object]]:
    """Every shipped config that runs something, as each command reads it (sweeps: each task's config)."""
    out = []
    for path in sorted([*REPO.glob("configs/*.yaml"), *REPO.glob("configs/*/*.yaml")]):
        rel = str(path.relative_to(REPO))
        if "/surveys/" in rel:
            continue
        text = path.read_text()
        if "methods:" in text and "fractions:" in text:
            out += [(f"{rel} task {t.index}", cfg) for t, cfg in task_configs(load_sweep(path))[:1]]
        else:
            out.append((rel, load_config(path, [], root=FinetuneRunConfig if "finetune:" in text else Config)))
    return out


def test_every_shipped_config_resolves_to_the_cpu_without_a_gpu(no_cuda):
    configs = _shipped_run_configs()
    assert len(configs) >= 10  # pretrain, finetune, demos, paper, science benchmark configs and sweeps
    for name, cfg in configs:
        assert gpu_or_cpu("loader.device", cfg.loader.device) == "cpu", name
        assert resolve_device(cfg.train.device, 0) == torch.device("cpu"), name
