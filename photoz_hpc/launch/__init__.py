"""The top of the data flow: commands that chain the layers below (fine-tune then evaluate, quickstart), and the
Python API (``api``: what ``import photoz_hpc as pz`` exposes)."""
