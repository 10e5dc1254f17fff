"""generate_survey: parallel, deterministic, streaming writer of a release-layout synthetic HDF5 file."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from photoz_hpc.constants import CUTOUT_SIZE, N_BANDS
from photoz_hpc.io_utils import atomic_path
from photoz_hpc.logs import get_logger
from photoz_hpc.sim.noise import add_noise
from photoz_hpc.sim.population import draw_galaxy, survey_model
from photoz_hpc.sim.render import render_galaxy
from photoz_hpc.sim.sky import extinction

log = get_logger("photoz_hpc.sim.survey")
#: ObjID / specObjID bases (DR12-like magnitudes); the seed occupies the high digits so files differ.
OBJID_BASE = 1237645000000000000
SPECOBJID_BASE = 299000000000000000
_SEED_STRIDE = 10**10


def render_chunk(seed: int, start: int, stop: int, labeled: bool, neighbours: bool = True) -> dict[str, np.ndarray]:
    """Galaxies start..stop-1 of survey ``seed``: images and catalogue columns (spawn-safe top-level function)."""
    model = survey_model()
    n = stop - start
    out = {
        "images": np.empty((n, N_BANDS, CUTOUT_SIZE, CUTOUT_SIZE), np.float32),
        "e_bv": np.empty((n, N_BANDS), np.float32),
        "ra": np.empty(n, np.float64),
        "dec": np.empty(n, np.float64),
        "specz_redshift": np.empty(n, np.float32),
        "specz_redshift_err": np.empty(n, np.float32),
    }
    for j, idx in enumerate(range(start, stop)):
        g = draw_galaxy(seed, idx, model)
        rng = g["rng"]
        a_band = extinction(g["ebv"])
        img = render_galaxy(g, a_band, neighbours=neighbours, rng=rng)
        out["images"][j] = add_noise(img, g["sky_dmag"], rng)
        out["e_bv"][j] = a_band
        out["ra"][j], out["dec"][j] = g["ra"], g["dec"]
        out["specz_redshift_err"][j] = g["specz_err"]
        out["specz_redshift"][j] = max(g["z"] + g["specz_err"] * rng.standard_normal(), 0.0)
    ids = np.arange(start, stop, dtype=np.int64) + (seed % 10**8) * _SEED_STRIDE
    out["ObjID"] = OBJID_BASE + ids
    out["specObjID"] = SPECOBJID_BASE + ids
    if not labeled:
        del out["specz_redshift"], out["specz_redshift_err"]
    return out


def _create(fh: h5py.File, n: int, labeled: bool) -> None:
    fh.create_dataset("images", (n, N_BANDS, CUTOUT_SIZE, CUTOUT_SIZE), np.float32,
                      chunks=(1, N_BANDS, CUTOUT_SIZE, CUTOUT_SIZE))
    fh.create_dataset("e_bv", (n, N_BANDS), np.float32)
    for key, dt in (("ra", np.float64), ("dec", np.float64), ("ObjID", np.int64), ("specObjID", np.int64)):
        fh.create_dataset(key, (n,), dt)
    if labeled:
        fh.create_dataset("specz_redshift", (n,), np.float32)
        fh.create_dataset("specz_redshift_err", (n,), np.float32)


def generate_survey(out_path: str | Path, n: int, seed: int, labeled: bool = True, workers: int | None = None,
                    chunk: int = 256) -> Path:
    """Write ``n`` synthetic SDSS galaxies to ``out_path`` (release layout) and return the path.

    Deterministic in ``seed`` and independent of ``workers``/``chunk``; chunks are streamed to a
    temporary file in the same directory that replaces ``out_path`` atomically only on success.
    """
    if n <= 0 or chunk <= 0:
        raise ValueError(f"n and chunk must be positive (n={n}, chunk={chunk})")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    workers = max(1, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    survey_model()  # fail fast on a missing calibration, before any file exists
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    log.info("synthesising %d galaxies (seed %d, %s, %d workers) -> %s", n, seed,
             "labeled" if labeled else "unlabeled", workers, out_path)
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as fh:
        _create(fh, n, labeled)
        fh.attrs["synthetic"] = True
        fh.attrs["seed"] = seed
        for (start, stop), part in zip(bounds, _chunks(seed, bounds, labeled, workers), strict=True):
            for key, arr in part.items():
                fh[key][start:stop] = arr
            log.info("wrote galaxies %d..%d of %d", start, stop, n)
    return out_path


def _chunks(seed: int, bounds: list[tuple[int, int]], labeled: bool, workers: int):
    """Chunks in order; at most 2 x workers in flight so memory stays bounded."""
    if workers == 1:
        for start, stop in bounds:
            yield render_chunk(seed, start, stop, labeled)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        pending = []
        it = iter(bounds)
        for start, stop in it:
            pending.append(pool.submit(render_chunk, seed, start, stop, labeled))
            if len(pending) >= 2 * workers:
                break
        while pending:
            fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(render_chunk, seed, nxt[0], nxt[1], labeled))
            yield fut.result()
