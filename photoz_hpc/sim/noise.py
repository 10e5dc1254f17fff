"""SDSS-depth noise for sky-subtracted nanomaggy images.

Per band: sky brightness (mag/arcsec^2), a nominal electrons-per-nanomaggy factor (gain / nmgy per DN
of typical DR12 frames) and an extra per-pixel variance (dark current, read noise, flat-field and PSF-fit
inefficiency) solved so that the 5-sigma PSF-magnitude depth at nominal seeing equals
``calibration.json["noise"]["depth_5sigma"]``: fitted by calibrate.py so that an ideal profile fit of the
rendered galaxies has the MGS catalogue's model-magnitude errors (``DEPTH_5SIGMA``, the SDSS 95%-completeness
limits used before, only when the calibration has no noise section). Sky is subtracted, so pixels scatter
around the source with Gaussian sky noise plus Poisson noise of the source.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from photoz_hpc.constants import NMGY_ZEROPOINT, PIXEL_SCALE_ARCSEC, mag_to_nmgy

SKY_MAG_ARCSEC2 = np.array([22.1, 21.9, 20.9, 20.2, 19.0])
#: fallback depths: the SDSS 95% point-source completeness limits (calibration version <= 2 used them as 5 sigma).
DEPTH_5SIGMA = np.array([22.0, 22.2, 22.2, 21.3, 20.5])
GAIN_E_PER_DN = np.array([1.6, 3.9, 4.7, 5.1, 4.7])
NMGY_PER_DN = np.array([0.010, 0.0037, 0.0050, 0.0068, 0.032])


def moffat_neff_pix(fwhm_arcsec: np.ndarray, beta: float) -> np.ndarray:
    """Effective number of pixels 1/sum(PSF^2) of a Moffat: pi a^2 (2b-1)/(b-1)^2."""
    alpha = np.asarray(fwhm_arcsec) / PIXEL_SCALE_ARCSEC / (2 * np.sqrt(2 ** (1 / beta) - 1))
    return np.pi * alpha**2 * (2 * beta - 1) / (beta - 1) ** 2


def sky_nmgy_per_pixel(sky_mag: np.ndarray = SKY_MAG_ARCSEC2) -> np.ndarray:
    return mag_to_nmgy(sky_mag) * PIXEL_SCALE_ARCSEC**2


def sky_limited_depth() -> np.ndarray:
    """5-sigma PSF depth per band with no extra variance (sky noise only): the deepest depth this model allows."""
    from photoz_hpc.sim.population import PSF_BETA, PSF_FWHM

    e_per_nmgy = GAIN_E_PER_DN / NMGY_PER_DN
    sigma_nmgy = np.sqrt(sky_nmgy_per_pixel() * e_per_nmgy * moffat_neff_pix(PSF_FWHM, PSF_BETA)) / e_per_nmgy
    return NMGY_ZEROPOINT - 2.5 * np.log10(5.0 * sigma_nmgy)


def extra_variance(depth: np.ndarray) -> np.ndarray:
    """Extra per-pixel variance (e^2) that sets the 5-sigma PSF depth at median seeing to ``depth``."""
    from photoz_hpc.sim.population import PSF_BETA, PSF_FWHM

    e_per_nmgy = GAIN_E_PER_DN / NMGY_PER_DN
    neff = moffat_neff_pix(PSF_FWHM, PSF_BETA)
    var_total_e = (mag_to_nmgy(np.asarray(depth)) / 5.0) ** 2 / neff * e_per_nmgy**2
    extra = var_total_e - sky_nmgy_per_pixel() * e_per_nmgy
    if np.any(extra < -1e-6 * var_total_e):
        raise ValueError(f"depths {depth} deeper than sky-limited ({sky_limited_depth()}); adjust NMGY_PER_DN")
    return np.clip(extra, 0.0, None)


@lru_cache(maxsize=4)
def noise_model(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(electrons per nmgy, extra variance in e^2 per pixel) per band, solved from the calibrated 5-sigma depths."""
    from photoz_hpc.sim.params import load_calibration

    depth = load_calibration(path).get("noise", {}).get("depth_5sigma", DEPTH_5SIGMA)
    return GAIN_E_PER_DN / NMGY_PER_DN, extra_variance(np.asarray(depth, dtype=float))


def add_noise(image: np.ndarray, sky_dmag: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noisy sky-subtracted image (5, H, W) in nmgy: sky + extra + source Poisson, Gaussian approximation."""
    e_per_nmgy, extra = noise_model()
    sky_e = sky_nmgy_per_pixel(SKY_MAG_ARCSEC2 + sky_dmag) * e_per_nmgy
    var_e = sky_e[:, None, None] + extra[:, None, None] + np.clip(image, 0, None) * e_per_nmgy[:, None, None]
    sigma = np.sqrt(var_e) / e_per_nmgy[:, None, None]
    return (image + sigma * rng.standard_normal(image.shape)).astype(np.float32)
