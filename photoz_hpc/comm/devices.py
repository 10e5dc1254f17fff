"""Device selection, in one place: which CUDA device a rank uses."""

from __future__ import annotations

import torch

from photoz_hpc.errors import PhotozError


def cuda_device_index(local_rank: int) -> int:
    """The CUDA device this rank uses: ``local_rank % device_count()``. With per-task GPU binding
    (``srun --gpus-per-task=1``, ``--gpu-bind``) every task sees one device, index 0, whatever its
    local rank; with all the node's GPUs visible it is the local rank. Used for every device choice."""
    n = torch.cuda.device_count()
    if n < 1:
        raise PhotozError("CUDA was requested but no CUDA device is visible to this process")
    return local_rank % n
