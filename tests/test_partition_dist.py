"""Node partitions in real multi-process runs (torchrun-style ranks declared as nodes of one rank): after
staging, each node reads only its own partition, from its own copy; the global run reads everywhere; a run
SIGKILLed mid-epoch resumes exactly; a resume on another node layout is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_dataset, run_torch, tiny_overrides

from photoz_hpc.data import open_dataset
from photoz_hpc.data.partition import node_shards
from photoz_hpc.data.stage import stage_dataset

NODE = ("data.partition=node", "dist.backend=torch", "moco.bn_mode=shuffle")


def _summary(results) -> dict:
    for rc, out in results:
        assert rc == 0, out[-3000:]
    line = next(ln for ln in results[0][1].splitlines() if ln.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):])


def _shards(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def test_two_nodes_read_only_their_staged_partition_and_global_reads_everywhere(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=768)  # 6 shards of 128
    counts = [s["count"] for s in open_dataset(data).shards]
    for node in (0, 1):  # what PHOTOZ_STAGE=1 does on each node (there on one path of two different disks)
        stats = stage_dataset(data, tmp_path / f"node{node}" / "ds", "node", node, 2)
        assert stats["shards_copied"] < stats["shards_total"] == len(counts)
    common = tiny_overrides(data, tmp_path / "node-run", 16, 64, ("train.max_steps=40",) + NODE)
    node_run = _summary(run_torch("pretrain_run.py", ["--ranks-per-node=1",
                                                      f"--node-data={tmp_path}/node{{node}}/ds", *common]))
    reads = node_run["reads"]
    assert reads["partition"] == "node" and [n["node"] for n in reads["per_node"]] == [0, 1]
    for rank in reads["per_rank"]:
        k = rank["rank"]
        assert rank["node"] == k and rank["nodes"] == 2 and rank["root"] == str((tmp_path / f"node{k}" / "ds").resolve())
        assert _shards(rank["shards"]) <= set(node_shards(counts, 2, k)), rank  # its own partition only
        assert rank["records"] == node_run["steps"] * 16 and rank["bytes"] == rank["records"] * open_dataset(data).record_bytes
    glob = _summary(run_torch("pretrain_run.py", tiny_overrides(
        data, tmp_path / "global-run", 16, 64, ("train.max_steps=40", "dist.backend=torch", "moco.bn_mode=shuffle"))))
    assert glob["reads"]["partition"] == "global" and "per_node" not in glob["reads"]
    for rank in glob["reads"]["per_rank"]:
        assert _shards(rank["shards"]) == set(range(len(counts))), rank  # every rank reads from every shard
    one_node = _summary(run_torch("pretrain_run.py", ["--ranks-per-node=2", *tiny_overrides(
        data, tmp_path / "one-node-run", 16, 64, ("train.max_steps=40",) + NODE)]))
    assert one_node["reads"]["per_node"][0]["ranks"] == [0, 1]
    a, b = _losses(tmp_path / "global-run"), _losses(tmp_path / "one-node-run")
    assert sorted(a) == sorted(b) == list(range(1, 41)) and a == b  # 2 ranks of one node: the global run exactly


def _losses(out: Path) -> dict[int, float]:
    return {rec["step"]: rec["loss"] for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_sigkill_mid_epoch_resumes_exactly_with_node_partitions(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=384)  # 3 shards; 2 nodes of 192 samples: 12 steps of 8 per epoch

    def run(out: Path, *extra: str, per_node: int = 1):
        args = [f"--ranks-per-node={per_node}", *extra, *tiny_overrides(
            data, out, 8, 64, ("train.max_steps=16", "train.checkpoint_every=4", *NODE))]
        return run_torch("pretrain_run.py", args)

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _summary(run(ref))
    for rc, out in run(cut, "--kill-after=6"):
        assert rc == -9, f"expected SIGKILL, got rc={rc}:\n{out[-3000:]}"
    refused = run(cut, per_node=2)  # the same 2 ranks as one node: another deal
    assert all(rc != 0 for rc, _ in refused)
    assert "node partitions are dealt per node layout" in refused[0][1], refused[0][1][-3000:]
    results = run(cut)
    summary = _summary(results)
    assert "resumed from" in results[0][1] and "at step 4" in results[0][1]
    assert summary["reads"]["partition"] == "node"
    a, b = _losses(ref), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 17))  # crosses the epoch boundary at step 12
    for step in range(5, 17):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}: {b[step]} != {a[step]}"
    assert len({round(a[s], 5) for s in range(5, 17)}) > 3
