"""What ``prepare`` reads: release-layout files (SDSS, Pasquet et al.) or Multimodal Universe image samples.

``resolve_inputs`` validates every file, settles the survey the store will record (release layout: SDSS, or the
``--survey`` description; MMU: the description whose ``band_labels`` and ``pixel_scale`` match the files'
``image_band`` and ``image_scale``), the kept bands (``--bands``), the record metadata dtype, where E(B-V) and the
redshift labels come from. The result reads rows as the store wants them; every rank computes the same one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from photoz_hpc import mmu_layout as L
from photoz_hpc.data import format as store_format
from photoz_hpc.data.hdf5_source import SourceFile, bad_rows, open_h5, read_rows, validate_source
from photoz_hpc.data.labels import LabelTable, clean_redshift, join_report, read_labels
from photoz_hpc.data.mmu_source import MMUFile, read_columns, read_ids, validate_mmu
from photoz_hpc.errors import InputDataError, PhotozError
from photoz_hpc.survey import Survey, load_survey, shipped_surveys, spec_to_dict, survey_from_dict

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
MASK_POLICY = ("pixels are stored exactly as in image_array; image_mask and image_ivar are not applied "
               "(NaN/inf pixels are bad rows: --bad-rows)")


@dataclass(frozen=True)
class PrepareOptions:
    """The ``prepare`` flags that decide what is read: ``survey`` (a name or file, None: from the files),
    ``bands`` (a subset in this order, None: all), and for MMU input ``no_extinction`` and ``labels``; and how it is
    stored: ``dtype``, the records' ``float32`` (bit copies, the default) or ``float16`` (``data.record_dtype``)."""

    survey: str | None = None
    bands: tuple[str, ...] | None = None
    no_extinction: bool = False
    labels: str | None = None
    redshift_key: str = "z_spec"
    dtype: str = "float32"


