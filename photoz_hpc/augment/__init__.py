"""Augmentations and data loaders: DALI pipelines and their plain-PyTorch reference.

``photoz_hpc.augment.loaders.build_loader`` is the entry point; the pipelines are described in
``pipelines``, draws live in ``draws``, sharding in ``sampler``, the host side in ``source``, the
backends in ``dali_pipeline`` and ``reference``; ``arrays`` makes the ``eval`` view of images held in memory (the
Python API) with the same functions.
"""
