"""Observed-frame synthetic photometry of kcorrect NMF templates on a precomputed redshift grid.

The grid ``A[z, template, band]`` holds AB maggies of each redshifted kcorrect-default-v4 template
through the SDSS 2.5m responses (kcorrect's sdss_*0, the ones its coefficient fits use), so the
calibration fit and the generator share one photometric system. A galaxy is a non-negative template
mixture; its fluxes are linear in the coefficients, so interpolating the grid is exact up to the
z-spacing. Magnitudes follow kcorrect's convention m = M_r + DM(z) - 2.5 log10(A_b(z).c / A_r(0).c).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from photoz_hpc.sim.params import load_calibration

#: SDSS magnitudes are not exactly AB: m_AB = m_SDSS + AB_OFFSET (Blanton & Roweis 2007, u-0.04, z+0.02).
AB_OFFSET = np.array([-0.04, 0.0, 0.0, 0.0, 0.02])
R_INDEX = 2


@dataclass(frozen=True)
class TemplateGrid:
    z: np.ndarray  # (nz,)
    maggies: np.ndarray  # (nz, ntemplate, nband)

    @property
    def rest_r(self) -> np.ndarray:
        """Rest-frame (z=0) r-band maggies per template: the normalisation of absolute magnitudes."""
        return self.maggies[0, :, R_INDEX]

    def at(self, z: np.ndarray) -> np.ndarray:
        """Template maggies at each z, linearly interpolated: (n, ntemplate, nband)."""
        z = np.atleast_1d(np.asarray(z, dtype=float))
        pos = np.clip((z - self.z[0]) / (self.z[1] - self.z[0]), 0, len(self.z) - 1 - 1e-9)
        i = pos.astype(int)
        f = (pos - i)[:, None, None]
        return self.maggies[i] * (1 - f) + self.maggies[i + 1] * f


@lru_cache(maxsize=2)
def template_grid(path: str | None = None) -> TemplateGrid:
    g = load_calibration(path)["template_grid"]
    return TemplateGrid(np.asarray(g["z"], dtype=float), np.asarray(g["maggies"], dtype=float))


def weights_to_coeffs(w: np.ndarray, grid: TemplateGrid) -> np.ndarray:
    """Rest-r light fractions (rows sum to 1) -> template coefficients with rest-frame r maggies = 1."""
    return np.asarray(w) / grid.rest_r


def coeffs_to_weights(c: np.ndarray, grid: TemplateGrid) -> np.ndarray:
    """Template coefficients -> fraction of rest-frame r light each template supplies."""
    light = np.asarray(c) * grid.rest_r
    return light / light.sum(axis=-1, keepdims=True)


def k_terms(w: np.ndarray, z: np.ndarray, grid: TemplateGrid) -> np.ndarray:
    """-2.5 log10(A_b(z).c / A_r(0).c) per band (n, 5): observed band b relative to rest-frame r."""
    c = weights_to_coeffs(np.atleast_2d(w), grid)
    flux = np.einsum("nt,ntb->nb", c, grid.at(z))
    return -2.5 * np.log10(np.maximum(flux, 1e-30))


def k_terms_through(w: np.ndarray, z: np.ndarray, rest: TemplateGrid, obs: TemplateGrid) -> np.ndarray:
    """-2.5 log10(A_b(z).c / A_r(0).c) (n, nband) with A_b from ``obs`` (another survey's filters) and the
    rest-frame SDSS r normalisation A_r(0) from ``rest``: the same rest-r light fractions w seen through any filters."""
    c = weights_to_coeffs(np.atleast_2d(w), rest)
    flux = np.einsum("nt,ntb->nb", c, obs.at(z))
    return -2.5 * np.log10(np.maximum(flux, 1e-30))


def apparent_mags(abs_r: np.ndarray, w: np.ndarray, z: np.ndarray, grid: TemplateGrid, dm: np.ndarray) -> np.ndarray:
    """SDSS-system apparent model magnitudes (n, 5) for rest-frame absolute r magnitude ``abs_r``."""
    ab = np.asarray(abs_r)[:, None] + np.asarray(dm)[:, None] + k_terms(w, z, grid)
    return ab - AB_OFFSET
