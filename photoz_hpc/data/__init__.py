"""Data: the release HDF5 reader, the sharded cutout store, and dataset access."""

from photoz_hpc.data.dataset import open_dataset

__all__ = ["open_dataset"]
