"""Pre-emption and interrupt signals: Slurm sends SIGTERM (or the ``--signal=USR1@T`` of the job script) before
killing a job. The handler only sets a flag; the training loop agrees on it across ranks, writes a
checkpoint and the command exits with ``EXIT_PREEMPTED`` so the job script can requeue. (The
no-progress watchdog is ``photoz_hpc.comm.liveness.Watchdog``.)

Training commands also take a first SIGINT (Ctrl-C) as a stop request: the same checkpoint and stop, but the exit
code is ``EXIT_INTERRUPTED`` (130, the shell's 128 + SIGINT), so nothing requeues a run its user stopped. A second
SIGINT stops at once (``KeyboardInterrupt``; no checkpoint beyond the last one written).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

#: Exit code for a clean stop after a pre-emption signal (checkpoint written); the Slurm scripts
#: requeue on it (tests/test_slurm.py checks they use this value).
EXIT_PREEMPTED = 75
#: Exit code for a stop after Ctrl-C (checkpoint written, or a second Ctrl-C): 128 + SIGINT, as a shell reports it.
EXIT_INTERRUPTED = 130

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Which stop signals arrived. ``interrupt=True``: SIGINT too (first: a stop request, second: stop now)."""

    def __init__(self, interrupt: bool = False) -> None:
        self.signum: int | None = None  # the first pre-emption signal, else SIGINT
        self.received: set[int] = set()
        self.interrupt = interrupt
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is not threading.main_thread():
            return self
        signals = PREEMPT_SIGNALS + ((signal.SIGINT,) if self.interrupt else ())
        for sig in signals:
            previous = signal.signal(sig, self._handle)
            self._previous[sig] = previous
            outer = getattr(previous, "__self__", None)
            if isinstance(outer, PreemptionFlag) and sig in outer.received:
                self._record(sig)  # arrived during start-up, before this flag took over from that one
        return self

    def _record(self, signum: int) -> None:
        self.received.add(signum)
        if self.signum is None or self.signum == signal.SIGINT:
            self.signum = signum

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if signal.SIGINT in self.received:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self._record(signum)  # no logging here: the handler may interrupt a write to the log's stream (the loop logs)

    @property
    def raised(self) -> bool:
        return bool(self.received)

    @property
    def preempted(self) -> bool:
        """A scheduler's pre-emption signal arrived (requeue), as opposed to SIGINT only."""
        return any(sig in self.received for sig in PREEMPT_SIGNALS)

    @property
    def interrupted(self) -> bool:
        return signal.SIGINT in self.received

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_preemption() -> None:
    """Ignore SIGTERM/SIGUSR1 from now on (a process whose work is saved and that is about to exit).
    SIG_IGN, unlike a Python handler, stays in force during interpreter shutdown. Ctrl-C gets Python's
    default back (KeyboardInterrupt)."""
    if threading.current_thread() is threading.main_thread():
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_code(summary: dict[str, Any]) -> int:
    """A training command's exit code: 0 done, 75 pre-empted (requeue), 130 stopped by Ctrl-C."""
    if not summary.get("preempted"):
        return 0
    return EXIT_INTERRUPTED if summary.get("interrupted") else EXIT_PREEMPTED
