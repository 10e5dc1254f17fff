"""The one reader and writer of ``torch.save`` files (checkpoints, ``encoder.pt``, photo-z models): data, never code.

Why: model files are shared, downloaded and run on shared machines, and unpickling an arbitrary object can run
any code. ``read_torch_file`` loads with ``torch.load(weights_only=True)``: tensors, plain containers and
primitives. Files of earlier photoz-hpc versions hold numpy arrays (the numpy RNG state); they load through a narrow
allowlist of numpy's array reconstruction only and come back converted (arrays -> tensors, numpy scalars -> Python
numbers). Anything else is an ``UnsafePickleError`` naming the file, the objects and the opt-in: ``--trust-pickle``
(``trusting_pickle`` around the command), which unpickles in full and says so with a WARNING.
``write_torch_file`` refuses to write anything but plain data, so a plain ``torch.load(weights_only=True)`` with no
allowlist reads every file photoz-hpc writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path, PurePath
from types import SimpleNamespace
from typing import Any

from photoz_hpc.errors import PhotozError
from photoz_hpc.io_utils import atomic_open
from photoz_hpc.logs import get_logger

log = get_logger(__name__)

TRUST_FLAG = "--trust-pickle"
TRUST_HELP = ("also read model/checkpoint files that hold pickled Python objects (torch.load weights_only=False): "
              "that can run any code the file holds, so only for files from a source you trust; logged as a WARNING")
#: numpy's dtype classes that may appear in an old file's arrays (numbers only: no object, string or void dtypes).
_NUMPY_DTYPES = ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType", "UInt16DType",
                 "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType", "LongLongDType",
                 "ULongLongDType", "LongDType", "ULongDType", "IntDType", "UIntDType", "ShortDType", "UShortDType",
                 "ByteDType", "UByteDType")
_trust_pickle = False


class UnsafePickleError(PhotozError):
    """A file needs pickled Python objects to load (refused unless the user opts in)."""


def add_trust_pickle_flag(parser: argparse.ArgumentParser) -> None:
    """The opt-in every command that reads a model or checkpoint file has (``cli.main`` applies it)."""
    parser.add_argument(TRUST_FLAG, dest="trust_pickle", action="store_true", help=TRUST_HELP)


@contextlib.contextmanager
def trusting_pickle(enabled: bool = True) -> Iterator[None]:
    """Within the block, ``read_torch_file`` unpickles files it would refuse (the ``--trust-pickle`` opt-in)."""
    global _trust_pickle
    before, _trust_pickle = _trust_pickle, bool(enabled)
    try:
        yield
    finally:
        _trust_pickle = before


def conversion_command(path: str | os.PathLike) -> str:
    """The one line that rewrites a trusted file as plain data."""
    p = Path(path)
    return f"photoz-hpc resave {p} {p.with_name(p.stem + '-safe' + p.suffix)} {TRUST_FLAG}"


def read_torch_file(path: str | os.PathLike, what: str, map_location: Any = "cpu",
                    trust_pickle: bool | None = None, data: bytes | None = None) -> Any:
    """``torch.load`` without running code: see the module docstring. ``what`` names the file's role in errors;
    ``trust_pickle`` (default: the ``trusting_pickle`` setting) allows full unpickling. A missing, truncated or
    corrupt file is a ``PhotozError`` naming ``what`` and the file. ``data``: the file's bytes, already read (by a
    caller that hashed them): parsed instead of reading ``path`` again, so what loads is what was hashed."""
    import io

    import torch

    def source() -> Any:
        return path if data is None else io.BytesIO(data)

    trust = _trust_pickle if trust_pickle is None else trust_pickle
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return to_plain(torch.load(source(), map_location=map_location, weights_only=True), False, f"{what} {path}")
    except FileNotFoundError:
        raise PhotozError(f"{what} {path} does not exist") from None
    except pickle.UnpicklingError as exc:
        found = _foreign_globals(source(), exc)
        if not found:  # not a refusal of objects: a damaged file
            raise PhotozError(f"{what} {path} is unreadable or corrupt ({_reason(exc)})") from None
        if not trust:
            raise UnsafePickleError(
                f"{what} {path} holds pickled Python objects ({', '.join(found[:4])}), and unpickling them can run "
                f"any code; photoz-hpc reads tensors and plain data only. If you trust where the file came from, "
                f"rerun with {TRUST_FLAG}, or convert it once: {conversion_command(path)}") from None
    except PhotozError:
        raise
    except Exception as exc:
        raise PhotozError(f"{what} {path} is unreadable or corrupt ({type(exc).__name__}: {exc})") from None
    log.warning("%s: unpickling %s %s in full (it holds %s): any code in it runs now", TRUST_FLAG, what, path,
                ", ".join(found[:4]))
    try:
        return to_plain(torch.load(source(), map_location=map_location, weights_only=False), False, f"{what} {path}")
    except Exception as exc:
        raise PhotozError(f"{what} {path} is unreadable or corrupt ({type(exc).__name__}: {exc})") from None


def write_torch_file(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` atomically, after checking ``obj`` is plain data (``check_plain``)."""
    import torch

    check_plain(obj, str(path))
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


