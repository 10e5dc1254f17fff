"""``photoz-hpc prepare``: stream release-layout or Multimodal Universe HDF5 files into a sharded fixed-record store.

What is read (layout, survey, bands, metadata dtype, extinction, labels) is settled by ``data.inputs`` before
anything is written; the survey is recorded in the manifest and travels with the data.

Shard boundaries are fixed by the input rows (shard i holds input rows [i*S, (i+1)*S) of the
concatenated inputs, minus skipped bad rows), so the dataset is the same whatever the number of
MPI ranks; rank r writes shards r, r+size, ... . Work happens in ``OUT.partial/``: every shard is
committed by its JSON marker, an interrupted run resumes there, and only a complete dataset is
renamed to ``OUT``. Bad input removes the staging directory so no partial dataset is left.

Records are float32 bit copies of the inputs, or with ``--dtype float16`` their float16 rounding
(``data.record_dtype``: pixels float16 cannot hold are bad input, named by file and row); CRCs, checksums and the
pixel statistics are those of the stored records, and a resumed prepare must use the same dtype.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from photoz_hpc.comm.select import prepare_comm
from photoz_hpc.data import format as store_format
from photoz_hpc.data.hdf5_source import open_h5
from photoz_hpc.data.inputs import PrepareOptions, StoreInput, resolve_inputs
from photoz_hpc.data.record_dtype import half_problem, to_records
from photoz_hpc.data.stats import exact_median_mad
from photoz_hpc.errors import InputDataError, PhotozError
from photoz_hpc.io_utils import atomic_open, atomic_write_json
from photoz_hpc.logs import get_logger
from photoz_hpc.run_lock import LOCK_NAME, RunDir, hold_for_ranks

log = get_logger(__name__)
BAD_ROW_POLICIES = ("reject", "skip")


@dataclass(frozen=True)
class ShardPlan:
    """Which input rows one shard holds: a list of (source index, start, stop)."""

    index: int
    segments: tuple[tuple[int, int, int], ...]


def plan_shards(sources: list, samples_per_shard: int) -> list[ShardPlan]:
    """Cut the concatenated inputs into consecutive runs of ``samples_per_shard`` rows."""
    if samples_per_shard < 1:
        raise PhotozError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    plans, current, filled = [], [], 0
    for f, src in enumerate(sources):
        start = 0
        while start < src.rows:
            take = min(samples_per_shard - filled, src.rows - start)
            current.append((f, start, start + take))
            filled += take
            start += take
            if filled == samples_per_shard:
                plans.append(ShardPlan(len(plans), tuple(current)))
                current, filled = [], 0
    if current:
        plans.append(ShardPlan(len(plans), tuple(current)))
    return plans


def _meta_rows(inp: StoreInput, src_index: int, start: int, rows: dict[str, np.ndarray], keep: np.ndarray) -> np.ndarray:
    meta = np.zeros(int(keep.sum()), dtype=inp.meta_dtype)
    for key in inp.meta_dtype.names:
        if key in rows:
            meta[key] = rows[key][keep]
    if "ebv_sfd" not in rows:  # release layout: from the per-band e_bv, in the survey's input convention
        meta["ebv_sfd"] = inp.survey.sfd_ebv(meta["e_bv"])
    meta["source_file"] = src_index
    meta["source_row"] = start + np.flatnonzero(keep)
    return meta


def write_shard(out: Path, plan: ShardPlan, inp: StoreInput, policy: str, chunk_rows: int,
                dtype: np.dtype = store_format.IMAGE_DTYPE) -> dict:
    """Write one shard's ``.bin`` (records of ``dtype``) and ``.meta.npy`` atomically, then its JSON commit marker."""
    stem = store_format.shard_stem(plan.index)
    metas, skipped = [], []
    sha = hashlib.sha256()
    with atomic_open(out / f"{stem}.bin", "wb") as fh:
        for f, seg_start, seg_stop in plan.segments:
            src = inp.sources[f]
            with open_h5(src.path) as h5:  # once per segment: reopening per chunk is costly on Lustre/GPFS
                for start in range(seg_start, seg_stop, chunk_rows):
                    stop = min(start + chunk_rows, seg_stop)
                    rows = inp.read(f, start, stop, h5)
                    mask, reasons = inp.bad(f, rows)
                    if mask.any():
                        first = int(np.flatnonzero(mask)[0])
                        if policy == "reject":
                            raise InputDataError(
                                f"{src.path}: row {start + first} has {reasons[0]} "
                                f"({int(mask.sum())} bad rows in {start}..{stop}); use --bad-rows skip to drop them"
                            )
                        skipped += [{"file": src.path, "row": start + int(i), "reason": r} for i, r in zip(np.flatnonzero(mask), reasons, strict=True)]
                    keep = ~mask
                    images = rows["images"] if keep.all() else rows["images"][keep]
                    hwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
                    stored = to_records(hwc, dtype)
                    if stored is not hwc:
                        problem = half_problem(hwc, stored, inp.survey.bands)
                        if problem is not None:
                            row = start + int(np.flatnonzero(keep)[problem[0]])
                            raise InputDataError(f"{src.path}: row {row}: {problem[1]}")
                    meta = _meta_rows(inp, f, start, rows, keep)
                    for i in range(len(stored)):
                        meta["crc32"][i] = zlib.crc32(stored[i])
                    data = stored.tobytes()
                    sha.update(data)
                    fh.write(data)
                    metas.append(meta)
    meta_all = np.concatenate(metas) if metas else np.zeros(0, dtype=inp.meta_dtype)
    with atomic_open(out / f"{stem}.meta.npy", "wb") as fh:
        np.save(fh, meta_all, allow_pickle=False)
    record = {
        "index": plan.index,
        "file": f"{stem}.bin",
        "meta": f"{stem}.meta.npy",
        "count": int(len(meta_all)),
        "labeled": int(np.isfinite(meta_all["specz_redshift"]).sum()),
        "sha256": sha.hexdigest(),
        "meta_sha256": hashlib.sha256((out / f"{stem}.meta.npy").read_bytes()).hexdigest(),
        "segments": [list(s) for s in plan.segments],
        "skipped": skipped,
    }
    atomic_write_json(out / f"{stem}.json", record)
    return record


