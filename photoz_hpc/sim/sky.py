"""Sky positions in an SDSS-Legacy-like footprint and SFD E(B-V) from a cosecant law with log-normal scatter.

Why this model: dust columns scale roughly as csc|b| (a plane-parallel slab), with patchy cirrus giving
~0.4 dex scatter at fixed latitude. With E0 = 0.022 and sigma_ln = 0.55 the footprint's distribution has
median ~0.03, 90th percentile ~0.07 and a tail to ~0.2-0.3, like SFD over the SDSS DR7 imaging area
(Schlegel, Finkbeiner & Davis 1998; Abazajian et al. 2009).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

#: ICRS -> Galactic rotation matrix (J2000; Hipparcos/Liu et al. 2011 values as used by astropy).
_ICRS_TO_GAL = np.array(
    [
        [-0.0548755604162154, -0.8734370902348850, -0.4838350155487132],
        [+0.4941094278755837, -0.4448296299600112, +0.7469822444972189],
        [-0.8676661490190047, -0.1980763734312015, +0.4559837761750669],
    ]
)
EBV_E0 = 0.022
EBV_SIGMA_LN = 0.55
EBV_MAX = 0.5
#: fraction of objects in the southern equatorial stripes (Stripe 82 and neighbours).
SOUTH_FRACTION = 0.08
MIN_ABS_B_DEG = 25.0


def galactic_latitude(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    xyz = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    gal = _ICRS_TO_GAL @ xyz.reshape(3, -1)
    return np.degrees(np.arcsin(np.clip(gal[2], -1, 1))).reshape(np.shape(ra_deg))


def draw_position(rng: np.random.Generator) -> tuple[float, float]:
    """One (ra, dec) in degrees, area-uniform within the footprint (rejection sampling)."""
    while True:
        if rng.random() < SOUTH_FRACTION:
            ra = (rng.uniform(-50.0, 60.0)) % 360.0
            dec = float(np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-11.0)), np.sin(np.radians(15.0))))))
        else:
            ra = rng.uniform(110.0, 265.0)
            dec = float(np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-5.0)), np.sin(np.radians(70.0))))))
        if abs(galactic_latitude(np.array(ra), np.array(dec))) >= MIN_ABS_B_DEG:
            return float(ra), dec


def draw_ebv(b_deg: float, rng: np.random.Generator) -> float:
    """SFD E(B-V) at galactic latitude ``b_deg``: E0 csc|b| times log-normal cirrus scatter."""
    csc = 1.0 / np.sin(np.radians(max(abs(b_deg), 5.0)))
    return float(min(EBV_E0 * csc * np.exp(EBV_SIGMA_LN * rng.standard_normal()), EBV_MAX))


@lru_cache(maxsize=1)
def _sdss_input_coefficients() -> np.ndarray:
    from photoz_hpc.survey import load_survey

    return np.asarray(load_survey("sdss").input_coefficients, dtype=np.float64)


def extinction(ebv: np.ndarray | float, coefficients: np.ndarray | None = None) -> np.ndarray:
    """Per-band extinction A_b = coefficient_b * E(B-V). Default: SDSS DR12's coefficients (sdss.yaml
    ``extinction_input``), the release's ``e_bv`` column; another survey passes its own."""
    coef = _sdss_input_coefficients() if coefficients is None else np.asarray(coefficients, dtype=np.float64)
    return np.asarray(ebv, dtype=np.float64)[..., None] * coef
