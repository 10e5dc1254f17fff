"""photoz-hpc: self-supervised photometric redshifts from multi-band survey images on HPC systems."""

__version__ = "0.1.0"
