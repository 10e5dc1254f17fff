"""The data path of the scaling model (benchmarks/scaling_io.py via scaling_model.py, issue 23): bytes per step
from the survey and dtype, where records live per data.partition, when the file system limits the step, when
a node's share does not fit, the table's limiting terms and the CLI with a site. Mechanics only: no figure
of a real machine is asserted beyond what the presets' cited numbers imply."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from photoz_hpc.survey import load_survey

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _scaling_model():
    """benchmarks/scaling_model.py as a module (the scripts are not a package), as tests/test_benchmarks.py does."""
    spec = importlib.util.spec_from_file_location("bench_scaling_model", BENCH / "scaling_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


sm = _scaling_model()
# a ResNet-50-sized workload without building the model: 64 ms per 256 images (the goal), SDSS crop and bands
W = sm.Workload(step_s=0.064, batch=256, params=28_000_000, bn_layers=53, bn_channels=26_560, crop=64, embed=128)


def _toy_site(**figures) -> object:
    """A 4-GPU-per-node site with round figures (GB, GB/s), overridden by ``figures``."""
    base = {"name": "toy", "network": "perlmutter-a100-4x200", "gpus_per_node": 4, "nodes": 64, "node_mem_gb": 100,
            "mem_reserve_gb": 20, "mem_read_gbs": 50, "local_disk_gb": 0, "local_read_gbs": 0, "local_write_gbs": 0,
            "fs_aggregate_gbs": 1000, "fs_node_gbs": 25}
    return sm.custom_site(None, {**base, **figures}, "test")


def test_record_and_step_bytes_follow_survey_batch_and_dtype():
    sdss, legacy = sm.DATASETS["sdss-paper"], sm.DATASETS["legacy-76m"]
    s = load_survey("sdss")
    assert sm.record_bytes(sdss, "float32") == s.n_bands * s.cutout_size**2 * 4 == 107 * 107 * 5 * 4
    assert sm.record_bytes(sdss, "float16") * 2 == sm.record_bytes(sdss, "float32")
    assert sm.record_bytes(legacy) == 152 * 152 * 3 * 4  # ssl_legacysurvey cutouts, the survey's default g r z
    hsc = load_survey("hsc")
    assert sm.record_bytes(sm.parse_dataset("hsc:1000")) == hsc.n_bands * hsc.cutout_size**2 * 4
    site = _toy_site()
    rb = sm.record_bytes(sdss)
    one = sm.data_path(site, 8, 128, rb, sdss.records, "global")
    two = sm.data_path(site, 8, 256, rb, sdss.records, "global")
    half = sm.data_path(site, 8, 256, rb // 2, sdss.records, "global")
    assert two.step_bytes_gpu == 2 * one.step_bytes_gpu == 256 * rb
    assert two.step_bytes_node == 4 * two.step_bytes_gpu and half.step_bytes_gpu * 2 == two.step_bytes_gpu
    # the shuffle-BN image gather uses the dataset's survey: Legacy 3 bands at its 96-pixel crop
    wl = sm.dataset_workload(W, legacy)
    assert (wl.bands, wl.crop) == (3, load_survey("legacy").crop_size)
    net = sm.NETWORKS["h100-4x200"]
    five = sm.step_terms(replace(wl, bands=5), 8, net, "torch", "shuffle", "local")["shuffle_bn"]
    three = sm.step_terms(wl, 8, net, "torch", "shuffle", "local")["shuffle_bn"]
    assert three < five


def test_node_partition_reads_memory_after_staging_global_reads_the_file_system():
    ds = sm.Dataset("d", "sdss", 1_000_000)  # 229 GB > the 80 GB a node keeps for data
    rb = sm.record_bytes(ds)
    slow, fast = _toy_site(fs_aggregate_gbs=100), _toy_site(fs_aggregate_gbs=1000)
    g_slow, g_fast = (sm.data_path(s, 32, 256, rb, ds.records, "global") for s in (slow, fast))
    assert g_slow.placement == "fs" and g_slow.read_term == "fs-read" and g_slow.read_s > g_fast.read_s
    assert g_slow.cache_hit == pytest.approx(80e9 / (ds.records * rb))
    n_slow, n_fast = (sm.data_path(s, 32, 256, rb, ds.records, "node") for s in (slow, fast))
    assert n_slow.placement == "memory" and n_slow.read_term == "memory-read" and n_slow.staged == "share"
    assert n_slow.node_gb == pytest.approx(ds.records * rb / 8 / 1e9)  # 8 nodes of 4 GPUs
    assert n_slow.read_s == n_fast.read_s  # no file-system term after staging
    assert n_slow.stage_s == pytest.approx(n_slow.node_gb / (100 / 8))  # each node at 1/8 of the aggregate
    assert n_fast.stage_s == pytest.approx(n_fast.node_gb / 25)  # the node's own ceiling
    # a dataset that fits a node's memory is staged whole in the global partition too
    small = sm.data_path(slow, 32, 256, rb, 100_000, "global")
    assert (small.placement, small.staged, small.read_term) == ("memory", "whole", "memory-read")


def test_global_partition_becomes_fs_read_bound_past_some_scale_on_a_small_file_system():
    site = replace(sm.SITES["perlmutter-like"], fs_aggregate_gbs=50.0)
    net = sm.NETWORKS[site.network]
    ds = sm.DATASETS["sdss-paper"]
    first = sm.io_bound_from(W, net, site, ds, "float32")
    assert first is not None and 8 < first < 1024
    before = sm.io_row(W, first - site.gpus_per_node, net, site, ds, "float32", "global")
    at = sm.io_row(W, first, net, site, ds, "float32", "global")
    assert before["limiting"] not in sm.READ_TERMS and at["limiting"] == "fs-read"
    assert at["efficiency"] == pytest.approx(at["compute_s"] / at["read_s"]) and at["efficiency"] < before["efficiency"]
    node = sm.io_row(W, 1024, net, site, ds, "float32", "node")
    assert node["limiting"] not in sm.READ_TERMS and node["placement"] == "memory"
    # the whole preset file system carries the same job further (or forever)
    full = sm.io_bound_from(W, net, sm.SITES["perlmutter-like"], ds, "float32")
    assert full is None or full > first


def test_share_that_fits_neither_memory_nor_disk_does_not_fit():
    site = _toy_site(local_disk_gb=200, local_read_gbs=5, local_write_gbs=2)
    net = sm.NETWORKS[site.network]
    ds = sm.Dataset("big", "sdss", 4_000_000)  # 916 GB: memory 80 GB and disk 200 GB per node
    rows = {n: sm.io_row(W, n, net, site, ds, "float32", "node") for n in (8, 20, 64)}
    assert rows[8]["limiting"] == "does not fit" and rows[8]["efficiency"] is None  # 458 GB per node
    assert rows[20]["placement"] == "local-disk" and rows[20]["limiting"] in ("local-read", "compute", "queue")
    assert rows[64]["placement"] == "memory"  # 57 GB per node
    assert sm.node_partition_fits_from(site, ds, "float32") == (20, 48)
    assert sm.node_partition_fits_from(site, ds, "float16") == (12, 24)
    json.dumps(rows)  # no infinities in what --json writes


def test_markdown_tables_name_a_limiting_term_per_row():
    sites = [sm.SITES["perlmutter-like"], _toy_site(fs_aggregate_gbs=20, nodes=16)]
    datasets = [sm.DATASETS["sdss-paper"], sm.parse_dataset("legacy:2e6:152:3")]
    lines, rows, bounds = sm.io_tables(W, sites, datasets, ["float32", "float16"], [8, 64], shares=(1.0,))
    cell = re.compile(r"^(\d+% (compute|gradients|shuffle_bn|queue|metrics|horovod_cycle|fs-read|local-read|"
                      r"memory-read)|does not fit)$")
    tables = [i for i, line in enumerate(lines) if line.startswith("| partition | dtype |") and lines[i - 2].startswith("**")]
    assert len(tables) == len(sites) * len(datasets)
    limits = set()
    for i in tables:
        body = lines[i + 2: i + 6]
        assert [b.split(" | ")[0] for b in body] == ["| global"] * 2 + ["| node"] * 2
        for b in body:
            cells = [c.strip() for c in b.strip("|").split("|")[2:]]
            assert len(cells) == 2 and all(cell.match(c) for c in cells), b
            limits |= {c.split(" ", 1)[1] for c in cells}
    assert "fs-read" in limits  # the toy site's 20 GB/s file system limits the global partition
    assert len(rows) == 2 * 2 * 2 * 2 * 2 and len(bounds) == 2 * 2 * 2
    assert any("I/O-bound from" in line for line in lines)


def test_cli_runs_with_site_and_json(tmp_path):
    site_file = tmp_path / "site.yaml"
    site_file.write_text("fs_aggregate_gbs: 40\nnodes: 32\n")
    out = tmp_path / "model.json"
    assert sm.main(["--arch", "resnet18", "--width", "8", "--site", "frontier-like", "--site-file", str(site_file),
                    "--site-set", "fs_share=0.5", "--datasets", "sdss-paper,hsc:2e6", "--dtypes", "float16",
                    "--gpus", "8,64", "--fs-shares", "1", "--io-only", "--json", str(out)]) == 0
    blob = json.loads(out.read_text())
    io = blob["io"]
    site = io["sites"][0]
    assert (site["fs_aggregate_gbs"], site["nodes"], site["fs_share"]) == (40.0, 32, 0.5)
    assert site["sources"]["fs_share"].startswith("given") and "olcf" in site["sources"]["node_mem_gb"]
    assert {(r["dataset"], r["partition"], r["ranks"]) for r in io["rows"]} == {
        (d, p, n) for d in ("sdss-paper", "hsc:2e6") for p in ("global", "node") for n in (8, 64)}
    assert all(r["limiting"] for r in io["rows"]) and blob["rows"] == []
    with pytest.raises(SystemExit):
        sm.main(["--site", "nowhere", "--io-only"])
    for bad in ("fs_share=2", "local_read_gbs=0", "nodes=x"):
        with pytest.raises(SystemExit):
            sm.main(["--site", "frontier-like", "--site-set", bad, "--io-only"])
