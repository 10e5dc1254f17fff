"""Shared fixtures: small release-layout HDF5 files written directly (no simulator needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_release_h5


@pytest.fixture
def release_h5(tmp_path: Path):
    """Factory fixture: ``release_h5(name, n, **kw)`` writes a file under tmp_path."""

    def make(name: str = "input.h5", n: int = 24, **kw) -> Path:
        return write_release_h5(tmp_path / name, n, **kw)

    return make
