"""The tests' shared helpers: release-layout HDF5 files and small prepared stores, the tiny model,
the CLI runner, real multi-process launches (gloo on 127.0.0.1, horovodrun) with timeouts and the
MPI-as-root environment, and the Horovod requirement policy. (Fixtures stay in conftest.py.)"""


from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from photoz_hpc.survey import load_survey

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test subprocess: this checkout first on PYTHONPATH, one thread per rank, MPI as root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks share two cores
    env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.update(extra or {})
    return env


def run_torch(script: str, args: list[str], world: int = 2, timeout: float = 180, env: dict | None = None):
    """Start ``world`` processes like torchrun does (RANK/WORLD_SIZE/MASTER_*); returns [(rc, output)]."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = process_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(env or {})})
        procs.append(subprocess.Popen([sys.executable, str(SCRIPTS / script), *args], env=e, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate()[0] for p in procs]
        pytest.fail(f"{script} did not finish within {timeout} s:\n" + "\n".join(o[-3000:] for o in outs))
    return results


def run_single(script: str, args: list[str], timeout: float = 180, env: dict | None = None):
    p = subprocess.run([sys.executable, str(SCRIPTS / script), *args], env=process_env(env), cwd=REPO, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, p.stdout


def horovod_ready() -> bool:
    from photoz_hpc.comm.horovod_comm import horovod_available

    return horovod_available() and shutil.which("horovodrun") is not None


def require_horovod() -> None:
    """Skip when Horovod is missing, unless PHOTOZ_REQUIRE_HOROVOD=1 (CI), where it is a failure."""
    if horovod_ready():
        return
    msg = "Horovod is not installed (run launch/install_horovod.sh)"
    if os.environ.get("PHOTOZ_REQUIRE_HOROVOD") == "1":
        pytest.fail(msg + " but PHOTOZ_REQUIRE_HOROVOD=1")
    pytest.skip(msg)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (horovodrun's workers live in their own process groups)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_horovod(script: str, args: list[str], np: int = 2, timeout: float = 240, env: dict | None = None):
    cmd = ["horovodrun", "--gloo", "-np", str(np), "-H", f"localhost:{np}", sys.executable, str(SCRIPTS / script), *args]
    p = subprocess.Popen(cmd, env=process_env(env), cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(p.pid)  # never leave orphaned workers behind
        out = p.communicate()[0]
        pytest.fail(f"horovodrun {script} did not finish within {timeout} s:\n{out[-3000:]}")
    return p.returncode, out


def blob_images(n: int, size: int, seed: int = 0):
    """Galaxy-like cutouts: an elliptical blob per object with its own size, shape and 5-band colours,
    plus sky noise, so instance discrimination is learnable (pure noise images are not)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    sigma = rng.uniform(1.5, 6.0, (n, 1, 1))
    q = rng.uniform(0.3, 1.0, (n, 1, 1))
    ang = rng.uniform(0, np.pi, (n, 1, 1))
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang)
    profile = np.exp(-0.5 * (u**2 + (v / q) ** 2) / sigma**2)
    colours = rng.lognormal(0.0, 0.8, (n, 5))
    images = colours[:, :, None, None] * profile[:, None] + rng.normal(0, 0.02, (n, 5, size, size))
    return images.astype(np.float32)


def make_dataset(root: Path, n: int = 256, size: int = 40, seed: int = 0) -> Path:
    """A prepared dataset of ``n`` synthetic galaxy cutouts (``size`` pixels) under ``root``."""
    from photoz_hpc.data.prepare import prepare

    root.mkdir(parents=True, exist_ok=True)
    h5 = write_release_h5(root / "release.h5", n, seed=seed, size=size, images=blob_images(n, size, seed))
    return prepare([h5], root / "prepared", samples_per_shard=128, overwrite=True)


def tiny_overrides(data: Path, out: Path, batch: int, queue: int, more: tuple[str, ...] = ()) -> list[str]:
    """A width-8 ResNet-18 on 16x16 crops: milliseconds per step on a CPU."""
    ov = {
        "model.arch": "resnet18", "model.width": 8, "model.embed_dim": 32, "augment.crop_size": 16,
        "augment.jitter_max": 2, "loader.batch_size": batch, "loader.backend": "reference", "moco.queue_size": queue,
        "data.path": str(data), "out_dir": str(out), "train.progress": "false", "train.log_every": 1,
        "train.tensorboard": "false", "optim.lr": 0.3, "optim.batch_ref": 32, "seed": 5,
    }
    return [f"{k}={v}" for k, v in ov.items()] + list(more)


