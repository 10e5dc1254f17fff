"""The redshift classification grid of the photo-z head, defined once: 180 bins over [0, 0.4).

Convention: the network predicts a probability per bin and ``z_phot = sum_k p_k c_k`` over the bin
*centres* ``c_k``. (The Pasquet et al. 2019 code took the expectation over left edges, which biases
every estimate low by half a bin, 0.0011; we use centres.) Redshifts outside the grid go to the edge
bins for training; they keep their true value in every metric.
"""

from __future__ import annotations

import numpy as np

Z_MIN: float = 0.0
Z_MAX: float = 0.4
N_Z_BINS: int = 180


def z_bin_edges(n_bins: int = N_Z_BINS, z_min: float = Z_MIN, z_max: float = Z_MAX) -> np.ndarray:
    """Edges of the redshift classification bins (``n_bins + 1`` values)."""
    return np.linspace(z_min, z_max, n_bins + 1)


def z_bin_centres(n_bins: int = N_Z_BINS, z_min: float = Z_MIN, z_max: float = Z_MAX) -> np.ndarray:
    """Bin centres: the support of every redshift pdf and of ``z_phot``."""
    edges = z_bin_edges(n_bins, z_min, z_max)
    return 0.5 * (edges[:-1] + edges[1:])


def redshift_bins(z: np.ndarray) -> np.ndarray:
    """Classification bin of each redshift (values outside [Z_MIN, Z_MAX) go to the edge bins)."""
    return np.clip(np.searchsorted(z_bin_edges(), z, side="right") - 1, 0, N_Z_BINS - 1).astype(np.int64)
