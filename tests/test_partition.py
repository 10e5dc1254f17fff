"""Node partitions (``data.partition: node``): the deal of a store's shards to nodes, each node's epoch plan,
the loaders' read statistics, and the resume and staging checks around them."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_dataset

from photoz_hpc.augment.draws import resolve_spec
from photoz_hpc.augment.loaders import build_loader
from photoz_hpc.augment.sampler import NodeSplit, plan_epoch
from photoz_hpc.augment.source import BatchSource, node_split, ranges
from photoz_hpc.config import load_config
from photoz_hpc.data import open_dataset
from photoz_hpc.data.partition import deal, node_ids, node_shards, shard_order
from photoz_hpc.errors import ConfigError, DatasetError


@pytest.mark.parametrize("counts,n_nodes", [([64] * 10 + [32], 2), ([64] * 10 + [32], 3), ([100, 7, 250, 1, 64], 4),
                                            ([5] * 3, 3), ([1000], 4), ([64] * 40, 7)])
def test_deal_is_disjoint_complete_and_balanced(counts, n_nodes):
    ids = node_ids(counts, n_nodes)
    everything = np.concatenate(ids)
    assert len(everything) == sum(counts) and len(np.unique(everything)) == sum(counts)  # each sample once
    sizes = [len(i) for i in ids]
    assert max(sizes) - min(sizes) <= 1, sizes  # balanced by sample count
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for k in range(n_nodes):  # a node's shards are exactly those its ids lie in
        shards = np.unique(np.searchsorted(offsets, ids[k], side="right") - 1)
        assert shards.tolist() == node_shards(counts, n_nodes, k)
    pieces = deal(counts, n_nodes)
    assert all(sum(p.hi - p.lo for p in node) == n for node, n in zip(pieces, sizes, strict=True))


def test_deal_depends_only_on_the_store_and_the_node_count():
    counts = [64] * 40
    assert [a.tolist() for a in node_ids(counts, 4)] == [a.tolist() for a in node_ids(list(counts), 4)]
    assert node_ids(counts, 1)[0].tolist() == list(range(sum(counts)))
    assert shard_order(40).tolist() != list(range(40))  # not the input order
    with pytest.raises(DatasetError, match="cannot be dealt to 5 nodes"):
        node_ids([2, 2], 5)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                        - np.searchsorted(np.sort(b), grid, "right") / len(b)).max())


def test_partitions_are_random_subsets_of_a_survey_stored_in_sky_order():
    """Inputs in sky order (the Multimodal Universe's HEALPix files): shard i is a patch of sky with its own
    redshift distribution. The deal is a random choice of shards, so each node's position and redshift
    distributions follow the whole survey's within what a random subset of that many shards allows (the 99% KS
    bound, finite population); one record per shard is a random subset of records. Cutting the shards into
    consecutive runs (the naive deal) would give each node a patch: the test tells the two apart."""
    rng = np.random.default_rng(3)
    n = 96 * 256
    ra = np.sort(rng.uniform(0, 360, n))  # prepare keeps the input order: sky order
    z = np.clip(0.15 + 0.1 * np.sin(np.radians(ra)) + rng.gamma(2.0, 0.03, n), 0, None)  # structure on the sky
    for per_shard in (256, 64, 1):
        n_shards = n // per_shard
        for n_nodes in (2, 4):
            m = n_shards / n_nodes  # shards per node
            bound = 1.63 * np.sqrt((n_shards - m) / (n_shards * m)) + 1.63 * np.sqrt(1 / (n / n_nodes))
            for ids in node_ids([per_shard] * n_shards, n_nodes):
                assert _ks(ra[ids], ra) < bound and _ks(z[ids], z) < bound, (per_shard, n_nodes, bound)
            naive = np.array_split(np.arange(n), n_nodes)[0]
            assert _ks(ra[naive], ra) > 2 * bound and _ks(z[naive], z) > bound  # a patch is told from a mix


def _split(pools, rank, per_node):
    return NodeSplit(pools[rank // per_node], tuple(len(p) for p in pools), rank // per_node, per_node)


def test_node_plans_read_only_their_node_and_visit_every_sample_at_most_once():
    counts = [64] * 13 + [20]
    n_nodes, per_node, batch = 3, 2, 8
    world = n_nodes * per_node
    pools = node_ids(counts, n_nodes)
    pool = np.arange(sum(counts))
    for epoch in (0, 1):
        plans = [plan_epoch(pool, batch, r, world, 7, epoch, True, _split(pools, r, per_node)) for r in range(world)]
        n_batches = min(len(p) // per_node for p in pools) // batch
        assert {len(p) for p in plans} == {n_batches}
        for r, plan in enumerate(plans):
            assert np.isin(plan.ids, pools[r // per_node]).all()  # rank r reads its node's share only
        seen = np.concatenate([p.ids.ravel() for p in plans])
        assert len(np.unique(seen)) == len(seen) == world * n_batches * batch  # once each, drop-last only
        assert sum(counts) - len(seen) < n_nodes * (per_node * batch + 1)
    again = plan_epoch(pool, batch, 3, world, 7, 1, True, _split(pools, 3, per_node))
    assert np.array_equal(again.ids, plans[3].ids)  # deterministic in (seed, epoch, node layout)
    other = plan_epoch(pool, batch, 3, world, 7, 2, True, _split(pools, 3, per_node))
    assert not np.array_equal(other.ids, plans[3].ids)  # a new permutation every epoch
    with pytest.raises(ValueError, match="is not on node"):
        plan_epoch(pool, batch, 3, world, 7, 0, True, _split(pools, 0, per_node))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return open_dataset(make_dataset(tmp_path_factory.mktemp("partition"), n=320, size=24))  # 3 shards of 128


def _cfg(partition: str, batch: int = 16):
    return load_config(None, ["augment.crop_size=16", "augment.jitter_max=2", "loader.backend=reference",
                              f"loader.batch_size={batch}", f"data.partition={partition}"])


def test_two_ranks_of_one_node_are_the_global_plan(store):
    """A one-node job with node partitions is today's global behaviour, bit for bit: same ids, same views."""
    for rank in (0, 1):
        glob = build_loader(_cfg("global"), store, "pretrain", rank, 2, seed=3, device="cpu")
        node = build_loader(_cfg("node"), store, "pretrain", rank, 2, seed=3, device="cpu", ranks_per_node=2)
        assert node.source.nodes.n_nodes == 1
        for epoch in (0, 1):
            glob.set_epoch(epoch)
            node.set_epoch(epoch)
            assert np.array_equal(glob.source.plan.ids, node.source.plan.ids)
        a, b = next(iter(glob)), next(iter(node))
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_two_nodes_split_the_store_and_report_their_reads(store):
    loaders = [build_loader(_cfg("node", 8), store, "pretrain", r, 2, seed=3, device="cpu", ranks_per_node=1)
               for r in range(2)]
    shards = [set(node_shards([s["count"] for s in store.shards], 2, r)) for r in range(2)]
    ids = []
    for r, loader in enumerate(loaders):
        batches = list(loader)
        ids.append(np.concatenate([b["index"].numpy() for b in batches]))
        stats = loader.read_stats()
        assert stats["records"] == len(ids[r]) and stats["bytes"] == len(ids[r]) * store.record_bytes
        touched = {int(x) for part in stats["shards"].split(",") for x in
                   (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
        assert touched <= shards[r] and stats["shard_files"] == len(touched)
        assert stats["partition"] == "node" and stats["node"] == r and stats["nodes"] == 2
    assert not set(ids[0]) & set(ids[1])


def test_ranges():
    assert ranges(np.array([0, 1, 2, 5, 7, 8])) == "0-2,5,7-8"
    assert ranges(np.array([], dtype=int)) == "" and ranges(np.array([4])) == "4"


def test_resume_on_another_node_layout_is_refused(store):
    two = build_loader(_cfg("node", 8), store, "pretrain", 0, 2, seed=3, device="cpu", ranks_per_node=1)
    one = build_loader(_cfg("node", 8), store, "pretrain", 0, 2, seed=3, device="cpu", ranks_per_node=2)
    glob = build_loader(_cfg("global", 8), store, "pretrain", 0, 2, seed=3, device="cpu")
    two.check_partition(two.state_dict())  # the same layout resumes
    with pytest.raises(ConfigError, match="node partitions are dealt per node layout"):
        one.check_partition(two.state_dict())
    with pytest.raises(ConfigError, match="data.partition=global"):
        two.check_partition(glob.state_dict())
    one.check_partition(glob.state_dict())  # one node is the global plan: either resumes the other
    glob.check_partition(one.state_dict())
    old = {k: v for k, v in glob.state_dict().items() if k != "partition"}  # from before partitions: global
    glob.check_partition(old)
    glob.load_state_dict(old)


def test_a_pool_the_deal_splits_unevenly_is_refused(store):
    """A labeled subset clustered in the store (here: all in node 0's shards) would leave most of it unseen."""
    counts = [s["count"] for s in store.shards]
    clustered = node_ids(counts, 2)[0][:100]
    with pytest.raises(ConfigError, match="unevenly .* visit only 0%"):
        build_loader(_cfg("node", 8), store, "finetune", 0, 2, seed=3, device="cpu", ids=clustered, ranks_per_node=1)
    spread = np.arange(0, len(store), 3)  # a random-like subset: balanced, fine
    loader = build_loader(_cfg("node", 8), store, "finetune", 1, 2, seed=3, device="cpu", ids=spread, ranks_per_node=1)
    assert np.isin(loader.source.plan.ids, node_ids(counts, 2)[1]).all() and len(loader) > 0


@pytest.mark.parametrize("backend,workers", [("reference", 1), ("dali", 0)])
def test_reads_count_the_delivered_batches_whatever_reads_them(store, backend, workers):
    """Worker processes and DALI's queues read ahead; the statistics count what the training process received."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = load_config(None, ["augment.crop_size=16", "augment.jitter_max=2", f"loader.backend={backend}",
                             "loader.batch_size=16", "data.partition=node", f"loader.num_workers={workers}"])
    loader = build_loader(cfg, store, "pretrain", 0, 2, seed=3, device="cpu", ranks_per_node=1)
    got = [b["index"].numpy() for _, b in zip(range(3), loader, strict=False)]
    stats = loader.read_stats()
    assert stats["records"] == 3 * 16 and stats["bytes"] == 48 * store.record_bytes
    offsets = store.offsets
    touched = sorted({int(np.searchsorted(offsets, i, side="right") - 1) for i in np.concatenate(got)})
    assert stats["shard_files"] == len(touched) and stats["shards"] == ranges(np.array(touched))


def test_a_staged_copy_serves_only_its_node(store, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.root, copy)
    mine = node_shards([s["count"] for s in store.shards], 2, 1)
    for k, shard in enumerate(store.shards):
        if k not in mine:
            (copy / shard["file"]).unlink()
    (copy / "staged.json").write_text(json.dumps({"partition": "node", "node": 1, "nodes": 2, "shards": mine}))
    ds = open_dataset(copy)
    spec = resolve_spec(_cfg("node").augment, ds.manifest, "pretrain", str(copy))
    BatchSource(ds, spec, 8, 1, 2, 3, ranks_per_node=1)  # node 1 of 2: fine
    with pytest.raises(DatasetError, match="staged for node 1 of 2, but rank 0 is on node 0 of 2"):
        node_split(ds, np.arange(len(ds)), 0, 2, 1)
    with pytest.raises(DatasetError, match="uses data.partition=global"):
        BatchSource(ds, spec, 8, 1, 2, 3)
    other = next(k for k in range(len(store.shards)) if k not in mine)
    with pytest.raises(DatasetError, match="holds only its node's shards"):
        ds.records_hwc([int(ds.offsets[other])])


def test_node_layout_comes_from_every_ranks_local_rank_whatever_the_backend():
    from types import SimpleNamespace

    from photoz_hpc.errors import PhotozError
    from photoz_hpc.train.runtime import data_ranks_per_node

    def comm(local_ranks, rank=0):
        return SimpleNamespace(world=len(local_ranks), rank=rank, local_rank=local_ranks[rank],
                               allgather_object=lambda obj: list(local_ranks))

    node, glob = _cfg("node"), _cfg("global")
    assert data_ranks_per_node(glob, comm([0, 1, 0, 1])) is None
    assert data_ranks_per_node(node, comm([0, 1, 0, 1])) == 2 and data_ranks_per_node(node, comm([0])) == 1
    assert data_ranks_per_node(node, comm([0, 0, 0])) == 1
    for bad in ([0, 0, 1, 1], [0, 1, 2, 0]):  # mpirun --map-by node; nodes of unequal rank counts
        with pytest.raises(PhotozError, match="data.partition=node needs the node layout"):
            data_ranks_per_node(node, comm(bad))
