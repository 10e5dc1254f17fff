"""What a survey is, defined once: bands, extinction coefficients, pixel grid, flux unit, redshift grid.

A survey is data: one small YAML file per survey (``configs/surveys/<name>.yaml``, shipped ``sdss``,
``legacy``, ``hsc``, ``lsst``), validated by the one config system into ``SurveySpec``. Wherever a survey
name is accepted a path to such a file is too. The description travels with the data (``prepare`` writes it
into ``manifest.json``) and with models (checkpoints record bands and redshift grid), so consumers read it
from there and never from module constants. See docs/surveys.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from photoz_hpc.config import _check_range, config_from_dict, packaged_config, read_yaml_mapping
from photoz_hpc.errors import ConfigError, PhotozError

DEFAULT_SURVEY = "sdss"
SHIPPED_SURVEYS = ("sdss", "legacy", "hsc", "lsst")


@dataclass(frozen=True)
class RedshiftGrid:
    """The classification grid of a photo-z head: ``n_bins`` equal bins over [z_min, z_max).

    The network predicts a probability per bin and ``z_phot = sum_k p_k c_k`` over the bin *centres*
    ``c_k`` (the Pasquet et al. 2019 code used left edges, biasing every estimate low by half a bin).
    Redshifts outside the grid go to the edge bins for training; they keep their true value in metrics.
    """

    z_min: float = 0.0
    z_max: float = 0.4
    n_bins: int = 180

    def __post_init__(self) -> None:
        if int(self.n_bins) != self.n_bins or self.n_bins < 2:
            raise ConfigError(f"redshift grid: n_bins = {self.n_bins!r} must be an integer >= 2")
        if not (np.isfinite(self.z_min) and np.isfinite(self.z_max)) or self.z_min < 0 or self.z_max <= self.z_min:
            raise ConfigError(f"redshift grid: need 0 <= z_min < z_max, got [{self.z_min}, {self.z_max})")

    def edges(self) -> np.ndarray:
        """Bin edges (``n_bins + 1`` values)."""
        return np.linspace(self.z_min, self.z_max, self.n_bins + 1)

    def centres(self) -> np.ndarray:
        """Bin centres: the support of every redshift pdf and of ``z_phot``."""
        e = self.edges()
        return 0.5 * (e[:-1] + e[1:])

    def bins(self, z: np.ndarray) -> np.ndarray:
        """Classification bin of each redshift (outside [z_min, z_max): the edge bins)."""
        return np.clip(np.searchsorted(self.edges(), z, side="right") - 1, 0, self.n_bins - 1).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"z_min": float(self.z_min), "z_max": float(self.z_max), "n_bins": int(self.n_bins)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "redshift grid") -> RedshiftGrid:
        try:
            z_min, z_max, n_bins = float(values["z_min"]), float(values["z_max"]), int(values["n_bins"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PhotozError(f"{where}: not a redshift grid ({values!r}): {exc}") from None
        return cls(z_min, z_max, n_bins)

    @classmethod
    def from_edges(cls, edges: np.ndarray, where: str = "redshift grid") -> RedshiftGrid:
        """The grid of equal bins with these edges (an error if they are not equal bins)."""
        edges = np.asarray(edges, dtype=np.float64)
        grid = cls(float(edges[0]), float(edges[-1]), len(edges) - 1)
        if not np.allclose(grid.edges(), edges, rtol=0, atol=1e-9):
            raise PhotozError(f"{where}: bin edges are not {len(edges) - 1} equal bins over [{edges[0]}, {edges[-1]})")
        return grid


#: The paper's grid (Hayat et al. 2021): 180 bins over [0, 0.4); the SDSS default.
SDSS_GRID = RedshiftGrid()


@dataclass
class GridSpec:
    """The ``redshift_grid`` section: the default grid of a photo-z head for this survey."""

    z_min: float = 0.0
    z_max: float = 0.4
    n_bins: int = 180


@dataclass
class ExtinctionInputSpec:
    """How the input catalogue gives each galaxy's Galactic extinction.

    ``per_band``: A_b magnitudes per band, made with ``coefficients`` (SFD E(B-V) = mean(A_b / coefficient));
    SDSS DR12's ``extinction_*`` columns use the DR12 coefficients, not SF11's. ``ebv``: SFD E(B-V) itself.
    """

    kind: Literal["per_band", "ebv"] = "per_band"
    coefficients: list[float] = field(default_factory=list)
    source: str = ""


@dataclass
class SyntheticSpec:
    """What the synthetic survey of this preset renders (photoz_hpc.sim; docs/synthetic_survey.md).

    ``filters``: speclite filter names in band order; ``psf_fwhm`` arcsec and ``depth`` (5-sigma point-source
    AB magnitude) per band; ``sky_mag`` (AB mag/arcsec^2) per band; selection ``mag_limit`` in ``select_band``.
    Empty lists: the preset has no synthetic survey.
    """

    filters: list[str] = field(default_factory=list)
    psf_fwhm: list[float] = field(default_factory=list)
    depth: list[float] = field(default_factory=list)
    sky_mag: list[float] = field(default_factory=list)
    select_band: str = "r"
    mag_limit: float = 17.77
    z_max: float = 0.4
    sources: list[str] = field(default_factory=list)


@dataclass
class SurveySpec:
    """One survey description file, validated (docs/surveys.md lists every key)."""

    name: str = ""
    description: str = ""
    bands: list[str] = field(default_factory=list)
    band_labels: list[str] = field(default_factory=list)  # Multimodal Universe ``image_band`` names
    default_bands: list[str] = field(default_factory=list)  # the bands synth renders; empty: all
    extinction_coefficients: list[float] = field(default_factory=list)  # A_b / E(B-V), SFD scale
    extinction_source: str = ""
    extinction_input: ExtinctionInputSpec = field(default_factory=ExtinctionInputSpec)
    # required (None: not given): a survey file must state its own pixel grid, unit and grid, never inherit SDSS's
    pixel_scale: float | None = None  # arcsec / pixel
    cutout_size: int | None = None  # native cutout side, pixels
    crop_size: int | None = None
    jitter_max: int | None = None
    flux_unit: str | None = None
    zeropoint: float | None = None  # AB magnitude of one flux unit
    rgb: list[str] = field(default_factory=list)  # bands shown as R, G, B in previews
    redshift_grid: GridSpec | None = None
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)

    def __post_init__(self) -> None:
        missing = [k for k in ("name", "bands", "band_labels", "extinction_coefficients", "extinction_source",
                               "pixel_scale", "cutout_size", "crop_size", "jitter_max", "flux_unit", "zeropoint",
                               "rgb", "redshift_grid") if getattr(self, k) in (None, "", [])]
        if missing:
            raise ConfigError(f"config key '{missing[0]}' must be set: a survey file states every fact itself (missing: {missing})")
        n = len(self.bands)
        if n < 1 or len(set(self.bands)) != n:
            raise ConfigError(f"config key 'bands' = {self.bands!r} must list distinct band names")
        for key in ("band_labels", "extinction_coefficients"):
            if len(getattr(self, key)) != n:
                raise ConfigError(f"config key '{key}' has {len(getattr(self, key))} entries, 'bands' has {n}")
        for key in ("default_bands", "rgb"):
            unknown = [b for b in getattr(self, key) if b not in self.bands]
            if unknown:
                raise ConfigError(f"config key '{key}' names bands {unknown} not in 'bands' {self.bands}")
        if len(self.rgb) != 3:
            raise ConfigError(f"config key 'rgb' must name 3 bands, got {self.rgb!r}")
        if self.extinction_input.kind == "per_band" and len(self.extinction_input.coefficients) != n:
            raise ConfigError(f"config key 'extinction_input.coefficients' must have one entry per band ({n})")
        _check_range("pixel_scale", self.pixel_scale, 1e-6)
        _check_range("cutout_size", self.cutout_size, 1)
        _check_range("crop_size", self.crop_size, 1, self.cutout_size)
        _check_range("jitter_max", self.jitter_max, 0)
        syn = self.synthetic
        for key in ("filters", "psf_fwhm", "depth", "sky_mag"):
            if getattr(syn, key) and len(getattr(syn, key)) != n:
                raise ConfigError(f"config key 'synthetic.{key}' must have one entry per band ({n})")


@dataclass(frozen=True)
class Survey:
    """A survey as every consumer uses it: a value passed down with the data and the model, never a global."""

    name: str
    bands: tuple[str, ...]
    band_labels: tuple[str, ...]
    extinction_coefficients: tuple[float, ...]  # A_b / E(B-V): reddening augmentation and dereddening
    input_extinction: str  # "per_band" or "ebv"
    input_coefficients: tuple[float, ...] | None  # for "per_band"
    pixel_scale: float
    cutout_size: int
    crop_size: int
    jitter_max: int
    flux_unit: str
    zeropoint: float
    rgb: tuple[str, str, str]
    redshift_grid: RedshiftGrid
    spec: SurveySpec = field(repr=False, compare=False)

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    @property
    def reddening_vector(self) -> np.ndarray:
        """A_b / E(B-V) per band as float64 (SDSS: SF11, exactly the paper's R_SF11)."""
        return np.asarray(self.extinction_coefficients, dtype=np.float64)

    def sfd_ebv(self, per_band: np.ndarray) -> np.ndarray:
        """SFD E(B-V) from per-band extinctions in the input's convention: mean(A_b / coefficient)."""
        if self.input_coefficients is None:
            raise PhotozError(f"survey '{self.name}': its input gives E(B-V) directly, not per-band extinctions")
        a = np.asarray(per_band, dtype=np.float64)
        return (a / np.asarray(self.input_coefficients, dtype=np.float64)).mean(axis=-1)

    def subset(self, bands: list[str] | tuple[str, ...]) -> Survey:
        """The same survey restricted to ``bands``, in the order given (``--bands g,r,z``)."""
        bands = list(bands)
        unknown = [b for b in bands if b not in self.bands]
        if unknown or not bands or len(set(bands)) != len(bands):
            raise PhotozError(f"survey '{self.name}': bands {bands} must be distinct bands of {list(self.bands)}")
        if tuple(bands) == self.bands:
            return self
        idx = [self.bands.index(b) for b in bands]
        values = spec_to_dict(self.spec)
        for key in ("band_labels", "extinction_coefficients"):
            values[key] = [values[key][i] for i in idx]
        if values["extinction_input"]["kind"] == "per_band":
            values["extinction_input"]["coefficients"] = [values["extinction_input"]["coefficients"][i] for i in idx]
        for key in ("filters", "psf_fwhm", "depth", "sky_mag"):
            if values["synthetic"][key]:
                values["synthetic"][key] = [values["synthetic"][key][i] for i in idx]
        values["bands"] = bands
        values["default_bands"] = [b for b in values["default_bands"] if b in bands]
        if any(b not in bands for b in values["rgb"]):  # a preview needs three of the kept bands
            values["rgb"] = _rgb_fallback(bands)
        return survey_from_dict(values, f"survey '{self.name}' restricted to {bands}")

    def to_dict(self) -> dict[str, Any]:
        """The full description, as recorded in manifests, checkpoints and model files."""
        return spec_to_dict(self.spec)

    def check_same_bands(self, other: Survey, what: str, where: str) -> None:
        """A model used on data of other bands is an error naming both band lists, raised before any work.

        Bands are compared by name and by filter (``band_labels``: ``hsc-g`` is not ``lsst-g``), in channel order, and
        the extinction coefficients too: data dereddened with another vector than the model's is refused."""
        if (self.bands, self.band_labels) == (other.bands, other.band_labels):
            if self.extinction_coefficients != other.extinction_coefficients:  # views dereddened by another vector
                raise PhotozError(
                    f"{what} was trained with extinction coefficients {list(self.extinction_coefficients)} (survey "
                    f"'{self.name}') but {where} has {list(other.extinction_coefficients)} (survey '{other.name}') for "
                    f"the same bands {list(self.bands)}: prepare the data with the model's survey description"
                )
            return
        mine, theirs = list(self.bands), list(other.bands)
        if mine == theirs:  # the same letters through other filters
            mine, theirs = list(self.band_labels), list(other.band_labels)
        raise PhotozError(
            f"{what} has bands {mine} (survey '{self.name}') but {where} has bands {theirs} (survey "
            f"'{other.name}'): a model only applies to data of the same bands, through the same filters, in the same order"
        )

def _rgb_fallback(bands: list[str]) -> list[str]:
    """Reddest, middle and bluest band (or repeats when fewer than three)."""
    picks = [bands[-1], bands[len(bands) // 2], bands[0]]
    return picks


#: What a model computed from: the keys of a description a resume must find unchanged (prose, sources and the
#: synthetic section may be edited without changing any trained number).
FACT_KEYS = ("bands", "band_labels", "extinction_coefficients", "pixel_scale", "zeropoint")


def survey_facts(values: dict[str, Any]) -> dict[str, Any]:
    """The facts of a recorded description (``Survey.to_dict()``): ``FACT_KEYS`` and the input extinction convention."""
    inp = values.get("extinction_input") or {}
    return {**{k: values.get(k) for k in FACT_KEYS},
            "extinction_input": {"kind": inp.get("kind"), "coefficients": inp.get("coefficients")}}


def spec_to_dict(spec: SurveySpec) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def _survey_from_spec(spec: SurveySpec) -> Survey:
    grid = RedshiftGrid.from_dict(dataclasses.asdict(spec.redshift_grid), f"survey '{spec.name}' redshift_grid")  # type: ignore[arg-type]
    inp = spec.extinction_input
    return Survey(
        name=spec.name,
        bands=tuple(spec.bands),
        band_labels=tuple(spec.band_labels),
        extinction_coefficients=tuple(float(c) for c in spec.extinction_coefficients),
        input_extinction=inp.kind,
        input_coefficients=tuple(float(c) for c in inp.coefficients) if inp.kind == "per_band" else None,
        pixel_scale=float(spec.pixel_scale),
        cutout_size=int(spec.cutout_size),
        crop_size=int(spec.crop_size),
        jitter_max=int(spec.jitter_max),
        flux_unit=spec.flux_unit,
        zeropoint=float(spec.zeropoint),
        rgb=tuple(spec.rgb),  # type: ignore[arg-type]
        redshift_grid=grid,
        spec=spec,
    )


def survey_from_dict(values: dict[str, Any], where: str) -> Survey:
    """Validate a description (parsed YAML, or the copy a manifest or checkpoint carries)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: a survey description must be a mapping, got {type(values).__name__}")
    try:
        return _survey_from_spec(config_from_dict(values, SurveySpec))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_survey(name_or_path: str | Path = DEFAULT_SURVEY) -> Survey:
    """A shipped survey by name (``sdss``, ``legacy``, ``hsc``, ``lsst``) or a description file by path."""
    text = str(name_or_path)
    if text in SHIPPED_SURVEYS:
        path = packaged_config(f"surveys/{text}.yaml")
    elif text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text)
    else:
        raise ConfigError(f"unknown survey '{text}': use one of {list(SHIPPED_SURVEYS)} or a path to a survey YAML file")
    return survey_from_dict(read_yaml_mapping(path), str(path))


@lru_cache(maxsize=1)
def default_survey() -> Survey:
    """SDSS: the default, and the survey of any file or dataset that records none (written before surveys existed)."""
    return load_survey(DEFAULT_SURVEY)


def shipped_surveys() -> list[Survey]:
    return [load_survey(name) for name in SHIPPED_SURVEYS]


def presets_table() -> str:
    """The table of docs/surveys.md: each shipped description's facts and sources (a test checks the docs hold it)."""
    rows = ["| survey | bands (channel order) | A_b / E(B-V), SFD scale | input extinction | pixel | cutout | "
            "flux unit (AB zero point) | redshift grid | sources |", "|---|---|---|---|---|---|---|---|---|"]
    for s in shipped_surveys():
        coeffs = ", ".join(f"{b} {c:g}" for b, c in zip(s.bands, s.extinction_coefficients, strict=True))
        if s.input_coefficients is None:
            given = "E(B-V)"
        elif s.input_coefficients == s.extinction_coefficients:
            given = "A_b with the same vector"
        else:
            given = "A_b with " + ", ".join(f"{c:g}" for c in s.input_coefficients)
        g = s.redshift_grid
        extra = f"; input: {s.spec.extinction_input.source}" if given.startswith("A_b with ") and "same" not in given else ""
        rows.append(f"| `{s.name}` | {' '.join(s.bands)} | {coeffs} | {given} | {s.pixel_scale:g}\" | "
                    f"{s.cutout_size} px | {s.flux_unit} ({s.zeropoint:g}) | {g.n_bins} bins over [{g.z_min:g}, "
                    f"{g.z_max:g}) | {s.spec.extinction_source}{extra} |")
    return "\n".join(rows)


def survey_of_manifest(manifest: dict[str, Any], where: str) -> Survey:
    """The survey a prepared dataset records; a manifest from before surveys existed is SDSS."""
    if "survey" not in manifest:
        return default_survey()
    return survey_from_dict(manifest["survey"], f"{where}: manifest 'survey'")


__all__ = [
    "DEFAULT_SURVEY", "SDSS_GRID", "SHIPPED_SURVEYS", "RedshiftGrid", "Survey", "SurveySpec", "default_survey", "load_survey",
    "presets_table", "shipped_surveys", "survey_from_dict", "survey_of_manifest",
]


if __name__ == "__main__":  # python -m photoz_hpc.survey: the presets table of docs/surveys.md
    print(presets_table())
