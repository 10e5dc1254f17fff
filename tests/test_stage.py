"""``photoz-hpc stage`` (photoz_hpc.data.stage): node-local copies of a store, whole or one node's shards, each
file checked against the manifest's sha256 as it is copied; a corrupt source shard leaves no copy behind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from photoz_hpc.cli import main
from photoz_hpc.data.dataset import open_dataset, read_manifest
from photoz_hpc.data.partition import STAGED_NAME, node_ids, node_shards, read_staged
from photoz_hpc.data.prepare import prepare
from photoz_hpc.data.stage import stage_dataset
from photoz_hpc.errors import DatasetError


@pytest.fixture
def store(release_h5, tmp_path):
    """10 shards of 4 records of 16x16 cutouts."""
    return prepare([release_h5("in.h5", 40, seed=3, size=16)], tmp_path / "src store", samples_per_shard=4)


def _counts(store) -> list[int]:
    return [s["count"] for s in read_manifest(store)["shards"]]


def _bins(path) -> set[int]:
    return {int(p.name[len("shard-"):-len(".bin")]) for p in path.glob("shard-*.bin")}


def test_two_nodes_copy_only_their_shards_and_together_all(store, tmp_path):
    counts = _counts(store)
    n_shards = len(counts)
    assert n_shards == 10
    copies = []
    for node in (0, 1):
        dest = tmp_path / f"node{node}" / "ds"
        stats = stage_dataset(store, dest, "node", node, 2, workers=3)
        mine = node_shards(counts, 2, node)
        assert _bins(dest) == set(mine)  # only this node's records
        assert len(list(dest.glob("shard-*.meta.npy"))) == n_shards  # but every shard's metadata
        small = {p.name for p in store.iterdir() if p.suffix != ".bin"}  # manifest, metadata (commit markers)
        assert small <= {p.name for p in dest.iterdir()} and "manifest.json" in small
        assert not list(dest.glob(".*tmp*"))  # no temporary left
        info = json.loads((dest / STAGED_NAME).read_text())
        assert (info["partition"], info["node"], info["nodes"], info["shards"]) == ("node", node, 2, mine)
        assert info["source"] == str(store.resolve()) and info["bytes"] == stats["bytes"] > 0 and info["host"]
        size = sum(p.stat().st_size for p in dest.iterdir() if p.name != STAGED_NAME)
        assert stats["bytes"] == size and (stats["shards_copied"], stats["shards_total"]) == (len(mine), n_shards)
        assert stats["seconds"] >= 0 and stats["mb_per_s"] > 0
        copies.append(dest)
    assert _bins(copies[0]) | _bins(copies[1]) == set(range(n_shards))
    assert _bins(copies[0]) != _bins(copies[1])

    # A copy is a dataset: its node's records read byte-identical to the source's; another node's are an error.
    src, ds = open_dataset(store), open_dataset(copies[0])
    assert read_staged(copies[0]).shards == frozenset(node_shards(counts, 2, 0))
    ids = node_ids(counts, 2)[0]
    for i in ids[[0, len(ids) // 2, -1]]:
        np.testing.assert_array_equal(ds.image_hwc(int(i)), src.image_hwc(int(i)))
    np.testing.assert_array_equal(ds.meta, src.meta)
    other = sorted(_bins(copies[1]) - _bins(copies[0]))[0]
    with pytest.raises(DatasetError, match=rf"shard-{other:05d}\.bin: not here: .*node 0 of 2"):
        ds.image_hwc(int(ds.offsets[other]))


def test_global_copies_everything_and_replaces_an_old_copy(store, tmp_path):
    dest = tmp_path / "copy"
    stage_dataset(store, dest, "node", 1, 2)
    (dest / "stale.txt").write_text("from before")
    stats = stage_dataset(store, dest)  # replaces it
    assert _bins(dest) == set(range(10)) and not (dest / "stale.txt").exists()
    assert stats["shards_copied"] == stats["shards_total"] == 10
    assert json.loads((dest / STAGED_NAME).read_text())["partition"] == "global"
    a, b = open_dataset(store), open_dataset(dest)
    np.testing.assert_array_equal(b.image_hwc(len(b) - 1), a.image_hwc(len(a) - 1))


def test_corrupt_source_shard_fails_naming_it_and_leaves_no_copy(store, tmp_path):
    bad = store / "shard-00003.bin"
    with open(bad, "r+b") as f:  # same size, other bytes: only the checksum can tell
        f.seek(100)
        f.write(b"\xff" * 8)
    dest = tmp_path / "copy"
    with pytest.raises(DatasetError, match=rf"{bad}: sha256 mismatch \(corrupt\)"):
        stage_dataset(store, dest, workers=2)
    assert not dest.exists()
    # a node whose shards are all intact stages fine: only the files it copies are checked
    node = next(k for k in range(3) if 3 not in node_shards(_counts(store), 3, k))
    stage_dataset(store, dest, "node", node, 3)
    assert 3 not in _bins(dest)


def test_refuses_a_target_that_is_not_a_copy_or_is_the_source(store, tmp_path):
    precious = tmp_path / "home"
    (precious / "notes").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not a dataset copy"):
        stage_dataset(store, precious)
    assert (precious / "notes").is_dir()
    with pytest.raises(DatasetError, match="cannot be the source"):
        stage_dataset(store, store / "inside")
    with pytest.raises(DatasetError, match="node 2 of 2"):
        stage_dataset(store, tmp_path / "x", "node", 2, 2)


def test_cli_stage_json_and_error(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    dest = tmp_path / "cli copy"
    assert main(["stage", str(store), str(dest), "--partition", "node", "--workers", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out)
    assert (stats["node"], stats["nodes"], stats["partition"]) == (1, 2, "node")
    mine = node_shards(_counts(store), 2, 1)
    assert _bins(dest) == set(mine)
    assert f"photoz: staged {store} on " in err and f"in {dest} (node 1 of 2, partition node: {len(mine)} of 10 " \
        f"shards, {stats['bytes']} bytes in " in err and "checksums verified)" in err
    assert main(["stage", str(tmp_path / "nothing"), str(dest)]) == 1
    assert "nothing: dataset directory does not exist" in capsys.readouterr().err
