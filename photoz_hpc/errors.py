"""Exception types users see; each message names the file or key and the problem."""

from __future__ import annotations


class PhotozError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(PhotozError):
    """A config file, key or value is invalid."""


class InputDataError(PhotozError):
    """An input HDF5 file is missing keys, has wrong shapes/dtypes, NaNs, or is truncated."""


class DatasetError(PhotozError):
    """A prepared dataset directory is incomplete, corrupt, truncated or of a newer format."""
