"""photoz-hpc: self-supervised photometric redshifts from multi-band survey images on HPC systems.

``import photoz_hpc as pz`` gives the Python API (``photoz_hpc.launch.api``, docs/python_api.md): ``pz.load_model``,
``pz.load_encoder``, ``pz.search``, ``pz.anomalies``, ``pz.prepare_arrays``, ``pz.finetune``, ``pz.evaluate_model``.
They are imported on first use, so ``import photoz_hpc`` (and the CLI, which imports it) stays light: no torch.
"""

from photoz_hpc.version import __version__

#: the Python API's names, imported from ``photoz_hpc.launch.api`` on first access
API = ("Encoder", "PhotoZModel", "anomalies", "evaluate_model", "finetune", "load_encoder", "load_model",
       "prepare_arrays", "search")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from photoz_hpc.launch import api

        return getattr(api, name)
    raise AttributeError(f"module 'photoz_hpc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
