"""Augmentation parameters: the random draws and what they mean, defined once for every backend.

The DALI pipelines and the PyTorch reference never draw anything themselves: they receive the
arrays made here (affine matrices, per-band multipliers, noise sigmas and noise fields) and only
apply them. Feeding both the same arrays therefore gives the same batch, and all randomness comes
from NumPy generators keyed by (seed, epoch, rank, batch), so a loader's state is just its position.

Nothing here knows a survey: the band count, the extinction vector of the reddening and the pixel numbers
(crop, jitter) come from the survey the dataset's manifest records (``photoz_hpc.survey.survey_of_manifest``),
the label grid from the model (``RedshiftGrid``), so any band count works the same way.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

import numpy as np

from photoz_hpc.augment.pipelines import Pipeline, get_pipeline
from photoz_hpc.config import AugmentConfig
from photoz_hpc.errors import ConfigError, DatasetError
from photoz_hpc.survey import RedshiftGrid, Survey, survey_of_manifest


class StreamTag(enum.IntEnum):
    """The first key of every loader generator: streams of different purposes never overlap."""

    DRAWS = 0  # per-batch augmentation draws (source.py)
    NOISE_TABLE = 1  # the per-epoch noise table
    FRESH_NOISE = 2  # per-batch noise fields of ``noise_method=fresh``
    SHUFFLE = 3  # the per-epoch permutation of the sample pool (sampler.py)


def generator(seed: int, *key: int) -> np.random.Generator:
    """A NumPy generator keyed by (seed, *key): same key, same stream, on every machine."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) for k in key)]))


def resolve_augment(aug: AugmentConfig, survey: Survey) -> AugmentConfig:
    """A copy of ``aug`` with concrete ``crop_size`` and ``jitter_max``: the survey's defaults where unset (None).

    Runs save this (config.yaml, checkpoints, encoder files), so a saved config holds the numbers used and a
    model trained on one survey's crop is not silently re-cropped by another survey's default. Resolving a
    resolved config changes nothing. A crop larger than the survey's cutouts is an error naming both."""
    crop = survey.crop_size if aug.crop_size is None else int(aug.crop_size)
    jitter = survey.jitter_max if aug.jitter_max is None else int(aug.jitter_max)
    if crop > survey.cutout_size:
        raise ConfigError(
            f"augment.crop_size={crop} does not fit the {survey.cutout_size}x{survey.cutout_size} pixel cutouts of "
            f"survey '{survey.name}' (its default crop is {survey.crop_size}, jitter {survey.jitter_max}); "
            f"lower augment.crop_size or leave it unset for the survey's default"
        )
    return dataclasses.replace(aug, crop_size=crop, jitter_max=jitter)


@dataclass(frozen=True)
class AugmentSpec:
    """Everything an augmentation backend needs, resolved from the config, the dataset manifest (its survey and
    image shape) and the model's redshift grid."""

    pipeline: Pipeline
    in_hw: tuple[int, int]
    bands: int
    crop: int
    reddening: bool
    ebv_range: tuple[float, float]
    deredden: bool
    rotation: bool
    rotation_max: float  # radians
    jitter: bool
    jitter_max: int
    noise: bool
    noise_scale: tuple[float, float]
    mad: np.ndarray | None
    noise_method: str
    noise_table_size: int
    survey: Survey  # the dataset's (its manifest's): band names, extinction vector, cutout size
    grid: RedshiftGrid  # the grid of the ``z_bin`` labels: the model's (default the survey's)
    reddening_vector: np.ndarray  # (C,) float64 A_b / E(B-V): the survey's; SDSS exactly SF11

    @property
    def n_views(self) -> int:
        return self.pipeline.n_views

    @property
    def field_size(self) -> int:
        """Floats in one noise field (crop x crop x bands)."""
        return self.crop * self.crop * self.bands


