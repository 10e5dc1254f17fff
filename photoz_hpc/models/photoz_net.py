"""The photo-z network: the ResNet trunk up to its global average pool, then one linear layer to the
redshift bins (``redshift_grid``). Same network for self-supervised fine-tuning, the supervised
baseline and the linear probe; only the initialisation and which parameters train differ.
"""

from __future__ import annotations

import torch
from torch import nn

from photoz_hpc.models.resnet import ResNet, build_encoder
from photoz_hpc.redshift_grid import N_Z_BINS, z_bin_centres
from photoz_hpc.torch_files import read_torch_file, write_torch_file


class PhotoZNet(nn.Module):
    """``forward`` returns logits (B, n_bins); ``encoder`` is the trunk, ``head`` the classifier."""

    def __init__(self, encoder: ResNet, n_bins: int = N_Z_BINS) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, n_bins)
        self.register_buffer("z_centres", torch.as_tensor(z_bin_centres(n_bins), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    @staticmethod
    def point_estimate(probs: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """z_phot = E[z] = sum_k p_k c_k over bin centres (see ``redshift_grid``)."""
        return probs.float() @ centres.to(probs.device).float()


def build_photoz_net(model_cfg, n_bins: int = N_Z_BINS) -> PhotoZNet:
    """A freshly initialised PhotoZNet from a ``ModelConfig`` (arch, width, stem_kernel)."""
    return PhotoZNet(build_encoder(model_cfg), n_bins)


#: Stand-alone photo-z model file (what ``finetune`` exports and ``import-checkpoint`` writes).
PHOTOZ_MODEL_FORMAT = "photoz-hpc/photoz-model/1"


def save_photoz_model(net: PhotoZNet, model_cfg, out_path, extra: dict | None = None):
    """Write ``{'format', 'model' (ModelConfig dict), 'n_bins', 'state_dict', ...extra}`` atomically,
    every tensor on the CPU and contiguous so the file loads on any machine (plain data: ``torch_files``)."""
    import dataclasses

    cfg = dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    return write_torch_file(out_path, {"format": PHOTOZ_MODEL_FORMAT, "model": cfg, "n_bins": net.head.out_features,
                                       "state_dict": state, **(extra or {})})


def load_photoz_model(path, map_location="cpu") -> tuple[PhotoZNet, dict]:
    """(network in eval mode, the file's dict) from a ``save_photoz_model`` file; clear errors otherwise."""
    return photoz_model_from_blob(read_torch_file(path, "photo-z model file", map_location), path)


def photoz_model_from_blob(blob, path) -> tuple[PhotoZNet, dict]:
    """``load_photoz_model`` on a blob already read from ``path``."""
    from types import SimpleNamespace

    from photoz_hpc.errors import PhotozError

    if not isinstance(blob, dict) or blob.get("format") != PHOTOZ_MODEL_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise PhotozError(f"{path} is not a photoz-hpc photo-z model (format {found!r}, expected {PHOTOZ_MODEL_FORMAT!r})")
    net = PhotoZNet(build_encoder(SimpleNamespace(**blob["model"])), int(blob["n_bins"]))
    net.load_state_dict(blob["state_dict"])
    return net.eval(), blob
