"""``benchmarks/gpu_check.sh`` without a GPU: its syntax, time limits, component policy and exit codes,
with stand-in interpreters (``PYTHON=...``) that fail where a real step would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "gpu_tests", "dali_tests", "loader", "split_bn", "pretrain_bf16", "pretrain_fp16", "pretrain_dali",
         "torchrun_nccl", "horovod"]


def _fake_python(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-python"
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)
    return path


def _run(tmp_path: Path, *args: str, python: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, WORK=str(tmp_path / "work"), PATH=os.environ["PATH"])
    if python is not None:
        env["PYTHON"] = str(python)
    return subprocess.run(["bash", str(SCRIPT), *args, str(tmp_path / "out")], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=120)


def _table(stdout: str) -> dict[str, tuple[str, str]]:
    """The table printed last: step -> (result, detail)."""
    tail = stdout[stdout.rindex("GPU check,"):].splitlines()
    assert tail[-1].startswith("RESULT:"), stdout[-2000:]
    rows = {}
    for line in tail[2:-1]:
        name, result, _, detail = (line.split(None, 3) + [""])[:4]
        rows[name] = (result, detail)
    return rows


NO_DALI_NO_HOROVOD = 'case "$*" in *nvidia.dali*|*horovod*) exit 1 ;; esac\nexec ' + sys.executable + ' "$@"'


def test_syntax() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_lists_every_step_within_the_time_limits(tmp_path: Path) -> None:
    p = _run(tmp_path, "--dry-run")
    assert p.returncode == 0, p.stdout + p.stderr
    limits = [int(m) for m in re.findall(r"limit +(\d+) s:", p.stdout)]
    assert len(limits) == len(STEPS) and sum(limits) < 600, limits  # one device command may run 600 s
    budget = int(re.search(r"^BUDGET_S=(\d+)$", SCRIPT.read_text(), re.M).group(1))
    assert budget <= 345  # the whole check under 6 minutes (steps are capped by what is left of it)
    assert list(_table(p.stdout)) == STEPS
    assert "--devices gpu" in p.stdout and "--devices auto" not in p.stdout  # no CPU variants on the GPU
    runs = [ln for ln in p.stdout.splitlines() if "[dry-run]" in ln and " pretrain " in ln]
    assert runs and all("train.resume=never" in ln for ln in runs)  # a rerun trains afresh
    assert "torch.distributed.run --standalone --nproc_per_node 1" in p.stdout and "dist.backend=torch" in p.stdout


def test_missing_dali_and_horovod_are_reported_and_fail_only_when_required(tmp_path: Path) -> None:
    fake = _fake_python(tmp_path, NO_DALI_NO_HOROVOD)
    p = _run(tmp_path, "--dry-run", python=fake)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = _table(p.stdout)
    for step, what in (("dali_tests", "DALI"), ("pretrain_dali", "DALI"), ("horovod", "Horovod")):
        assert rows[step] == ("skip", f"not run: {what} missing"), rows
    p = _run(tmp_path, "--dry-run", "--require-dali", python=fake)
    assert p.returncode == 1 and _table(p.stdout)["dali_tests"][0] == "FAIL"
    assert _table(p.stdout)["horovod"][0] == "skip" and p.stdout.rstrip().endswith("RESULT: FAIL")
    p = _run(tmp_path, "--dry-run", "--require-horovod", python=fake)
    assert p.returncode == 1 and _table(p.stdout)["horovod"] == ("FAIL", "Horovod missing (required by --require-horovod)")


def test_a_failing_interpreter_fails_the_check(tmp_path: Path) -> None:
    p = _run(tmp_path, python=_fake_python(tmp_path, "echo broken >&2; exit 3"))
    assert p.returncode == 1, p.stdout + p.stderr
    rows = _table(p.stdout)
    assert rows["env"][0] == "FAIL" and all(rows[s][0] in ("skip", "FAIL") for s in STEPS[1:])
    assert (tmp_path / "out" / "env.log").is_file() and (tmp_path / "out" / "table.txt").is_file()


def test_a_failing_step_after_a_good_start_fails_the_check(tmp_path: Path) -> None:
    """env passes (a stand-in GPU), every later step's command fails: each is reported and the exit code is 1."""
    body = (
        'if [[ "$1" == benchmarks/gpu_check_report.py && "$2" == env ]]; then echo "{}" > "$3"; echo "Fake GPU"; exit 0; fi\n'
        'case "$*" in *nvidia.dali*|*horovod*) exit 1 ;; esac\n'
        'echo "step failed" >&2; exit 1'
    )
    p = _run(tmp_path, python=_fake_python(tmp_path, body))
    assert p.returncode == 1, p.stdout + p.stderr
    rows = _table(p.stdout)
    assert rows["env"] == ("ok", "Fake GPU")
    for step in ("gpu_tests", "loader", "split_bn"):
        assert rows[step][0] == "FAIL", rows
    assert rows["pretrain_bf16"] == ("FAIL", "not run: no data (loader step failed)")
    assert (tmp_path / "out" / "gpu_tests.log").read_text().strip() == "step failed"  # full logs kept


@pytest.mark.parametrize("arg", ["--bogus"])
def test_unknown_option_is_an_error(tmp_path: Path, arg: str) -> None:
    assert _run(tmp_path, arg).returncode == 2
