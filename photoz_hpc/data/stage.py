"""``photoz-hpc stage``: a node-local copy of a store, whole (``global``) or only one node's shards (``node``).

A job's nodes stage in parallel, each its own copy (``slurm/common.sh`` ``photoz_stage``). Every shard's metadata
(``.meta.npy``, small) is copied, because the loaders index the whole store; with ``data.partition=node`` only the
``.bin`` files of the node's shards (``partition.node_shards``, the deal the training computes too) are. Files are
copied in parallel, each hashed in the same pass as it is copied (so a checksum costs no second read) and
compared with the manifest's sha256 before it is renamed into place; ``staged.json``, written last, marks the
copy complete and says which shards it holds (``ShardedDataset`` reads it). A checksum mismatch or an I/O error
removes the whole copy and names the source file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from photoz_hpc.data import format as store_format
from photoz_hpc.data.dataset import read_manifest
from photoz_hpc.data.partition import PARTITIONS, STAGED_NAME, node_shards
from photoz_hpc.errors import DatasetError
from photoz_hpc.io_utils import atomic_write_json

_CHUNK = 8 << 20  # large sequential reads: parallel file systems stream them, hashlib releases the GIL on them


@dataclass(frozen=True)
class _File:
    """One file to copy; ``sha256`` None where the manifest holds no checksum (itself, the commit markers)."""

    name: str
    size: int
    sha256: str | None


class _Mismatch(Exception):
    pass


class _Stopped(Exception):
    """Another file failed: this copy stops early (the whole copy is removed anyway)."""


def stage_dataset(src: str | os.PathLike, dest: str | os.PathLike, partition: str = "global", node: int = 0,
                  nodes: int = 1, workers: int = 4) -> dict:
    """Copy the store ``src`` into ``dest`` (replaced if it exists): all shards, or node ``node`` of ``nodes``'s.

    Returns the statistics ``photoz-hpc stage`` prints (bytes, seconds, MB/s, shards copied of the total).
    """
    t0 = time.perf_counter()
    src, dest = Path(src), Path(dest)
    if partition not in PARTITIONS:
        raise DatasetError(f"staging {src}: partition {partition!r} must be one of {', '.join(PARTITIONS)}")
    if not 0 <= node < nodes:
        raise DatasetError(f"staging {src}: node {node} of {nodes} (a node index is 0 ... nodes - 1)")
    if workers < 1:
        raise DatasetError(f"staging {src}: workers must be >= 1, got {workers}")
    manifest = read_manifest(src)
    _check_places(src, dest)
    shards = manifest["shards"]
    counts = [int(s["count"]) for s in shards]
    wanted = node_shards(counts, nodes, node) if partition == "node" else list(range(len(shards)))
    files = _plan(src, shards, set(wanted))
    need = sum(f.size for f in files)
    _clear(dest)
    _check_space(dest, need)
    dest.mkdir(parents=True)
    try:
        nbytes = _copy_all(src, dest, files, workers)
        seconds = time.perf_counter() - t0
        host = socket.gethostname()
        atomic_write_json(dest / STAGED_NAME, {
            "partition": partition, "node": node, "nodes": nodes, "shards": sorted(wanted),
            "source": os.path.abspath(src), "bytes": nbytes, "seconds": round(seconds, 3), "host": host})
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return {"source": str(src), "dest": str(dest), "host": host, "partition": partition, "node": node,
            "nodes": nodes, "shards_copied": len(wanted), "shards_total": len(shards), "files": len(files) + 1,
            "bytes": nbytes, "seconds": round(seconds, 3), "mb_per_s": round(nbytes / 1e6 / max(seconds, 1e-9), 1)}


def _plan(src: Path, shards: list[dict], wanted: set[int]) -> list[_File]:
    """The files to copy, largest first (the workers finish together): wanted .bin, every .meta.npy, markers."""
    files = []
    for number, shard in enumerate(shards):
        checked = [(shard["meta"], "meta_sha256")] + ([(shard["file"], "sha256")] if number in wanted else [])
        for name, key in checked:
            if Path(name).name != name:
                raise DatasetError(f"{src / store_format.MANIFEST_NAME}: shard file name {name!r} is not a plain name")
            if not shard.get(key):
                raise DatasetError(f"{src / store_format.MANIFEST_NAME}: no {key} for {name}; re-run prepare")
            if not (src / name).is_file():
                raise DatasetError(f"{src / name}: missing, cannot stage {src}")
            files.append(_File(name, (src / name).stat().st_size, shard[key]))
        marker = f"{Path(shard['file']).stem}.json"  # prepare's commit record: informative, a store may lack it
        if (src / marker).is_file():
            files.append(_File(marker, (src / marker).stat().st_size, None))
    files.append(_File(store_format.MANIFEST_NAME, (src / store_format.MANIFEST_NAME).stat().st_size, None))
    return sorted(files, key=lambda f: -f.size)


def _check_places(src: Path, dest: Path) -> None:
    """``dest`` is replaced: it must be neither the source, nor inside it, nor hold it."""
    s, d = src.resolve(), dest.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise DatasetError(f"staging {src} into {dest}: the copy cannot be the source, lie inside it or contain it")


def _clear(dest: Path) -> None:
    """Remove an earlier copy at ``dest``; refuse to remove anything that does not look like one."""
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir() or dest.is_symlink():
        raise DatasetError(f"{dest}: exists and is not a directory; refusing to replace it with a dataset copy")
    entries = [p.name for p in dest.iterdir()]
    looks_like_copy = (not entries or (dest / STAGED_NAME).is_file() or (dest / store_format.MANIFEST_NAME).is_file()
                       or all(n.startswith(("shard-", ".shard-", ".manifest.json")) for n in entries))
    if not looks_like_copy:
        raise DatasetError(f"{dest}: exists and is not a dataset copy (no {store_format.MANIFEST_NAME}); refusing to "
                           "replace it: stage into a new or empty directory")
    shutil.rmtree(dest)


def _check_space(dest: Path, need: int) -> None:
    """Fail before copying when the target's file system (node memory for /dev/shm) cannot hold the copy."""
    probe = dest
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise DatasetError(f"{dest}: the copy needs {need / 1e9:.2f} GB but {probe} has {free / 1e9:.2f} GB free; "
                           "stage into a larger target (node memory or a local disk) or use more nodes with "
                           "data.partition=node")


