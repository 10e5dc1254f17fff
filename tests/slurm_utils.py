"""Helpers for tests that submit the real slurm/*.sh scripts to a running Slurm cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def require_slurm() -> None:
    """Skip when no cluster is up, unless PHOTOZ_REQUIRE_SLURM=1 (CI), where that is a failure."""
    ok = shutil.which("sbatch") is not None and subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0
    if ok:
        return
    if os.environ.get("PHOTOZ_REQUIRE_SLURM") == "1":
        pytest.fail("Slurm is required (PHOTOZ_REQUIRE_SLURM=1) but no cluster answers: run launch/start_slurm.sh")
    pytest.skip("no Slurm cluster (start one with launch/start_slurm.sh as root)")


def sbatch_wait(script: str, *args: str, sbatch_opts: tuple[str, ...] = (), env: dict | None = None, timeout: int = 300):
    """Submit ``script`` with ``sbatch --wait`` from the repo root; returns (CompletedProcess, log text)."""
    log = Path(env.get("PHOTOZ_TEST_LOG") if env and env.get("PHOTOZ_TEST_LOG") else "/tmp/photoz-slurm-test.out")
    log.unlink(missing_ok=True)
    run_env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **(env or {}))
    name = f"photoz-test-{uuid.uuid4().hex[:8]}"
    cmd = ["sbatch", "--wait", f"--job-name={name}", f"--chdir={REPO}", f"--output={log}", *sbatch_opts, str(REPO / script), *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], check=False)
        pytest.fail(f"sbatch {script} did not finish within {timeout} s (job cancelled); log: {log}")
    text = log.read_text() if log.exists() else ""
    return res, text
