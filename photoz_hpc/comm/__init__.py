"""The one communication layer, at the bottom of the import graph.

``base`` (the interface and its serial implementation), ``torch_comm``, ``horovod_comm``, ``mpi_comm``
(data preparation), ``liveness`` (heartbeats, peer reports, the watchdog), ``devices`` (which GPU a
rank uses) and ``select`` (which communicator a process gets).
"""
