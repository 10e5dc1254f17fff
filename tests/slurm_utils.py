"""Helpers for tests that submit the real slurm/*.sh scripts to a running Slurm cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
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


def submit(script: str, *args: str, sbatch_opts: tuple[str, ...] = (), env: dict | None = None) -> str:
    """``sbatch --parsable`` from the repo root without waiting; returns the job id."""
    run_env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **(env or {}))
    cmd = ["sbatch", "--parsable", f"--chdir={REPO}", *sbatch_opts, str(REPO / script), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=run_env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip().split(";")[0]


def job_info(job: str) -> str:
    res = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else ""


def wait_for(predicate, timeout: float, diagnostics=lambda: "", every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"condition not reached within {timeout} s\n{diagnostics()}")


def start_requeued_now(job: str, timeout: float = 240, diagnostics=lambda: "") -> None:
    """Skip Slurm's delay of a requeued job (EligibleTime = requeue + 120 s, the credential lifetime) once it
    is pending again: 2 s later, not at once. A job restarted in the same second as its requeue was processed
    on the node has a credential that counts as revoked, and slurmctld kills it ("Job credential revoked")."""
    wait_for(lambda: "JobState=PENDING" in job_info(job) and "Restarts=0" not in job_info(job), timeout, diagnostics, 0.3)
    time.sleep(2)

    def started() -> bool:
        if "JobState=PENDING" not in job_info(job):
            return True
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        return False

    wait_for(started, timeout, diagnostics)
