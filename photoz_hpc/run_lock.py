"""One run per output directory: a lock file that a run creates before it writes, refreshes while it runs
and removes when it ends.

Two runs writing one directory (a double submission, a requeued job racing its old self) interleave their
metrics and checkpoints, so every command that writes a run directory holds it (``hold_directory``; multi-rank
runs through ``hold_for_ranks``: rank 0 takes it and every rank learns the outcome before anything is written).

What it relies on, so that it works on Lustre, GPFS, NFSv3+ and local disks alike: ``open(O_CREAT|O_EXCL)``,
``rename`` and ``link`` are atomic on the file system. Not on ``fcntl``/``flock``, which parallel file systems often
disable, emulate per client or lose with a node. A holder writes its identity (host, pid, Slurm job/step/
restart count, command, start time, a random token) into the file and touches it every ``PHOTOZ_LOCK_HEARTBEAT_S``
(15) seconds. A holder is stale -- and the lock is taken over with a log line -- when it is on this host and its
process is gone, when it is an earlier incarnation of this Slurm job (a lower ``SLURM_RESTART_COUNT``: Slurm
runs one incarnation of a job at a time), or when its heartbeat is older than ``PHOTOZ_LOCK_STALE_S`` (120)
seconds (this compares another host's file time with our clock: clocks must agree to well within it).
Takers serialise on a second exclusive file (``LOCK.takeover``) and remove only the lock (or stale guard) they
judged stale: they move it aside, check it, and put anything else back with ``link``, which never replaces a
file created meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from photoz_hpc.errors import PhotozError
from photoz_hpc.logs import get_logger

log = get_logger(__name__)

#: The lock file inside a held directory (hidden: listings of run directories skip dot files).
LOCK_NAME = ".photoz-run.lock"
HEARTBEAT_ENV, STALE_ENV = "PHOTOZ_LOCK_HEARTBEAT_S", "PHOTOZ_LOCK_STALE_S"
DEFAULT_HEARTBEAT_S, DEFAULT_STALE_S = 15.0, 120.0
_SLURM_KEYS = {"job": "SLURM_JOB_ID", "step": "SLURM_STEP_ID", "restart": "SLURM_RESTART_COUNT",
               "array_job": "SLURM_ARRAY_JOB_ID", "array_task": "SLURM_ARRAY_TASK_ID", "cluster": "SLURM_CLUSTER_NAME"}

_TAKEOVER_ROUNDS = 20  # looks at a lock that is being taken over, 0.05 s apart, before giving up
_held: set[str] = set()  # lock files held by this process (a second hold from here is refused too)
_held_guard = threading.Lock()


class DirectoryHeld(PhotozError):
    """The output directory is held by another run (or a lock file cannot be created there)."""


@dataclass(frozen=True)
class RunDir:
    """What a command holds: ``directory`` (named in messages) and its lock file (default ``directory/LOCK_NAME``)."""

    directory: Path
    what: str
    lock_file: Path | None = None

    @property
    def lock_path(self) -> Path:
        return Path(self.lock_file) if self.lock_file is not None else Path(self.directory) / LOCK_NAME


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise PhotozError(f"{name}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise PhotozError(f"{name}={value!r} must be > 0 seconds")
    return seconds


def heartbeat_seconds() -> float:
    return _env_seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)


def stale_seconds() -> float:
    return _env_seconds(STALE_ENV, DEFAULT_STALE_S)


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from its holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _pid_namespace() -> str | None:
    """Which pid namespace our pids belong to (containers sharing a host name may not share it)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def holder_info(what: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """This process's identity as a lock holder."""
    env = os.environ if environ is None else environ
    return {"command": what, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "pid_ns": _pid_namespace(),
            "slurm": {k: env[v] for k, v in _SLURM_KEYS.items() if env.get(v)},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:8], "token": uuid.uuid4().hex}


