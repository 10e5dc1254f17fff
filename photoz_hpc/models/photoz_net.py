"""The photo-z network: the ResNet trunk up to its global average pool, then one linear layer to the
bins of the model's redshift grid (``RedshiftGrid``). Same network for self-supervised fine-tuning, the
supervised baseline and the linear probe; only the initialisation and which parameters train differ.

The grid and the survey (the trunk's bands) belong to the model: a saved model records both, and its loader
rebuilds stem and head from them (``models.records``; a file that records none is SDSS, 180 bins on [0, 0.4)).
"""

from __future__ import annotations

import torch
from torch import nn

from photoz_hpc.models.records import default_survey, grid_record, recorded_grid, recorded_survey, survey_record
from photoz_hpc.models.resnet import ResNet, build_encoder
from photoz_hpc.survey import RedshiftGrid, Survey
from photoz_hpc.torch_files import read_torch_file, write_torch_file


class PhotoZNet(nn.Module):
    """``forward`` returns logits (B, grid.n_bins); ``encoder`` is the trunk, ``head`` the classifier over ``grid``."""

    def __init__(self, encoder: ResNet, grid: RedshiftGrid) -> None:
        super().__init__()
        self.encoder = encoder
        self.grid = grid
        self.head = nn.Linear(encoder.feature_dim, grid.n_bins)
        self.register_buffer("z_centres", torch.as_tensor(grid.centres(), dtype=torch.float32), persistent=False)

    @property
    def survey(self) -> Survey:
        """The survey whose bands the trunk reads (the default survey for a bare ``ResNet``)."""
        return self.encoder.survey or default_survey()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    @staticmethod
    def point_estimate(probs: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """z_phot = E[z] = sum_k p_k c_k over bin centres (see ``RedshiftGrid``)."""
        return probs.float() @ centres.to(probs.device).float()


def build_photoz_net(model_cfg, survey: Survey | None = None, grid: RedshiftGrid | None = None) -> PhotoZNet:
    """A freshly initialised PhotoZNet from a ``ModelConfig`` (arch, width, stem_kernel) for data of ``survey``
    (None: the default survey, SDSS) over ``grid`` (None: the survey's grid)."""
    encoder = build_encoder(model_cfg, survey=survey)
    return PhotoZNet(encoder, grid or encoder.survey.redshift_grid)


#: Stand-alone photo-z model file (what ``finetune`` exports and ``import-checkpoint`` writes).
PHOTOZ_MODEL_FORMAT = "photoz-hpc/photoz-model/1"


def save_photoz_model(net: PhotoZNet, model_cfg, out_path, extra: dict | None = None):
    """Write ``{'format', 'model' (ModelConfig dict), 'n_bins', 'survey', 'redshift_grid', 'state_dict', ...extra}``
    atomically, every tensor on the CPU and contiguous so the file loads on any machine (plain data: ``torch_files``).
    """
    import dataclasses

    cfg = dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    return write_torch_file(out_path, {"format": PHOTOZ_MODEL_FORMAT, "model": cfg, "n_bins": net.head.out_features,
                                       "state_dict": state, **(extra or {}),
                                       **survey_record(net.survey), **grid_record(net.grid)})  # the network's own


def load_photoz_model(path, map_location="cpu") -> tuple[PhotoZNet, dict]:
    """(network in eval mode, the file's dict) from a ``save_photoz_model`` file; clear errors otherwise."""
    return photoz_model_from_blob(read_torch_file(path, "photo-z model file", map_location), path)


def photoz_model_from_blob(blob, path) -> tuple[PhotoZNet, dict]:
    """``load_photoz_model`` on a blob already read from ``path``: the stem built for the recorded bands, the head
    for the recorded grid (none recorded: SDSS ugriz and the paper's 180 bins)."""
    from types import SimpleNamespace

    from photoz_hpc.errors import PhotozError

    if not isinstance(blob, dict) or blob.get("format") != PHOTOZ_MODEL_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise PhotozError(f"{path} is not a photoz-hpc photo-z model (format {found!r}, expected {PHOTOZ_MODEL_FORMAT!r})")
    survey = recorded_survey(blob, str(path))
    grid = recorded_grid(blob, str(path), int(blob["n_bins"]))
    net = PhotoZNet(build_encoder(SimpleNamespace(**blob["model"]), survey=survey), grid)
    try:
        net.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise PhotozError(f"{path}: the weights do not fit a {blob['model']} network for bands {list(survey.bands)} "
                          f"and {grid.n_bins} redshift bins ({exc})") from None
    return net.eval(), blob
