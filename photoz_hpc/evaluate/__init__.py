"""Evaluation outputs of a trained photo-z model: pdf summaries, prediction CSVs and diagnostic plots.

Modules: ``pdfs`` (per-galaxy point estimates and intervals from binned probabilities),
``predictions`` (atomic CSV writer and reader), ``plots`` (PNG diagnostics). The metrics themselves
live in ``photoz_hpc.metrics``.
"""
