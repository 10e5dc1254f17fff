"""photoz-hpc: self-supervised photometric redshifts from SDSS cutouts on HPC systems."""

__version__ = "0.1.0"
