"""The sharded queue gives exactly the replicated-queue MoCo: 2 ranks (gloo, CPU) against 1 rank
with the same global batch, initial weights and queue content, over 6 steps (the 64-key queue takes
16 keys per step, so it wraps after 4). Runs under torch.distributed and under Horovod. Node-local
shuffle-BN (``moco.bn_mode=shuffle-node``) on ranks declared as one node, one node per rank, or two nodes
of two: against global shuffle-BN, one process, and keys computed by hand; trains and resumes exactly.

Why the two-rank comparisons run in float64 (``equivalence.py --dtype float64``): 2 ranks of 8 and 1 rank of
16 sum the same numbers in different orders (SyncBN's sums of x and x^2, the gradient all-reduce), and what
that order changes depends on the CPU's kernels. In float32 the difference reached 2e-3 of the gradients'
scale by step 2 on one machine and stayed under 1e-4 on another (SyncBN's E[x^2] - E[x]^2 cancels), so a
float32 tolerance is a statement about the CPU, not the code. In float64 the measured difference is under
2e-14 (loss, weights, queue) and 1.1e-14 of the gradients' scale over all 6 steps, both queue modes; the
tolerance of 1e-10 leaves four orders of magnitude for other CPUs, thread counts and instruction sets,
and a real defect is far above it: a missing gradient all-reduce, or keys written one slot off in the
queue, differ by more than 1e-3 from step 0 or 1 on (tried by mutation; see the commit that set this)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_dataset, require_horovod, run_horovod, run_ranks, run_single, run_torch, tiny_overrides

STEPS = 6
EXACT = 1e-10  # float64 runs: relative tolerance of losses, weights, queue; of gradients, relative to their scale


def _one_rank(tmp_path_factory, dtype: str, steps: int) -> list[dict]:
    out = tmp_path_factory.mktemp("eq") / f"ref_{dtype}.pt"
    rc, log = run_single("equivalence.py", ["--backend", "none", "--steps", str(steps), "--dtype", dtype,
                                            "--out", str(out)])
    assert rc == 0, log[-3000:]
    blob = torch.load(out, weights_only=True)
    assert blob["world"] == 1 and blob["dtype"] == dtype
    return blob["records"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """One rank, float64: what the two-rank float64 runs must reproduce."""
    return _one_rank(tmp_path_factory, "float64", STEPS)


@pytest.fixture(scope="module")
def reference_fp32(tmp_path_factory) -> list[dict]:
    """One rank, float32 (other inputs than float64's: randn draws differ per dtype): the fp16 runs' yardstick."""
    return _one_rank(tmp_path_factory, "float32", 3)


def _compare(ref: list[dict], got: list[dict], channels_last: bool = False) -> None:
    """The 2-rank records equal the 1-rank (NCHW) reference; with channels_last the weights really were
    channels_last throughout (and the math must not depend on the memory format)."""
    assert len(got) == len(ref) == STEPS
    fmt = "channels_last" if channels_last else "contiguous"
    assert all(r["memory_format"] == fmt and r["conv_weight_channels_last"] == channels_last for r in got)
    for step, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert b["grads"].dtype == a["grads"].dtype == torch.float64
        assert b["loss"] == pytest.approx(a["loss"], rel=EXACT), f"step {step} loss"
        gscale = float(a["grads"].abs().max())
        torch.testing.assert_close(b["grads"], a["grads"], rtol=EXACT, atol=EXACT * gscale, msg=f"step {step} grads")
        torch.testing.assert_close(b["weights"], a["weights"], rtol=EXACT, atol=EXACT, msg=f"step {step} weights")
        torch.testing.assert_close(b["queue"], a["queue"], rtol=EXACT, atol=EXACT, msg=f"step {step} queue")
        assert b["ptr"] == a["ptr"]
    assert [r["ptr"] for r in got] == [16, 32, 48, 0, 16, 32]  # wrapped around


def _load(path: Path, world: int) -> list[dict]:
    blob = torch.load(path, weights_only=True)
    assert blob["world"] == world
    return blob["records"]


CHANNELS_LAST = pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])


@CHANNELS_LAST
@pytest.mark.parametrize("mode", ["sharded", "replicated"])
def test_torch_two_ranks_match_one_rank(tmp_path: Path, reference, mode: str, channels_last: bool) -> None:
    out = tmp_path / f"{mode}.pt"
    for rc, log in run_torch("equivalence.py", ["--backend", "torch", "--mode", mode, "--steps", str(STEPS),
                                                 "--dtype", "float64", "--channels-last", str(channels_last).lower(),
                                                 "--out", str(out)]):
        assert rc == 0, log[-3000:]
    _compare(reference, _load(out, 2), channels_last)


def test_local_mode_is_a_different_objective(tmp_path: Path, reference) -> None:
    """Negative control: with only its own shard as negatives the loss differs (so the test can fail)."""
    out = tmp_path / "local.pt"
    for rc, log in run_torch("equivalence.py", ["--backend", "torch", "--mode", "local", "--steps", "2",
                                                 "--dtype", "float64", "--out", str(out)]):
        assert rc == 0, log[-3000:]
    got = _load(out, 2)
    assert abs(got[0]["loss"] - reference[0]["loss"]) > 1e-3


@CHANNELS_LAST
@pytest.mark.parametrize("mode", ["sharded", "replicated"])
def test_horovod_two_ranks_match_one_rank(tmp_path: Path, reference, mode: str, channels_last: bool) -> None:
    """Also: with channels_last (conv weights and gradients not contiguous) Horovod's broadcast and gradient
    all-reduce work (contiguous views, no copies), and every step names its collectives the same way
    (stable names per call site: Horovod's response cache hits from the second step on)."""
    require_horovod()
    out = tmp_path / f"hvd_{mode}.pt"
    rc, log = run_horovod("equivalence.py", ["--backend", "horovod", "--mode", mode, "--steps", str(STEPS),
                                             "--dtype", "float64", "--channels-last", str(channels_last).lower(),
                                             "--out", str(out)])
    assert rc == 0, log[-3000:]
    blob = torch.load(out, weights_only=True)
    assert blob["backend"] == "horovod"
    got = _load(out, 2)
    _compare(reference, got, channels_last)
    names = [r["collective_names"] for r in got]
    assert names[0] and all(n == names[0] for n in names), names
    assert all(n.startswith("photoz.") for n in names[0]) and len(set(names[0])) < len(names[0])  # sites repeat


@pytest.mark.parametrize("backend, channels_last", [("torch", False), ("horovod", False), ("horovod", True)])
def test_fp16_gradscaler_protocol(tmp_path: Path, reference_fp32, backend: str, channels_last: bool) -> None:
    """fp16 + GradScaler (with Horovod: synchronize / unscale / skip_synchronize) trains like fp32; with
    channels_last, Horovod's explicit synchronize hands the gradients back in their own layout."""
    out = tmp_path / "fp16.pt"
    args = ["--backend", backend, "--mode", "sharded", "--steps", "3", "--precision", "fp16",
            "--channels-last", str(channels_last).lower(), "--out", str(out)]
    for rc, log in run_ranks(backend, "equivalence.py", args):
        assert rc == 0, log[-3000:]
    got = _load(out, 2)
    for a, b in zip(reference_fp32, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
        assert torch.isfinite(b["weights"]).all()
    # the unscaled gradients are real gradients, not scaled by 2**16
    assert float(got[0]["grads"].abs().max()) == pytest.approx(float(reference_fp32[0]["grads"].abs().max()), rel=0.1)


# ---------------------------------------------------------------- node-local shuffle-BN (moco.bn_mode=shuffle-node)

BACKENDS = pytest.mark.parametrize("backend", ["torch", "horovod"])


def _shuffle_node(tmp_path: Path, backend: str, world: int, per_node: int) -> list[dict]:
    """Every rank's record from ``shuffle_node.py`` on ``world`` ranks declared as nodes of ``per_node``."""
    out = tmp_path / f"shuffle_node_{backend}_{world}x{per_node}.json"
    args = ["--backend", backend, "--ranks-per-node", str(per_node), "--out", str(out)]
    for rc, log in run_ranks(backend, "shuffle_node.py", args, world=world):
        assert rc == 0, log[-3000:]
    records = json.loads(out.read_text())
    assert [r["rank"] for r in records] == list(range(world))
    for r in records:
        assert r["node_size"] == per_node and r["node_rank"] == r["rank"] % per_node
        assert r["unshuffle_exact"] and r["diff_by_hand"] < 1e-6
        assert r["sources"] == list(range(r["rank"] - r["node_rank"], r["rank"] - r["node_rank"] + per_node))
    return records


@BACKENDS
def test_shuffle_node_on_one_node_is_shuffle(tmp_path: Path, backend: str) -> None:
    """All ranks on one node: the same collectives, keys and loss as global shuffle-BN, bit for bit."""
    for r in _shuffle_node(tmp_path, backend, world=2, per_node=2):
        assert r["sources"] == [0, 1] and r["bn_splits"] == 1
        assert r["calls_node"] == r["calls_shuffle"] == 2
        assert r["diff_shuffle"] == 0.0 and r["loss_node"] == r["loss_shuffle"]


@BACKENDS
def test_shuffle_node_with_one_rank_per_node_shuffles_alone(tmp_path: Path, backend: str) -> None:
    """One rank per node: no collective in the key encoding, and the keys of one process (split BN over
    moco.bn_splits sub-batches, the same seeded permutation); global shuffle-BN differs (negative control)."""
    for r in _shuffle_node(tmp_path, backend, world=2, per_node=1):
        assert r["calls_node"] == 0 and r["calls_shuffle"] == 2 and r["bn_splits"] == 4
        assert r["diff_alone"] == 0.0 and r["diff_shuffle"] > 1e-3


@BACKENDS
def test_shuffle_node_on_two_nodes_of_two(tmp_path: Path, backend: str) -> None:
    """Four ranks as two nodes of two: keys move only within the node (torch: a group per node; Horovod: a
    process set per node made at hvd.init), match keys computed by hand, and differ from global shuffle-BN."""
    records = _shuffle_node(tmp_path, backend, world=4, per_node=2)
    assert all(r["calls_node"] == 2 and r["bn_splits"] == 1 for r in records)
    assert max(r["diff_shuffle"] for r in records) > 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n=256)


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}  # a resume re-logs steps: keep the last


@BACKENDS
def test_shuffle_node_trains_on_two_nodes_and_resumes_exactly(tmp_path: Path, data: Path, backend: str) -> None:
    """Two ranks declared as two nodes train with shuffle-node; SIGKILLed after step 4 and resumed from the
    step-3 checkpoint, the run reproduces the uninterrupted losses (the permutation is seeded per step)."""
    more = ("train.max_steps=6", "train.checkpoint_every=3", "moco.bn_mode=shuffle_node", "moco.bn_splits=4",
            f"dist.backend={backend}", "moco.queue_mode=sharded")

    def run(out: Path, *extra: str) -> list[tuple[int, str]]:
        args = ["--ranks-per-node=1", *extra, *tiny_overrides(data, out, 16, 64, more)]
        return run_ranks(backend, "pretrain_run.py", args)

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for rc, log in run(ref):
        assert rc == 0, log[-3000:]
    assert json.loads((ref / "summary.json").read_text())["steps"] == 6
    for rc, _ in run(cut, "--kill-after=4"):
        assert rc != 0
    for rc, log in run(cut):
        assert rc == 0, log[-3000:]
    a, b = _losses(ref), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in range(4, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}: {b[step]} != {a[step]}"
