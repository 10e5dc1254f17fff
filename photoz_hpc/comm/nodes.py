"""Which ranks share a node: the groups that node-local collectives (``Comm.allgather_node``) run in.

A node is a block of consecutive ranks, all blocks of one size (what block task placement gives:
torchrun, horovodrun, ``mpirun --map-by slot``, ``srun --distribution=block``). ``node_groups`` derives
the blocks from every rank's local rank (after init); ``env_local_size`` reads the ranks per node from
the launcher's variables, for Horovod, whose process sets must exist before ``hvd.init`` returns.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from photoz_hpc.errors import PhotozError

# Ranks-per-node variables, in the order tried: Horovod's (gloo), Open MPI, MPICH/Hydra, torchrun.
LOCAL_SIZE_VARS = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE")
_SLURM_TASKS = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")  # e.g. "4(x2)": same count on every node


def node_groups(local_ranks: Sequence[int]) -> list[list[int]]:
    """Consecutive ranks per node, from every rank's local rank in rank order (a node starts at local
    rank 0). Raises ``PhotozError`` unless the nodes are consecutive blocks of one size."""
    groups: list[list[int]] = []
    for rank, local in enumerate(local_ranks):
        if local == 0:
            groups.append([])
        if not groups or local != len(groups[-1]):
            raise _layout_error(local_ranks)
        groups[-1].append(rank)
    if len({len(g) for g in groups}) > 1:
        raise _layout_error(local_ranks)
    return groups


def _layout_error(local_ranks: Sequence[int]) -> PhotozError:
    return PhotozError(
        f"node-local collectives need the ranks of each node to be consecutive and equally many; local ranks "
        f"by rank: {list(local_ranks)} (use block placement: srun --distribution=block, mpirun --map-by slot)"
    )


def env_local_size(environ: Mapping[str, str] | None = None) -> int | None:
    """Ranks per node as the launcher states it, or None when it does not (or nodes differ)."""
    env = os.environ if environ is None else environ
    for key in LOCAL_SIZE_VARS:
        if env.get(key, "").isdigit():
            return int(env[key])
    for key in _SLURM_TASKS:
        m = re.fullmatch(r"(\d+)(\(x\d+\))?", env.get(key, ""))
        if m:
            return int(m.group(1))
    return None


def uniform_groups(world: int, local_size: int) -> list[list[int]]:
    """Blocks of ``local_size`` consecutive ranks (``world`` must be a multiple of it)."""
    if local_size < 1 or world % local_size:
        raise PhotozError(f"{world} ranks cannot be split into nodes of {local_size}")
    return [list(range(start, start + local_size)) for start in range(0, world, local_size)]