@dataclass
class StoreInput:
    """The validated inputs and how their rows become records."""

    layout: str  # "release" or "mmu"
    sources: list[Any]  # SourceFile (release) or MMUFile
    survey: Survey  # the stored bands, in the stored order
    meta_dtype: np.dtype
    shape: tuple[int, int, int]  # (H, W, bands)
    channels: list[int] | None  # file channels kept, in stored order (None: all, as stored)
    extinction: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # per MMU source: (mode, columns)
    labels: LabelTable | None = None
    manifest: dict[str, Any] = field(default_factory=dict)  # layout-specific manifest keys
    options: dict[str, Any] = field(default_factory=dict)  # what a resumed prepare must agree on
    notes: list[tuple[int, str]] = field(default_factory=list)  # (logging level, message): rank 0 logs them

    def read(self, f: int, start: int, stop: int, fh) -> dict[str, np.ndarray]:
        """Rows [start, stop) of source ``f``: ``images`` (n, bands, H, W) float32 and the metadata fields."""
        src = self.sources[f]
        if self.layout == "release":
            rows = read_rows(src, start, stop, fh)
            if self.channels is not None:
                rows["images"] = rows["images"][:, self.channels]
                rows["e_bv"] = rows["e_bv"][:, self.channels]
            return rows
        cols = read_columns(src, fh, start, stop, self.channels, self.extinction[f][1])
        ids = read_ids(src, fh, start, stop, self.meta_dtype[store_format.MMU_ID_FIELD].itemsize // 4
                       if src.id_kind == "str" else None)
        n = stop - start
        mode = self.extinction[f][0]
        if mode == "ebv":
            ebv = cols["extinction"][:, 0]
            e_bv = ebv[:, None] * self.survey.reddening_vector
        elif mode == "per_band":
            e_bv = cols["extinction"]
            ebv = self.survey.sfd_ebv(e_bv)
        else:
            ebv, e_bv = np.zeros(n), np.zeros((n, self.survey.n_bands))
        z = self.labels.lookup(ids) if self.labels is not None else cols["z_spec"]
        return {
            "images": cols["images"], "specz_redshift": clean_redshift(z), "specz_redshift_err": np.full(n, np.nan),
            "e_bv": e_bv, "ebv_sfd": ebv, "ra": cols["ra"], "dec": cols["dec"], store_format.MMU_ID_FIELD: ids,
        }

    def bad(self, f: int, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Rows with NaN/inf pixels or metadata (MMU: a missing redshift is 'unlabeled', not bad)."""
        if self.layout == "release":
            return bad_rows(self.sources[f], rows)
        images = rows["images"]
        bad_pix = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        bad_meta = (~np.isfinite(rows["e_bv"]).all(axis=1) | ~np.isfinite(rows["ebv_sfd"])
                    | ~np.isfinite(rows["ra"]) | ~np.isfinite(rows["dec"]))
        mask = bad_pix | bad_meta
        return mask, ["NaN/inf pixels" if bad_pix[i] else "NaN/inf metadata" for i in np.flatnonzero(mask)]


def expand_inputs(inputs: list[str | os.PathLike]) -> list[str]:
    """Files as given; a directory stands for every HDF5 file below it (MMU ``<sample>/healpix=N/*.hdf5``), sorted."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES
                           and not p.name.startswith("."))
            if not found:
                raise InputDataError(f"{path}: directory holds no HDF5 files ({', '.join(HDF5_SUFFIXES)})")
            out += found
        else:
            out.append(str(item))
    return out


def detect_layout(path: str) -> str:
    """``mmu`` if the file has Multimodal Universe image keys, else ``release`` (whose checks name what is missing)."""
    with open_h5(path) as fh:
        return "mmu" if (L.IMAGE_ARRAY in fh or L.IMAGE_BAND in fh) else "release"


def resolve_inputs(inputs: list[str | os.PathLike], options: PrepareOptions | None = None) -> StoreInput:
    """Validate the inputs (files or directories) and settle survey, bands, metadata, extinction and labels."""
    options = options or PrepareOptions()
    paths = expand_inputs(inputs)
    layouts = {p: detect_layout(p) for p in paths}
    kinds = sorted(set(layouts.values()))
    if len(kinds) > 1:
        first = {k: next(p for p in paths if layouts[p] == k) for k in kinds}
        raise InputDataError(f"inputs mix the release layout ({first['release']}) and Multimodal Universe files "
                             f"({first['mmu']}); prepare one kind at a time")
    if kinds == ["mmu"]:
        return _resolve_mmu(paths, options)
    if options.labels or options.no_extinction:
        raise PhotozError("--labels and --no-extinction apply to Multimodal Universe input; release-layout files "
                          "carry their own labels and e_bv")
    return _resolve_release(paths, options)


def _with_cutout(survey: Survey, height: int, width: int, notes: list[tuple[int, str]]) -> Survey:
    """The survey as stored: ``cutout_size`` is the images' side (a default view that does not fit is shrunk, logged)."""
    side = min(height, width)
    if side == survey.cutout_size:
        return survey
    values = spec_to_dict(survey.spec)
    values["cutout_size"] = side
    crop, jitter = values["crop_size"], values["jitter_max"]
    if crop + 2 * jitter > side:  # the survey's default view must fit these cutouts: both shrunk in proportion
        crop = max(1, crop * side // (crop + 2 * jitter))
        jitter = min(jitter, (side - crop) // 2)
        notes.append((logging.WARNING, f"survey '{survey.name}': the default crop {values['crop_size']} + 2 x jitter "
                      f"{values['jitter_max']} exceeds the {side} px cutouts; recorded as crop {crop}, jitter {jitter}"))
        values["crop_size"], values["jitter_max"] = crop, jitter
    return survey_from_dict(values, f"survey '{survey.name}' with {side} px cutouts")


def _subset(survey: Survey, stored_bands: list[str], bands: tuple[str, ...] | None) -> tuple[Survey, list[int] | None]:
    """The survey of the kept bands and the file channels that hold them (None: all, in order)."""
    if bands is None:
        return survey, None
    missing = [b for b in bands if b not in stored_bands]
    if missing:
        raise PhotozError(f"--bands {','.join(bands)}: the inputs have no band(s) {missing} (they have {stored_bands})")
    kept = survey.subset(list(bands))
    channels = [stored_bands.index(b) for b in bands]
    return kept, (None if channels == list(range(len(stored_bands))) else channels)


def _resolve_release(paths: list[str], options: PrepareOptions) -> StoreInput:
    survey = load_survey(options.survey) if options.survey else load_survey("sdss")
    if survey.input_extinction != "per_band":
        raise PhotozError(f"survey '{survey.name}': release-layout e_bv holds per-band extinctions, but its "
                          "extinction_input.kind is 'ebv'")
    sources: list[SourceFile] = [validate_source(p, survey.n_bands) for p in paths]
    shapes = {(s.height, s.width) for s in sources}
    if len(shapes) != 1:
        raise InputDataError(f"inputs have different image sizes {sorted(shapes)}: {[s.path for s in sources]}")
    height, width = shapes.pop()
    kept, channels = _subset(survey, list(survey.bands), options.bands)
    notes: list[tuple[int, str]] = []
    kept = _with_cutout(kept, height, width, notes)
    manifest = {"r_dr12": list(kept.input_coefficients)}  # the coefficients the release's e_bv were made with
    return StoreInput("release", sources, kept, store_format.meta_dtype(kept.n_bands), (height, width, kept.n_bands),
                      channels, manifest=manifest, options=_options(options, kept), notes=notes)


def _options(options: PrepareOptions, survey: Survey) -> dict[str, Any]:
    return {"survey": survey.to_dict(), "bands": list(survey.bands), "no_extinction": options.no_extinction}


def _match(sources: list[MMUFile], wanted: str | None) -> tuple[Survey, list[str]]:
    """The survey description of the files' ``image_band`` and ``image_scale``, and their band names."""
    first = sources[0]
    for src in sources[1:]:
        if src.labels != first.labels:
            raise InputDataError(f"{src.path}: image_band {list(src.labels)} differs from {first.path}'s "
                                 f"{list(first.labels)}; prepare files of one band list together")
        if (src.height, src.width) != (first.height, first.width):
            raise InputDataError(f"{src.path}: {src.height}x{src.width} px cutouts, {first.path} has "
                                 f"{first.height}x{first.width}")
        if abs(src.scale_max - first.scale_min) > L.SCALE_TOLERANCE or abs(src.scale_min - first.scale_max) > L.SCALE_TOLERANCE:
            raise InputDataError(f"{src.path}: image_scale {src.scale_min:g}..{src.scale_max:g} arcsec/px differs "
                                 f"from {first.path}'s {first.scale_min:g}..{first.scale_max:g}")
        if src.id_kind != first.id_kind:
            raise InputDataError(f"{src.path}: object_id are {src.id_kind}s, {first.path}'s are {first.id_kind}s")
    if first.scale_max - first.scale_min > L.SCALE_TOLERANCE:
        raise InputDataError(f"{first.path}: image_scale varies ({first.scale_min:g}..{first.scale_max:g} arcsec/px)")
    labels, scale = list(first.labels), first.scale_min
    candidates = [load_survey(wanted)] if wanted else shipped_surveys()
    matches = L.match_survey(labels, scale, candidates)
    if not matches:
        if wanted:
            s = candidates[0]
            raise InputDataError(f"{first.path}: image_band {labels} at {scale:g} arcsec/px does not match survey "
                                 f"'{s.name}' (band_labels {list(s.band_labels)}, pixel_scale {s.pixel_scale:g})")
        raise InputDataError(f"{first.path}: image_band {labels} at {scale:g} arcsec/px matches no shipped survey "
                             f"({', '.join(f'{s.name}: {list(s.band_labels)} at {s.pixel_scale:g}' for s in candidates)}); "
                             "describe the survey in a YAML file and pass --survey FILE")
    if len(matches) > 1:
        raise InputDataError(f"{first.path}: image_band {labels} matches surveys {[s.name for s, _ in matches]}; "
                             "choose one with --survey")
    survey, bands = matches[0]
    return survey.subset(bands), bands


def _extinction(src: MMUFile, survey: Survey, no_extinction: bool) -> tuple[str, tuple[str, ...]]:
    """Where a file's E(B-V) comes from: ``ebv`` (EBV/ebv column), ``per_band`` (a_<band>) or ``none``."""
    if no_extinction:
        return "none", ()
    if src.ebv_key:
        return "ebv", (src.ebv_key,)
    keys = tuple(L.extinction_key(b) for b in survey.bands)
    if all(k in src.extinction_keys for k in keys):
        if survey.input_extinction != "per_band":
            raise InputDataError(f"{src.path}: carries per-band extinctions {list(keys)} but survey '{survey.name}' "
                                 "reads E(B-V) directly (extinction_input.kind 'ebv')")
        return "per_band", keys
    raise InputDataError(f"{src.path}: no Galactic extinction: neither {' nor '.join(L.EBV_KEYS)} nor "
                         f"{list(keys)}; pass --no-extinction to store E(B-V) = 0")


def _resolve_mmu(paths: list[str], options: PrepareOptions) -> StoreInput:
    sources = [validate_mmu(p) for p in paths]
    file_survey, file_bands = _match(sources, options.survey)
    kept, channels = _subset(file_survey, file_bands, options.bands)
    notes: list[tuple[int, str]] = []
    kept = _with_cutout(kept, sources[0].height, sources[0].width, notes)
    extinction = [_extinction(s, kept, options.no_extinction) for s in sources]
    if options.no_extinction:
        ignored = sorted({str(s.path) for s in sources if s.ebv_key or s.extinction_keys})
        if ignored:
            notes.append((logging.WARNING, f"--no-extinction: E(B-V) = 0 is stored although {ignored[:3]}"
                          f"{' ...' if len(ignored) > 3 else ''} carry extinctions"))

    id_kind = sources[0].id_kind
    all_ids, owner = [], []
    for f, src in enumerate(sources):
        with open_h5(src.path) as fh:
            all_ids.append(read_ids(src, fh, width=max(s.id_width for s in sources)))
        owner.append(np.full(src.rows, f))
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
    owners = np.concatenate(owner)
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(dup):
        a, b = order[dup[0]], order[dup[0] + 1]
        raise InputDataError(f"object_id {ids[a]!s} occurs twice ({sources[owners[a]].path} and "
                             f"{sources[owners[b]].path}): ids must name one galaxy each")
    width = max([s.id_width for s in sources] + [1])
    labels, report = None, None
    if options.labels:
        labels = read_labels(options.labels, options.redshift_key, id_kind, width)
        report = join_report(labels, ids)
        if any(s.has_z_spec for s in sources):
            notes.append((logging.INFO, f"--labels {labels.path} replaces the files' z_spec column"))
        if report["not_in_images"]:
            notes.append((logging.WARNING, f"labels: {report['not_in_images']} of {report['rows']} ids in {labels.path} "
                          f"have no image (e.g. {report['not_in_images_examples'][:3]}); they are not in the store"))
        notes.append((logging.INFO, f"labels: {report['labeled_images']} of {len(ids)} images have a redshift "
                      f"from {labels.path}"))
    id_dtype = np.dtype(np.int64) if id_kind == "int" else np.dtype(f"<U{width}")
    label_source = ("labels file" if labels is not None else
                    "z_spec column" if all(s.has_z_spec for s in sources) else
                    "z_spec column (some files)" if any(s.has_z_spec for s in sources) else "none")
    ext_names = {"ebv": "EBV column", "per_band": "per-band a_<band> / extinction_input.coefficients",
                 "none": "none (--no-extinction: E(B-V) = 0)"}
    manifest = {
        "mmu": {
            "image_band": L.labels_of(kept),
            "pixel_scale": sources[0].scale_min,
            "has_ivar": [s.has_ivar for s in sources],
            "has_mask": [s.has_mask for s in sources],
            "mask_policy": MASK_POLICY,
            "extinction": [{"source": ext_names[m], "columns": list(k)} for m, k in extinction],
            "no_extinction": options.no_extinction,
            "redshift_labels": label_source,
            "labels": report,
        }
    }
    opts = _options(options, kept)
    opts["labels"] = labels.fingerprint() if labels is not None else None
    return StoreInput("mmu", sources, kept, store_format.meta_dtype(kept.n_bands, id_dtype),
                      (sources[0].height, sources[0].width, kept.n_bands), channels, extinction, labels, manifest, opts,
                      notes)


__all__ = ["PrepareOptions", "StoreInput", "detect_layout", "expand_inputs", "resolve_inputs"]
