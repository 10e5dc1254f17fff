"""The loader pipelines, each described once; every other augment module reads this table.

A pipeline is one row of ``PIPELINES``: how many views of a sample it makes, whether it trains (a
new shuffle every epoch, drop-last) or evaluates (in order, padded, every sample exactly once),
which samples it may use, which augmentations it may apply (each still switched by its
``augment.*`` key), which ``augment.*`` switch dereddens by the galaxy's own SFD E(B-V), and the
keys of its batches. A new pipeline (e.g. test-time augmentation for prediction) is one more row.
The pipeline table of docs/augmentations.md is ``markdown_table()``, its survey table ``survey_table()`` (tests
check both).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from photoz_hpc.config import AugmentConfig
from photoz_hpc.errors import ConfigError
from photoz_hpc.survey import RedshiftGrid, shipped_surveys

#: The augmentations, in the order docs/augmentations.md lists them (the warp and the flux factor commute).
AUGMENTATIONS = ("reddening", "rotation", "jitter", "noise")


def _z_bin(z: np.ndarray, grid: RedshiftGrid) -> np.ndarray:
    return grid.bins(z)


def _redshift(z: np.ndarray, grid: RedshiftGrid) -> np.ndarray:
    return z.astype(np.float32)


#: Each label key and how it is computed from the samples' spectroscopic redshifts and the model's redshift grid.
LABELS = {"z_bin": _z_bin, "redshift": _redshift}

#: What each batch key holds (B: per-rank batch, C: the dataset's bands, S: ``augment.crop_size``).
KEYS = {
    "view1": "(B, C, S, S) float32: the query view",
    "view2": "(B, C, S, S) float32: the key view, augmented independently",
    "image": "(B, C, S, S) float32",
    "z_bin": "(B,) int64: redshift bin on the model's grid (`finetune.n_z_bins` bins over [`finetune.z_min`, "
             "`finetune.z_max`); default the survey's, SDSS 180 over [0, 0.4))",
    "redshift": "(B,) float32: spectroscopic redshift",
    "index": "(B,) int64, on the host: dataset rows (of `ds.meta`); -1 on padding rows",
    "valid": "(B,) bool, on the host: False on padding rows",
}


@dataclass(frozen=True)
class Pipeline:
    """One loader pipeline: views, sampling, the augmentations it may apply and its batch keys."""

    name: str
    n_views: int
    training: bool  # True: shuffled per epoch, drop-last; False: in order, padded, every sample once
    labeled_only: bool  # True: only samples with a spectroscopic redshift
    augmentations: tuple[str, ...]  # which of AUGMENTATIONS it may apply
    deredden_switch: str  # the AugmentConfig field that switches dereddening by the galaxy's own E(B-V)
    view_keys: tuple[str, ...]
    label_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        switches = {f.name for f in dataclasses.fields(AugmentConfig)}
        problems = []
        if len(self.view_keys) != self.n_views:
            problems.append(f"{len(self.view_keys)} view keys for {self.n_views} views")
        if not set(self.augmentations) <= set(AUGMENTATIONS):
            problems.append(f"unknown augmentations {sorted(set(self.augmentations) - set(AUGMENTATIONS))}")
        if self.deredden_switch not in switches:
            problems.append(f"augment.{self.deredden_switch} is not an AugmentConfig field")
        if not set(self.label_keys) <= set(LABELS):
            problems.append(f"unknown label keys {sorted(set(self.label_keys) - set(LABELS))}")
        if self.label_keys and not self.labeled_only:
            problems.append("labels need labeled_only")
        if not set(self.keys) <= set(KEYS):
            problems.append(f"keys without a description in KEYS {sorted(set(self.keys) - set(KEYS))}")
        if problems:
            raise ValueError(f"pipeline '{self.name}': " + "; ".join(problems))

    def allows(self, augmentation: str) -> bool:
        return augmentation in self.augmentations

    @property
    def keys(self) -> tuple[str, ...]:
        """The batch keys, in order: views, labels, ``index``, and ``valid`` when padded."""
        return (*self.view_keys, *self.label_keys, "index") + (() if self.training else ("valid",))


PIPELINES: dict[str, Pipeline] = {
    p.name: p
    for p in (
        Pipeline("pretrain", 2, training=True, labeled_only=False, augmentations=AUGMENTATIONS,
                 deredden_switch="pretrain_deredden", view_keys=("view1", "view2")),
        Pipeline("finetune", 1, training=True, labeled_only=True, augmentations=("rotation", "jitter"),
                 deredden_switch="deredden", view_keys=("image",), label_keys=("z_bin", "redshift")),
        Pipeline("eval", 1, training=False, labeled_only=False, augmentations=(),
                 deredden_switch="deredden", view_keys=("image",)),
    )
}


def get_pipeline(pipeline: str | Pipeline) -> Pipeline:
    """The table row of a pipeline name (a ``Pipeline`` is returned as it is)."""
    if isinstance(pipeline, Pipeline):
        return pipeline
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline '{pipeline}' (choose one of {list(PIPELINES)})")
    return PIPELINES[pipeline]


def markdown_table() -> str:
    """The pipeline and batch-key tables of docs/augmentations.md, generated from ``PIPELINES``."""
    defaults = AugmentConfig()
    rows = [
        "| pipeline | views | order | samples | augmentations | dereddening | batch keys |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in PIPELINES.values():
        switch = f"`augment.{p.deredden_switch}` ({'on' if getattr(defaults, p.deredden_switch) else 'off'})"
        rows.append(" | ".join([
            f"| `{p.name}`", str(p.n_views),
            "shuffled per epoch, drop-last" if p.training else "in order, padded, every sample once",
            "labeled" if p.labeled_only else "all",
            ", ".join(p.augmentations) or "none", switch,
            ", ".join(f"`{k}`" for k in p.keys) + " |",
        ]))
    rows += ["", "| key | holds |", "|---|---|"]
    rows += [f"| `{key}` | {text} |" for key, text in KEYS.items()]
    return "\n".join(rows)


def survey_table() -> str:
    """The per-survey table of docs/augmentations.md: the default crop and jitter of every shipped survey description
    (configs/surveys/*.yaml) in pixels and arcsec; the extinction vectors are docs/surveys.md's table."""
    rows = ["| survey | bands | pixel | cutout | crop | jitter |", "|---|---|---|---|---|---|"]
    for s in shipped_surveys():
        arcsec = s.pixel_scale
        rows.append(
            f"| `{s.name}` | {' '.join(s.bands)} | {arcsec:g}\" | {s.cutout_size} px ({s.cutout_size * arcsec:.1f}\") "
            f"| {s.crop_size} px ({s.crop_size * arcsec:.1f}\") | +-{s.jitter_max} px (+-{s.jitter_max * arcsec:.1f}\") |"
        )
    return "\n".join(rows)


if __name__ == "__main__":  # python -m photoz_hpc.augment.pipelines: the tables for docs/augmentations.md
    print(markdown_table())
    print()
    print(survey_table())