def resolve_spec(
    aug: AugmentConfig, manifest: dict, pipeline: str | Pipeline, where: str = "dataset", grid: RedshiftGrid | None = None,
) -> AugmentSpec:
    """Check the config against the dataset's survey, image shape and statistics; clear errors, no silent clipping.

    An augmentation is on where the pipeline allows it (``pipelines.PIPELINES``) and its switch is on. ``grid``:
    the redshift grid of the ``z_bin`` labels (the model's); None: the survey's."""
    from photoz_hpc.data.dataset import pixel_stats

    pipeline = get_pipeline(pipeline)
    shape = manifest.get("image_shape")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3):
        raise DatasetError(f"{where}: manifest image_shape must be [H, W, C], got {shape!r}")
    height, width, bands = (int(v) for v in shape)
    survey = survey_of_manifest(manifest, where)
    if bands != survey.n_bands:
        raise DatasetError(f"{where}: images have {bands} bands but the manifest's survey '{survey.name}' has "
                           f"{survey.n_bands} ({list(survey.bands)})")
    aug = resolve_augment(aug, survey)
    jitter = aug.jitter and pipeline.allows("jitter")
    reach = aug.crop_size + (2 * aug.jitter_max if jitter else 0)
    if reach > min(height, width):
        what = f"crop {aug.crop_size}" + (f" + 2 x jitter {aug.jitter_max}" if jitter else "")
        raise ConfigError(
            f"augment.crop_size={aug.crop_size} does not fit the {height}x{width} images of {where} (survey "
            f"'{survey.name}', native cutouts {survey.cutout_size}x{survey.cutout_size}, default crop "
            f"{survey.crop_size} + 2 x jitter {survey.jitter_max}): {what} = {reach} pixels > {min(height, width)}; "
            f"lower augment.crop_size or augment.jitter_max"
        )
    noise = aug.noise and pipeline.allows("noise")
    mad = None
    if noise:
        mad = pixel_stats(manifest, where)["mad"]
        need = 2 * aug.crop_size * aug.crop_size * bands
        if aug.noise_method == "table" and aug.noise_table_size < need:
            raise ConfigError(f"augment.noise_table_size={aug.noise_table_size} must be >= {need} (two noise fields)")
    return AugmentSpec(
        pipeline=pipeline,
        in_hw=(height, width),
        bands=bands,
        crop=aug.crop_size,
        reddening=aug.reddening and pipeline.allows("reddening"),
        ebv_range=(aug.ebv_min, aug.ebv_max),
        deredden=getattr(aug, pipeline.deredden_switch),
        rotation=aug.rotation and pipeline.allows("rotation"),
        rotation_max=math.radians(aug.rotation_max_deg),
        jitter=jitter,
        jitter_max=aug.jitter_max,
        noise=noise,
        noise_scale=(aug.noise_scale_min, aug.noise_scale_max),
        mad=mad,
        noise_method=aug.noise_method,
        noise_table_size=aug.noise_table_size,
        survey=survey,
        grid=survey.redshift_grid if grid is None else grid,
        reddening_vector=survey.reddening_vector,
    )


@dataclass
class ViewDraws:
    """The random draws of one view of a batch (disabled augmentations hold their identity values)."""

    ebv: np.ndarray  # (B,) net E(B-V) added: the reddening draw minus the galaxy's SFD E(B-V) where dereddened
    angle: np.ndarray  # (B,) radians
    shift: np.ndarray  # (B, 2) int64, (dx, dy) offset of the crop centre
    scale: np.ndarray  # (B,) noise sigma in units of the band MAD (0 when noise is off)
    noise_offset: np.ndarray  # (B,) int64 start of each noise field in the epoch's noise table


def draw_views(spec: AugmentSpec, rng: np.random.Generator, n: int, ebv_sfd: np.ndarray | None = None) -> list[ViewDraws]:
    """Draw every view of ``n`` samples (``ebv_sfd``: their own SFD E(B-V), needed where ``spec.deredden``).
    All quantities are always drawn, in a fixed order, so that switching one augmentation off leaves
    the others' draws unchanged."""
    views = []
    half = spec.noise_table_size // 2
    for v in range(spec.n_views):
        ebv = rng.uniform(*spec.ebv_range, n)
        angle = rng.uniform(0.0, spec.rotation_max, n)
        shift = rng.integers(-spec.jitter_max, spec.jitter_max + 1, size=(n, 2), dtype=np.int64)
        scale = rng.uniform(*spec.noise_scale, n)
        # View v reads only the v-th half of the table: the two views of one galaxy never share noise.
        offset = v * half + rng.integers(0, max(half - spec.field_size, 0) + 1, size=n, dtype=np.int64)
        views.append(
            ViewDraws(
                ebv=net_ebv(spec, ebv, ebv_sfd),
                angle=angle if spec.rotation else np.zeros(n),
                shift=shift if spec.jitter else np.zeros((n, 2), np.int64),
                scale=scale if spec.noise else np.zeros(n),
                noise_offset=offset,
            )
        )
    return views


def net_ebv(spec: AugmentSpec, reddening: np.ndarray, ebv_sfd: np.ndarray | None) -> np.ndarray:
    """The one E(B-V) per sample that a view adds: the reddening draw (0 where off) minus the galaxy's
    own SFD E(B-V) where the pipeline dereddens (``Pipeline.deredden_switch``): deredden, then redden,
    in one factor. Negative: a net dereddening."""
    added = reddening if spec.reddening else np.zeros(len(reddening))
    if not spec.deredden:
        return added
    if ebv_sfd is None:
        raise ValueError(f"the {spec.pipeline.name} pipeline dereddens: the galaxies' ebv_sfd is needed")
    return added - np.asarray(ebv_sfd, np.float64)


def band_multipliers(spec: AugmentSpec, ebv: np.ndarray) -> np.ndarray:
    """Per-sample per-band flux factors (B, C) float32 = 10**(-0.4 R E) for the net E(B-V) E of ``net_ebv``
    (R: the survey's ``reddening_vector``)."""
    return (10.0 ** (-0.4 * np.outer(ebv, spec.reddening_vector))).astype(np.float32)


