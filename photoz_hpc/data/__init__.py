"""Data: the release HDF5 reader, the sharded cutout store, and dataset access."""

from photoz_hpc.data.dataset import ShardedDataset, open_dataset, pixel_stats, read_manifest

__all__ = ["ShardedDataset", "open_dataset", "pixel_stats", "read_manifest"]
