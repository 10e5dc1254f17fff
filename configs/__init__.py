"""Packaged configs: the YAML files of configs/ ship inside the package as photoz_hpc.configs."""
