"""RGB previews of multi-band cutouts: Lupton et al. (2004) asinh stretch of the survey's three preview bands
(``Survey.rgb``, e.g. i, r, g for SDSS ugriz), and grids. The survey is passed in (that of the data shown): the
band names say which channels are red, green and blue."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from photoz_hpc.survey import Survey, default_survey

#: per-channel scale of R, G, B so a typical galaxy looks neutral (SDSS-like i,r,g -> R,G,B weighting).
_RGB_SCALE = (1.0, 1.1, 1.6)


def rgb_channels(survey: Survey | None = None, n_channels: int | None = None) -> tuple[int, int, int]:
    """Channel indices of the survey's red, green and blue preview bands (``survey.rgb``; None: the default
    survey's, SDSS i, r, g). ``n_channels``, the images' band count, must be the survey's."""
    survey = survey or default_survey()
    if n_channels is not None and n_channels != survey.n_bands:
        raise ValueError(f"images have {n_channels} bands but survey '{survey.name}' has {survey.n_bands} "
                         f"{list(survey.bands)}: pass the survey of the data shown")
    return tuple(survey.bands.index(b) for b in survey.rgb)  # type: ignore[return-value]


def lupton_rgb(images: np.ndarray, stretch: float = 0.5, q: float = 8.0, survey: Survey | None = None) -> np.ndarray:
    """(..., bands, H, W) images -> (..., H, W, 3) uint8 RGB from the survey's ``rgb`` bands (SDSS: i, r, g) with an
    asinh stretch (``stretch`` in nanomaggies, AB zero point 22.5, whatever the survey's flux unit, so a galaxy
    looks alike in every survey: LSST's nJy are 3631 to the nanomaggy). ``survey``: that of the images (None: SDSS).

    The asinh is applied to the summed intensity so colours are preserved (Lupton et al. 2004).
    """
    images = np.asarray(images, dtype=np.float64)
    channels = rgb_channels(survey, images.shape[-3])
    to_nmgy = 10 ** (-0.4 * ((survey or default_survey()).zeropoint - 22.5))  # SDSS: exactly 1
    if to_nmgy != 1.0:
        images = images * to_nmgy
    rgb = np.stack([images[..., c, :, :] * s for c, s in zip(channels, _RGB_SCALE, strict=True)], axis=-1)
    intensity = rgb.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(intensity > 0, np.arcsinh(q * intensity / stretch) / (q * np.maximum(intensity, 1e-12)), 0.0)
    out = np.clip(rgb * factor, 0, None)
    peak = np.maximum(out.max(axis=-1, keepdims=True), 1.0)
    return (np.clip(out / peak, 0, 1) * 255).round().astype(np.uint8)


def save_grid(images: np.ndarray, labels: Sequence[str], path: str | Path, ncols: int = 8, dpi: int = 110,
              crop: int | None = None, **rgb_kw) -> Path:
    """PNG grid of RGB renderings of (N, bands, H, W) images, each labelled (inside its panel, so labels never overlap).

    ``crop``: keep the central crop x crop pixels; ``dpi`` sets the file size (~1 px per image pixel at 110);
    ``rgb_kw``: ``lupton_rgb``'s ``survey`` (that of the images: which bands are red, green, blue), ``stretch``, ``q``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images)
    if crop is not None and crop < images.shape[-1]:
        lo = (images.shape[-1] - crop) // 2
        images = images[..., lo:lo + crop, lo:lo + crop]
    rgb = lupton_rgb(images, **rgb_kw)
    n = len(rgb)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.2 * ncols, 1.2 * nrows), squeeze=False)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=0.995, wspace=0.03, hspace=0.03)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(rgb[k], origin="lower", interpolation="nearest")
            ax.text(0.03, 0.97, labels[k], transform=ax.transAxes, fontsize=7, color="white", va="top", ha="left",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