def _load_committed(out: Path, plan: ShardPlan, record_size: int) -> dict | None:
    """The shard's commit record if it is complete and matches the plan, else None (redo it)."""
    marker = out / f"{store_format.shard_stem(plan.index)}.json"
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
        ok = record["segments"] == [list(s) for s in plan.segments]
        ok = ok and (out / record["file"]).stat().st_size == record["count"] * record_size
        ok = ok and (out / record["meta"]).is_file()
    except (OSError, ValueError, KeyError):
        return None
    return record if ok else None


def shard_blocks(root: Path, records: list[dict], shape: tuple[int, int, int], rows_per_block: int = 256,
                 dtype: np.dtype = store_format.IMAGE_DTYPE):
    """A re-iterable source of (n, H, W, C) float32 blocks over the given shards of ``dtype`` records (memory-
    mapped; float16 records are widened exactly, so the statistics are those of the values loaders see)."""

    def blocks():
        for shard in records:
            if shard["count"] == 0:
                continue
            images = np.memmap(root / shard["file"], dtype=dtype, mode="r", shape=(shard["count"], *shape))
            for i in range(0, shard["count"], rows_per_block):
                yield np.asarray(images[i : i + rows_per_block], dtype=np.float32)

    return blocks


def _plan_fingerprint(inp: StoreInput, samples_per_shard: int, policy: str, dtype: str) -> dict:
    return {
        "format_version": store_format.FORMAT_VERSION,
        "samples_per_shard": samples_per_shard,
        "bad_rows": policy,
        "dtype": dtype,
        "inputs": [s.fingerprint() for s in inp.sources],
        "layout": inp.layout,
        "options": inp.options,
    }


