"""Pre-emption signals and a no-progress watchdog.

Slurm sends SIGTERM (or the ``--signal=USR1@T`` of the job script) before killing a job. The handler
only sets a flag; the training loop agrees on it across ranks at the next step, writes a checkpoint
and exits with ``EXIT_PREEMPTED`` so the job script can requeue. The watchdog aborts a rank that
makes no progress for ``timeout`` seconds (a dead or hung peer, or this rank itself hung), naming this
rank, the step, the rank(s) that did not respond (from the communicator's heartbeats, see
``photoz_hpc.train.dist``) and the main thread's stack, instead of letting the job hang until its time
limit. It works the same for every backend, including Horovod, which cannot time out a hung peer itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

from photoz_hpc.logs import get_logger

log = get_logger(__name__)

#: Exit code for a clean stop after a pre-emption signal (checkpoint written); the Slurm scripts
#: requeue on it (tests/test_slurm.py checks they use this value).
EXIT_PREEMPTED = 75

_peer_report: Callable[[], str] | None = None


def set_peer_report(fn: Callable[[], str] | None) -> None:
    """Register the communicator's ``peer_report`` (who did not respond) for the watchdog's message."""
    global _peer_report
    _peer_report = fn


def _main_stack() -> str:
    frame = sys._current_frames().get(threading.main_thread().ident)
    return "".join(traceback.format_stack(frame)[-6:]) if frame is not None else ""

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


class Watchdog(threading.Thread):
    """Calls ``os._exit(exit_code)`` if ``beat()`` is not called for ``timeout`` seconds."""

    def __init__(self, timeout: float, rank: int, exit_code: int = 3) -> None:
        super().__init__(daemon=True, name="photoz-watchdog")
        self.timeout, self.rank, self.exit_code = timeout, rank, exit_code
        self.step = 0
        self._last = time.monotonic()
        self._stop_event = threading.Event()  # not _stop: Thread._stop() exists

    def beat(self, step: int) -> None:
        self.step, self._last = step, time.monotonic()

    def run(self) -> None:
        while not self._stop_event.wait(min(5.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                try:
                    report = _peer_report() if _peer_report is not None else ""
                except Exception as exc:  # a diagnosis must never stop the abort
                    report = f"(peer report failed: {exc})"
                msg = (f"rank {self.rank}: no training progress for {idle:.0f} s after step {self.step} "
                       f"(dist.timeout_s={self.timeout:g}); {report or 'a peer rank has probably failed or hung'}. "
                       f"Aborting. Main thread of rank {self.rank} is in:\n{_main_stack()}")
                log.error(msg)
                print(msg, file=sys.stderr, flush=True)
                os._exit(self.exit_code)

    def stop(self) -> None:
        self._stop_event.set()
