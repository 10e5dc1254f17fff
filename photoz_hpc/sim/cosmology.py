"""Flat LCDM distances on a cached grid (H0=70, Om=0.3, the convention of Shen+03/Blanton+03 with h=0.7).

A 20-line integral instead of astropy.cosmology keeps worker start-up cheap and every quantity
vectorised via ``np.interp``; tests check it against astropy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

C_KMS = 299792.458
H0 = 70.0
OM0 = 0.3
_ZGRID_MAX = 1.0
_NGRID = 4001
#: the grid goes on in the same steps to Z_MAX (other surveys' synthetic z_max); the first _NGRID points (and so
#: every SDSS distance) are exactly those of the original [0, 1] grid.
Z_MAX = 4.0


@lru_cache(maxsize=4)
def _grid(h0: float = H0, om0: float = OM0) -> tuple[np.ndarray, np.ndarray]:
    """Comoving distance D_C(z) [Mpc] on a fine grid (trapezoid integral of c/H(z)), z in [0, Z_MAX]."""
    step = _ZGRID_MAX / (_NGRID - 1)
    n_more = int(round((Z_MAX - _ZGRID_MAX) / step))
    z = np.concatenate([np.linspace(0.0, _ZGRID_MAX, _NGRID), np.linspace(_ZGRID_MAX, Z_MAX, n_more + 1)[1:]])
    inv_e = 1.0 / np.sqrt(om0 * (1 + z) ** 3 + (1 - om0))
    dc = np.concatenate([[0.0], np.cumsum(0.5 * (inv_e[1:] + inv_e[:-1]) * np.diff(z))]) * C_KMS / h0
    return z, dc


def comoving_distance(z: np.ndarray | float) -> np.ndarray:
    """Line-of-sight (= transverse, flat) comoving distance in Mpc."""
    zg, dc = _grid()
    return np.interp(z, zg, dc)


def luminosity_distance(z: np.ndarray | float) -> np.ndarray:
    return (1 + np.asarray(z)) * comoving_distance(z)


def angular_diameter_distance(z: np.ndarray | float) -> np.ndarray:
    return comoving_distance(z) / (1 + np.asarray(z))


def distance_modulus(z: np.ndarray | float) -> np.ndarray:
    """5 log10(D_L / 10 pc); z must be > 0."""
    return 5.0 * np.log10(luminosity_distance(z)) + 25.0


def dvdz(z: np.ndarray | float) -> np.ndarray:
    """Comoving volume element per unit z and steradian [Mpc^3 / sr]: D_C^2 c / H(z)."""
    z = np.asarray(z, dtype=float)
    hz = H0 * np.sqrt(OM0 * (1 + z) ** 3 + (1 - OM0))
    return comoving_distance(z) ** 2 * C_KMS / hz


def kpc_to_arcsec(r_kpc: np.ndarray | float, z: np.ndarray | float) -> np.ndarray:
    """Physical size [kpc] to angle [arcsec] via the angular-diameter distance."""
    return np.asarray(r_kpc) / (angular_diameter_distance(z) * 1e3) * 206264.806
