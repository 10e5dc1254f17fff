"""The catalogue's pdfs as a ``qp`` Ensemble (LSST DESC ``qp-prob``), which RAIL's evaluation stages read.

Parameterisation ``qp.hist`` over the project's bin edges: qp stores a density per bin (p_k / width_k),
which is exactly our piecewise-constant pdf, so qp's cdf, ppf (median, intervals) and mean agree with
``pdfs.summarize_catalogue``. Ancillary columns: the catalogue's id column (``ObjID`` for SDSS stores, ``object_id``,
int64 or string, for Multimodal Universe ones), ra, dec, ``zmode`` and ``zmean`` (RAIL's names for the point
estimates). ``qp`` is an optional dependency, imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from photoz_hpc.errors import PhotozError
from photoz_hpc.evaluate.catalogue import DEFAULT_ID_COLUMN, PDF_COLUMN, PLAN_NAME, read_catalogue

#: ancillary columns of the export after the id column: qp/RAIL name -> catalogue column.
ANCIL = {"ra": "ra", "dec": "dec", "zmode": "z_mode", "zmean": "z_phot"}


def ancil_columns(plan: dict) -> dict[str, str]:
    """qp/RAIL name -> catalogue column of the export: the catalogue's id column under its own name first."""
    id_column = plan.get("id_column", DEFAULT_ID_COLUMN)
    return {id_column: id_column, **ANCIL}


def _qp():
    try:
        import qp
    except ImportError:
        raise PhotozError("the qp export needs LSST DESC's qp (pip install qp-prob, or photoz-hpc[dev])") from None
    return qp


def to_ensemble(probs: np.ndarray, edges: np.ndarray, ancil: dict[str, np.ndarray] | None = None):
    """A ``qp.Ensemble`` of histogram pdfs: row i has probability ``probs[i, k]`` in bin [edges[k], edges[k+1])."""
    qp = _qp()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(edges) - 1:
        raise ValueError(f"probs must be (N, {len(edges) - 1}), got {probs.shape}")
    probs = probs / probs.sum(axis=1, keepdims=True)  # float16 storage: renormalise before qp
    return qp.Ensemble(qp.hist, data={"bins": np.asarray(edges, dtype=np.float64), "pdfs": probs}, ancil=ancil)


def ensemble_probs(ens) -> np.ndarray:
    """Back from a ``qp.hist`` Ensemble to (N, n_bins) bin probabilities."""
    edges = np.asarray(ens.metadata["bins"]).ravel()
    return np.asarray(ens.objdata["pdfs"]) * np.diff(edges)[None, :]


def qp_suffixes() -> list[str]:
    """The file suffixes qp can write (tables_io's list: qp picks the writer from the suffix)."""
    _qp()
    try:
        from tables_io.types import FILE_FORMAT_SUFFIXS
    except ImportError:  # another tables_io layout: qp's own error is turned into ours in export_qp
        return []
    return [f".{k}" for k in FILE_FORMAT_SUFFIXS]


def export_qp(catalogue: str | Path, out: str | Path) -> Path:
    """Write the pdfs of ``catalogue`` (made with ``--pdf``) as a qp file (format from the suffix, e.g. .hdf5);
    a missing catalogue or an unknown suffix is an error naming it, before any pdf is read."""
    root, out = Path(catalogue), Path(out)
    if not root.is_dir():
        raise PhotozError(f"{root}: no such catalogue directory (the --out of 'photoz-hpc predict --pdf')")
    if not (root / PLAN_NAME).is_file():
        raise PhotozError(f"{root}: not a photo-z catalogue ({PLAN_NAME} is missing; make one with "
                          "'photoz-hpc predict --pdf')")
    suffixes = qp_suffixes()
    if suffixes and out.suffix.lower() not in suffixes:
        raise PhotozError(f"{out}: qp cannot write a file with suffix {out.suffix or '(none)'!r}; it picks the "
                          f"format from the suffix: one of {', '.join(suffixes)} (e.g. pdfs.hdf5)")
    try:
        plan = json.loads((root / PLAN_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise PhotozError(f"{root / PLAN_NAME}: unreadable catalogue plan ({exc})") from None
    if not plan.get("pdf"):
        raise PhotozError(f"{root}: the catalogue holds no pdfs; make it with 'photoz-hpc predict --pdf' to export them")
    ancil = ancil_columns(plan)
    cols = read_catalogue(root, [PDF_COLUMN, *ancil.values()])
    if PDF_COLUMN not in cols:
        raise PhotozError(f"{root}: no finished part to export")
    ens = to_ensemble(cols[PDF_COLUMN], np.asarray(plan["bin_edges"]), {k: cols[v] for k, v in ancil.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")  # qp picks the writer from the suffix: keep it on the temporary
    try:
        ens.write_to(str(tmp))
    except KeyError as exc:  # tables_io: unknown suffix
        raise PhotozError(f"{out}: qp cannot write this format ({exc})") from None
    tmp.replace(out)
    return out