def describe(info: dict[str, Any]) -> str:
    """The holder in words: command, pid, host, Slurm job/step/restart where known, start time."""
    slurm = info.get("slurm") or {}
    where = f"pid {info.get('pid')} on host {info.get('host')}"
    if slurm.get("job"):
        job = f"{slurm['array_job']}_{slurm['array_task']}" if slurm.get("array_task") else slurm["job"]
        where += f", Slurm job {job}"
        if job != slurm["job"]:
            where += f" (id {slurm['job']})"
        where += f" step {slurm.get('step', '?')} restart {slurm.get('restart', '0')}"
    return f"{info.get('command', '?')} ({where}, started {info.get('started', '?')})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(info: dict[str, Any], age_s: float, stale_s: float, me: dict[str, Any]) -> str | None:
    """Why the holder ``info`` (its heartbeat ``age_s`` old) is gone, or None if it may still be running."""
    pid = info.get("pid")
    same_ns = not (info.get("pid_ns") and me.get("pid_ns")) or info["pid_ns"] == me["pid_ns"]
    if info.get("host") == me["host"] and isinstance(pid, int) and same_ns:
        if pid == me["pid"]:
            return f"its pid {pid} is this process's (an earlier process in a reused pid namespace)"
        if not _alive(pid):
            return f"process {pid} no longer exists on {me['host']}"
        start = _pid_start(pid)
        if info.get("pid_start") and start and start != info["pid_start"]:
            return f"pid {pid} on {me['host']} now belongs to another process"
        return None  # alive on this host: held, however old its heartbeat (it may be stopped or hung)
    theirs, mine = info.get("slurm") or {}, me["slurm"]
    if (theirs.get("job") and theirs.get("job") == mine.get("job") and theirs.get("cluster") == mine.get("cluster")
            and int(theirs.get("restart") or 0) < int(mine.get("restart") or 0)):
        return (f"Slurm requeued job {mine['job']} (restart {theirs.get('restart') or 0} -> {mine.get('restart')}): "
                "its earlier incarnation cannot still run")
    if age_s > stale_s:
        return f"no heartbeat for {age_s:.0f} s (> {STALE_ENV}={stale_s:g})"
    return None


def _read(path: Path, tries: int = 50) -> tuple[dict[str, Any] | None, float] | None:
    """(holder info or None if unreadable, heartbeat age in s) of the lock file; None if there is none. A file
    just created is empty until its holder writes it: read again for up to 5 s (a holder descheduled on a loaded
    node) before calling it unreadable."""
    for attempt in range(tries):
        try:
            with open(path, "rb") as fh:
                text = fh.read()
                mtime = os.fstat(fh.fileno()).st_mtime  # fstat after open: fresh attributes on NFS too
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
            if isinstance(info, dict) and "token" in info:
                return info, time.time() - mtime
        except ValueError:
            pass
        if attempt < tries - 1:
            time.sleep(0.1)
    return None, time.time() - mtime


