"""Template grids through any survey's filters: kcorrect-default-v4 spectra integrated through filter curves.

calibration.json's grid holds the templates through kcorrect's SDSS responses on z in [0, 0.5]; a synthetic survey
in other filters (DECam, HSC, LSST) and to higher redshift needs the same templates through its own filters. The
grids are computed here from the template spectra shipped with kcorrect (``data/templates/kcorrect-default-v4.fits``,
rest-frame f_lambda "at 10 pc") and speclite's filter curves, as AB maggies:

    A_b(z) = int f(lambda / (1+z)) / (1+z) R_b(lambda) lambda dlambda / int f_AB(lambda) R_b(lambda) lambda dlambda

(photon-counting responses; the redshifted spectrum conserves bolometric flux, kcorrect's convention, so
m = M + DM(z) - 2.5 log10(A_b(z).c / A_r(0).c) as in ``seds``). Both integrals are trapezoids on the union of the
redshifted template's and the filter's wavelengths, the filter interpolated linearly. Grids are package data
(``template_grids/<family>.json``, one per speclite filter family) so generating a survey needs neither kcorrect
nor speclite; they are rebuilt, bit-reproducibly on one machine, by

    python -m photoz_hpc.sim.bandpass                      # every family the shipped surveys use
    python -m photoz_hpc.sim.bandpass --family decam2014   # one family

The same integrator through kcorrect's own SDSS responses (``kcorrect:sdss_r0``) reproduces calibration.json's grid
(tests/test_sim_surveys.py; docs/synthetic_survey.md gives how close).
"""

from __future__ import annotations

import argparse
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from photoz_hpc.errors import ConfigError
from photoz_hpc.io_utils import atomic_write_text
from photoz_hpc.sim.seds import TemplateGrid

TEMPLATE_SET = "kcorrect-default-v4"
GRID_DIR = Path(__file__).with_name("template_grids")
#: redshift grid of the shipped files: 0 to 3 in steps of 0.005 (linear interpolation error < 0.2% in maggies).
GRID_Z_MAX, GRID_DZ = 3.0, 0.005
#: speed of light in Angstrom / s and the AB zero point 3631 Jy in erg / s / cm^2 / Hz.
C_ANGSTROM_S = 2.99792458e18
AB_FNU = 3631e-23
#: the speclite families shipped (every band of each, so a survey file may name any of them).
FAMILIES = ("decam2014", "hsc2017", "lsst2023")
KCORRECT_PREFIX = "kcorrect:"


def template_spectra() -> tuple[np.ndarray, np.ndarray]:
    """Rest-frame wavelengths (Angstrom, float64) and f_lambda (ntemplate, nwave) of kcorrect-default-v4."""
    import kcorrect
    from astropy.io import fits

    path = Path(kcorrect.__file__).parent / "data" / "templates" / f"{TEMPLATE_SET}.fits"
    if not path.is_file():
        raise ConfigError(f"{path}: kcorrect's template file is missing (kcorrect >= 5.1 ships it)")
    with fits.open(path) as hdul:
        row = hdul["FLUX"].data[0]
        wave = np.asarray(row["wave"], dtype=np.float64)
        flux = np.asarray(row["flux"], dtype=np.float64).reshape(-1, len(wave))
    return wave, flux


