"""The survey a run trains on, and the run's config resolved for it before anything is saved.

Why: the survey travels with the data (the manifest records it) and from there into the model, so the stem
reads the data's bands and the head predicts the model's redshift grid. Config values left to the survey
(``augment.crop_size`` / ``jitter_max``, ``finetune.z_min`` / ``z_max`` / ``n_z_bins``: None) are resolved to
numbers once, at the start of a run, so ``config.yaml``, checkpoints and exported models record the numbers
used, and a resume compares numbers, not "the default of whatever data this is".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from photoz_hpc.augment.draws import resolve_augment
from photoz_hpc.data.dataset import read_manifest
from photoz_hpc.errors import ConfigError
from photoz_hpc.models.records import default_survey
from photoz_hpc.survey import RedshiftGrid, Survey, survey_of_manifest


def data_survey(path: str | Path) -> Survey:
    """The survey of the prepared dataset at ``path`` (its manifest; none recorded: SDSS)."""
    return survey_of_manifest(read_manifest(path), str(path))


def loader_survey(loader: Any, cfg) -> Survey:
    """The survey of a loader handed to a run (tests, wrappers): its dataset's, else that of ``cfg.data.path``,
    else the default survey (a synthetic loader of no dataset)."""
    dataset = getattr(getattr(loader, "source", None), "dataset", None)
    if dataset is not None and hasattr(dataset, "survey"):
        return dataset.survey
    if cfg.data.path and (Path(cfg.data.path) / "manifest.json").is_file():
        return data_survey(cfg.data.path)
    return default_survey()


def finetune_grid(ft, survey: Survey) -> RedshiftGrid:
    """The redshift grid ``finetune.z_min`` / ``z_max`` / ``n_z_bins`` ask for, each unset one the survey's
    (SDSS: 180 bins over [0, 0.4)); an invalid combination is a ``ConfigError`` naming the keys."""
    base = survey.redshift_grid
    z_min = base.z_min if ft.z_min is None else float(ft.z_min)
    z_max = base.z_max if ft.z_max is None else float(ft.z_max)
    n_bins = base.n_bins if ft.n_z_bins is None else int(ft.n_z_bins)
    try:
        return RedshiftGrid(z_min, z_max, n_bins)
    except ConfigError as exc:
        raise ConfigError(f"finetune.z_min / z_max / n_z_bins (unset ones from survey '{survey.name}', "
                          f"[{base.z_min}, {base.z_max}) in {base.n_bins} bins): {exc}") from None


def resolve_run_config(cfg, survey: Survey):
    """A copy of ``cfg`` with every survey default made concrete: ``augment`` (crop, jitter) and, for a
    fine-tuning config, the redshift grid (``finetune.z_min`` / ``z_max`` / ``n_z_bins``)."""
    out = dataclasses.replace(cfg, augment=resolve_augment(cfg.augment, survey))
    ft = getattr(cfg, "finetune", None)
    if ft is not None:
        grid = finetune_grid(ft, survey)
        out = dataclasses.replace(out, finetune=dataclasses.replace(ft, z_min=grid.z_min, z_max=grid.z_max,
                                                                    n_z_bins=grid.n_bins))
    return out

