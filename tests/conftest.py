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


_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")


def _process_state() -> dict[str, object]:
    """Process-global state a test could leave behind for later tests in the same pytest process."""
    import signal

    import torch

    handlers = {name: signal.getsignal(getattr(signal, name)) for name in _SIGNALS}
    return {"torch threads": torch.get_num_threads(), "torch default dtype": torch.get_default_dtype(),
            "torch grad mode": torch.is_grad_enabled(), "torch dispatch modes": torch._C._len_torch_dispatch_stack(),
            "torch deterministic": torch.are_deterministic_algorithms_enabled(), **handlers}


@pytest.fixture(autouse=True)
def no_state_left_behind():
    """Fail (and repair) a test that changes process-global state: a later test would run under it. A leaked
    thread count once turned a latent heap corruption into an abort of the whole run, far from its cause."""
    import logging
    import signal

    import torch

    package_logger = logging.getLogger("photoz_hpc")
    logging_before = (list(package_logger.handlers), package_logger.level, package_logger.propagate)
    before = _process_state()
    yield
    # the package logger as it was (repaired, not failed: a command run in-process configures logging, as it
    # should); otherwise a test's caplog sees records or not depending on which tests ran before it
    package_logger.handlers[:] = logging_before[0]
    package_logger.setLevel(logging_before[1])
    package_logger.propagate = logging_before[2]
    after = _process_state()
    changed = {k: (before[k], after[k]) for k in before if after[k] != before[k]}
    if not changed:
        return
    torch.set_num_threads(before["torch threads"])
    torch.set_default_dtype(before["torch default dtype"])
    torch.set_grad_enabled(before["torch grad mode"])
    torch.use_deterministic_algorithms(before["torch deterministic"])
    for name in _SIGNALS:
        signal.signal(getattr(signal, name), before[name])
    pytest.fail(f"the test left process-global state changed (before, after): {changed}")
