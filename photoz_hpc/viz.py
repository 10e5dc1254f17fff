"""RGB previews of 5-band (u,g,r,i,z) cutouts: Lupton et al. (2004) asinh stretch of g,r,i, and grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from photoz_hpc.constants import BANDS

#: per-band scale so a typical galaxy looks neutral (SDSS-like i,r,g -> R,G,B weighting).
_RGB_SCALE = (1.0, 1.1, 1.6)


def lupton_rgb(images: np.ndarray, stretch: float = 0.5, q: float = 8.0) -> np.ndarray:
    """(..., 5, H, W) nanomaggy images -> (..., H, W, 3) uint8 RGB from i, r, g with an asinh stretch.

    The asinh is applied to the summed intensity so colours are preserved (Lupton et al. 2004).
    """
    images = np.asarray(images, dtype=np.float64)
    rgb = np.stack([images[..., BANDS.index(b), :, :] * s for b, s in zip("irg", _RGB_SCALE, strict=True)], axis=-1)
    intensity = rgb.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(intensity > 0, np.arcsinh(q * intensity / stretch) / (q * np.maximum(intensity, 1e-12)), 0.0)
    out = np.clip(rgb * factor, 0, None)
    peak = np.maximum(out.max(axis=-1, keepdims=True), 1.0)
    return (np.clip(out / peak, 0, 1) * 255).round().astype(np.uint8)


def save_grid(images: np.ndarray, labels: Sequence[str], path: str | Path, ncols: int = 8, **rgb_kw) -> Path:
    """PNG grid of RGB renderings of (N, 5, H, W) images, each titled by its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rgb = lupton_rgb(images, **rgb_kw)
    n = len(rgb)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.7 * nrows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(rgb[k], origin="lower")
            ax.set_title(labels[k], fontsize=8)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
