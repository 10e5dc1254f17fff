"""GalSim rendering of one galaxy's noiseless multi-band cutout (bulge + disk, per-band Moffat PSF).

Bulge: de Vaucouleurs truncated at 8 r_e, disk: exponential (SDSS model-magnitude profiles); each
component carries its own SED so colour gradients exist. Fluxes are in the survey's flux unit (SDSS:
nanomaggies) after Galactic extinction. One FFT draw per band (the sum of both components convolved with
that band's PSF). ``render_galaxy`` is the calibrated SDSS camera (107 px at 0.396"); ``render_bands`` any
survey's (``Camera``: pixel scale, cutout size, zero point), for the bands asked.
"""

from __future__ import annotations

import galsim
import numpy as np

from photoz_hpc.sim.camera import Camera, sdss_camera
from photoz_hpc.sim.population import PSF_BETA

_GSP = galsim.GSParams(maximum_fft_size=8192, folding_threshold=5e-3)
#: neighbours: probability of a faint star / galaxy in a cutout, and their r-magnitude ranges.
P_STAR, P_NEIGHBOUR_GAL = 0.25, 0.3
#: SDSS: stars at r 17-22 and galaxies at r 18.5-22.5, i.e. from the MGS limit 17.77 -0.77..+4.23 and +0.73..+4.73;
#: other surveys use the same ranges about their own selection limit.
STAR_RANGE, NEIGHBOUR_RANGE = (-0.77, 4.23), (0.73, 4.73)
#: the SDSS neighbour galaxy's colour tilt per unit N(0.2, 0.2) (u g r i z, 0 in r)
NEIGHBOUR_TILT = np.array([1.5, 1.0, 0.0, -0.5, -0.8])


def galaxy_profile(g: dict) -> tuple[galsim.GSObject, galsim.GSObject]:
    """Unit-flux bulge and disk profiles with their own axis ratios, sharing the position angle."""
    beta = g["beta"] * galsim.radians
    bulge = galsim.DeVaucouleurs(half_light_radius=max(g["bulge_hlr"], 0.05), trunc=8 * max(g["bulge_hlr"], 0.05),
                                 gsparams=_GSP).shear(q=g["bulge_q"], beta=beta)
    disk = galsim.Exponential(half_light_radius=max(g["disk_hlr"], 0.05), gsparams=_GSP).shear(q=g["disk_q"], beta=beta)
    return bulge, disk


def _neighbours(g: dict, rng: np.random.Generator, camera: Camera) -> list[tuple[galsim.GSObject, np.ndarray,
                                                                                   tuple[float, float]]]:
    """Cheap faint contaminants: a star on the stellar locus and/or a small background galaxy (SDSS ugriz mags)."""
    out = []
    half = camera.size * camera.pixel_scale / 2
    if rng.random() < P_STAR:
        gr = rng.uniform(0.25, 1.4)
        colours = np.array([0.75 + 1.1 * gr, gr, max(0.45 * gr - 0.1, 0.0), max(0.25 * gr - 0.05, 0.0)])
        r = rng.uniform(17.0, 22.0)
        mags = r + np.array([colours[0] + colours[1], colours[1], 0.0, -colours[2], -colours[2] - colours[3]])
        out.append((galsim.DeltaFunction(gsparams=_GSP), mags, tuple(rng.uniform(-half + 2, half - 2, 2))))
    if rng.random() < P_NEIGHBOUR_GAL:
        r = rng.uniform(18.5, 22.5)
        mags = r + (g["mag"] - g["mag"][2]) + rng.normal(0.2, 0.2) * NEIGHBOUR_TILT
        prof = galsim.Exponential(half_light_radius=rng.uniform(0.4, 1.5), gsparams=_GSP).shear(
            q=rng.uniform(0.3, 1.0), beta=rng.uniform(0, np.pi) * galsim.radians)
        out.append((prof, mags, tuple(rng.uniform(-half + 2, half - 2, 2))))
    return out