def write_release_h5(path: Path, n: int, seed: int = 0, labeled: bool = True, size: int = 107, **overrides) -> Path:
    """A release-layout file with random but plausible content; ``overrides`` replace datasets."""
    rng = np.random.default_rng(seed)
    ebv = rng.lognormal(np.log(0.03), 0.5, n)
    data = {
        "images": (rng.standard_normal((n, 5, size, size)) * 0.01 + rng.uniform(0, 0.1, (n, 5, 1, 1))).astype(np.float32),
        "e_bv": (np.asarray(load_survey("sdss").input_coefficients)[None, :] * ebv[:, None]).astype(np.float32),
        "ra": rng.uniform(120, 240, n),
        "dec": rng.uniform(0, 60, n),
        "ObjID": np.arange(n, dtype=np.int64) + 1237650000000000000 + seed * 100000,
        "specObjID": np.arange(n, dtype=np.int64) + 300000000000000000 + seed * 100000,
    }
    if labeled:
        data["specz_redshift"] = rng.uniform(0.01, 0.35, n).astype(np.float32)
        data["specz_redshift_err"] = rng.uniform(1e-5, 1e-4, n).astype(np.float32)
    data.update(overrides)
    with h5py.File(path, "w") as fh:
        for key, value in data.items():
            if value is not None:
                fh.create_dataset(key, data=value)
    return path


#: A width-8 ResNet-18: milliseconds per step on a CPU (use with 16-32 px crops).
TINY_MODEL = ["model.arch=resnet18", "model.width=8"]


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """``python -m photoz_hpc ARGS`` in a subprocess (captured text output)."""
    return subprocess.run([sys.executable, "-m", "photoz_hpc", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def run_ranks(backend: str, script: str, args: list[str], world: int = 2, timeout: float = 240,
              env: dict | None = None) -> list[tuple[int, str]]:
    """``world`` ranks of ``script`` under the backend's launcher: ``horovodrun --gloo`` (one entry: its exit
    code and every rank's output; Horovod required per the policy above) or torchrun-style processes (one
    entry per rank)."""
    if backend == "horovod":
        require_horovod()
        return [run_horovod(script, args, np=world, timeout=timeout, env=env)]
    return run_torch(script, args, world=world, timeout=timeout, env=env)


def split_bn_case(dtype):
    """The split-BN tests' case: a SplitBatchNorm2d(16, 4) with non-trivial affine parameters, an input and an output
    gradient in ``dtype`` (fixed seed), and the fp64 NCHW reference run forward and backward on them.
    Returns (bn, x, g, ref, xr, yr): ``xr.grad`` and ``ref``'s parameter grads are the reference gradients."""
    import copy

    import torch

    from photoz_hpc.models.resnet import SplitBatchNorm2d

    torch.manual_seed(0)
    bn = SplitBatchNorm2d(16, 4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = (torch.randn(32, 16, 9, 7) * 2 + 0.5).to(dtype)
    g = torch.randn(32, 16, 9, 7).to(dtype)
    ref = copy.deepcopy(bn).double()
    xr = x.double().requires_grad_()
    yr = ref(xr)
    yr.backward(g.double())
    return bn, x, g, ref, xr, yr


def assert_loader_matches_oracle(loader, ref_loader, pipeline: str, crop: int, bands: int) -> None:
    """Every batch of ``loader`` (DALI) equals the reference loader's and the reference augmentation of the same
    draws (``augment_batch``): views within 1e-4 of their scale (DALI's bilinear warp rounds differently), the
    reference exactly, every other key exactly; ``batch`` views of (B, bands, crop, crop) float32."""
    import torch

    from photoz_hpc.augment.pipelines import PIPELINES
    from photoz_hpc.augment.reference import augment_batch

    view_keys = PIPELINES[pipeline].view_keys
    n = 0
    for k, (batch, ref) in enumerate(zip(loader, ref_loader, strict=True)):
        oracle = augment_batch(loader.source.batch(k), crop, loader.torch_device)
        for key, want in zip(view_keys, oracle, strict=True):
            got = batch[key]
            assert got.shape == (want.shape[0], bands, crop, crop) and got.dtype == torch.float32
            scale = want.abs().max().item()
            assert scale > 0
            assert (got - want).abs().max().item() <= 1e-4 * scale, key
            torch.testing.assert_close(ref[key], want, rtol=0, atol=0)
        for key in batch:
            if key not in view_keys:
                torch.testing.assert_close(batch[key], ref[key], rtol=0, atol=0)
        n += 1
    assert n == len(loader) > 0
