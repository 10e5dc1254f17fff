"""Synthetic galaxy-cutout surveys from a population calibrated on the SDSS Main Galaxy Sample.

``generate_survey`` writes SDSS ugriz in the release HDF5 layout (default), or any survey with a ``synthetic``
section (legacy, hsc, lsst, a survey YAML) through its filters in the Multimodal Universe layout; see
docs/synthetic_survey.md for the model.
"""

from photoz_hpc.sim.survey import generate_survey

__all__ = ["generate_survey"]