def prepare(
    inputs: list[str | Path],
    out: str | Path,
    samples_per_shard: int = 4096,
    bad_row_policy: str = "reject",
    chunk_rows: int = 256,
    overwrite: bool = False,
    comm=None,
    options: PrepareOptions | None = None,
) -> Path:
    """Convert release-layout or Multimodal Universe HDF5 files (or directories of them) into a dataset
    directory; returns its path. Resumable, MPI-aware. ``options``: survey, bands, extinction, labels and the
    record dtype (``float32``, the default, or ``float16``)."""
    comm = comm or prepare_comm("auto")
    options = options or PrepareOptions()
    if bad_row_policy not in BAD_ROW_POLICIES:
        raise PhotozError(f"--bad-rows must be one of {BAD_ROW_POLICIES}, got '{bad_row_policy}'")
    if options.dtype not in store_format.IMAGE_DTYPES:
        raise PhotozError(f"--dtype must be one of {sorted(store_format.IMAGE_DTYPES)}, got '{options.dtype}'")
    if not inputs:
        raise PhotozError("prepare needs at least one input HDF5 file")
    out = Path(out).resolve()
    with hold_for_ranks(comm, prepare_hold(out)):
        return _prepare_held(inputs, out, samples_per_shard, bad_row_policy, chunk_rows, overwrite, comm, options)


def prepare_hold(out: Path) -> RunDir:
    """What ``prepare`` holds: ``out``, by a lock file beside it (``out`` is replaced by its staging directory
    when the dataset is published, and must not contain anything but the dataset)."""
    return RunDir(out, "prepare", out.parent / f".{out.name}{LOCK_NAME}")


def _prepare_held(inputs, out: Path, samples_per_shard: int, bad_row_policy: str, chunk_rows: int, overwrite: bool,
                  comm, options: PrepareOptions) -> Path:
    """``prepare`` once ``out`` is held by this run."""
    staging = out.with_name(out.name + ".partial")
    if (out / store_format.MANIFEST_NAME).exists():
        if not overwrite:
            raise PhotozError(f"{out}: a prepared dataset already exists (use --overwrite to replace it)")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Never replace anything that is not a prepared dataset (it may hold the inputs themselves).
        raise PhotozError(f"{out}: exists and is not a prepared dataset; choose a new or empty --out directory")

    inp = resolve_inputs(inputs, options)
    if comm.rank == 0:
        for level, message in inp.notes:
            log.log(level, message)
    sources = inp.sources
    shape = inp.shape
    height, width, n_bands = shape
    dtype = store_format.IMAGE_DTYPES[options.dtype]
    record_size = store_format.record_bytes(*shape, dtype)
    plans = plan_shards(sources, samples_per_shard)
    fingerprint = _plan_fingerprint(inp, samples_per_shard, bad_row_policy, options.dtype)

    error = ""
    if comm.rank == 0:
        try:
            staging.mkdir(parents=True, exist_ok=True)
            for stale in staging.glob(".*.tmp-*"):  # left by a killed run: never published
                stale.unlink()
            plan_file = staging / "plan.json"
            planned = json.loads(plan_file.read_text()) if plan_file.exists() else fingerprint
            planned.setdefault("dtype", "float32")  # planned before --dtype existed
            if planned != fingerprint:
                error = _resume_conflict(staging, planned, fingerprint)
            else:
                atomic_write_json(plan_file, fingerprint)
        except OSError as exc:
            error = f"{staging}: cannot create staging directory: {exc}"
    error = comm.broadcast_object(error)
    if error:
        raise PhotozError(error)

    records, reused = [], 0
    try:
        for plan in plans[comm.rank :: comm.world]:
            record = _load_committed(staging, plan, record_size)
            if record is None:
                record = write_shard(staging, plan, inp, bad_row_policy, chunk_rows, dtype)
                log.info("wrote %s (%d samples)", record["file"], record["count"])
            else:
                reused += 1
            records.append(record)
    except InputDataError as exc:
        error = str(exc)
        bad_input = 1
    except Exception as exc:  # disk full, I/O error...: keep committed shards so a re-run resumes
        error = f"rank {comm.rank}: {type(exc).__name__}: {exc}"
        bad_input = 0
    else:
        bad_input = 0
    # Every rank reaches these collectives, whatever happened on the others: no rank is left waiting.
    errors = [e for e in comm.gather_object(error) if e]
    failed = int(comm.allreduce_array(np.array([2 if bad_input else (1 if error else 0)]), "max")[0])
    if failed == 2:
        if comm.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise InputDataError("; ".join(errors) if errors else "another rank hit bad input (see its log); nothing was kept")
    if failed:
        raise PhotozError(
            ("; ".join(errors) if errors else "another rank failed (see its log)")
            + f"; completed shards are kept in {staging}: re-run the same command to resume"
        )
    if reused:
        log.info("resumed: %d shard(s) already complete on rank %d", reused, comm.rank)

    count = int(comm.allreduce_array(np.array([sum(r["count"] for r in records)], dtype=np.int64))[0])
    if count == 0:
        if comm.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise InputDataError(f"no usable rows in {[s.path for s in sources]}")
    median, mad = exact_median_mad(shard_blocks(staging, records, shape, dtype=dtype), n_bands, count * height * width,
                                   comm)

    all_records = comm.gather_object(records)
    error = ""
    if comm.rank == 0:
        try:
            shards = sorted((r for part in all_records for r in part), key=lambda r: r["index"])
            manifest = build_manifest(inp, shards, samples_per_shard, bad_row_policy, median, mad, options.dtype)
            atomic_write_json(staging / store_format.MANIFEST_NAME, manifest)
            _publish(staging, out)
            log.info("prepared %d samples in %d shards at %s", manifest["count"], len(shards), out)
        except OSError as exc:
            error = f"{out}: could not publish the dataset ({exc}); the finished shards are in {staging}"
    error = comm.broadcast_object(error)
    if error:
        raise PhotozError(error)
    return out


