"""The data path of pretraining at scale, for ``scaling_model.py``: what a step reads, where the records live
(node memory, node-local disk or the parallel file system), what staging costs, per ``data.partition``.

Why: at the goal of 4,000 images/s per GPU the data path, not the network, decides whether training scales,
and a model that leaves it out assumes a page cache that cannot exist (issue 23).

* Records: one record per image (MoCo's two views come from one read), ``bands x cutout^2 x itemsize`` bytes
  (float32 4, ``prepare --dtype float16`` 2), survey facts read from ``configs/surveys/*.yaml``; the per-record
  metadata (tens of bytes) is left out. Bytes per step per GPU = batch x record bytes.
* Memory for data = node memory - ``mem_reserve_gb`` (the processes' own). Records are drawn uniformly at
  random, so a cache holding ``c`` of the ``s`` bytes a node draws from hits ``c / s`` of its reads (the page
  cache, LRU, under uniform random access).
* ``global`` partition: every node draws from the whole dataset. It is staged whole (``PHOTOZ_STAGE=1``) into
  memory if it fits there, else onto the node-local disk if it fits there, else every epoch reads it from the
  parallel file system (only the page-cache hits are spared).
* ``node`` partition: each node stages dataset / nodes once (into memory, else the local disk) and then reads
  only its own share; "does not fit" when the share fits neither.
* Staging time: the bytes a node stages at min(per-node file-system bandwidth, the job's share of the aggregate
  / nodes, the local write bandwidth); all nodes stage at once.
* Reads per step and node: bytes at the bandwidth of where they live; file-system reads also count one random
  operation per record against the aggregate IOPS where a site gives a figure. Loaders prefetch, so reads
  overlap compute: the step takes max(compute + exposed communication, reads) (``scaling_model.io_row``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

ITEMSIZE = {"float32": 4, "float16": 2}
PARTITIONS = ("global", "node")


@dataclass(frozen=True)
class Dataset:
    """A store's size: ``records`` cutouts of ``survey`` (a shipped name or a survey YAML path); ``cutout`` and
    ``bands`` default to the survey's (its ``cutout_size``; its ``default_bands``, else all bands)."""

    name: str
    survey: str
    records: int
    cutout: int | None = None
    bands: int | None = None
    note: str = ""


DATASETS = {
    "sdss-paper": Dataset("sdss-paper", "sdss", 1_600_000, note="the paper's data (Hayat et al. 2021): 107x107x5"),
    # MMU ssl_legacysurvey cutouts are 152 px (configs/surveys/legacy.yaml) in g r z (its default_bands)
    "legacy-76m": Dataset("legacy-76m", "legacy", 76_000_000, cutout=152,
                          note="Legacy-Survey size (Multimodal Universe ssl_legacysurvey): 152x152x3"),
}


def parse_dataset(text: str) -> Dataset:
    """A preset name, or ``SURVEY:RECORDS[:CUTOUT[:BANDS]]`` (e.g. ``hsc:5000000`` or ``lsst:1e7:128:6``)."""
    if text in DATASETS:
        return DATASETS[text]
    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"dataset '{text}': use one of {list(DATASETS)} or SURVEY:RECORDS[:CUTOUT[:BANDS]]")
    try:
        records = int(float(parts[1]))
        cutout = int(parts[2]) if len(parts) > 2 and parts[2] else None
        bands = int(parts[3]) if len(parts) > 3 and parts[3] else None
    except ValueError:
        raise ValueError(f"dataset '{text}': RECORDS, CUTOUT and BANDS must be numbers") from None
    if records < 1 or (cutout is not None and cutout < 1) or (bands is not None and bands < 1):
        raise ValueError(f"dataset '{text}': RECORDS, CUTOUT and BANDS must be positive")
    return Dataset(text, parts[0], records, cutout, bands)


@lru_cache(maxsize=32)
def dataset_survey(ds: Dataset):
    """The survey of ``ds`` restricted to the bands its records hold (``photoz_hpc.survey``)."""
    from photoz_hpc.survey import load_survey

    s = load_survey(ds.survey)
    bands = list(s.spec.default_bands or s.bands)
    if ds.bands is not None:
        if ds.bands > s.n_bands:
            raise ValueError(f"dataset '{ds.name}': {ds.bands} bands, survey '{s.name}' has {s.n_bands}")
        bands = list(s.bands[: ds.bands]) if ds.bands != len(bands) else bands
    return s.subset(bands) if tuple(bands) != s.bands else s


