"""Make the ranks of one host look like several nodes of ``ranks_per_node`` consecutive ranks each.

Sets, before the communicator starts, the variables a multi-node launch would have given this rank:
torchrun's ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``, or horovodrun's ``HOROVOD_LOCAL_*``/``HOROVOD_CROSS_*``
and ``HOROVOD_HOSTNAME`` (Horovod's Gloo rendezvous groups a node's ranks by host name), so that
node-local collectives can be tested on one machine. Test-only: the trainer reads what the launcher set.
"""

from __future__ import annotations

import os


def declare_nodes(ranks_per_node: int) -> None:
    """Re-declare this rank's node membership (no-op for 0: keep what the launcher set)."""
    if ranks_per_node <= 0:
        return
    if "HOROVOD_RANK" in os.environ:
        rank, world = int(os.environ["HOROVOD_RANK"]), int(os.environ["HOROVOD_SIZE"])
        node = rank // ranks_per_node
        os.environ.update(HOROVOD_LOCAL_RANK=str(rank % ranks_per_node), HOROVOD_LOCAL_SIZE=str(ranks_per_node),
                          HOROVOD_CROSS_RANK=str(node), HOROVOD_CROSS_SIZE=str(world // ranks_per_node),
                          HOROVOD_HOSTNAME=f"node{node}")
    else:
        rank = int(os.environ["RANK"])
        os.environ.update(LOCAL_RANK=str(rank % ranks_per_node), LOCAL_WORLD_SIZE=str(ranks_per_node))
