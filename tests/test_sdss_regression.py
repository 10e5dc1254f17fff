"""The SDSS defaults give the same stores, draws, synthetic catalogue and losses as before surveys existed.

The record (tests/data/sdss_regression.json) was written by ``tests/sdss_regression.py record`` on the SDSS-only
code. Stores, draws and the synthetic catalogue are pure integer/NumPy-RNG arithmetic: compared bit for bit.
Images rendered by GalSim and training losses depend on the CPU's floating-point kernels (AVX2 vs AVX-512), so
they are compared at 1e-6 and 1e-5 relative: far below any change a wrong band, coefficient or grid would make.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sdss_regression import RECORD, fingerprint

pytest.importorskip("galsim")


@pytest.fixture(scope="module")
def now() -> dict:
    return fingerprint()


@pytest.fixture(scope="module")
def before() -> dict:
    return json.loads(RECORD.read_text())


def test_store_bytes_are_unchanged(now, before):
    assert now["store"] == before["store"]


def test_augmentation_draws_are_unchanged(now, before):
    assert now["draws"] == before["draws"]


def test_synthetic_sdss_catalogue_and_images_are_unchanged(now, before):
    assert now["synth"]["catalogue"] == before["synth"]["catalogue"]
    np.testing.assert_allclose(now["synth"]["image_sums"], before["synth"]["image_sums"], rtol=1e-6)


def test_training_losses_are_unchanged(now, before):
    for kind in ("pretrain", "finetune"):
        assert len(now["losses"][kind]) == len(before["losses"][kind]) == 4
        np.testing.assert_allclose(now["losses"][kind], before["losses"][kind], rtol=1e-5, err_msg=kind)
