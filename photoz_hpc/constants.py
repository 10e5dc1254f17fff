"""Physical and survey constants shared by every part of photoz-hpc.

Defined once so the synthetic survey, the DALI pipelines, the reference loader and the
fine-tuning head can never disagree about them.
"""

from __future__ import annotations

import numpy as np

#: SDSS filter order used everywhere (channel axis).
BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z")
N_BANDS: int = len(BANDS)

#: Native cutout size of the public release (pixels) and SDSS pixel scale (arcsec/pixel).
CUTOUT_SIZE: int = 107
PIXEL_SCALE_ARCSEC: float = 0.396

#: A/E(B-V) used by SDSS DR12 to compute the per-band ``extinction_*`` columns, i.e. the
#: ``e_bv`` array of the release. SFD E(B-V) = mean(e_bv / R_DR12).
R_DR12: np.ndarray = np.array([5.155, 3.793, 2.751, 2.086, 1.479], dtype=np.float64)

#: A/E(B-V) from Schlafly & Finkbeiner (2011) used by the reddening augmentation and by
#: dereddening at fine-tuning time (as in the paper).
R_SF11: np.ndarray = np.array([4.239, 3.303, 2.285, 1.698, 1.263], dtype=np.float64)

#: Zero point of SDSS nanomaggies: m = NMGY_ZEROPOINT - 2.5 log10(flux_nmgy).
NMGY_ZEROPOINT: float = 22.5

def mag_to_nmgy(mag: np.ndarray | float) -> np.ndarray:
    """AB magnitude (or mag/arcsec^2) to SDSS nanomaggies (per arcsec^2)."""
    return 10 ** (-0.4 * (np.asarray(mag) - NMGY_ZEROPOINT))


def sfd_ebv(e_bv: np.ndarray) -> np.ndarray:
    """SFD E(B-V) from the release's per-band DR12 extinctions: mean(e_bv / R_DR12) over bands."""
    e_bv = np.asarray(e_bv, dtype=np.float64)
    return (e_bv / R_DR12).mean(axis=-1)
