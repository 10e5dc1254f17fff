"""What every command that runs a trained photo-z network over prepared data checks first (evaluate, predict,
calibrate): the data has the network's bands, in its order, and cutouts that hold its crop.

Why here: ``catalogue`` (predict) and ``calibration`` (calibrate) both need it; kept in its own module so
neither imports the other. Every check reads manifests only, before any loader is built or file written;
errors name the dataset directory, and a band mismatch both band lists (``Survey.check_same_bands``).
"""

from __future__ import annotations

from pathlib import Path

from photoz_hpc.data.dataset import ShardedDataset, open_dataset, read_manifest
from photoz_hpc.errors import DatasetError, PhotozError
from photoz_hpc.models.records import check_bands
from photoz_hpc.survey import survey_of_manifest


def check_inputs(net, cfg, paths: list[str | Path], what: str = "the network") -> list[ShardedDataset]:
    """Open every input and check it against ``net`` (a ``PhotoZNet``; ``what`` names it in errors) before any
    work: the bands of its survey (the stem's input channels) and images that hold the network's
    ``augment.crop_size`` crop (``cfg`` resolved: a number). Errors name the directory."""
    if not paths:
        raise PhotozError("no input dataset given (--data DIR [DIR ...])")
    survey = net.survey
    channels = net.encoder.conv1.in_channels
    crop = cfg.augment.crop_size
    out = []
    for path in paths:
        manifest = read_manifest(path)
        shape = manifest.get("image_shape")
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3):
            raise DatasetError(f"{path}: manifest image_shape must be [H, W, C], got {shape!r}")
        check_bands(survey, what, survey_of_manifest(manifest, str(path)), f"dataset {path}")
        h, w, c = (int(v) for v in shape)
        if c != channels:
            raise DatasetError(f"{path}: images have {c} bands but the network takes {channels} "
                               f"({' '.join(survey.bands)}); this dataset was not made for this model")
        if crop is not None and min(h, w) < crop:
            raise DatasetError(f"{path}: images are {h}x{w} pixels but the network was trained on {crop}x{crop} "
                               f"centre crops (augment.crop_size={crop}); they need at least {crop}x{crop}")
        out.append(open_dataset(path))
    return out