def record_bytes(ds: Dataset, dtype: str = "float32") -> int:
    """Bytes of one stored cutout: bands x cutout^2 x itemsize."""
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype '{dtype}': use one of {list(ITEMSIZE)}")
    s = dataset_survey(ds)
    cutout = ds.cutout or s.cutout_size
    return s.n_bands * cutout * cutout * ITEMSIZE[dtype]


@dataclass(frozen=True)
class Site:
    """A machine's data path. GB = 1e9 bytes; bandwidths per second. ``sources`` says where each figure comes
    from (a URL and what the page says) or that it is assumed."""

    name: str
    network: str  # a key of scaling_model.NETWORKS
    gpus_per_node: int
    nodes: int  # GPU nodes in the machine
    node_mem_gb: float
    mem_reserve_gb: float  # kept for the training processes, loaders, OS
    mem_read_gbs: float  # reads from memory (page cache, tmpfs) per node
    local_disk_gb: float  # node-local disk (0: none)
    local_read_gbs: float
    local_write_gbs: float
    fs_aggregate_gbs: float  # the parallel file system, all clients together
    fs_node_gbs: float  # what one node can read from it
    fs_iops: float = 0.0  # aggregate random-read operations/s (0: not modelled)
    fs_share: float = 1.0  # the job's share of the aggregate (bandwidth and IOPS); 1 = the whole file system
    note: str = ""
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def mem_for_data_gb(self) -> float:
        return max(0.0, self.node_mem_gb - self.mem_reserve_gb)


def _site(name: str, network: str, note: str, figures: dict[str, tuple[float, str]]) -> Site:
    """A site from ``{field: (value, where the value comes from)}``: every number sits next to its source."""
    return Site(name=name, network=network, note=note, sources={k: s for k, (_, s) in figures.items()},
                **{k: v for k, (v, _) in figures.items()})


_RESERVE = "assumed, not measured: 16 GB for the OS + 8 GB per training process (host memory, pinned buffers, loader queues)"
_MEM_READ = ("assumed, not a hardware figure: loader threads copying from the page cache (host_feed.py measured 17 GB/s "
             "for one thread on a 2-core EPYC, benchmarks/RESULTS.md); never the limit at these rates")
_ASSUMED_SHARE = "the whole file system (an upper bound: a shared file system gives one job less; --site-set fs_share=0.25)"

