"""torch.hub entry points of photoz-hpc: load an exported photo-z model directory in one line.

    net = torch.hub.load("path/to/photoz-hpc", "photoz_model", path="my_model", source="local")

``my_model`` is a directory written by ``photoz-hpc export-model`` (docs/model_files.md): its checksums are
verified, then the network is built from its model card and its safetensors weights (no pickle, no code from the
directory runs). Only photoz-hpc's own loader is imported here.
"""

dependencies = ["torch", "numpy", "yaml", "safetensors"]


def photoz_model(path: str, map_location="cpu"):
    """The ``PhotoZNet`` (eval mode, on ``map_location``) of an exported model directory ``path`` (a photo-z model
    file works too); ``net.survey`` / ``net.grid``: its bands and redshift grid."""
    from photoz_hpc.models.model_files import load_photoz

    net, _ = load_photoz(path, map_location)
    return net