def _copy_all(src: Path, dest: Path, files: list[_File], workers: int) -> int:
    """Copy ``files`` with ``workers`` threads; on any failure stop the others and raise naming every bad file."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="photoz-stage")
    stop = threading.Event()
    try:
        futures = {pool.submit(_copy_one, src / f.name, dest / f.name, f.sha256, stop): f for f in files}
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        problems = []
        for fut in done:
            exc = fut.exception()
            if isinstance(exc, _Mismatch):
                problems.append(f"{src / futures[fut].name}: sha256 mismatch (corrupt)")
            elif isinstance(exc, OSError):
                hint = " (disk full?)" if exc.errno == errno.ENOSPC else ""
                problems.append(f"{src / futures[fut].name}: copying to {dest} failed: {exc.strerror or exc}{hint}")
            elif exc is not None:
                raise exc
        if problems:
            raise DatasetError(f"staging {src} into {dest} failed (the copy is removed):\n  "
                               + "\n  ".join(sorted(problems)))
        return sum(fut.result() for fut in futures)
    finally:
        stop.set()  # a no-op when all is done; else the running copies end at their next chunk
        pool.shutdown(wait=True, cancel_futures=True)


def _copy_one(src: Path, dest: Path, sha256: str | None, stop: threading.Event) -> int:
    """Copy to a temporary name, hashing in the same pass; rename only when the checksum matches."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    n = 0
    try:
        with open(src, "rb", buffering=0) as fin, open(tmp, "wb", buffering=0) as fout:
            while k := fin.readinto(buf):
                if stop.is_set():
                    raise _Stopped(str(src))
                chunk = view[:k]
                digest.update(chunk)
                while chunk:  # raw writes may be partial
                    chunk = chunk[fout.write(chunk):]
                n += k
        if sha256 is not None and digest.hexdigest() != sha256:
            raise _Mismatch(str(src))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


__all__ = ["stage_dataset"]