def _resume_conflict(staging: Path, planned: dict, fingerprint: dict) -> str:
    """Why an unfinished prepare in ``staging`` cannot be resumed with these settings (never a mixed store)."""
    if {k: v for k, v in planned.items() if k != "dtype"} == {k: v for k, v in fingerprint.items() if k != "dtype"}:
        return (f"{staging}: holds an unfinished prepare with --dtype {planned['dtype']}, this one asks for --dtype "
                f"{fingerprint['dtype']}; resume it with --dtype {planned['dtype']}, or remove {staging} to start again")
    return f"{staging}: holds an unfinished prepare of different inputs or settings; remove it first"


def build_manifest(inp: StoreInput, shards, samples_per_shard, policy, median, mad, dtype: str = "float32") -> dict:
    skipped = [s for r in shards for s in r["skipped"]]
    shape = inp.shape
    manifest = {
        "format": "photoz-hpc-shards",
        "format_version": store_format.FORMAT_VERSION,
        "layout": store_format.LAYOUT,
        "dtype": dtype,
        "byte_order": "little",
        "image_shape": list(shape),
        "bands": list(inp.survey.bands),
        "survey": inp.survey.to_dict(),
        "input_layout": inp.layout,
        "record_bytes": store_format.record_bytes(*shape, dtype),
        "samples_per_shard": samples_per_shard,
        "count": sum(r["count"] for r in shards),
        "labeled_count": sum(r["labeled"] for r in shards),
        "skipped_count": len(skipped),
        "skipped": skipped,
        "bad_rows": policy,
        **inp.manifest,
        "meta_fields": list(inp.meta_dtype.names),
        "meta_dtype": store_format.meta_dtype_to_json(inp.meta_dtype),
        "id_field": store_format.id_field(inp.meta_dtype),
        "inputs": [{"path": s.path, "rows": s.rows, "labeled": s.labeled} for s in inp.sources],
        "shards": [
            {k: r[k] for k in ("file", "meta", "count", "labeled", "sha256", "meta_sha256")} for r in shards
        ],
        "pixel_stats": {
            "definition": "exact per-band median over all pixels; MAD = median(|x - median|)",
            "median": [float(v) for v in median],
            "mad": [float(v) for v in mad],
        },
    }
    return manifest


def _publish(staging: Path, out: Path) -> None:
    """Move the finished staging directory to ``out``; an old dataset is removed only afterwards."""
    for marker in staging.glob("shard-*.json"):
        marker.unlink()
    (staging / "plan.json").unlink(missing_ok=True)
    old = None
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["prepare", "plan_shards", "write_shard"]
