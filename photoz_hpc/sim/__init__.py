"""Synthetic SDSS (ugriz) galaxy-cutout survey calibrated on the SDSS Main Galaxy Sample.

``generate_survey`` writes a release-layout HDF5 file; see docs/synthetic_survey.md for the model.
"""

from photoz_hpc.sim.survey import generate_survey

__all__ = ["generate_survey"]