def noise_sigmas(spec: AugmentSpec, scale: np.ndarray) -> np.ndarray:
    """Per-sample per-band noise sigma (B, C) float32 = scale x MAD[band].

    MAD is the manifest's ``pixel_stats.mad``: the raw median(|x - median|) of each band over every
    pixel of every full cutout in the store (not scaled by 1.4826, not measured on the crop)."""
    if spec.mad is None:
        return np.zeros((len(scale), spec.bands), np.float32)
    return (np.outer(scale, spec.mad)).astype(np.float32)


def affine_matrices(spec: AugmentSpec, angle: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Destination-to-source 2x3 matrices (B, 2, 3) float32 fusing rotation, jitter and crop.

    Coordinates are continuous with (0, 0) at the first pixel's corner (DALI's and grid_sample's
    ``align_corners=False`` convention). The image is rotated by ``angle`` about its centre c, the
    crop window starts at the integer position ((W-S)//2, (H-S)//2) + shift, so a zero angle is an
    exact integer crop: src = c + A(angle) (dst + start + shift - c).
    """
    height, width = spec.in_hw
    centre = np.array([width / 2.0, height / 2.0])
    start = np.array([(width - spec.crop) // 2, (height - spec.crop) // 2], np.float64)
    cos, sin = np.cos(angle), np.sin(angle)
    offset = start + shift - centre  # (B, 2)
    out = np.empty((len(cos), 2, 3), np.float32)  # filled in place: this runs in the training thread per batch
    out[:, 0, 0], out[:, 0, 1] = cos, -sin
    out[:, 1, 0], out[:, 1, 1] = sin, cos
    out[:, 0, 2] = centre[0] + (cos * offset[:, 0] - sin * offset[:, 1])
    out[:, 1, 2] = centre[1] + (sin * offset[:, 0] + cos * offset[:, 1])
    # An exact zero rotation must stay an exact translation (cos=1, sin=0 already are).
    return out


def _warp_half_widths(spec: AugmentSpec) -> list[float]:
    """Per image axis (H, W): how far from the image centre a destination pixel centre can map before rotation.

    Along an axis of D pixels that is a = S/2 - 1/2 + J + |e| (J: ``jitter_max`` where jitter is on;
    e = (D-S)//2 + S/2 - D/2, the crop window's 0 or 1/2 pixel offset from ``affine_matrices``' integer start)."""
    jitter = spec.jitter_max if spec.jitter else 0
    return [spec.crop / 2.0 - 0.5 + jitter + abs((d - spec.crop) // 2 + spec.crop / 2.0 - d / 2.0) for d in spec.in_hw]


def warp_reach(spec: AugmentSpec) -> float:
    """How far from the image centre, in pixels, a source point of the warp can fall: the largest half-width,
    or with rotation on (any angle) the half-diagonal of the window the half-widths span."""
    a = _warp_half_widths(spec)
    return math.hypot(*a) if spec.rotation else max(a)


def warp_stays_inside(spec: AugmentSpec) -> bool:
    """True when every bilinear tap of every warp reads pixels of the image, so zero fill and clamped
    borders give the same views and the CPU path needs no zero-bordered copy of the records.
    A source point p reads pixels floor(p - 1/2) and the next (weight 0 at p = D - 1/2): inside while
    1/2 <= p <= D - 1/2 on both axes. Exact without rotation; with rotation exact for square images."""
    limits = [d / 2.0 - 0.5 + 1e-9 for d in spec.in_hw]
    if spec.rotation:
        return warp_reach(spec) <= min(limits)
    return all(a <= lim for a, lim in zip(_warp_half_widths(spec), limits, strict=True))


class NoiseTable:
    """A per-(seed, epoch, rank) table of standard normals; each noise field is a contiguous slice.

    DALI's CPU normal generator (and NumPy's, ~300 us per 64x64x5 field on the reference core) would
    dominate the CPU pipeline, so fields are slices at random offsets of a table drawn once per epoch
    (~60 ms for 4 Mi values). Every field is exactly standard normal and i.i.d. within itself; the two
    views of a sample read disjoint halves of the table, so a positive pair never shares noise.
    ``augment.noise_method=fresh`` draws fresh normals instead.
    """

    def __init__(self, spec: AugmentSpec, seed: int, epoch: int, rank: int) -> None:
        self.spec = spec
        self.key = (seed, epoch, rank)
        self.table = generator(seed, StreamTag.NOISE_TABLE, epoch, rank).standard_normal(spec.noise_table_size, dtype=np.float32)

    def fields(self, offsets: np.ndarray, batch: int, view: int) -> list[np.ndarray]:
        """Per-sample (S, S, C) standard-normal fields, zero-copy views for the table method."""
        s, c, n = self.spec.crop, self.spec.bands, self.spec.field_size
        if self.spec.noise_method == "fresh":
            seed, epoch, rank = self.key
            rng = generator(seed, StreamTag.FRESH_NOISE, epoch, rank, batch, view)
            return list(rng.standard_normal((len(offsets), s, s, c), dtype=np.float32))
        return [self.table[o : o + n].reshape(s, s, c) for o in offsets]
