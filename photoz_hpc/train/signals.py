"""Pre-emption signals and a no-progress watchdog.

Slurm sends SIGTERM (or the ``--signal=USR1@T`` of the job script) before killing a job. The handler
only sets a flag; the training loop agrees on it across ranks at the next step, writes a checkpoint
and exits with ``EXIT_PREEMPTED`` so the job script can requeue. The watchdog aborts a rank that
makes no progress for ``timeout`` seconds (a dead or hung peer), naming the rank and step, instead
of letting the job hang until its time limit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from photoz_hpc.logs import get_logger

log = get_logger(__name__)

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


class Watchdog(threading.Thread):
    """Calls ``os._exit(exit_code)`` if ``beat()`` is not called for ``timeout`` seconds."""

    def __init__(self, timeout: float, rank: int, exit_code: int = 3) -> None:
        super().__init__(daemon=True, name="photoz-watchdog")
        self.timeout, self.rank, self.exit_code = timeout, rank, exit_code
        self.step = 0
        self._last = time.monotonic()
        self._stop = threading.Event()

    def beat(self, step: int) -> None:
        self.step, self._last = step, time.monotonic()

    def run(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                msg = (f"rank {self.rank}: no training progress for {idle:.0f} s after step {self.step} "
                       f"(dist.timeout_s={self.timeout:g}); a peer rank has probably failed or hung. Aborting.")
                log.error(msg)
                print(msg, file=sys.stderr, flush=True)
                os._exit(self.exit_code)

    def stop(self) -> None:
        self._stop.set()
