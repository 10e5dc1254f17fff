"""generate_survey: parallel, deterministic, streaming writer of a synthetic survey file.

SDSS (the default, calibrated on the MGS): the public release HDF5 layout, exactly as before surveys existed.
Any other survey with a ``synthetic`` section (legacy, hsc, lsst, or a YAML file): the same population through its
filters, PSFs, depths, pixel grid and selection, written in the Multimodal Universe layout (``mmu_layout``) that
``prepare`` reads. See docs/synthetic_survey.md.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from photoz_hpc import mmu_layout
from photoz_hpc.errors import ConfigError
from photoz_hpc.io_utils import atomic_path
from photoz_hpc.logs import get_logger
from photoz_hpc.sim.camera import Camera, sdss_camera
from photoz_hpc.sim.noise import DepthNoise, add_noise
from photoz_hpc.sim.population import PSF_BETA, BandModel, band_model, draw_band_galaxy, draw_galaxy, survey_model
from photoz_hpc.sim.render import band_neighbours, render_bands, render_galaxy
from photoz_hpc.sim.sky import extinction
from photoz_hpc.survey import DEFAULT_SURVEY, Survey, default_survey, load_survey

log = get_logger("photoz_hpc.sim.survey")
#: ObjID / specObjID bases (DR12-like magnitudes); the seed occupies the high digits so files differ.
OBJID_BASE = 1237645000000000000
SPECOBJID_BASE = 299000000000000000
_SEED_STRIDE = 10**10


def _render_rows(seed: int, start: int, stop: int, labeled: bool, columns: dict[str, tuple[tuple[int, ...], type]],
                 fill: Callable[[dict[str, np.ndarray], int, int], None], id_bases: dict[str, int],
                 labels: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The chunk skeleton of every layout: empty ``columns`` ({key: (shape per galaxy, dtype)}) for galaxies
    start..stop-1, ``fill(out, row, index)`` per galaxy in index order, then the id columns (``id_bases``: {key:
    base}, the seed in the high digits) and, when not ``labeled``, the ``labels`` columns dropped."""
    n = stop - start
    out = {key: np.empty((n, *shape), dtype) for key, (shape, dtype) in columns.items()}
    for j, idx in enumerate(range(start, stop)):
        fill(out, j, idx)
    ids = np.arange(start, stop, dtype=np.int64) + (seed % 10**8) * _SEED_STRIDE
    for key, base in id_bases.items():
        out[key] = base + ids
    if not labeled:
        for key in labels:
            del out[key]
    return out


def render_chunk(seed: int, start: int, stop: int, labeled: bool, neighbours: bool = True) -> dict[str, np.ndarray]:
    """Galaxies start..stop-1 of the SDSS survey ``seed``: images and catalogue columns (spawn-safe top-level)."""
    model = survey_model()
    nb, size = default_survey().n_bands, sdss_camera().size

    def fill(out: dict[str, np.ndarray], j: int, idx: int) -> None:
        g = draw_galaxy(seed, idx, model)
        rng = g["rng"]
        a_band = extinction(g["ebv"])
        img = render_galaxy(g, a_band, neighbours=neighbours, rng=rng)
        out["images"][j] = add_noise(img, g["sky_dmag"], rng)
        out["e_bv"][j] = a_band
        out["ra"][j], out["dec"][j] = g["ra"], g["dec"]
        out["specz_redshift_err"][j] = g["specz_err"]
        out["specz_redshift"][j] = max(g["z"] + g["specz_err"] * rng.standard_normal(), 0.0)

    columns = {"images": ((nb, size, size), np.float32), "e_bv": ((nb,), np.float32), "ra": ((), np.float64),
               "dec": ((), np.float64), "specz_redshift": ((), np.float32), "specz_redshift_err": ((), np.float32)}
    return _render_rows(seed, start, stop, labeled, columns, fill, {"ObjID": OBJID_BASE, "specObjID": SPECOBJID_BASE},
                        ("specz_redshift", "specz_redshift_err"))


@dataclass(frozen=True)
class BandPlan:
    """What a non-SDSS synthetic survey renders: the survey (all its bands), the bands drawn (indices) and the
    pixel grid (the survey's, or a ``--cutout-size`` override)."""

    survey: Survey
    bands: tuple[int, ...]
    camera: Camera

    def model(self) -> BandModel:
        syn = self.survey.spec.synthetic
        return band_model(tuple(syn.filters), self.survey.bands, tuple(float(v) for v in syn.psf_fwhm),
                          syn.select_band, float(syn.mag_limit), float(syn.z_max))

    def noise(self) -> DepthNoise:
        syn = self.survey.spec.synthetic
        return DepthNoise(self.camera, np.asarray(syn.depth), np.asarray(syn.sky_mag), np.asarray(syn.psf_fwhm),
                          PSF_BETA)

    @property
    def band_names(self) -> list[str]:
        return [self.survey.bands[b] for b in self.bands]


