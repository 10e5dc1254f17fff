"""Models: the ResNet encoder (a stem over the survey's bands), the MoCo v2 method and its (sharded) negative queue."""

from photoz_hpc.models.moco import MoCo, build_moco
from photoz_hpc.models.resnet import ResNet, build_encoder

__all__ = ["MoCo", "ResNet", "build_encoder", "build_moco"]
