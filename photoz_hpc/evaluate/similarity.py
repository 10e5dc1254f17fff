"""Similarity search and anomaly scores over ``embed`` outputs (the paper's Figure 1).

Similarity is the dot product of L2-normalised embeddings (the cosine). ``knn`` finds the exact top-k
with faiss when importable (``IndexFlatIP``, on all GPUs when faiss has them) or with torch (blocked
matrix products over the memory-mapped parts, on a GPU when there is one); both are exact, so they agree
up to ties. A galaxy never counts as its own neighbour. The anomaly score of a galaxy is
``1 - mean similarity to its k nearest neighbours``: high for galaxies unlike anything else in the set.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from photoz_hpc.errors import PhotozError
from photoz_hpc.evaluate.embeddings import Embeddings
from photoz_hpc.logs import get_logger

log = get_logger(__name__)

BACKENDS = ("auto", "faiss", "torch")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise PhotozError(f"search backend '{backend}' is not one of {list(BACKENDS)}")
    if backend == "auto":
        return "faiss" if faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise PhotozError("search backend 'faiss' but faiss is not installed (pip install faiss-cpu, or "
                          "photoz-hpc[similarity])")
    return backend


def _chunks(db: Embeddings | np.ndarray, size: int):
    if isinstance(db, Embeddings):
        yield from db.chunks(size)
    else:
        for lo in range(0, len(db), size):
            yield lo, np.asarray(db[lo:lo + size], dtype=np.float32)


class TorchIndex:
    """Exact inner-product search by blocked matrix products over the (memory-mapped) rows."""

    def __init__(self, db: Embeddings | np.ndarray, chunk: int = 65536) -> None:
        self.db, self.chunk = db, chunk
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        best_s = torch.full((len(q), 0), -np.inf, device=self.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=self.device)
        for lo, rows in _chunks(self.db, self.chunk):
            s = q @ torch.from_numpy(rows).to(self.device).T
            cat_s = torch.cat([best_s, s], 1)
            cat_i = torch.cat([best_i, torch.arange(lo, lo + len(rows), device=self.device).expand(len(q), -1)], 1)
            top = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1)
            best_s, best_i = top.values, torch.gather(cat_i, 1, top.indices)
        return best_s.cpu().numpy(), best_i.cpu().numpy()


class FaissIndex:
    """faiss ``IndexFlatIP`` (exact inner product), moved to all GPUs when faiss has them."""

    def __init__(self, db: Embeddings | np.ndarray, chunk: int = 65536) -> None:
        import faiss

        dim = db.dim if isinstance(db, Embeddings) else np.asarray(db).shape[1]
        index = faiss.IndexFlatIP(dim)
        self.gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        if self.gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        for _, rows in _chunks(db, chunk):
            index.add(np.ascontiguousarray(rows, dtype=np.float32))
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, i = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return s, i.astype(np.int64)


def build_index(db: Embeddings | np.ndarray, backend: str = "auto") -> TorchIndex | FaissIndex:
    return FaissIndex(db) if resolve_backend(backend) == "faiss" else TorchIndex(db)


def knn(db: Embeddings | np.ndarray, queries: np.ndarray, k: int, query_rows: np.ndarray | None = None,
        backend: str = "auto", index: TorchIndex | FaissIndex | None = None,
        query_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows), each (n_queries, k), best first: the ``k`` most similar rows of ``db`` to each
    query. ``query_rows``: the queries' own rows in ``db``, never returned as their own neighbours."""
    n = len(db)
    if k < 1:
        raise PhotozError(f"k must be >= 1, got {k}")
    extra = 1 if query_rows is not None else 0
    if k + extra > n:
        raise PhotozError(f"k = {k} neighbours asked for, but the set has {n} galaxies")
    index = index or build_index(db, backend)
    queries = np.asarray(queries, dtype=np.float32)
    sims, rows = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    for lo in range(0, len(queries), query_chunk):
        s, i = index.search(queries[lo:lo + query_chunk], k + extra)
        if query_rows is not None:
            own = i == np.asarray(query_rows[lo:lo + query_chunk])[:, None]
            own[~own.any(1), -1] = True  # not found (exact duplicates tie with it): drop the last instead
            own &= np.cumsum(own, 1) == 1  # exactly one entry per row
            s, i = s[~own].reshape(len(s), k), i[~own].reshape(len(i), k)
        sims[lo:lo + len(s)], rows[lo:lo + len(s)] = s, i
    return sims, rows


def search_rows(db: Embeddings | np.ndarray, rows, k: int, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows), each (len(rows), k), best first: the ``k`` most similar other galaxies of ``db`` to
    its galaxies ``rows`` (a galaxy is never its own neighbour). What ``search`` and the Python API's ``search``
    run; row numbers outside ``db`` are an error."""
    rows = np.asarray(rows, dtype=np.int64).ravel()
    bad = rows[(rows < 0) | (rows >= len(db))]
    if len(bad):
        raise PhotozError(f"query rows {bad[:5].tolist()} are not in 0..{len(db) - 1}")
    queries = db.rows(rows) if isinstance(db, Embeddings) else np.asarray(db[rows], dtype=np.float32)
    return knn(db, queries, k, query_rows=rows, backend=backend)


def anomaly_scores(emb: Embeddings | np.ndarray, k: int = 10, backend: str = "auto",
                   chunk: int = 8192) -> np.ndarray:
    """1 - mean similarity to the ``k`` nearest other galaxies, for every galaxy (row order)."""
    index = build_index(emb, backend)
    scores = np.empty(len(emb), np.float64)
    for lo, rows in _chunks(emb, chunk):
        s, _ = knn(emb, rows, k, query_rows=np.arange(lo, lo + len(rows)), index=index)
        scores[lo:lo + len(rows)] = 1.0 - s.mean(axis=1)
    return scores


# ---------------------------------------------------------------------- figures


def _z_text(z: float) -> str:
    return f"z={z:.3f}" if np.isfinite(z) else "z=?"


def _cutouts(dataset, rows: Sequence[int]) -> np.ndarray:
    return np.stack([dataset[int(i)]["image"] for i in rows])


def plot_search(dataset, query_rows: Sequence[int], sims: np.ndarray, rows: np.ndarray, path: str | Path,
                crop: int | None = 64) -> Path:
    """One row per query: the query, then its neighbours, as asinh RGB cutouts (the dataset's survey's preview
    bands) with z_spec and similarity."""
    from photoz_hpc.viz import save_grid

    z = dataset.meta["specz_redshift"]
    images, labels = [], []
    for q, s_row, r_row in zip(query_rows, sims, rows, strict=True):
        picks = [int(q), *map(int, r_row)]
        images.append(_cutouts(dataset, picks))
        labels += [f"query #{q}\n{_z_text(z[q])}"] + [f"#{r}  s={s:.3f}\n{_z_text(z[r])}" for r, s in zip(r_row, s_row, strict=True)]
    return save_grid(np.concatenate(images), labels, path, ncols=rows.shape[1] + 1, crop=crop,
                     survey=dataset.survey)


def plot_anomalies(dataset, top_rows: Sequence[int], scores: np.ndarray, path: str | Path, crop: int | None = 64,
                   ncols: int = 10) -> Path:
    from photoz_hpc.viz import save_grid

    z = dataset.meta["specz_redshift"]
    labels = [f"#{r}  a={scores[r]:.3f}\n{_z_text(z[r])}" for r in top_rows]
    return save_grid(_cutouts(dataset, top_rows), labels, path, ncols=min(ncols, max(1, len(top_rows))), crop=crop,
                     survey=dataset.survey)
