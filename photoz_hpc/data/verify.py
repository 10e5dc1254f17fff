"""``photoz-hpc verify`` and ``photoz-hpc info``: full integrity check and a dataset summary."""

from __future__ import annotations

import numpy as np

from photoz_hpc.data.dataset import open_dataset
from photoz_hpc.errors import DatasetError
from photoz_hpc.io_utils import sha256_file


def verify_dataset(root) -> dict:
    """Re-check every shard's sha256 (of the stored records, whatever their dtype) and record count; raise
    ``DatasetError`` listing all problems. A node-local copy made with node partitions (``staged.json``) holds only
    its node's ``.bin`` files: those are checked (and every metadata file), and the report says so (``partial``)."""
    try:
        ds = open_dataset(root)
        problems: list[str] = []
    except DatasetError as exc:
        raise DatasetError(f"verify failed: {exc}") from None
    held = [number for number in range(len(ds.shards)) if ds.holds(number)]
    for number, shard in enumerate(ds.shards):
        for key, digest in (("file", "sha256"), ("meta", "meta_sha256")):
            if key == "file" and not ds.holds(number):
                continue  # another node's records: not in this copy
            path = ds.root / shard[key]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != shard[digest]:
                problems.append(f"{path}: sha256 mismatch (corrupt)")
    if not problems:
        try:
            meta = ds.meta
            if len(meta) != len(ds):
                problems.append(f"{ds.root}: {len(meta)} metadata rows for {len(ds)} records")
        except DatasetError as exc:
            problems.append(str(exc))
    if problems:
        raise DatasetError("verify failed:\n  " + "\n  ".join(problems))
    partial = ""
    if ds.staged is not None and len(held) < len(ds.shards):
        held_count = sum(ds.shards[n]["count"] for n in held)
        partial = (f"{ds.staged.describe()}: the records of {len(held)} of {len(ds.shards)} shards ({held_count} of "
                   f"{len(ds)} samples) are here and were verified; the other nodes' .bin files are not")
    return {"path": str(ds.root), "count": len(ds), "shards": len(ds.shards), "ok": True,
            "survey": ds.survey.name, "bands": list(ds.bands), "dtype": ds.image_dtype.name,
            "verified_shards": held, "partial": partial}


def dataset_info(root) -> dict:
    """Survey and bands, counts, redshift range and pixel statistics of a dataset."""
    ds = open_dataset(root)
    meta = ds.meta
    z = meta["specz_redshift"][np.isfinite(meta["specz_redshift"])]
    man = ds.manifest
    info = {
        "path": str(ds.root),
        "format_version": man["format_version"],
        "count": len(ds),
        "labeled_count": int(len(z)),
        "skipped_count": man.get("skipped_count", 0),
        "shards": len(ds.shards),
        "survey": ds.survey.name,
        "bands": list(ds.bands),
        "id_field": ds.id_field,
        "image_shape": man["image_shape"],
        "layout": man["layout"],
        "dtype": ds.image_dtype.name,
        "size_gb": round(len(ds) * ds.record_bytes / 1e9, 3),
        "ebv_sfd": _summary(meta["ebv_sfd"]),
    }
    if len(z):
        info["specz_redshift"] = _summary(z)
    try:
        stats = ds.pixel_stats()
        info["pixel_median"], info["pixel_mad"] = stats["median"].tolist(), stats["mad"].tolist()
    except DatasetError as exc:
        info["pixel_stats"] = f"unavailable: {exc}"
    return info


def _summary(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {}
    q = np.quantile(values, [0.0, 0.5, 1.0])
    return {"min": float(q[0]), "median": float(q[1]), "max": float(q[2]), "mean": float(values.mean())}


__all__ = ["verify_dataset", "dataset_info"]
