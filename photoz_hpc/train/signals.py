"""Pre-emption signals: Slurm sends SIGTERM (or the ``--signal=USR1@T`` of the job script) before
killing a job. The handler only sets a flag; the training loop agrees on it across ranks, writes a
checkpoint and the command exits with ``EXIT_PREEMPTED`` so the job script can requeue. (The
no-progress watchdog is ``photoz_hpc.comm.liveness.Watchdog``.)
"""

from __future__ import annotations

import signal
import threading

from photoz_hpc.logs import get_logger

log = get_logger(__name__)

#: Exit code for a clean stop after a pre-emption signal (checkpoint written); the Slurm scripts
#: requeue on it (tests/test_slurm.py checks they use this value).
EXIT_PREEMPTED = 75

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_preemption() -> None:
    """Ignore SIGTERM/SIGUSR1 from now on (a process whose work is saved and that is about to exit).
    SIG_IGN, unlike a Python handler, stays in force during interpreter shutdown."""
    if threading.current_thread() is threading.main_thread():
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
