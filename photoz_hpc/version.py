"""The package version, in its own module so that modules recording it (model cards) need not import the package
root, which is the Python API's facade."""

__version__ = "0.1.0"