def _band_rng(seed: int, index: int, band: int) -> np.random.Generator:
    """The pixel noise of one band of one galaxy: its own stream, so a band's image does not depend on which
    other bands are rendered (``--bands``)."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(seed), int(index), 1 + int(band)])))


def render_band_chunk(plan: BandPlan, seed: int, start: int, stop: int, labeled: bool,
                      neighbours: bool = True) -> dict[str, np.ndarray]:
    """Galaxies start..stop-1 of a non-SDSS synthetic survey ``seed``: MMU columns (spawn-safe top-level)."""
    model, noise, cam = plan.model(), plan.noise(), plan.camera
    coef = plan.survey.reddening_vector
    bands = list(plan.bands)

    def fill(out: dict[str, np.ndarray], j: int, idx: int) -> None:
        g = draw_band_galaxy(seed, idx, model)
        rng = g["rng"]
        extra = band_neighbours(g, rng, cam, model.wave_eff, model.select, model.mag_limit) if neighbours else []
        out["z_spec"][j] = max(g["z"] + g["specz_err"] * rng.standard_normal(), 0.0)
        img = render_bands(g, extinction(g["ebv"], coef), bands, cam, extra)
        for k, b in enumerate(bands):
            out["image_array"][j, k] = noise.add(img[k], b, float(g["sky_dmag"][b]), _band_rng(seed, idx, b))
        out["image_psf_fwhm"][j] = g["psf_fwhm"][bands]
        out["ra"][j], out["dec"][j], out["EBV"][j] = g["ra"], g["dec"], g["ebv"]

    columns = {"image_array": ((len(bands), cam.size, cam.size), np.float32), "image_psf_fwhm": ((len(bands),), np.float32),
               "ra": ((), np.float64), "dec": ((), np.float64), "EBV": ((), np.float32), "z_spec": ((), np.float32)}
    return _render_rows(seed, start, stop, labeled, columns, fill, {"object_id": OBJID_BASE}, ("z_spec",))


def _create(fh: h5py.File, n: int, labeled: bool) -> None:
    size = sdss_camera().size
    fh.create_dataset("images", (n, default_survey().n_bands, size, size), np.float32, chunks=(1, default_survey().n_bands, size, size))
    fh.create_dataset("e_bv", (n, default_survey().n_bands), np.float32)
    for key, dt in (("ra", np.float64), ("dec", np.float64), ("ObjID", np.int64), ("specObjID", np.int64)):
        fh.create_dataset(key, (n,), dt)
    if labeled:
        fh.create_dataset("specz_redshift", (n,), np.float32)
        fh.create_dataset("specz_redshift_err", (n,), np.float32)


def resolve_plan(survey: str | Path | Survey, bands: list[str] | tuple[str, ...] | None,
                 cutout_size: int | None) -> BandPlan | None:
    """None for the calibrated SDSS survey (release layout), else what to render; bad requests are errors."""
    s = survey if isinstance(survey, Survey) else load_survey(survey)
    syn = s.spec.synthetic
    if not syn.filters:
        if s.name != DEFAULT_SURVEY or s.bands != ("u", "g", "r", "i", "z"):
            raise ConfigError(f"survey '{s.name}' has no synthetic section (synthetic.filters, psf_fwhm, depth, "
                              "sky_mag): nothing to render it with (docs/synthetic_survey.md)")
        if bands is not None and tuple(bands) != s.bands:
            raise ConfigError(f"the synthetic SDSS survey is the release layout, all of {list(s.bands)}; "
                              f"--bands {list(bands)} is for other surveys")
        if cutout_size is not None and cutout_size != s.cutout_size:
            raise ConfigError(f"the synthetic SDSS survey's cutouts are {s.cutout_size} px (release layout); "
                              "--cutout-size is for other surveys")
        return None
    for key in ("psf_fwhm", "depth", "sky_mag"):
        if len(getattr(syn, key)) != s.n_bands:
            raise ConfigError(f"survey '{s.name}': synthetic.{key} must have one entry per band ({s.n_bands})")
    if syn.select_band not in s.bands:
        raise ConfigError(f"survey '{s.name}': synthetic.select_band '{syn.select_band}' is not one of {list(s.bands)}")
    wanted = list(bands) if bands is not None else list(s.spec.default_bands or s.bands)
    s.subset(wanted)  # the error for unknown or repeated bands
    if cutout_size is not None and cutout_size < 8:
        raise ConfigError(f"--cutout-size must be >= 8 pixels, got {cutout_size}")
    size = int(cutout_size) if cutout_size is not None else s.cutout_size
    return BandPlan(s, tuple(s.bands.index(b) for b in wanted), Camera(s.pixel_scale, size, s.zeropoint))


def generate_survey(out_path: str | Path, n: int, seed: int, labeled: bool = True, workers: int | None = None,
                    chunk: int = 256, survey: str | Path | Survey = DEFAULT_SURVEY,
                    bands: list[str] | tuple[str, ...] | None = None, cutout_size: int | None = None) -> Path:
    """Write ``n`` synthetic galaxies of ``survey`` to ``out_path`` and return the path.

    SDSS (default): the release layout, calibrated on the MGS. Other surveys: the Multimodal Universe layout in
    ``bands`` (default: the survey's ``default_bands``) at ``cutout_size`` (default: the survey's).
    Deterministic in ``seed`` and independent of ``workers``/``chunk``; nothing is left at ``out_path`` unless
    the whole file was written (temporary name, then rename).
    """
    if n <= 0 or chunk <= 0:
        raise ValueError(f"n and chunk must be positive (n={n}, chunk={chunk})")
    plan = resolve_plan(survey, bands, cutout_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    workers = max(1, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if plan is not None:
        return _generate_mmu(out_path, n, seed, labeled, workers, bounds, plan)
    survey_model()  # fail fast on a missing calibration, before any file exists
    log.info("synthesising %d galaxies (seed %d, %s, %d workers) -> %s", n, seed,
             "labeled" if labeled else "unlabeled", workers, out_path)
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as fh:
        _create(fh, n, labeled)
        fh.attrs["synthetic"] = True
        fh.attrs["seed"] = seed
        for (start, stop), part in zip(bounds, _chunks(render_chunk, (), seed, bounds, labeled, workers), strict=True):
            for key, arr in part.items():
                fh[key][start:stop] = arr
            log.info("wrote galaxies %d..%d of %d", start, stop, n)
    return out_path


def _generate_mmu(out_path: Path, n: int, seed: int, labeled: bool, workers: int, bounds: list[tuple[int, int]],
                  plan: BandPlan) -> Path:
    """Render into a disk-backed array beside ``out_path`` (memory stays bounded), then write the MMU file."""
    plan.model()  # fail fast (missing template grid, z_max beyond it) before any file exists
    s, cam, nb = plan.survey, plan.camera, len(plan.bands)
    log.info("synthesising %d %s galaxies in %s at %d px (seed %d, %s, %d workers) -> %s", n, s.name,
             ",".join(plan.band_names), cam.size, seed, "labeled" if labeled else "unlabeled", workers, out_path)
    cols: dict[str, np.ndarray] = {}
    fd, scratch = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".images", dir=out_path.parent)
    os.close(fd)
    try:
        images = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(n, nb, cam.size, cam.size))
        for (start, stop), part in zip(bounds, _chunks(render_band_chunk, (plan,), seed, bounds, labeled, workers),
                                       strict=True):
            images[start:stop] = part.pop("image_array")
            for key, arr in part.items():
                cols.setdefault(key, np.empty((n, *arr.shape[1:]), arr.dtype))[start:stop] = arr
            log.info("rendered galaxies %d..%d of %d", start, stop, n)
        images.flush()
        extra = {key: cols[key] for key in ("ra", "dec", "EBV", "z_spec") if key in cols}
        mmu_layout.write_mmu_file(out_path, images, mmu_layout.labels_of(s, plan.band_names), cam.pixel_scale,
                                  cols["image_psf_fwhm"], cols["object_id"], extra)
        del images
    finally:
        Path(scratch).unlink(missing_ok=True)
    return out_path


def _chunks(fn: Callable[..., dict[str, np.ndarray]], head: tuple, seed: int, bounds: list[tuple[int, int]],
            labeled: bool, workers: int) -> Iterator[dict[str, np.ndarray]]:
    """``fn(*head, seed, start, stop, labeled)`` per chunk, in order; at most 2 x workers in flight."""
    if workers == 1:
        for start, stop in bounds:
            yield fn(*head, seed, start, stop, labeled)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        pending = []
        it = iter(bounds)
        for start, stop in it:
            pending.append(pool.submit(fn, *head, seed, start, stop, labeled))
            if len(pending) >= 2 * workers:
                break
        while pending:
            fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, *head, seed, nxt[0], nxt[1], labeled))
            yield fut.result()
