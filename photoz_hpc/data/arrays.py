"""A prepared store from arrays held in memory, and the checks every in-memory input gets.

Why: a notebook holds cutouts as arrays (from the Multimodal Universe, a cutout service, a simulation) and should
go from them to a run without writing an HDF5 file and a command line first. ``prepare_arrays`` writes the arrays
as one Multimodal Universe image-sample file (``mmu_layout.write_mmu_file``, in a temporary directory beside
``out``, removed afterwards) and runs the real ``prepare`` on it, so the store is exactly what ``photoz-hpc
prepare`` makes of that file: the same manifest (survey, bands, pixel statistics), shards and float32 pixels bit for
bit. The manifest's ``inputs`` name that temporary file.

``check_layout``, ``nonfinite_rows``/``nonfinite_message`` and ``finite_column`` are the shape and NaN rules shared with the Python API's predictions and
embeddings (``evaluate.arrays``): (N, bands, H, W) in the survey's band order, with clear errors for the
(N, H, W, bands) layout, a single cutout, another band count, images smaller than a crop, NaN/inf pixels.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from photoz_hpc import mmu_layout as L
from photoz_hpc.data.inputs import PrepareOptions
from photoz_hpc.data.prepare import prepare
from photoz_hpc.errors import PhotozError
from photoz_hpc.survey import SHIPPED_SURVEYS, Survey, load_survey

#: galaxies checked for NaN/inf per step (bounds the temporary boolean array)
CHECK_ROWS = 4096


def shape_text(shape) -> str:
    return str(tuple(int(v) for v in shape))


def rows_text(rows: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return f"[{shown}{', ...' if len(rows) > limit else ''}]"


def check_layout(shape: tuple[int, ...], survey: Survey, crop: int | None, what: str) -> None:
    """A ``ValueError`` naming the problem unless ``shape`` is (N >= 1, bands, H, W) with ``survey``'s band count and
    at least ``crop`` pixels a side (``what``: who reads the images, e.g. the network's file)."""
    bands, n_bands = list(survey.bands), survey.n_bands
    shape = tuple(int(v) for v in shape)
    layout = f"(N, bands, H, W) = (N, {n_bands}, H, W), bands {bands}"
    if len(shape) == 3 and shape[0] == n_bands:
        raise ValueError(f"images have shape {shape_text(shape)}: a single cutout? {what} takes batches {layout}: "
                         "pass images[None]")
    if len(shape) != 4:
        raise ValueError(f"images have shape {shape_text(shape)}: {what} takes 4-d batches {layout}")
    if shape[1] != n_bands:
        if shape[3] == n_bands:
            raise ValueError(f"images have shape {shape_text(shape)}, the (N, H, W, bands) layout: {what} takes "
                             f"{layout}; pass images.transpose(0, 3, 1, 2) (numpy) or images.permute(0, 3, 1, 2) "
                             "(torch)")
        raise ValueError(f"images have {shape[1]} bands (axis 1 of {shape_text(shape)}) but {what} reads "
                         f"{n_bands}: {bands} (survey '{survey.name}'), in that order")
    if shape[0] == 0:
        raise ValueError(f"images have shape {shape_text(shape)}: no galaxies")
    height, width = shape[2], shape[3]
    if crop is not None and min(height, width) < crop:
        raise ValueError(f"images are {height}x{width} pixels but {what} was trained on {crop}x{crop} centre crops "
                         f"(augment.crop_size={crop}): they need at least {crop}x{crop}")


def check_real(dtype: np.dtype) -> None:
    if np.dtype(dtype).kind not in "fiu":
        raise ValueError(f"images have dtype {dtype}: pass real numbers (fluxes; they are read as float32)")


def nonfinite_message(bad_rows: np.ndarray, n: int) -> str:
    return (f"images: {len(bad_rows)} of {n} galaxies have NaN or inf pixels (rows {rows_text(bad_rows)}); replace "
            "the bad pixels (e.g. np.nan_to_num) or leave those rows out")


def nonfinite_rows(images: Any) -> np.ndarray:
    """Rows of an (N, ...) numpy array or torch tensor (on any device: checked there) with a NaN or inf value,
    checked ``CHECK_ROWS`` at a time (bounds the temporary boolean array)."""
    bad = [np.zeros(0, np.int64)]
    for lo in range(0, len(images), CHECK_ROWS):
        chunk = images[lo:lo + CHECK_ROWS]
        if hasattr(chunk, "detach"):  # a torch tensor
            import torch

            ok = torch.isfinite(chunk.reshape(len(chunk), -1)).all(dim=1).cpu().numpy()
        else:
            ok = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        bad.append(lo + np.flatnonzero(~ok))
    return np.concatenate(bad)


def as_survey(survey: str | Path | Survey) -> Survey:
    """A ``Survey`` as given, or loaded from its shipped name or description file."""
    return survey if isinstance(survey, Survey) else load_survey(survey)


def finite_column(values: Any, n: int, name: str) -> np.ndarray:
    """A per-galaxy number column (numpy, torch or a list; a scalar stands for every galaxy) as float64 (n,), with a
    ``ValueError`` naming ``name`` and the rows for the wrong shape, non-numbers or NaN/inf values. The one check of
    E(B-V), ra and dec given as arrays (``prepare_arrays`` and the Python API's predictions and embeddings)."""
    values = _column(values, n, name, "f")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ValueError(f"{name}: {len(bad)} of {n} values are NaN or inf (rows {rows_text(bad)})")
    return values


def _column(values: Any, n: int, name: str, kind: str) -> np.ndarray:
    """One per-galaxy column as numpy, checked: shape (n,), numbers (``kind`` 'f') or ids ('id': ints or strings)."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim == 0 and kind == "f":
        arr = np.full(n, arr.item())
    if arr.shape != (n,):
        scalar = ", or a scalar for all" if kind == "f" else ""
        raise ValueError(f"{name} has shape {shape_text(arr.shape)}: one value per galaxy, shape ({n},){scalar}")
    if kind == "f":
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{name} has dtype {arr.dtype}: pass numbers")
        return arr.astype(np.float64)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind in "UO":
        return arr.astype(str)
    raise ValueError(f"{name} has dtype {arr.dtype}: ids are integers or strings")


def prepare_arrays(images: Any, out: str | Path, survey: str | Path | Survey = "sdss", *, ebv: Any = None,
                   z_spec: Any = None, object_id: Any = None, ra: Any = None, dec: Any = None,
                   samples_per_shard: int = 4096, overwrite: bool = False, dtype: str = "float32") -> Path:
    """Write a prepared store at ``out`` from (N, bands, H, W) ``images`` of ``survey`` (a shipped name, a
    description file or a ``Survey``; bands in its order), with per-galaxy SFD ``ebv`` (None: E(B-V) = 0 is
    recorded, for images already corrected), spectroscopic ``z_spec`` (NaN or negative: unlabeled; None: none
    labeled), ``object_id`` (ints or strings; None: 0..N-1), ``ra``/``dec`` (degrees; None: 0). Pixels are stored as
    float32 (float64 input is rounded once), or float16 with ``dtype="float16"`` (``prepare --dtype float16``: half
    the bytes, rounded from the float32 values, so float64 input is rounded twice; pixels float16 cannot hold are
    refused). Returns ``out``; errors before anything is written."""
    survey = as_survey(survey)
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    check_real(images.dtype)
    check_layout(images.shape, survey, None, f"survey '{survey.name}'")
    n = len(images)
    bad = nonfinite_rows(images)
    if len(bad):
        raise ValueError(nonfinite_message(bad, n))
    columns: dict[str, np.ndarray] = {}
    for name, value in (("ra", ra), ("dec", dec)):
        columns[name] = np.zeros(n) if value is None else finite_column(value, n, name)
    if ebv is not None:
        columns["EBV"] = finite_column(ebv, n, "ebv")
    if z_spec is not None:
        columns[L.Z_SPEC] = _column(z_spec, n, "z_spec", "f")
    ids = np.arange(n, dtype=np.int64) if object_id is None else _column(object_id, n, "object_id", "id")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"object_id {uniq[counts > 1][0]!s} occurs {int(counts[counts > 1][0])} times: ids must name "
                         "one galaxy each")
    if not survey.band_labels:
        raise PhotozError(f"survey '{survey.name}' has no band_labels: its description must name its filters")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.arrays-", dir=out.parent))
    try:
        if survey.to_dict() != _shipped_dict(survey.name):  # a description of the user's: prepare reads it
            import yaml

            description = tmp / f"{survey.name}.yaml"
            description.write_text(yaml.safe_dump(survey.to_dict(), sort_keys=False))
            name = str(description)
        else:
            name = survey.name
        source = L.write_mmu_file(tmp / "arrays.hdf5", images.astype(np.float32, copy=False), L.labels_of(survey),
                                  survey.pixel_scale, np.nan, ids, columns)
        options = PrepareOptions(survey=name, no_extinction=ebv is None, dtype=dtype)
        return prepare([source], out, samples_per_shard=samples_per_shard, overwrite=overwrite, options=options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _shipped_dict(name: str) -> dict[str, Any] | None:
    return load_survey(name).to_dict() if name in SHIPPED_SURVEYS else None


__all__ = ["check_layout", "finite_column", "nonfinite_message", "nonfinite_rows", "prepare_arrays"]
