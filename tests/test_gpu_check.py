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
# most important first: crashes (the CUDA tests; split BN's fused backward compiling), then training-step
# throughput, then the loader
STEPS = ["env", "store", "gpu_tests", "split_bn", "pretrain_bf16", "loader", "pretrain_fp16", "dali_tests",
         "pretrain_dali", "torchrun_nccl", "horovod"]


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
    steps = re.findall(r"^\[dry-run\] (\S+) +limit +(\d+) s:", p.stdout, re.M)
    limits = [int(limit) for _, limit in steps]
    budget = int(re.search(r"^BUDGET_S=(\d+)$", SCRIPT.read_text(), re.M).group(1))
    # every step's limit fits the budget together: none is cut because an earlier one ran to its limit
    assert len(limits) == len(STEPS) and sum(limits) <= budget, (limits, budget)
    assert budget <= 300  # the check twice + start-up + transfers within 15 minutes of device time (docs/benchmarks.md)
    assert [name for name, _ in steps] == STEPS and list(_table(p.stdout)) == STEPS
    # the store is built in a step of its own, before every step that reads it
    store = next(ln for ln in p.stdout.splitlines() if ln.startswith("[dry-run] store "))
    assert "--store-only" in store and "--n 8192" in store
    readers = [ln for ln in p.stdout.splitlines() if "[dry-run]" in ln and "bench-8192-107" in ln]
    assert readers and not any("--store-only" in ln or "--n " in ln for ln in readers)
    assert "--devices gpu" in p.stdout and "--devices auto" not in p.stdout  # no CPU variants on the GPU
    runs = [ln for ln in p.stdout.splitlines() if "[dry-run]" in ln and " pretrain " in ln]
    assert runs and all("train.resume=never" in ln for ln in runs)  # a rerun trains afresh
    assert "torch.distributed.run --standalone --nproc_per_node 1" in p.stdout and "dist.backend=torch" in p.stdout


def test_a_store_left_half_built_is_rebuilt(tmp_path: Path) -> None:
    """A store build killed midway leaves ``*.partial`` planned for an HDF5 since rewritten: the store step
    removes it and builds the store (it used to fail every rerun: "an unfinished prepare of different inputs")."""
    partial = tmp_path / "work" / "bench-64-107.partial"
    partial.mkdir(parents=True)
    (partial / "plan.json").write_text('{"inputs": [["/elsewhere/bench-64-107.h5", 1, 2]], "samples_per_shard": 1024}')
    (partial / "shard-00000.bin").write_bytes(b"half")
    p = subprocess.run([sys.executable, "benchmarks/pipeline_throughput.py", "--store-only", "--work",
                        str(tmp_path / "work"), "--n", "64"], cwd=REPO, text=True, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    store = tmp_path / "work" / "bench-64-107"
    assert p.stdout.strip().splitlines()[-1] == str(store)
    assert (store / "manifest.json").is_file() and not partial.exists()
    from photoz_hpc.data import open_dataset

    assert len(open_dataset(store)) == 64


def test_dali_installed_apart_imports_beside_a_regular_nvidia_package(tmp_path: Path) -> None:
    """The image's CUDA wheels ship a regular ``nvidia/__init__.py``; DALI installed with ``pip --target``
    elsewhere is a namespace portion the regular package hides. The check's PYTHONPATH (nvidia_ns first) finds
    both: DALI from its own directory and the image's ``nvidia`` modules."""
    image = tmp_path / "image-site" / "nvidia"
    image.mkdir(parents=True)
    (image / "__init__.py").write_text("")
    (image / "cuda_runtime_stand_in.py").write_text("OK = 1\n")
    dali = tmp_path / "dali-site" / "nvidia" / "dali"
    dali.mkdir(parents=True)
    (dali / "__init__.py").write_text("__version__ = 'stand-in'\n")
    code = "import nvidia.dali, nvidia.cuda_runtime_stand_in; print(nvidia.dali.__file__)"
    plain = f"{image.parent}:{dali.parents[1]}"  # what the check did: DALI's directory appended
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=plain), text=True,
                       capture_output=True, cwd=tmp_path)
    assert p.returncode != 0 and "No module named 'nvidia.dali'" in p.stderr  # the defect this guards against
    env = dict(os.environ, PYTHONPATH=str(image.parent), PHOTOZ_DALI_SITE=str(dali.parents[1]))
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")], cwd=REPO, text=True,
                       capture_output=True, timeout=120, env=dict(env, WORK=str(tmp_path / "work")))
    assert f"DALI: nvidia.dali from {dali / '__init__.py'}" in p.stdout, p.stdout + p.stderr
    assert "components: DALI 1" in p.stdout
    # the same path order, and the image's own nvidia modules still import
    shim = REPO / "benchmarks" / "device" / "nvidia_ns"
    p = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=f"{shim}:{REPO}:{image.parent}:{dali.parents[1]}"))
    assert p.returncode == 0 and p.stdout.strip() == str(dali / "__init__.py"), p.stderr


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
    for step in ("store", "gpu_tests", "split_bn"):
        assert rows[step][0] == "FAIL", rows
    for step in ("pretrain_bf16", "loader", "pretrain_fp16", "torchrun_nccl"):
        assert rows[step] == ("FAIL", "not run: no data (store step failed)"), rows
    assert (tmp_path / "out" / "gpu_tests.log").read_text().strip() == "step failed"  # full logs kept


@pytest.mark.parametrize("arg", ["--bogus"])
def test_unknown_option_is_an_error(tmp_path: Path, arg: str) -> None:
    assert _run(tmp_path, arg).returncode == 2


def test_dali_parts_are_written_into_a_real_directory_in_the_repository(tmp_path: Path) -> None:
    """``carry: [".dali/partN"]`` sends what is in the working tree: the parts must be there, not behind a link
    to a directory outside it (which the device machine does not have)."""
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "device").mkdir(parents=True)
    (repo / ".gitignore").write_text("/.dali\n")
    script = repo / "benchmarks" / "device" / "split_wheel.sh"
    script.write_text((REPO / "benchmarks" / "device" / "split_wheel.sh").read_text())
    wheel = tmp_path / "fake_dali-1.0-py3-none-any.whl"
    wheel.write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    env = {k: v for k, v in os.environ.items() if k not in ("PARTS", "LINK")}
    p = subprocess.run(["bash", str(script), str(wheel), "", "1"], env=env, text=True, capture_output=True)
    assert p.returncode == 0, p.stderr
    dali = repo / ".dali"
    assert dali.is_dir() and not dali.is_symlink()
    assert sorted(d.name for d in dali.iterdir() if d.is_dir()) == ["part0", "part1", "part2"]
    assert all((dali / f"part{i}" / "MANIFEST").is_file() for i in range(3))
