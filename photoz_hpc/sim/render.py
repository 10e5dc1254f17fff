"""GalSim rendering of one galaxy's 5-band noiseless cutout (bulge + disk, per-band Moffat PSF).

Bulge: de Vaucouleurs truncated at 8 r_e, disk: exponential (SDSS model-magnitude profiles); each
component carries its own SED so colour gradients exist. Fluxes are in nanomaggies after Galactic
extinction. One FFT draw per band (the sum of both components convolved with that band's PSF).
"""

from __future__ import annotations

import galsim
import numpy as np

from photoz_hpc.constants import CUTOUT_SIZE, PIXEL_SCALE_ARCSEC, mag_to_nmgy
from photoz_hpc.sim.population import PSF_BETA

_GSP = galsim.GSParams(maximum_fft_size=8192, folding_threshold=5e-3)
#: neighbours: probability of a faint star / galaxy in a cutout, and their r-magnitude ranges.
P_STAR, P_NEIGHBOUR_GAL = 0.25, 0.3


def galaxy_profile(g: dict) -> tuple[galsim.GSObject, galsim.GSObject]:
    """Unit-flux bulge and disk profiles with their own axis ratios, sharing the position angle."""
    beta = g["beta"] * galsim.radians
    bulge = galsim.DeVaucouleurs(half_light_radius=max(g["bulge_hlr"], 0.05), trunc=8 * max(g["bulge_hlr"], 0.05),
                                 gsparams=_GSP).shear(q=g["bulge_q"], beta=beta)
    disk = galsim.Exponential(half_light_radius=max(g["disk_hlr"], 0.05), gsparams=_GSP).shear(q=g["disk_q"], beta=beta)
    return bulge, disk


def _neighbours(g: dict, rng: np.random.Generator) -> list[tuple[galsim.GSObject, np.ndarray, tuple[float, float]]]:
    """Cheap faint contaminants: a star on the stellar locus and/or a small background galaxy."""
    out = []
    half = CUTOUT_SIZE * PIXEL_SCALE_ARCSEC / 2
    if rng.random() < P_STAR:
        gr = rng.uniform(0.25, 1.4)
        colours = np.array([0.75 + 1.1 * gr, gr, max(0.45 * gr - 0.1, 0.0), max(0.25 * gr - 0.05, 0.0)])
        r = rng.uniform(17.0, 22.0)
        mags = r + np.array([colours[0] + colours[1], colours[1], 0.0, -colours[2], -colours[2] - colours[3]])
        out.append((galsim.DeltaFunction(gsparams=_GSP), mags, tuple(rng.uniform(-half + 2, half - 2, 2))))
    if rng.random() < P_NEIGHBOUR_GAL:
        r = rng.uniform(18.5, 22.5)
        mags = r + (g["mag"] - g["mag"][2]) + rng.normal(0.2, 0.2) * np.array([1.5, 1.0, 0.0, -0.5, -0.8])
        prof = galsim.Exponential(half_light_radius=rng.uniform(0.4, 1.5), gsparams=_GSP).shear(
            q=rng.uniform(0.3, 1.0), beta=rng.uniform(0, np.pi) * galsim.radians)
        out.append((prof, mags, tuple(rng.uniform(-half + 2, half - 2, 2))))
    return out


def render_galaxy(g: dict, a_band: np.ndarray, neighbours: bool = True,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Noiseless (5, 107, 107) float32 image in nmgy, extincted by ``a_band`` magnitudes."""
    bulge, disk = galaxy_profile(g)
    ext = 10 ** (-0.4 * np.asarray(a_band))
    fb = mag_to_nmgy(g["bulge_mag"]) * ext if g["bulge_frac"] > 0 else np.zeros(5)
    fd = mag_to_nmgy(g["disk_mag"]) * ext
    extra = _neighbours(g, rng) if (neighbours and rng is not None) else []
    img = np.empty((5, CUTOUT_SIZE, CUTOUT_SIZE), dtype=np.float32)
    offset = galsim.PositionD(*g["offset"])
    for b in range(5):
        psf = galsim.Moffat(beta=PSF_BETA, fwhm=float(g["psf_fwhm"][b]), gsparams=_GSP)
        parts = [disk.withFlux(float(fd[b]))]
        if fb[b] > 0:
            parts.append(bulge.withFlux(float(fb[b])))
        im = galsim.Convolve(galsim.Add(parts), psf).drawImage(nx=CUTOUT_SIZE, ny=CUTOUT_SIZE, scale=PIXEL_SCALE_ARCSEC,
                                                              offset=offset)
        for prof, mags, (dx, dy) in extra:
            flux = float(mag_to_nmgy(mags[b]) * ext[b])
            galsim.Convolve(prof.withFlux(flux), psf).drawImage(
                image=im, add_to_image=True, offset=(g["offset"][0] + dx / PIXEL_SCALE_ARCSEC,
                                                     g["offset"][1] + dy / PIXEL_SCALE_ARCSEC))
        img[b] = im.array
    return img
