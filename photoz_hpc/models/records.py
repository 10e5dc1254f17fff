"""What a model file records about the data it was made for: the survey (its bands) and the redshift grid.

Why: a network is only meaningful on data of the bands it was trained on, in their order, and its pdfs only
on its own redshift grid. So MoCo checkpoints, ``encoder.pt``, fine-tuning checkpoints and photo-z model files
carry ``"survey"`` (``Survey.to_dict()``) and photo-z models ``"redshift_grid"`` (``RedshiftGrid.to_dict()``);
every loader rebuilds the stem and the head from them. A file written before they were recorded (no key) was
SDSS with the paper's 180-bin grid: that is what it means. Plain dicts of strings and numbers: weights_only-safe.
"""

from __future__ import annotations

from typing import Any

from photoz_hpc.errors import PhotozError
from photoz_hpc.survey import (
    SDSS_GRID,
    RedshiftGrid,
    Survey,
    default_survey,
    survey_from_dict,
)

SURVEY_KEY, GRID_KEY = "survey", "redshift_grid"


def recorded_survey(blob: dict[str, Any], where: str) -> Survey:
    """The survey a loaded model file or checkpoint records (none recorded: SDSS)."""
    values = blob.get(SURVEY_KEY)
    if values is None:
        return default_survey()
    return survey_from_dict(values, f"{where}: recorded '{SURVEY_KEY}'")


def recorded_grid(blob: dict[str, Any], where: str, n_bins: int | None = None) -> RedshiftGrid:
    """The redshift grid a photo-z model file or fine-tuning checkpoint records (none: the paper's 180 bins over
    [0, 0.4)); ``n_bins``, when the file also states its head's size, must agree with it."""
    values = blob.get(GRID_KEY)
    grid = SDSS_GRID if values is None else RedshiftGrid.from_dict(values, f"{where}: recorded '{GRID_KEY}'")
    if n_bins is not None and int(n_bins) != grid.n_bins:
        said = "records no redshift grid (so the paper's" if values is None else "records a redshift grid of"
        raise PhotozError(f"{where}: its head has {n_bins} bins but the file {said} {grid.n_bins} bins over "
                          f"[{grid.z_min}, {grid.z_max}){')' if values is None else ''}")
    return grid


def survey_record(survey: Survey) -> dict[str, Any]:
    """``{"survey": ...}`` to store in a model file or checkpoint."""
    return {SURVEY_KEY: survey.to_dict()}


def grid_record(grid: RedshiftGrid) -> dict[str, Any]:
    """``{"redshift_grid": ...}`` to store in a photo-z model file or fine-tuning checkpoint."""
    return {GRID_KEY: grid.to_dict()}


def check_bands(model: Survey, what: str, data: Survey, where: str) -> None:
    """A model (``what``, e.g. the file) used on data (``where``) of other bands is a ``PhotozError`` naming both
    band lists and surveys; callers check before building loaders or writing anything."""
    model.check_same_bands(data, what, where)
