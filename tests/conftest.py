"""Shared fixtures: small release-layout HDF5 files written directly (no simulator needed)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from photoz_hpc.constants import R_DR12


def write_release_h5(path: Path, n: int, seed: int = 0, labeled: bool = True, size: int = 107, **overrides) -> Path:
    """A release-layout file with random but plausible content; ``overrides`` replace datasets."""
    rng = np.random.default_rng(seed)
    ebv = rng.lognormal(np.log(0.03), 0.5, n)
    data = {
        "images": (rng.standard_normal((n, 5, size, size)) * 0.01 + rng.uniform(0, 0.1, (n, 5, 1, 1))).astype(np.float32),
        "e_bv": (R_DR12[None, :] * ebv[:, None]).astype(np.float32),
        "ra": rng.uniform(120, 240, n),
        "dec": rng.uniform(0, 60, n),
        "ObjID": np.arange(n, dtype=np.int64) + 1237650000000000000 + seed * 100000,
        "specObjID": np.arange(n, dtype=np.int64) + 300000000000000000 + seed * 100000,
    }
    if labeled:
        data["specz_redshift"] = rng.uniform(0.01, 0.35, n).astype(np.float32)
        data["specz_redshift_err"] = rng.uniform(1e-5, 1e-4, n).astype(np.float32)
    data.update(overrides)
    with h5py.File(path, "w") as fh:
        for key, value in data.items():
            if value is not None:
                fh.create_dataset(key, data=value)
    return path


@pytest.fixture
def release_h5(tmp_path: Path):
    """Factory fixture: ``release_h5(name, n, **kw)`` writes a file under tmp_path."""

    def make(name: str = "input.h5", n: int = 24, **kw) -> Path:
        return write_release_h5(tmp_path / name, n, **kw)

    return make