def _create(path: Path, info: dict[str, Any]) -> bool:
    """Create the lock file holding ``info``; False if it exists. The only way to become a holder."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(info, indent=1) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _remove_if(path: Path, token: str | None, me: dict[str, Any]) -> bool:
    """Remove ``path`` if it is still the file judged stale (``token``); True if removed. Moved aside first
    (atomic), so what is checked is what is removed; anything else goes back with ``link``, which, unlike
    ``rename``, fails rather than replace a file another run created at ``path`` meanwhile."""
    aside = path.with_name(f"{path.name}.stale-{me['token']}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # gone since it was judged (its holder released it): look again
    moved = _read(aside)
    if moved is None or (moved[0] or {}).get("token") == token:
        aside.unlink(missing_ok=True)
        return True
    try:  # replaced in between: put it back
        os.link(aside, path)
    except FileExistsError:  # a third run created it meanwhile and holds it now: it keeps it
        log.warning("%s: a takeover race displaced the lock file %s of %s, and another run has created it since: "
                    "the displaced run reports this at its next heartbeat", path.parent, path,
                    describe(moved[0]) if moved[0] else "a run whose lock file is unreadable")
    aside.unlink(missing_ok=True)
    return False


def _take_over(path: Path, token: str | None, me: dict[str, Any], stale_s: float) -> bool:
    """Remove the lock file if it is still the one judged stale (``token``); True if removed. Takers serialise
    on ``path.takeover`` (created exclusively), so a lock created meanwhile by another taker is never removed."""
    guard = path.with_name(path.name + ".takeover")
    if not _create(guard, me):
        found = _read(guard, tries=3)
        if found is not None and found[1] > stale_s:  # a taker died inside the few ms of its takeover
            _remove_if(guard, (found[0] or {}).get("token"), me)
        return False
    try:
        found = _read(path)
        if found is None or (found[0] or {}).get("token") != token:
            return False  # gone or replaced since it was judged: judge again
        return _remove_if(path, token, me)
    finally:
        guard.unlink(missing_ok=True)


def _refusal(spec: RunDir, info: dict[str, Any] | None, age_s: float, stale_s: float) -> DirectoryHeld:
    who = describe(info) if info else "a run whose lock file is unreadable"
    return DirectoryHeld(
        f"{spec.directory} is in use by another run: {who}; its heartbeat is {age_s:.0f} s old. Two runs writing "
        f"one directory corrupt each other: wait for it to end, or write elsewhere. A holder that died is taken over "
        f"at once on its own host or by its requeued Slurm job, else after {stale_s:g} s without a heartbeat "
        f"({STALE_ENV}); if you are sure it is gone, delete {spec.lock_path}")


class DirectoryLock:
    """A held lock: a daemon thread touches the file every ``heartbeat_s``; ``release`` removes it."""

    def __init__(self, spec: RunDir, info: dict[str, Any], heartbeat_s: float) -> None:
        self.spec, self.info, self.path = spec, info, spec.lock_path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="photoz-run-lock")
        self._thread.start()

    def _ours(self) -> bool | None:
        found = _read(self.path, tries=3)
        return None if found is None else (found[0] or {}).get("token") == self.info["token"]

    def _beat(self, interval: float) -> None:
        missing = 0
        while not self._stop.wait(interval):
            try:
                ours = self._ours()
                if ours:
                    os.utime(self.path)
                    missing = 0
                    continue
                missing += 1
                if ours is False or missing >= 3:
                    found = _read(self.path, tries=3)
                    other = describe(found[0]) if found and found[0] else "nobody"
                    log.error("%s: this run's lock %s was taken over (now held by %s): another run may write here",
                              self.spec.directory, self.path, other)
                    return
            except OSError as exc:  # a file-system hiccup: the next beat tries again
                log.warning("%s: could not refresh the run lock %s: %s", self.spec.directory, self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            if self._ours():
                self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: could not remove the run lock %s: %s", self.spec.directory, self.path, exc)
        finally:
            with _held_guard:
                _held.discard(str(self.path.resolve()))


def acquire(spec: RunDir, environ: Mapping[str, str] | None = None) -> DirectoryLock:
    """Take ``spec``'s lock (creating the directory), taking over a stale holder with a log line; raises
    ``DirectoryHeld`` naming the directory and the holder when another run holds it."""
    path, stale_s = spec.lock_path, stale_seconds()
    heartbeat_s = heartbeat_seconds()
    me = holder_info(spec.what, environ)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DirectoryHeld(f"{spec.directory}: cannot create the directory for its run lock: {exc}") from None
    key = str(path.resolve())
    with _held_guard:
        if key in _held:
            raise DirectoryHeld(f"{spec.directory} is already held by this process (pid {me['pid']}); "
                                f"a second {spec.what} cannot write into it")
        _held.add(key)
    try:
        return _acquire(spec, me, stale_s, heartbeat_s)
    except BaseException as exc:
        with _held_guard:
            _held.discard(key)
        if isinstance(exc, OSError):  # permissions, a full or read-only file system...
            raise DirectoryHeld(f"{spec.directory}: cannot use its run lock {path}: {exc}") from None
        raise


def _acquire(spec: RunDir, me: dict[str, Any], stale_s: float, heartbeat_s: float) -> DirectoryLock:
    """Create the lock, or judge its holder and take it over if stale (a few rounds: takers may race)."""
    path = spec.lock_path
    for _ in range(_TAKEOVER_ROUNDS):
        if _create(path, me):
            return DirectoryLock(spec, me, heartbeat_s)
        found = _read(path)
        if found is None:
            continue  # released in between: try again
        info, age = found
        reason = stale_reason(info, age, stale_s, me) if info else (
            f"unreadable lock file, untouched for {age:.0f} s" if age > stale_s else None)
        if reason is None:
            raise _refusal(spec, info, age, stale_s)
        if _take_over(path, (info or {}).get("token"), me, stale_s):
            log.warning("%s: took over the run lock from a stale holder, %s: %s", spec.directory,
                        describe(info) if info else "unknown", reason)
        else:
            time.sleep(0.05)  # another taker is at it: look again
    raise DirectoryHeld(f"{spec.directory}: could not take the run lock {path} (other runs keep taking it)")


@contextlib.contextmanager
def hold_directory(directory: str | os.PathLike, what: str, lock_file: str | os.PathLike | None = None
                   ) -> Iterator[DirectoryLock]:
    """Hold ``directory`` for the block (one process); released on exit, exception or not."""
    lock = acquire(RunDir(Path(directory), what, Path(lock_file) if lock_file else None))
    try:
        yield lock
    finally:
        lock.release()


class _Broadcaster(Protocol):
    rank: int

    def broadcast_object(self, obj: Any, root: int = 0) -> Any: ...


@contextlib.contextmanager
def hold_for_ranks(comm: _Broadcaster, spec: RunDir | None) -> Iterator[DirectoryLock | None]:
    """Rank 0 holds ``spec`` for the block; every rank learns the outcome (one broadcast, a collective)
    before the block, so a refused run raises on every rank before any of them writes. ``None``: no lock."""
    if spec is None:
        yield None
        return
    lock, error = None, None
    if comm.rank == 0:
        try:
            lock = acquire(spec)
        except Exception as exc:  # every failure must reach the broadcast, or the other ranks wait forever
            error = str(exc) if isinstance(exc, PhotozError) else f"{spec.directory}: run lock: {exc}"
    error = comm.broadcast_object(error)
    if error:
        raise DirectoryHeld(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
