"""The ``eval`` pipeline on images held in memory: what the loaders do to a store's records, for arrays.

Why: a notebook has cutouts as arrays (the Multimodal Universe, a cutout service, a simulation), not a prepared
store, and its predictions must be the numbers ``predict`` writes for the same galaxies. So the view is made by the
very functions the loaders use (``draws.draw_views`` / ``band_multipliers`` / ``affine_matrices`` for the inputs,
``reference.apply_view`` for the pixels) from an ``AugmentSpec`` that ``resolve_spec`` builds for the ``eval``
pipeline: the centre crop starting at ``((W - S) // 2, (H - S) // 2)`` (an exact integer slice, so even and odd
sizes crop as in a store), and, where the network dereddens (``augment.deredden``), the flux factor
``10 ** (0.4 * A_b * E(B-V))`` with the survey's ``A_b / E(B-V)`` vector, in float32 as the loaders apply it.
"""

from __future__ import annotations

import numpy as np
import torch

from photoz_hpc.augment.draws import AugmentSpec, affine_matrices, band_multipliers, draw_views, generator, resolve_spec
from photoz_hpc.augment.reference import apply_view
from photoz_hpc.config import AugmentConfig
from photoz_hpc.survey import RedshiftGrid, Survey


def eval_spec(aug: AugmentConfig, survey: Survey, height: int, width: int, grid: RedshiftGrid | None = None,
              where: str = "the images") -> AugmentSpec:
    """The ``eval`` pipeline's spec for (N, bands, ``height``, ``width``) images of ``survey`` (the network's), as
    ``build_loader`` resolves it for a store of that survey and image size (``aug``: the network's view settings)."""
    manifest = {"image_shape": [int(height), int(width), survey.n_bands], "survey": survey.to_dict(),
                "bands": list(survey.bands)}
    return resolve_spec(aug, manifest, "eval", where, grid)


def eval_views(images: torch.Tensor, ebv: np.ndarray | None, spec: AugmentSpec) -> torch.Tensor:
    """(B, C, S, S) float32 eval views of (B, C, H, W) float32 ``images`` (on any device; the view is made there,
    as the reference loader makes it on its delivery device) with per-galaxy SFD ``ebv`` (B,) where ``spec``
    dereddens (None otherwise). The eval pipeline draws nothing random: the generator only fills identity draws."""
    n = images.shape[0]
    rng = generator(0, 0)
    (view,) = draw_views(spec, rng, n, None if ebv is None else np.asarray(ebv, np.float64))
    matrix = torch.from_numpy(affine_matrices(spec, view.angle, view.shift))
    mult = torch.from_numpy(np.ascontiguousarray(band_multipliers(spec, view.ebv)))
    device = images.device
    return apply_view(images, matrix.to(device), mult.to(device), spec.crop, host_matrix=matrix)