SITES = {
    "perlmutter-like": _site("perlmutter-like", "perlmutter-a100-4x200", "NERSC Perlmutter GPU nodes, $PSCRATCH", {
        "gpus_per_node": (4, "https://docs.nersc.gov/systems/perlmutter/architecture: GPU partition '1x AMD EPYC 7763, "
                             "4x NVIDIA A100 (40GB), 4x HPE Slingshot 11' per node"),
        "nodes": (1792, "https://docs.nersc.gov/systems/perlmutter/architecture: '3,072 CPU-only and 1,792 "
                        "GPU-accelerated nodes' (1,536 with 40 GB A100s + 256 with 80 GB)"),
        "node_mem_gb": (256, "https://docs.nersc.gov/beginner-guide/nodetypesfig: GPU nodes '1 AMD EPYC 7763 CPUs and "
                             "4 NVIDIA A100 GPUs, Memory per Node: 256 GB'"),
        "mem_reserve_gb": (48, _RESERVE),
        "mem_read_gbs": (50.0, _MEM_READ),
        "local_disk_gb": (0.0, "not verified: no node-local disk on GPU nodes is named in the NERSC pages found; "
                               "modelled as none (staging goes to memory only)"),
        "local_read_gbs": (0.0, "no local disk (as local_disk_gb)"),
        "local_write_gbs": (0.0, "no local disk (as local_disk_gb)"),
        "fs_aggregate_gbs": (5000.0, "https://docs.nersc.gov/filesystems/perlmutter-scratch/: 'all-flash file system. "
                                     "It has 35 PB of disk space, an aggregate bandwidth of >5 TB/sec, and 4 million "
                                     "IOPS (4 KiB random)'"),
        "fs_iops": (4e6, "https://docs.nersc.gov/filesystems/perlmutter-scratch/: '4 million IOPS (4 KiB random)'; "
                         "one operation per record read (optimistic for 100-300 kB records)"),
        "fs_node_gbs": (100.0, "the node's injection bandwidth, 4 Slingshot NICs x 200 Gb/s (Lockwood et al. 2021, "
                               "https://escholarship.org/uc/item/90r3s04z, Fig. 1: GPU nodes '4x Slingshot NICs', "
                               "'Slingshot Network 200 Gb/s'); an upper bound: a Lustre client's read rate is not "
                               "verified"),
        "fs_share": (1.0, _ASSUMED_SHARE),
    }),
    "frontier-like": _site("frontier-like", "frontier-mi250x-4x200", "OLCF Frontier, Orion (Lustre) and node NVMe", {
        "gpus_per_node": (8, "https://docs.olcf.ornl.gov/systems/frontier_user_guide.html: '[4x] AMD MI250X, each "
                             "with 2 Graphics Compute Dies (GCDs) for a total of 8 GCDs per node' (one rank per GCD)"),
        "nodes": (9856, "https://docs.olcf.ornl.gov/systems/frontier_user_guide.html: 'a total of 9,856 AMD compute "
                        "nodes'"),
        "node_mem_gb": (512, "https://docs.olcf.ornl.gov/systems/frontier_user_guide.html: '64-core AMD ... CPU ... "
                             "with access to 512 GB of DDR4 memory'"),
        "mem_reserve_gb": (80, _RESERVE),
        "mem_read_gbs": (50.0, _MEM_READ),
        "local_disk_gb": (3840.0, "https://docs.olcf.ornl.gov/systems/frontier_user_guide.html: 'Each compute node on "
                                  "Frontier has [2x] 1.92TB ... (NVMe) storage devices (SSDs)'"),
        "local_read_gbs": (5.5, "https://docs.olcf.ornl.gov/systems/frontier_user_guide.html: 'a peak sequential "
                                "performance of 5500 MB/s (read) and 2000 MB/s (write)'; the guide does not say per "
                                "device or per node: taken per node (conservative)"),
        "local_write_gbs": (2.0, "as local_read_gbs: '2000 MB/s (write)'"),
        "fs_aggregate_gbs": (5500.0, "https://docs.olcf.ornl.gov/data/index.html (Orion): 'A hard-disk-based capacity "
                                     "tier that provides 679 PB at peak read speeds of 5.5 TB/s and peak write speeds "
                                     "of 4.6 TB/s'; the flash performance tier ('11.5 petabytes (PB) of capacity at "
                                     "peak read-write speeds of 10 TB/s') holds only each file's first 8 MB under the "
                                     "default layout (frontier_user_guide: 'lfs setstripe -E 256K -L mdt -E 8M ... -p "
                                     "performance ... -p capacity'), so shards are read from the capacity tier"),
        "fs_iops": (0.0, "not modelled: no cited random-read figure for Orion's capacity tier"),
        "fs_node_gbs": (100.0, "https://docs.olcf.ornl.gov/systems/frontier_user_guide.html: '[4x] HPE Slingshot 200 "
                               "Gbps (25 GB/s) NICs providing a node-injection bandwidth of 800 Gbps (100 GB/s)'; an "
                               "upper bound: a Lustre client's read rate is not verified"),
        "fs_share": (1.0, _ASSUMED_SHARE),
    }),
}

_SITE_FIELDS = {f.name: f.type for f in fields(Site)}
_NUMERIC = [f.name for f in fields(Site) if f.name not in ("name", "network", "note", "sources")]


