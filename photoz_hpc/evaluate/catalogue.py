"""Survey-scale inference: a photo-z catalogue of every galaxy of one or many prepared datasets.

One **part** per input shard (dataset d, shard s). The parts are dealt to Slurm array tasks
(``block``) and then to ranks in contiguous blocks; each rank streams its parts through the ``eval``
pipeline (one loader per dataset over the ids of its pending parts, ``rank=0, world_size=1``, so no
rank ever waits for another), drops the padding rows, and writes each part atomically followed by a
small done marker holding its sha256. A part whose marker and checksum match is skipped on re-run,
so a killed or pre-empted run resumes where it stopped and no galaxy is ever written twice.

    CATALOGUE/
      catalogue.json        the plan: checkpoint sha256, config, the model's bands and redshift grid (bin edges),
                            the id column (``id_column``), inputs, columns, parts
      parts/d000-s00000.parquet (or .h5)   one row per galaxy of input 0, shard 0, in dataset order
      done/d000-s00000.json marker: rows, sha256, bytes, rank, device, precision, seconds
      manifest.json         written last, once every part is done: plan + per-part checksums + counts

``manifest.json`` with ``complete: true`` means complete. ``verify_catalogue`` re-hashes every part and checks
against the inputs that every galaxy is present exactly once (the merge/verify step); a catalogue that fails
it gets ``complete: false`` (a part damaged after its marker is reported as corrupt, by name).

Galaxies are named by the inputs' id column (``ids.shared_id_column``): ``ObjID`` int64 for SDSS release stores
(the schema as before surveys), ``object_id`` int64 or string for Multimodal Universe stores (Parquet: a string
column; HDF5: a fixed-width utf-8 string dataset); the plan records it as ``id_column``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from photoz_hpc.data.dataset import ShardedDataset, open_dataset
from photoz_hpc.errors import PhotozError
from photoz_hpc.evaluate import ids as galaxy_ids
from photoz_hpc.evaluate.arrays import photoz_summaries
from photoz_hpc.evaluate.inputs import check_inputs
from photoz_hpc.io_utils import atomic_path, atomic_write_json, sha256_file
from photoz_hpc.logs import get_logger
from photoz_hpc.models.model_files import model_digest
from photoz_hpc.run_lock import LOCK_NAME, RunDir
from photoz_hpc.survey import RedshiftGrid, Survey
from photoz_hpc.train.inference import MAX_TTA, batch_log_probs

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

CATALOGUE_FORMAT = "photoz-hpc/catalogue/1"
PLAN_NAME, MANIFEST_NAME, PARTS_DIR, DONE_DIR = "catalogue.json", "manifest.json", "parts", "done"
FORMATS = {"parquet": ".parquet", "hdf5": ".h5"}
#: catalogue columns in order, with their dtypes, for SDSS release stores; ``pdf`` (the model's n_bins, float16)
#: follows when requested. Other stores' catalogues have their id column in place of ``ObjID`` (``columns_for``).
COLUMNS: dict[str, str] = {
    "ObjID": "int64", "ra": "float64", "dec": "float64",
    "z_phot": "float32", "z_mode": "float32", "z_median": "float32", "z_lo68": "float32", "z_hi68": "float32",
    "z_lo95": "float32", "z_hi95": "float32", "odds": "float32", "pdf_std": "float32",
    "z_spec": "float32", "dataset": "int32", "index": "int64",
}
PDF_COLUMN, PDF_DTYPE = "pdf", "float16"
#: what slurm/predict.sh (slurm/common.sh) writes into the catalogue directory before predict starts
SLURM_LAUNCH_FILES = ("launch.log", ".launch")
#: galaxies per forward pass by default: large on a GPU (no gradients to keep), moderate on a CPU
#: (a ResNet-50 on 64x64 crops peaks at ~14 MB of fp32 activations per galaxy).
DEFAULT_BATCH = {"cuda": 512, "cpu": 64}
#: ``verify_catalogue`` counts ids that occur in several inputs up to this many rows, and up to as many bytes of ids
#: as that many int64 ids take (string ids are wider: fewer of them).
MAX_DUPLICATE_CHECK = 200_000_000
#: the id column of a plan written before plans recorded it
DEFAULT_ID_COLUMN = "ObjID"


def columns_for(id_column: str = DEFAULT_ID_COLUMN, id_dtype: str = galaxy_ids.INT_LABEL) -> dict[str, str]:
    """The catalogue's columns and dtypes with ``id_column`` (``ids.id_column_of``) naming the galaxies, in the
    first place: SDSS (``ObjID``, int64) gives ``COLUMNS`` exactly."""
    return {id_column: id_dtype, **{k: v for k, v in COLUMNS.items() if k != DEFAULT_ID_COLUMN}}


@dataclass(frozen=True)
class Part:
    """Rows [start, start + count) of input ``dataset`` (= its shard ``shard``)."""

    dataset: int
    shard: int
    start: int
    count: int

    @property
    def name(self) -> str:
        return f"d{self.dataset:03d}-s{self.shard:05d}"


# ---------------------------------------------------------------------- plan: parts, blocks, checks


def plan_parts(datasets: list[ShardedDataset]) -> list[Part]:
    """Every (dataset, shard) with at least one galaxy, in input order."""
    return [Part(d, s, int(ds.offsets[s]), int(ds.offsets[s + 1] - ds.offsets[s]))
            for d, ds in enumerate(datasets) for s in range(len(ds.shards)) if ds.offsets[s + 1] > ds.offsets[s]]


def block(items: list, index: int, count: int) -> list:
    """Contiguous block ``index`` of ``count`` near-equal blocks of ``items`` (sizes differ by at most 1)."""
    if count < 1 or not 0 <= index < count:
        raise PhotozError(f"block {index} of {count} does not exist (need 0 <= index < count)")
    lo, hi = (index * len(items)) // count, ((index + 1) * len(items)) // count
    return items[lo:hi]


def parse_block(text: str | None) -> tuple[int, int]:
    """``'I/N'`` (array task I of N) -> (I, N); None -> (0, 1)."""
    if not text:
        return 0, 1
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise PhotozError(f"--block {text!r} must look like I/N, e.g. 3/16 (Slurm: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)") from None
    if count < 1 or not 0 <= index < count:
        raise PhotozError(f"--block {text!r}: task {index} of {count} does not exist (need 0 <= I < N)")
    return index, count


def _json_safe(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}


def make_plan(checkpoint: Path, cfg, meta: dict, datasets: list[ShardedDataset], fmt: str, with_pdf: bool,
              tta: int, temperature: float, overrides: list[str], *, grid: RedshiftGrid, survey: Survey
              ) -> dict[str, Any]:
    """What the catalogue is (deterministic: array tasks writing it concurrently write the same bytes); ``grid``
    and ``survey``: the model's (the pdf bins and the bands it read)."""
    parts = plan_parts(datasets)
    edges = grid.edges()
    id_column, id_dtype = galaxy_ids.shared_id_column(datasets)
    schema = columns_for(id_column, id_dtype)
    columns = list(schema) + ([PDF_COLUMN] if with_pdf else [])
    return {
        "format": CATALOGUE_FORMAT, "file_format": fmt,
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": meta.get("checkpoint_sha256") or model_digest(checkpoint),  # the loaded bytes' digest
        "model": _json_safe({k: v for k, v in meta.items() if k != "checkpoint_sha256"}),
        "config": dataclasses.asdict(cfg), "overrides": list(overrides),
        "tta": tta, "temperature": float(temperature), "pdf": with_pdf, "pdf_dtype": PDF_DTYPE if with_pdf else None,
        "survey": survey.name, "bands": list(survey.bands), "redshift_grid": grid.to_dict(),
        "bin_edges": edges.tolist(), "id_column": id_column, "columns": columns,
        "column_dtypes": {**schema, **({PDF_COLUMN: f"{PDF_DTYPE}[{grid.n_bins}]"} if with_pdf else {})},
        "inputs": [{"path": str(ds.root), "count": len(ds), "shards": len(ds.shards),
                    "image_shape": list(ds.image_shape), "manifest_sha256": sha256_file(ds.root / "manifest.json")}
                   for ds in datasets],
        "count": int(sum(p.count for p in parts)),
        "parts": [dataclasses.asdict(p) | {"name": p.name} for p in parts],
    }