def response_curve(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(wavelength in Angstrom, response) of a speclite filter (``decam2014-g``) or a kcorrect response
    (``kcorrect:sdss_r0``, the files kcorrect fits SDSS photometry with)."""
    if name.startswith(KCORRECT_PREFIX):
        import kcorrect
        from astropy.io import ascii as fixed_width

        path = Path(kcorrect.__file__).parent / "data" / "responses" / f"{name[len(KCORRECT_PREFIX):]}.dat"
        if not path.is_file():
            raise ConfigError(f"unknown kcorrect response '{name}' (no {path})")
        table = fixed_width.read(path, format="fixed_width")
        wave, resp = np.asarray(table["lambda"], dtype=np.float64), np.asarray(table["pass"], dtype=np.float64)
    else:
        import speclite.filters

        try:
            filt = speclite.filters.load_filter(name)
        except ValueError as exc:
            raise ConfigError(f"unknown speclite filter '{name}': {exc}") from None
        wave, resp = np.asarray(filt.wavelength, dtype=np.float64), np.asarray(filt.response, dtype=np.float64)
    order = np.argsort(wave)
    return wave[order], resp[order]


def effective_wavelength(wave: np.ndarray, resp: np.ndarray) -> float:
    """Log-mean wavelength exp(int R ln(l) dl/l / int R dl/l) of a photon-counting response (Angstrom)."""
    w = resp / wave
    return float(np.exp(np.trapezoid(w * np.log(wave), wave) / np.trapezoid(w, wave)))


def ab_maggies(rest_wave: np.ndarray, flux: np.ndarray, z: float, wave: np.ndarray, resp: np.ndarray,
               kind: str = "linear") -> np.ndarray:
    """AB maggies (ntemplate,) of the rest-frame spectra ``flux`` redshifted to ``z`` through one response.

    ``kind``: how spectrum and response are interpolated onto the union grid; "linear" (speclite's convention,
    used for the shipped grids) or "cubic" (kcorrect's, used to check the integration against calibration.json).
    """
    obs = rest_wave * (1.0 + z)
    inside = np.flatnonzero((obs >= wave[0]) & (obs <= wave[-1]))
    if inside.size == 0 or obs[0] > wave[0] or obs[-1] < wave[-1]:
        raise ConfigError(f"templates at z = {z} (observed {obs[0]:.0f}-{obs[-1]:.0f} A) do not cover the filter "
                          f"({wave[0]:.0f}-{wave[-1]:.0f} A)")
    grid = np.union1d(obs[inside], wave)
    if kind == "cubic":
        from scipy.interpolate import interp1d

        r = interp1d(wave, resp, kind="cubic", bounds_error=False, fill_value=0.0)(grid)
        f = interp1d(obs, flux / (1.0 + z), kind="cubic", axis=-1)(grid)
    else:
        r = np.interp(grid, wave, resp, left=0.0, right=0.0)
        f = np.stack([np.interp(grid, obs, row / (1.0 + z)) for row in flux])
    numer = np.trapezoid(f * r * grid, grid, axis=-1)
    denom = np.trapezoid(AB_FNU * C_ANGSTROM_S / grid**2 * r * grid, grid)
    return numer / denom


def compute_grid(filters: list[str] | tuple[str, ...], z: np.ndarray, kind: str = "linear") -> np.ndarray:
    """maggies[z, template, band] of kcorrect-default-v4 through ``filters`` at each redshift in ``z``."""
    rest_wave, flux = template_spectra()
    curves = [response_curve(name) for name in filters]
    out = np.empty((len(z), len(flux), len(filters)))
    for i, zi in enumerate(np.asarray(z, dtype=np.float64)):
        for b, (wave, resp) in enumerate(curves):
            out[i, :, b] = ab_maggies(rest_wave, flux, float(zi), wave, resp, kind)
    return out


def grid_z(z_max: float = GRID_Z_MAX, dz: float = GRID_DZ) -> np.ndarray:
    return np.round(np.arange(0.0, z_max + dz / 2, dz), 6)


def family_filters(family: str) -> list[str]:
    import speclite.filters

    try:
        return list(speclite.filters.load_filters(f"{family}-*").names)
    except ValueError as exc:
        raise ConfigError(f"unknown speclite filter family '{family}': {exc}") from None


def build_family(family: str, out_dir: Path = GRID_DIR, z_max: float = GRID_Z_MAX, dz: float = GRID_DZ) -> Path:
    """Compute and write ``<out_dir>/<family>.json``: every band of a speclite family on the shipped z grid."""
    import kcorrect
    import speclite

    filters = family_filters(family)
    z = grid_z(z_max, dz)
    maggies = compute_grid(filters, z)
    doc = {
        "templates": TEMPLATE_SET,
        "filters": filters,
        "wave_eff": [round(effective_wavelength(*response_curve(f)), 2) for f in filters],
        "z": z.tolist(),
        # 7 significant digits: far below the 0.2% interpolation error of the z grid
        "maggies": np.vectorize(lambda v: float(f"{v:.7g}"))(maggies).tolist(),
        "made_by": f"python -m photoz_hpc.sim.bandpass --family {family} (z_max {z_max}, dz {dz})",
        "versions": {"kcorrect": kcorrect.__version__, "speclite": speclite.__version__},
    }
    out = Path(out_dir) / f"{family}.json"
    atomic_write_text(out, json.dumps(doc) + "\n")
    return out


@lru_cache(maxsize=8)
def _family_file(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def load_band_grid(filters: tuple[str, ...], z_max: float, grid_dir: str | None = None) -> tuple[TemplateGrid, np.ndarray]:
    """The shipped grid of ``filters`` (TemplateGrid, bands in the given order) and their effective wavelengths.

    An error names the filters no shipped file holds, or a ``z_max`` beyond the grid, and how to build them.
    """
    base = Path(grid_dir) if grid_dir else GRID_DIR
    found: dict[str, tuple[dict, int]] = {}
    for name in filters:
        path = base / f"{name.rsplit('-', 1)[0]}.json"
        if path.is_file():
            doc = _family_file(str(path))
            if name in doc["filters"]:
                found[name] = (doc, doc["filters"].index(name))
    missing = [f for f in filters if f not in found]
    if missing:
        raise ConfigError(f"no template grid for filters {missing} in {base}: build one with "
                          f"`python -m photoz_hpc.sim.bandpass --family <speclite family> --out-dir {base}`")
    zs = {tuple(doc["z"]) for doc, _ in found.values()}
    if len(zs) != 1:
        raise ConfigError(f"{base}: the template grids of {list(filters)} have different redshift grids")
    z = np.asarray(next(iter(zs)), dtype=float)
    if z_max > z[-1] + 1e-9:
        raise ConfigError(f"synthetic z_max = {z_max} is beyond the template grids' z_max {z[-1]} ({base}); rebuild "
                          f"them with `python -m photoz_hpc.sim.bandpass --z-max ...`")
    maggies = np.stack([np.asarray(doc["maggies"], dtype=float)[:, :, j] for doc, j in (found[f] for f in filters)],
                       axis=-1)
    wave = np.array([found[f][0]["wave_eff"][found[f][1]] for f in filters], dtype=float)
    return TemplateGrid(z, maggies), wave


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append", default=None,
                    help=f"speclite filter family (repeatable; default: {', '.join(FAMILIES)})")
    ap.add_argument("--out-dir", default=str(GRID_DIR))
    ap.add_argument("--z-max", type=float, default=GRID_Z_MAX)
    ap.add_argument("--dz", type=float, default=GRID_DZ)
    args = ap.parse_args(argv)
    for family in args.family or FAMILIES:
        print(build_family(family, Path(args.out_dir), args.z_max, args.dz))


if __name__ == "__main__":
    main()
