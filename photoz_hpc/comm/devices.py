"""Device selection, in one place: which CUDA device a rank uses, and what a GPU setting means without a GPU.

The shipped configs ask for GPUs (``loader.device: gpu``); a machine without a CUDA device runs them on its CPU
(``gpu_or_cpu``): a GPU setting that comes from a config file (or from the config a model was trained with, or a
sweep file) is replaced by the CPU value with one WARNING per setting and process that says what changed and how to
silence it. A GPU asked for on the command line is a user's explicit request, never replaced: ``check_gpu_requests``
makes it an error before any work, saying how to run on the CPU. Nor is a GPU the scheduler allocated: a job given
GPUs (``SLURM_GPUS_ON_NODE``/``SLURM_JOB_GPUS``, or a non-empty ``CUDA_VISIBLE_DEVICES``) whose process sees no CUDA
device (a driver or container mismatch, a wrong binding) stops with an error instead of training for hours on the CPU.
"""

from __future__ import annotations

import os

import torch

from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.logs import get_logger

log = get_logger(__name__)

#: setting -> (its GPU value, its CPU value).
GPU_SETTINGS = {"loader.device": ("gpu", "cpu"), "train.device": ("cuda", "cpu")}
_fallen_back: set[str] = set()


def cuda_device_index(local_rank: int) -> int:
    """The CUDA device this rank uses: ``local_rank % device_count()``. With per-task GPU binding
    (``srun --gpus-per-task=1``, ``--gpu-bind``) every task sees one device, index 0, whatever its
    local rank; with all the node's GPUs visible it is the local rank. Used for every device choice."""
    n = torch.cuda.device_count()
    if n < 1:
        raise PhotozError("CUDA was requested but no CUDA device is visible to this process")
    return local_rank % n


def gpu_or_cpu(setting: str, value: str) -> str:
    """``value`` of ``setting`` (a key of ``GPU_SETTINGS``), or its CPU value when it asks for a GPU and this machine
    has no CUDA device, with one WARNING per setting and process."""
    gpu, cpu = GPU_SETTINGS[setting]
    if value != gpu or torch.cuda.is_available():
        return value
    allocated = allocated_gpus()
    if allocated:
        raise PhotozError(f"{setting}={gpu} and this job was given GPUs ({allocated}), but this process sees no CUDA "
                          "device (driver, container or GPU binding): not falling back to the CPU; check "
                          "torch.cuda.is_available() on the node, or set " + f"{setting}={cpu} to run on the CPU")
    if setting not in _fallen_back:
        _fallen_back.add(setting)
        log.warning("%s=%s (from the config) but this machine has no CUDA device: running on the CPU instead "
                    "(%s=%s). Set %s=%s to silence this warning (on the command line or in the config); %s=%s on the "
                    "command line requires a GPU", setting, gpu, setting, cpu, setting, cpu, setting, gpu)
    return cpu


#: Variables by which a scheduler says GPUs were allocated to this job or process.
GPU_ALLOCATION_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")


def allocated_gpus() -> str:
    """'VAR=value' for each variable saying GPUs were allocated here ('' when none: a CPU machine or job). A
    ``CUDA_VISIBLE_DEVICES`` of '', '-1' or 'NoDevFiles' hides every GPU and allocates none."""
    found = []
    for var in GPU_ALLOCATION_VARS:
        value = os.environ.get(var, "").strip()
        none = ("", "-1", "NoDevFiles") if var == "CUDA_VISIBLE_DEVICES" else ("", "0")  # SLURM_*: a count or ids
        if value not in none:
            found.append(f"{var}={value}")
    return ", ".join(found)


def check_gpu_requests(overrides: list[str]) -> None:
    """A GPU setting given on the command line (``loader.device=gpu``, ``train.device=cuda``) on a machine without a
    CUDA device: a ``ConfigError`` before any work, saying how to run on the CPU (never a silent fallback)."""
    asked = []
    for text in overrides:
        key, _, value = str(text).partition("=")
        key, value = key.strip(), value.strip().strip("'\"").lower()
        if key in GPU_SETTINGS and value == GPU_SETTINGS[key][0]:
            asked.append((key, value))
    if not asked or torch.cuda.is_available():
        return
    given = " ".join(f"{k}={v}" for k, v in asked)
    cpu = " ".join(f"{k}={GPU_SETTINGS[k][1]}" for k, _ in asked)
    raise ConfigError(f"{given} on the command line, but this machine has no CUDA device. To run on its CPU, pass "
                      f"{cpu} instead (or leave {' and '.join(k for k, _ in asked)} out: a config's GPU setting falls "
                      "back to the CPU with a warning)")
