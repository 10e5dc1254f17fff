"""SDSS-depth noise for sky-subtracted nanomaggy images.

Per band: sky brightness (mag/arcsec^2), a nominal electrons-per-nanomaggy factor (gain / nmgy per DN
of typical DR12 frames) and an extra per-pixel variance (dark current, read noise, flat-field and PSF-fit
inefficiency) solved so that the 5-sigma PSF-magnitude depth at nominal seeing equals
``calibration.json["noise"]["depth_5sigma"]``: fitted by calibrate.py so that an ideal profile fit of the
rendered galaxies has the MGS catalogue's model-magnitude errors (``DEPTH_5SIGMA``, the SDSS 95%-completeness
limits used before, only when the calibration has no noise section). Sky is subtracted, so pixels scatter
around the source with Gaussian sky noise plus Poisson noise of the source.

Other surveys (``DepthNoise``): the published 5-sigma point-source depth per band sets the sky noise per pixel at
the median seeing, sigma = F_5 / (5 sqrt(n_eff)), and the sky brightness sets the source's Poisson term as if all
of that noise were sky photons (variance sigma^2 (sky + source) / sky, per pixel).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from photoz_hpc.sim.camera import Camera, sdss_camera

SKY_MAG_ARCSEC2 = np.array([22.1, 21.9, 20.9, 20.2, 19.0])
#: fallback depths: the SDSS 95% point-source completeness limits (calibration version <= 2 used them as 5 sigma).
DEPTH_5SIGMA = np.array([22.0, 22.2, 22.2, 21.3, 20.5])
GAIN_E_PER_DN = np.array([1.6, 3.9, 4.7, 5.1, 4.7])
NMGY_PER_DN = np.array([0.010, 0.0037, 0.0050, 0.0068, 0.032])


def moffat_neff_pix(fwhm_arcsec: np.ndarray, beta: float, pixel_scale: float | None = None) -> np.ndarray:
    """Effective number of pixels 1/sum(PSF^2) of a Moffat: pi a^2 (2b-1)/(b-1)^2 (default pixels: SDSS's)."""
    pixel_scale = sdss_camera().pixel_scale if pixel_scale is None else pixel_scale
    alpha = np.asarray(fwhm_arcsec) / pixel_scale / (2 * np.sqrt(2 ** (1 / beta) - 1))
    return np.pi * alpha**2 * (2 * beta - 1) / (beta - 1) ** 2


def sky_nmgy_per_pixel(sky_mag: np.ndarray = SKY_MAG_ARCSEC2) -> np.ndarray:
    camera = sdss_camera()
    return camera.flux(sky_mag) * camera.pixel_scale**2


def sky_limited_depth() -> np.ndarray:
    """5-sigma PSF depth per band with no extra variance (sky noise only): the deepest depth this model allows."""
    from photoz_hpc.sim.population import PSF_BETA, PSF_FWHM

    e_per_nmgy = GAIN_E_PER_DN / NMGY_PER_DN
    sigma_nmgy = np.sqrt(sky_nmgy_per_pixel() * e_per_nmgy * moffat_neff_pix(PSF_FWHM, PSF_BETA)) / e_per_nmgy
    return sdss_camera().zeropoint - 2.5 * np.log10(5.0 * sigma_nmgy)


def extra_variance(depth: np.ndarray) -> np.ndarray:
    """Extra per-pixel variance (e^2) that sets the 5-sigma PSF depth at median seeing to ``depth``."""
    from photoz_hpc.sim.population import PSF_BETA, PSF_FWHM

    e_per_nmgy = GAIN_E_PER_DN / NMGY_PER_DN
    neff = moffat_neff_pix(PSF_FWHM, PSF_BETA)
    var_total_e = (sdss_camera().flux(np.asarray(depth)) / 5.0) ** 2 / neff * e_per_nmgy**2
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


class DepthNoise:
    """Pixel noise of a survey given by its depths: per band, sky sigma from the 5-sigma point-source depth at the
    median seeing, scaled per galaxy by its sky-brightness offset, plus the source's Poisson noise."""

    def __init__(self, camera: Camera, depth: np.ndarray, sky_mag: np.ndarray, psf_fwhm: np.ndarray, beta: float):
        self.camera = camera
        neff = moffat_neff_pix(np.asarray(psf_fwhm, dtype=float), beta, camera.pixel_scale)
        #: sky sigma per pixel (flux unit) and sky level per pixel, per band
        self.sigma = camera.flux(np.asarray(depth, dtype=float)) / (5.0 * np.sqrt(neff))
        self.sky = camera.flux(np.asarray(sky_mag, dtype=float)) * camera.pixel_scale**2

    def add(self, image: np.ndarray, band: int, sky_dmag: float, rng: np.random.Generator) -> np.ndarray:
        """Noisy sky-subtracted image of band ``band`` (H, W): variance sigma^2 (10^(-0.4 dmag) + source / sky)."""
        s2 = self.sigma[band] ** 2
        var = s2 * 10 ** (-0.4 * sky_dmag) + s2 * np.clip(image, 0, None) / self.sky[band]
        return (image + np.sqrt(var) * rng.standard_normal(image.shape)).astype(np.float32)