def resave(src: str | os.PathLike, out: str | os.PathLike, trust_pickle: bool | None = None) -> Path:
    """``photoz-hpc resave``: ``src`` read (pickled objects only with the opt-in) and written to ``out`` as plain data;
    an object with no plain form is a ``PhotozError`` naming it."""
    blob = read_torch_file(src, "file", trust_pickle=trust_pickle)
    return write_torch_file(out, to_plain(blob, strict=True, where=str(src)))


def check_plain(obj: Any, where: str = "") -> None:
    """``TypeError`` naming the first entry a plain ``torch.load(weights_only=True)`` would refuse."""
    import torch

    if obj is None or type(obj) in (str, bytes, int, float, bool) or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not plain data")
            check_plain(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not plain data (tensors, dicts, "
                    "lists, tuples, str, bytes, int, float, bool, None)")


def to_plain(obj: Any, strict: bool = True, where: str = "") -> Any:
    """numpy arrays -> tensors, numpy scalars -> Python numbers, paths -> str, dataclasses and namespaces -> dicts,
    recursively.
    Anything else that is not plain data: ``PhotozError`` when ``strict``, else left as it is."""
    import numpy as np
    import torch

    if obj is None or type(obj) in (str, bytes, int, float, bool) or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        out = {k: to_plain(v, strict, f"{where}[{k!r}]") for k, v in obj.items()}
        return OrderedDict(out) if isinstance(obj, OrderedDict) else out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(to_plain(v, strict, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise PhotozError(f"{where or 'file'}: a numpy array of dtype {obj.dtype} is not plain data")
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return obj.item()
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj), strict, where)
    if isinstance(obj, (argparse.Namespace, SimpleNamespace)):  # e.g. the training args some checkpoints carry
        return to_plain(vars(obj), strict, where)
    if strict:
        raise PhotozError(f"{where or 'file'}: {type(obj).__module__}.{type(obj).__qualname__} cannot be stored as "
                          "plain data")
    return obj


def _numpy_array_globals() -> list[Any]:
    """numpy's array and scalar reconstruction, under the names numpy 1 and 2 pickle them: builds arrays of numbers
    from bytes (an object array's items go through the same restricted unpickler), runs nothing else."""
    import importlib

    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    dtypes = getattr(np, "dtypes", None)
    allowed += [getattr(dtypes, name) for name in _NUMPY_DTYPES if hasattr(dtypes, name)]
    return allowed


def _foreign_globals(path: Any, exc: Exception) -> list[str]:
    """The globals (classes, functions) a refused file names, read without unpickling it."""
    import torch

    found: list[str] = []
    with contextlib.suppress(Exception):
        allowed = {name if isinstance(name, str) else f"{name.__module__}.{name.__qualname__}"
                   for name in (g[1] if isinstance(g, tuple) else g for g in _numpy_array_globals())}
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    if not found:  # not a zip file (torch's legacy format), or a class built later: the refusal names the first
        found = re.findall(r"(?:GLOBAL|Unsupported class) (\S+)|but got <class '([^']+)'>", str(exc))
        found = [a or b for a, b in found]
    return found


def _reason(exc: Exception) -> str:
    """torch's own reason for a refused load, without its boilerplate."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(boilerplate)), type(exc).__name__)