def custom_site(base: Site | None, values: dict[str, Any], where: str) -> Site:
    """``base`` with ``values`` (field -> number) replaced, or a new site when ``base`` is None (every numeric
    field then needed); custom figures are recorded as given in ``where``."""
    unknown = sorted(set(values) - set(_SITE_FIELDS) - {"sources"})
    if unknown:
        raise ValueError(f"{where}: unknown site keys {unknown}; known: {['name', 'network', *_NUMERIC]}")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key in _NUMERIC:
            try:
                clean[key] = int(value) if key in ("gpus_per_node", "nodes") else float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: site key '{key}' = {value!r} is not a number") from None
            if clean[key] < 0 or (key in ("gpus_per_node", "nodes") and clean[key] < 1):
                raise ValueError(f"{where}: site key '{key}' = {value!r} must be positive")
        elif key != "sources":
            clean[key] = str(value)
    if not 0 < clean.get("fs_share", 1.0) <= 1:
        raise ValueError(f"{where}: fs_share must be in (0, 1]")
    sources = {k: f"given ({where})" for k in clean if k in _NUMERIC}
    if base is None:
        missing = [k for k in ("name", "network", *_NUMERIC) if k not in clean and k not in ("fs_iops", "fs_share")]
        if missing:
            raise ValueError(f"{where}: a new site needs {missing} (or start from a preset with --site)")
        site = Site(**clean, sources=sources)
    else:
        site = replace(base, **clean, sources={**base.sources, **sources})
    zero = [k for k in ("mem_read_gbs", "fs_aggregate_gbs", "fs_node_gbs") if getattr(site, k) <= 0]
    if site.local_disk_gb > 0:
        zero += [k for k in ("local_read_gbs", "local_write_gbs") if getattr(site, k) <= 0]
    if zero:
        raise ValueError(f"{where}: site '{site.name}' needs {zero} > 0" + (" (it has a local disk)" if
                         site.local_disk_gb > 0 and set(zero) & {"local_read_gbs", "local_write_gbs"} else ""))
    return site


@dataclass(frozen=True)
class DataPath:
    """Where a node's records live and what one step reads, per node (see the module docstring)."""

    partition: str
    placement: str  # "memory", "local-disk", "fs" or "does not fit"
    staged: str  # "whole" (the dataset), "share" (dataset / nodes) or "none"
    node_gb: float  # what each node draws from: the dataset (global) or its share (node)
    stage_s: float  # once per run, before the first step
    step_bytes_gpu: float
    step_bytes_node: float
    read_s: float  # the node's reads per step (overlapped with compute by prefetching)
    read_term: str  # "fs-read", "local-read" or "memory-read"
    cache_hit: float  # share of reads served from memory when the data lives on disk or the file system


def nodes_of(n_gpus: int, site: Site) -> tuple[int, int]:
    """(GPUs per node in use, nodes)."""
    g = min(n_gpus, site.gpus_per_node)
    return g, max(1, math.ceil(n_gpus / g))


def data_path(site: Site, n_gpus: int, batch: int, rec_bytes: float, records: int, partition: str) -> DataPath:
    """The data path of one step at ``n_gpus`` GPUs with ``batch`` records per GPU (see the module docstring)."""
    if partition not in PARTITIONS:
        raise ValueError(f"partition '{partition}': use one of {PARTITIONS}")
    g, n = nodes_of(n_gpus, site)
    dataset = records * rec_bytes
    held = dataset if partition == "global" or n == 1 else dataset / n
    step_gpu = batch * rec_bytes
    step_node, records_node = g * step_gpu, g * batch
    mem = site.mem_for_data_gb * 1e9
    fs_rate = min(site.fs_node_gbs, site.fs_aggregate_gbs * site.fs_share / n) * 1e9
    staged = "whole" if held == dataset else "share"
    if held <= mem:
        placement, hit = "memory", 1.0
        stage_s = held / fs_rate
    elif site.local_disk_gb > 0 and held <= site.local_disk_gb * 1e9:
        placement, hit = "local-disk", mem / held
        stage_s = held / min(fs_rate, site.local_write_gbs * 1e9)
    elif partition == "global":
        placement, staged, hit, stage_s = "fs", "none", mem / held, 0.0
    else:
        return DataPath(partition, "does not fit", "share", held / 1e9, math.inf, step_gpu, step_node, math.inf,
                        "does not fit", 0.0)
    from_mem = hit * step_node / (site.mem_read_gbs * 1e9)
    rest = (1 - hit) * step_node
    if placement == "memory":
        read_s, term = from_mem, "memory-read"
    elif placement == "local-disk":
        read_s, term = from_mem + rest / (site.local_read_gbs * 1e9), "local-read"
    else:
        fs_s = rest / fs_rate
        if site.fs_iops > 0:
            fs_s = max(fs_s, (1 - hit) * records_node / (site.fs_iops * site.fs_share / n))
        read_s, term = from_mem + fs_s, "fs-read"
    return DataPath(partition, placement, staged, held / 1e9, stage_s, step_gpu, step_node, read_s, term, hit)