def band_neighbours(g: dict, rng: np.random.Generator, camera: Camera, wave_eff: np.ndarray, select: int,
                    mag_limit: float) -> list[tuple[galsim.GSObject, np.ndarray, tuple[float, float]]]:
    """``_neighbours`` for another survey's bands: the same star locus and tilt (SDSS colours placed at the SDSS
    effective wavelengths, interpolated in log wavelength to each band), magnitudes about its selection limit."""
    from photoz_hpc.sim.population import SDSS_WAVE_EFF

    x, xs = np.log(np.asarray(wave_eff)), np.log(SDSS_WAVE_EFF)
    out = []
    half = camera.size * camera.pixel_scale / 2
    if rng.random() < P_STAR:
        gr = rng.uniform(0.25, 1.4)
        colours = np.array([0.75 + 1.1 * gr, gr, max(0.45 * gr - 0.1, 0.0), max(0.25 * gr - 0.05, 0.0)])
        sdss = np.array([colours[0] + colours[1], colours[1], 0.0, -colours[2], -colours[2] - colours[3]])
        rel = np.interp(x, xs, sdss)
        m_sel = mag_limit + rng.uniform(*STAR_RANGE)
        out.append((galsim.DeltaFunction(gsparams=_GSP), m_sel + rel - rel[select],
                    tuple(rng.uniform(-half + 2, half - 2, 2))))
    if rng.random() < P_NEIGHBOUR_GAL:
        m_sel = mag_limit + rng.uniform(*NEIGHBOUR_RANGE)
        tilt = np.interp(x, xs, NEIGHBOUR_TILT)
        mags = m_sel + (g["mag"] - g["mag"][select]) + rng.normal(0.2, 0.2) * (tilt - tilt[select])
        prof = galsim.Exponential(half_light_radius=rng.uniform(0.4, 1.5), gsparams=_GSP).shear(
            q=rng.uniform(0.3, 1.0), beta=rng.uniform(0, np.pi) * galsim.radians)
        out.append((prof, mags, tuple(rng.uniform(-half + 2, half - 2, 2))))
    return out


def _draw_band(bulge: galsim.GSObject, disk: galsim.GSObject, flux_bulge: float, flux_disk: float, psf_fwhm: float,
               offset: np.ndarray, extra: list[tuple[galsim.GSObject, float, tuple[float, float]]],
               camera: Camera) -> np.ndarray:
    """One band: bulge + disk (+ neighbours of the given fluxes) convolved with a Moffat PSF, drawn on the grid."""
    psf = galsim.Moffat(beta=PSF_BETA, fwhm=float(psf_fwhm), gsparams=_GSP)
    parts = [disk.withFlux(float(flux_disk))]
    if flux_bulge > 0:
        parts.append(bulge.withFlux(float(flux_bulge)))
    im = galsim.Convolve(galsim.Add(parts), psf).drawImage(nx=camera.size, ny=camera.size, scale=camera.pixel_scale,
                                                          offset=galsim.PositionD(*offset))
    for prof, flux, (dx, dy) in extra:
        galsim.Convolve(prof.withFlux(flux), psf).drawImage(
            image=im, add_to_image=True, offset=(offset[0] + dx / camera.pixel_scale, offset[1] + dy / camera.pixel_scale))
    return im.array


def render_galaxy(g: dict, a_band: np.ndarray, neighbours: bool = True,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Noiseless (5, 107, 107) float32 SDSS image in nmgy, extincted by ``a_band`` magnitudes."""
    camera = sdss_camera()
    bulge, disk = galaxy_profile(g)
    ext = 10 ** (-0.4 * np.asarray(a_band))
    fb = camera.flux(g["bulge_mag"]) * ext if g["bulge_frac"] > 0 else np.zeros(5)
    fd = camera.flux(g["disk_mag"]) * ext
    extra = _neighbours(g, rng, camera) if (neighbours and rng is not None) else []
    img = np.empty((5, camera.size, camera.size), dtype=np.float32)
    for b in range(5):
        fluxes = [(prof, float(camera.flux(mags[b]) * ext[b]), pos) for prof, mags, pos in extra]
        img[b] = _draw_band(bulge, disk, fb[b], fd[b], g["psf_fwhm"][b], g["offset"], fluxes, camera)
    return img


def render_bands(g: dict, a_band: np.ndarray, bands: list[int], camera: Camera,
                 extra: list[tuple[galsim.GSObject, np.ndarray, tuple[float, float]]]) -> np.ndarray:
    """Noiseless (len(bands), size, size) float32 image in the camera's flux unit of the survey bands ``bands``
    (indices into ``g``'s magnitude arrays), extincted by ``a_band`` (all bands), with neighbours ``extra``."""
    bulge, disk = galaxy_profile(g)
    ext = 10 ** (-0.4 * np.asarray(a_band))
    fb = camera.flux(g["bulge_mag"]) * ext if g["bulge_frac"] > 0 else np.zeros(len(ext))
    fd = camera.flux(g["disk_mag"]) * ext
    img = np.empty((len(bands), camera.size, camera.size), dtype=np.float32)
    for j, b in enumerate(bands):
        fluxes = [(prof, float(camera.flux(mags[b]) * ext[b]), pos) for prof, mags, pos in extra]
        img[j] = _draw_band(bulge, disk, fb[b], fd[b], g["psf_fwhm"][b], g["offset"], fluxes, camera)
    return img
