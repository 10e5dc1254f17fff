"""The pixel grid and flux unit a synthetic survey is rendered on, from the survey's description."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Camera:
    """Pixel scale (arcsec), cutout side (pixels) and zero point (AB magnitude of one flux unit) of a survey."""

    pixel_scale: float
    size: int
    zeropoint: float

    def flux(self, mag: np.ndarray | float) -> np.ndarray:
        """AB magnitude (or mag/arcsec^2) to the survey's flux unit (per arcsec^2)."""
        return 10 ** (-0.4 * (np.asarray(mag) - self.zeropoint))


@lru_cache(maxsize=1)
def sdss_camera() -> Camera:
    """The calibrated SDSS camera, from configs/surveys/sdss.yaml (0.396"/px, 107 px, nanomaggies)."""
    from photoz_hpc.survey import load_survey

    s = load_survey("sdss")
    return Camera(s.pixel_scale, s.cutout_size, s.zeropoint)