#: plan keys that must agree between runs writing into one catalogue (paths may move; loader, dist and
#: train settings do not change the numbers, the network, its augment section and these options do).
_PLAN_KEYS = ("format", "file_format", "checkpoint_sha256", "tta", "temperature", "pdf", "bin_edges", "columns",
              "count", "parts")
_CONFIG_KEYS = ("model", "augment")


def claim_catalogue(root: Path, plan: dict[str, Any]) -> None:
    """Write the plan, or check that the catalogue under ``root`` was started with the same one; a directory
    without a plan must be empty (it may hold another command's outputs, e.g. an ``evaluate`` directory)."""
    path = root / PLAN_NAME
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in _PLAN_KEYS if old.get(k) != plan.get(k)]
        diff += [f"config.{k}" for k in _CONFIG_KEYS if old.get("config", {}).get(k) != plan["config"].get(k)]
        diff += [f"inputs[{i}]" for i, (a, b) in enumerate(zip(old.get("inputs", []), plan["inputs"], strict=False))
                 if (a["manifest_sha256"], a["count"]) != (b["manifest_sha256"], b["count"])]
        if len(old.get("inputs", [])) != len(plan["inputs"]):
            diff.append("inputs")
        if diff:
            raise PhotozError(f"{root} holds a catalogue of another model, input or option ({', '.join(diff)} differ): "
                              "write to a new --out, or delete it to start again")
        return
    others = sorted(n for n in os.listdir(root)
                    if n not in (PARTS_DIR, DONE_DIR, *SLURM_LAUNCH_FILES) and not n.startswith(LOCK_NAME))
    others += [f"{d}/{n}" for d in (PARTS_DIR, DONE_DIR) if (root / d).is_dir() for n in sorted(os.listdir(root / d))]
    if others and (root / PLAN_NAME).exists():  # another array task of this catalogue wrote its plan meanwhile
        return claim_catalogue(root, plan)
    if others:  # no plan: not a catalogue; never mix parts into another command's outputs
        raise PhotozError(f"--out {root} is not a catalogue ({PLAN_NAME} is missing) and holds other files "
                          f"({', '.join(others[:8])}{' ...' if len(others) > 8 else ''}): predict writes only into a "
                          "new or empty directory or a catalogue of its own; choose another --out")
    (root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    (root / DONE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, plan)


# ---------------------------------------------------------------------- part files (Parquet or HDF5)


def part_path(root: Path, name: str, fmt: str) -> Path:
    return root / PARTS_DIR / f"{name}{FORMATS[fmt]}"


def write_part(path: Path, columns: dict[str, np.ndarray], fmt: str, meta: dict[str, str]) -> None:
    """One part file, atomically: Parquet (pyarrow; ``pdf`` a fixed-size list of float16) or HDF5 (h5py)."""
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            pa, pq = _pyarrow()
            arrays = []
            for values in columns.values():
                if values.ndim == 2:
                    flat = pa.array(values.reshape(-1))
                    arrays.append(pa.FixedSizeListArray.from_arrays(flat, values.shape[1]))
                else:
                    arrays.append(pa.array(values))
            table = pa.Table.from_arrays(arrays, names=list(columns)).replace_schema_metadata(meta)
            pq.write_table(table, tmp)
        else:
            import h5py

            with h5py.File(tmp, "w") as fh:
                for name, values in columns.items():
                    if values.dtype.kind == "U":  # string ids: fixed-width utf-8 (h5py stores no numpy unicode)
                        encoded = np.char.encode(values, "utf-8") if values.size else np.zeros(0, "S1")
                        utf8 = h5py.string_dtype("utf-8", max(1, encoded.dtype.itemsize))
                        fh.create_dataset(name, data=encoded.astype(utf8))  # the dtype carries the encoding
                    else:
                        fh.create_dataset(name, data=values)
                for key, value in meta.items():
                    fh.attrs[key] = value


def read_part(path: Path, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of one part file as numpy arrays (``pdf``: (rows, n_bins) float16; string ids: a unicode array)."""
    if path.suffix == ".parquet":
        pa, pq = _pyarrow()
        table = pq.read_table(path, columns=columns)
        out = {}
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            if name == PDF_COLUMN:
                out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
            elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                out[name] = galaxy_ids.as_ids(col.to_numpy(zero_copy_only=False), galaxy_ids.STRING_LABEL)
            else:
                out[name] = col.to_numpy(zero_copy_only=False)
        return out
    import h5py

    with h5py.File(path, "r") as fh:
        return {k: (galaxy_ids.as_ids(fh[k].asstr()[()], galaxy_ids.STRING_LABEL) if h5py.check_string_dtype(fh[k].dtype)
                    else fh[k][()]) for k in (columns or list(fh.keys())) if k in fh}


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PhotozError("the Parquet catalogue needs pyarrow (pip install 'photoz-hpc[catalogue]' or pyarrow); "
                          "or write HDF5 with --format hdf5") from None
    return pa, pq


def part_state(root: Path, part: Part, fmt: str, check_sha: bool = True) -> tuple[str, dict | None]:
    """(state, marker) of a part: ``"done"`` (marker present, file of the recorded rows, size and sha256),
    ``"unfinished"`` (no readable marker: never written, or interrupted before its marker), or ``"corrupt: WHY"``
    (a marker whose file is missing or differs from it: damaged after it was written)."""
    marker = root / DONE_DIR / f"{part.name}.json"
    path = part_path(root, part.name, fmt)
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return "unfinished", None
    if not isinstance(done, dict) or done.get("rows") != part.count:
        return f"corrupt: its done marker {marker} does not record its {part.count} rows", None
    if not path.is_file():
        return f"corrupt: {path} is missing (its done marker exists)", None
    if path.stat().st_size != done.get("bytes"):
        return f"corrupt: {path} has {path.stat().st_size} bytes, its done marker {done.get('bytes')}", None
    if check_sha and sha256_file(path) != done.get("sha256"):
        return f"corrupt: the sha256 of {path} differs from its done marker", None
    return "done", done


def part_done(root: Path, part: Part, fmt: str, check_sha: bool = True) -> dict | None:
    """The part's marker if the part is finished (``part_state`` "done"), else None."""
    return part_state(root, part, fmt, check_sha)[1]


def part_columns(ds: ShardedDataset, d: int, index: np.ndarray, summary: dict[str, np.ndarray],
                 probs: np.ndarray | None) -> dict[str, np.ndarray]:
    """The catalogue columns of galaxies ``index`` of input ``d`` from their pdf summaries and, for the ``pdf``
    column, their (N, n_bins) pdfs (None: no pdf column), both from ``arrays.photoz_summaries`` as the Python API
    computes them; the id column is the store's (``ids.galaxy_ids``), in its own dtype."""
    meta = ds.meta[index]
    (id_column, id_values), = galaxy_ids.galaxy_ids(ds, index).items()
    cols = {id_column: id_values, "ra": meta["ra"], "dec": meta["dec"], **summary, "z_spec": meta["specz_redshift"],
            "dataset": np.full(len(index), d), "index": index}
    schema = columns_for(*galaxy_ids.id_column_of(ds))
    out = {k: (cols[k] if k == id_column else np.ascontiguousarray(cols[k], dtype=dt)) for k, dt in schema.items()}
    if probs is not None:
        out[PDF_COLUMN] = probs.astype(PDF_DTYPE)
    return out


# ---------------------------------------------------------------------- one rank's parts


@dataclass
class PredictOptions:
    fmt: str = "parquet"
    with_pdf: bool = False
    tta: int = 1
    temperature: float = 1.0
    batch_size: int = 0  # 0: DEFAULT_BATCH of the device
    precision: str = "auto"  # bf16 on GPUs with native bf16, fp32 on CPU (train.precision's rules)


def check_predict_options(tta: Any, temperature: Any) -> tuple[int, float]:
    """(tta, temperature) of a prediction, checked: the command's and the Python API's one rule. A ``ValueError``
    naming the value, in words that fit both (``predict`` reports it as a ``PhotozError``)."""
    if isinstance(tta, bool) or not isinstance(tta, (int, np.integer)) or not 1 <= tta <= MAX_TTA:
        raise ValueError(f"tta must be a whole number from 1 to {MAX_TTA} (test-time augmentation averages that many "
                         f"exact 90-degree rotations), got {tta!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating))
            or not (temperature > 0 and math.isfinite(temperature))):
        raise ValueError(f"temperature must be a positive number (1: the network's own pdfs), got {temperature!r}")
    return int(tta), float(temperature)


@dataclass(frozen=True)
class ForwardSetup:
    """How ``predict`` runs a network on a device (``forward_setup``)."""

    net: Any  # the PhotoZNet on the device, eval mode, channels_last when ``channels_last``
    precision: Any  # train.precision.Precision: its ``autocast`` and ``name``
    channels_last: bool
    batch_size: int


def forward_setup(net, cfg, device: torch.device, precision: str, batch_size: int | None) -> ForwardSetup:
    """The forward-pass settings predict (the command and the Python API) uses on ``device``: the network moved there
    in eval mode (channels_last where the config and device use it), ``precision`` resolved (auto: bf16 on GPUs with
    native bf16, fp32 on CPUs) and ``batch_size`` galaxies per pass (None: ``DEFAULT_BATCH`` of the device; else a
    positive whole number, a ``ValueError`` otherwise)."""
    import torch

    from photoz_hpc.train.precision import resolve_precision
    from photoz_hpc.train.runtime import use_channels_last

    batch = resolve_batch_size(batch_size, DEFAULT_BATCH.get(device.type, 64), f"on this {device.type} device")
    channels_last = use_channels_last(cfg, device)
    net = net.to(device).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return ForwardSetup(net, resolve_precision(precision, device), channels_last, batch)


def resolve_batch_size(batch_size: Any, default: int, why: str) -> int:
    """``batch_size`` (a whole number >= 1) or, for None, ``default`` (``why``: where that default comes from); 0,
    negatives, bools and fractions are a ``ValueError`` (never silently the default)."""
    if batch_size is None:
        return int(default)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1 (or None: {default} {why}), got {batch_size!r}")
    return int(batch_size)


def write_parts(root: Path, setup: ForwardSetup, cfg, datasets: list[ShardedDataset], parts: list[Part],
                opts: PredictOptions, device: torch.device, loader_device: str, flag=None, rank: int = 0,
                on_part: Callable[[Part, dict], None] | None = None) -> dict[str, Any]:
    """Write this rank's unfinished ``parts`` (skipping finished ones) with ``setup``'s network, precision and batch
    size, stopping after the current part when ``flag`` is raised. Returns counts and timing."""
    net, precision, channels_last = setup.net, setup.precision, setup.channels_last
    opts = dataclasses.replace(opts, batch_size=setup.batch_size)
    todo = []
    for p in parts:
        state, _ = part_state(root, p, opts.fmt)
        if state.startswith("corrupt"):
            log.warning("part %s is %s: redoing it", p.name, state)
        if state != "done":
            todo.append(p)
    if len(todo) < len(parts):
        log.info("rank %d: %d of its %d parts are already finished: skipped", rank, len(parts) - len(todo), len(parts))
    written = rows = 0
    stopped = False
    t_start = time.perf_counter()
    for d in sorted({p.dataset for p in todo}):
        stream = _stream_parts(net, cfg, datasets[d], [p for p in todo if p.dataset == d], opts, device, precision,
                               channels_last, loader_device)
        for part, index, log_p, t_part in stream:
            done = _finish_part(root, datasets[d], part, index, log_p, opts, net.grid, rank, device, precision, t_part)
            written, rows = written + 1, rows + part.count
            if on_part is not None:
                on_part(part, done)
            if flag is not None and flag.raised:
                stopped = True
                break
        stream.close()  # ends the loader's pass (a DALI pipeline is released)
        if stopped:
            break
    seconds = time.perf_counter() - t_start
    return {"rank": rank, "parts": len(parts), "skipped": len(parts) - len(todo), "written": written, "rows": rows,
            "seconds": seconds, "rate": rows / seconds if seconds > 0 and rows else 0.0, "stopped": stopped,
            "remaining": len(todo) - written}


def _stream_parts(net, cfg, ds: ShardedDataset, parts: list[Part], opts: PredictOptions, device, precision,
                  channels_last: bool, loader_device: str):
    """Yield (part, index, log_p, start time) for ``parts`` of one dataset, in order, from one eval loader
    over their rows: batches are cut at part boundaries, padding rows dropped before the forward pass."""
    import torch

    from photoz_hpc.augment.loaders import build_loader

    ids = np.concatenate([np.arange(p.start, p.start + p.count, dtype=np.int64) for p in parts])
    loader = build_loader(cfg, ds, "eval", 0, 1, cfg.seed, device=loader_device, ids=ids, batch_size=opts.batch_size,
                          grid=net.grid)
    loader.set_epoch(0)
    pending = list(parts)
    index_buf: list[np.ndarray] = []
    logp_buf: list[np.ndarray] = []
    have, t_part = 0, time.perf_counter()
    for batch in loader:
        valid = batch["valid"].cpu().numpy().astype(bool)
        x = batch["image"].to(device, non_blocking=True)
        if not valid.all():  # the padded last batch
            x = x[torch.from_numpy(valid).to(x.device)]
        index_buf.append(batch["index"].cpu().numpy()[valid])
        logp_buf.append(batch_log_probs(net, x, opts.tta, precision.autocast, channels_last).cpu().numpy())
        have += int(valid.sum())
        while pending and have >= pending[0].count:
            part = pending.pop(0)
            index, log_p = np.concatenate(index_buf), np.concatenate(logp_buf)
            index_buf, logp_buf, have = [index[part.count:]], [log_p[part.count:]], have - part.count
            if not np.array_equal(index[: part.count], np.arange(part.start, part.start + part.count)):
                raise PhotozError(f"part {part.name}: the loader delivered other galaxies than the shard's rows")
            yield part, index[: part.count], log_p[: part.count], t_part
            t_part = time.perf_counter()


def _finish_part(root: Path, ds: ShardedDataset, part: Part, index: np.ndarray, log_p: np.ndarray,
                 opts: PredictOptions, grid: RedshiftGrid, rank: int, device, precision, t0: float) -> dict:
    summary, probs = photoz_summaries(log_p, grid, opts.temperature)  # what the Python API returns for arrays
    cols = part_columns(ds, part.dataset, index, summary, probs if opts.with_pdf else None)
    path, marker = part_path(root, part.name, opts.fmt), root / DONE_DIR / f"{part.name}.json"
    marker.unlink(missing_ok=True)  # a part being redone is unfinished until its new marker
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed run (only this rank writes this part)
        stale.unlink(missing_ok=True)
    write_part(path, cols, opts.fmt, {"photoz_hpc_catalogue": CATALOGUE_FORMAT, "part": part.name})
    done = {"name": part.name, "dataset": part.dataset, "shard": part.shard, "start": part.start, "rows": part.count,
            "sha256": sha256_file(path), "bytes": path.stat().st_size, "rank": rank, "host": socket.gethostname(),
            "device": str(device), "precision": precision.name, "seconds": round(time.perf_counter() - t0, 3)}
    atomic_write_json(marker, done)
    log.info("rank %d: part %s: %d galaxies in %.2f s", rank, part.name, part.count, done["seconds"])
    return done


# ---------------------------------------------------------------------- finish, verify, read


def finalize(root: str | Path) -> dict[str, Any] | None:
    """Write ``manifest.json`` if every part of the plan has its marker and file (sizes checked, not hashes);
    returns the manifest, or None while parts are missing. Concurrent callers write identical manifests."""
    root = Path(root)
    plan = json.loads((root / PLAN_NAME).read_text())
    markers = [n for n in os.listdir(root / DONE_DIR) if n.endswith(".json") and not n.startswith(".")]
    if len(markers) < len(plan["parts"]):  # one directory listing, not a file per part, while parts are missing
        return None
    entries = []
    for p in plan["parts"]:
        part = Part(p["dataset"], p["shard"], p["start"], p["count"])
        done = part_done(root, part, plan["file_format"], check_sha=False)
        if done is None:
            return None
        entries.append({"name": part.name, "file": str(part_path(root, part.name, plan["file_format"]).relative_to(root)),
                        "dataset": part.dataset, "shard": part.shard, "rows": part.count,
                        "sha256": done["sha256"], "bytes": done["bytes"]})
    per_input = [int(sum(e["rows"] for e in entries if e["dataset"] == d)) for d in range(len(plan["inputs"]))]
    manifest = {k: v for k, v in plan.items() if k != "parts"} | {
        "complete": True, "count": int(sum(per_input)), "counts_per_input": per_input, "parts": entries}
    atomic_write_json(root / MANIFEST_NAME, manifest)
    return manifest


def verify_catalogue(root: str | Path, data: list[str | Path] | None = None, write_manifest: bool = True) -> dict[str, Any]:
    """The merge/verify step: re-hash every part, check that its rows are exactly its shard's galaxies
    (``index`` = the shard's rows, the id column (plan ``id_column``: ``ObjID``, ``object_id``) = the input's, when
    the inputs are readable; ``data`` overrides the recorded paths), so every input galaxy appears exactly once;
    write ``manifest.json`` when all is well. ``duplicate_objids``: ids found in more than one row (None when too
    many to hold)."""
    root = Path(root)
    if not (root / PLAN_NAME).is_file():
        raise PhotozError(f"{root}: not a photo-z catalogue ({PLAN_NAME} is missing)")
    plan = json.loads((root / PLAN_NAME).read_text())
    fmt = plan["file_format"]
    paths = [str(p) for p in data] if data else [i["path"] for i in plan["inputs"]]
    if len(paths) != len(plan["inputs"]):
        raise PhotozError(f"{root}: the catalogue has {len(plan['inputs'])} inputs, {len(paths)} given")
    datasets: list[ShardedDataset | None] = []
    problems: list[str] = []
    for path, rec in zip(paths, plan["inputs"], strict=True):
        try:
            ds = open_dataset(path, verify_records=False)
            if sha256_file(ds.root / "manifest.json") != rec["manifest_sha256"]:
                problems.append(f"input {path} is not the dataset the catalogue was made from (manifest differs)")
            datasets.append(ds)
        except PhotozError as exc:
            log.warning("input %s cannot be read (%s): checking the catalogue against its plan only", path, exc)
            datasets.append(None)
    id_column = plan.get("id_column", DEFAULT_ID_COLUMN)
    for d, ds in enumerate(datasets):
        if ds is not None and ds.id_field != id_column:
            problems.append(f"input {paths[d]} names its galaxies by {ds.id_field}, the catalogue by {id_column}")
            datasets[d] = None
    missing, corrupt, rows, ids, id_bytes = [], [], 0, [], 0
    check_duplicates = plan["count"] <= MAX_DUPLICATE_CHECK
    for p in plan["parts"]:
        part = Part(p["dataset"], p["shard"], p["start"], p["count"])
        state, _ = part_state(root, part, fmt, check_sha=True)
        if state != "done":
            missing.append(part.name)
            if state.startswith("corrupt"):
                corrupt.append(part.name)
                problems.append(f"part {part.name} is {state}; re-run predict with the same arguments to redo it")
            continue
        cols = read_part(part_path(root, part.name, fmt), [id_column, "dataset", "index"])
        expect = np.arange(part.start, part.start + part.count)
        if len(cols["index"]) != part.count or not np.array_equal(cols["index"], expect) or \
                not (cols["dataset"] == part.dataset).all():
            problems.append(f"part {part.name}: its rows are not exactly rows {part.start}..{part.start + part.count - 1} "
                            f"of input {part.dataset}")
        ds = datasets[part.dataset]
        if id_column not in cols:
            problems.append(f"part {part.name} has no {id_column} column")
        elif ds is not None and not np.array_equal(cols[id_column], ds.meta[id_column][part.start: part.start + part.count]):
            problems.append(f"part {part.name}: {id_column}s differ from input {paths[part.dataset]}")
        rows += len(cols["index"])
        if check_duplicates and id_column in cols:
            id_bytes += cols[id_column].nbytes
            check_duplicates = id_bytes <= MAX_DUPLICATE_CHECK * 8
            ids.append(cols[id_column])
    total = plan["count"]
    for d, ds in enumerate(datasets):
        if ds is not None and len(ds) != plan["inputs"][d]["count"]:
            problems.append(f"input {paths[d]} has {len(ds)} galaxies, the plan {plan['inputs'][d]['count']}")
    unfinished = [n for n in missing if n not in corrupt]
    if unfinished:
        problems.append(f"{len(unfinished)} of {len(plan['parts'])} parts are missing or unfinished: "
                        f"{', '.join(unfinished[:8])}{' ...' if len(unfinished) > 8 else ''}")
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    report = {"catalogue": str(root), "ok": not problems, "rows": int(rows), "expected": int(total),
              "parts": len(plan["parts"]), "missing_parts": missing, "corrupt_parts": corrupt, "problems": problems,
              "id_column": id_column,
              "duplicate_objids": int(all_ids.size - np.unique(all_ids).size) if check_duplicates else None}
    if report["ok"] and write_manifest:
        report["manifest"] = str(root / MANIFEST_NAME) if finalize(root) is not None else None
    elif not report["ok"] and write_manifest:
        report["manifest"] = mark_incomplete(root, problems)
    return report


def mark_incomplete(root: Path, problems: list[str]) -> str | None:
    """Rewrite an existing ``manifest.json`` with ``complete: false`` and the problems found (a catalogue that
    failed verification must not look finished); the next predict run that completes it writes a new one."""
    path = root / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        manifest = {}
    if not isinstance(manifest, dict):
        manifest = {}
    atomic_write_json(path, manifest | {"complete": False, "problems": problems})
    log.warning("%s: marked incomplete (complete: false)", path)
    return str(path)


def read_catalogue(root: str | Path, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """The whole catalogue (every finished part, in plan order) as numpy arrays; for validation-sized
    catalogues and tests. Survey-sized ones: read ``parts/`` with pyarrow.dataset or part by part."""
    root = Path(root)
    plan = json.loads((root / PLAN_NAME).read_text())
    chunks: dict[str, list[np.ndarray]] = {}
    for p in plan["parts"]:
        path = part_path(root, p["name"], plan["file_format"])
        if (root / DONE_DIR / f"{p['name']}.json").is_file() and path.is_file():
            for k, v in read_part(path, columns).items():
                chunks.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in chunks.items()}


# ---------------------------------------------------------------------- the command


def catalogue_hold(root: Path, task: int, n_tasks: int) -> RunDir:
    """What one ``predict`` holds: the catalogue, or with ``--block I/N`` its block I (the tasks of a job array
    write disjoint parts of one catalogue at once; blocks of one catalogue must share N)."""
    if n_tasks == 1:
        return RunDir(root, "predict")
    return RunDir(root, f"predict --block {task}/{n_tasks}", root / f"{LOCK_NAME}.block-{task}-of-{n_tasks}")


def run_predict(checkpoint: str | Path, data: list[str | Path], out: str | Path, opts: PredictOptions,
                block_spec: str | None = None, overrides: list[str] | None = None,
                on_part: Callable[[Part, dict], None] | None = None) -> dict[str, Any]:
    """The ``predict`` command on every rank: checks (before any work), plan, this rank's parts, and the
    manifest once every part of the catalogue is done. ``report['preempted']``: stopped by a signal."""
    from photoz_hpc.evaluate.run import load_network
    from photoz_hpc.train.runtime import run_with_comm

    if opts.fmt not in FORMATS:
        raise PhotozError(f"--format {opts.fmt!r} is not one of {sorted(FORMATS)}")
    if opts.fmt == "parquet":
        _pyarrow()
    try:
        check_predict_options(opts.tta, opts.temperature)
    except ValueError as exc:
        raise PhotozError(str(exc)) from None
    if opts.batch_size < 0:
        raise PhotozError(f"--batch-size {opts.batch_size} must be >= 1 (or 0: the device's default)")
    checkpoint = Path(checkpoint)
    task, n_tasks = parse_block(block_spec)
    overrides = list(overrides or [])
    net, cfg, meta = load_network(checkpoint, overrides)
    datasets = check_inputs(net, cfg, list(data), f"the network {checkpoint}")  # before any work
    galaxy_ids.shared_id_column(datasets)  # one id column for all inputs: before any work
    root = Path(out)
    explicit_loader_device = any(o.split("=", 1)[0].strip() == "loader.device" for o in overrides)

    def body(cfg, comm, device, flag):
        error = None
        if comm.rank == 0:
            try:
                root.mkdir(parents=True, exist_ok=True)
                claim_catalogue(root, make_plan(checkpoint, cfg, meta, datasets, opts.fmt, opts.with_pdf, opts.tta,
                                                opts.temperature, overrides, grid=net.grid, survey=net.survey))
            except (PhotozError, OSError) as exc:
                error = str(exc)
        error = comm.broadcast_object(error)
        if error:
            raise PhotozError(error)
        parts = block(block(plan_parts(datasets), task, n_tasks), comm.rank, comm.world)
        setup = forward_setup(net, cfg, device, opts.precision, opts.batch_size or None)  # 0: the device's default
        loader_device = cfg.loader.device if explicit_loader_device else ("gpu" if device.type == "cuda" else "cpu")
        mine = write_parts(root, setup, cfg, datasets, parts, opts, device, loader_device, flag, comm.rank, on_part)
        ranks = comm.allgather_object(mine)
        manifest = finalize(root) if comm.rank == 0 else None
        rows = sum(r["rows"] for r in ranks)
        seconds = max(r["seconds"] for r in ranks)
        return {"catalogue": str(root), "block": f"{task}/{n_tasks}", "world_size": comm.world,
                "device": str(device), "precision": setup.precision.name, "tta": opts.tta,
                "batch_size": setup.batch_size,
                "parts": sum(r["parts"] for r in ranks), "written": sum(r["written"] for r in ranks),
                "skipped": sum(r["skipped"] for r in ranks), "rows": rows, "seconds": seconds,
                "rate": rows / seconds if seconds > 0 else 0.0, "ranks": ranks,
                "preempted": any(r["remaining"] > 0 for r in ranks),
                "complete": manifest is not None if comm.rank == 0 else None}

    return run_with_comm(cfg, None, body, hold=catalogue_hold(root, task, n_tasks))
