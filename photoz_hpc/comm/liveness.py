"""Which rank stopped: collective counters over a side channel, and a no-progress watchdog.

Every rank counts the explicit collectives it has entered (``Comm.calls``) and a daemon thread
publishes the count to a side channel that does not need the (possibly blocked) collectives -- the
c10d store for ``torch``, horovodrun's rendezvous key-value server for ``horovod --gloo``. When a
collective fails or times out, or the ``Watchdog`` fires, ``peer_report()`` compares the counts and
names the rank(s) that never reached the collective the others are waiting in. The watchdog aborts a
rank that makes no progress for ``timeout`` seconds (a dead or hung peer, or this rank itself),
naming this rank, the step, the rank(s) that did not respond and the main thread's stack, for every
backend, including Horovod, which cannot time out a hung peer itself.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

from photoz_hpc.logs import get_logger

log = get_logger(__name__)

_peer_report: Callable[[], str] | None = None


def set_peer_report(fn: Callable[[], str] | None) -> None:
    """Register the communicator's ``peer_report`` (who did not respond) for the watchdog's message."""
    global _peer_report
    _peer_report = fn


class Heartbeat:
    """Mixin for a communicator with a side channel (``_kv_set``/``_kv_get``): publishes ``calls`` and
    reports which peers are behind. Needs ``rank``, ``world``, ``calls`` and ``timeout_s``."""

    _hb_thread: threading.Thread | None = None

    def _kv_set(self, key: str, value: str) -> None:
        raise NotImplementedError

    def _kv_get(self, key: str) -> str | None:
        raise NotImplementedError

    def _start_heartbeat(self, timeout_s: float) -> None:
        """Publish ``calls`` every few seconds from a daemon thread (the main thread may be stuck)."""
        self.timeout_s = timeout_s
        self._hb_stop = threading.Event()
        if self.world < 2:
            return
        try:
            self._kv_set(f"hb{self.rank}", str(self.calls))
        except Exception as exc:  # no side channel (e.g. plain mpirun): reports say the rank is unknown
            log.debug("no heartbeat channel: %s", exc)
            return
        interval = min(max(timeout_s / 10, 0.5), 30.0)

        def beat() -> None:
            last = -1
            while not self._hb_stop.wait(interval):
                if self.calls != last:
                    try:
                        self._kv_set(f"hb{self.rank}", str(self.calls))
                        last = self.calls
                    except Exception:  # the store's host is gone: nothing left to report to
                        return

        self._hb_thread = threading.Thread(target=beat, daemon=True, name="photoz-heartbeat")
        self._hb_thread.start()
        set_peer_report(self.peer_report)

    def _stop_heartbeat(self) -> None:
        if getattr(self, "_hb_stop", None) is not None:
            self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)
            self._hb_thread = None
        set_peer_report(None)

    def peer_report(self) -> str:
        """Which ranks did not reach the collective this rank is in (best effort, never raises)."""
        if self._hb_thread is None:
            return "cannot tell which rank did not respond (no heartbeat channel)"
        counts: dict[int, int] = {self.rank: self.calls}
        missing = []
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                v = self._kv_get(f"hb{r}")
            except Exception:
                v = None
            if v is None:
                missing.append(r)
            else:
                counts[r] = int(v)
        top = max(counts.values())
        behind = sorted(r for r, c in counts.items() if c < top)
        parts = []
        if behind:
            mine = " (this rank)" if self.rank in behind else ""
            last = ", ".join(f"rank {r} at #{counts[r]}" for r in behind)
            parts.append(f"rank(s) {behind}{mine} did not respond: they never entered collective #{top} that "
                         f"rank(s) {sorted(r for r, c in counts.items() if c == top)} are waiting in ({last})")
        elif len(counts) > 1:
            parts.append(f"every reachable rank entered collective #{top}: the stall is in a gradient all-reduce "
                         "or the ranks issued different collectives")
        if missing:
            parts.append(f"no heartbeat from rank(s) {sorted(missing)} (dead, or their host is unreachable)")
        return "; ".join(parts)



def _main_stack() -> str:
    frame = sys._current_frames().get(threading.main_thread().ident)
    return "".join(traceback.format_stack(frame)[-6:]) if frame is not None else ""


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
