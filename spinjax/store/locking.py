"""Cross-process lock files for the store (metadata lock, per-step claims).

A lock is a file created with ``os.open(O_CREAT | O_EXCL)``, which is atomic on local file
systems and on NFS v3+ / Lustre / GPFS, unlike ``flock``, which some shared file systems do not
support or only emulate per node. The file holds its owner (host, pid, process start time,
a random token). A lock whose owner died is stale and is broken by the next process that
wants it: at once when the owner ran on this host and its pid is gone (or was reused), else
when the file's mtime is older than ``stale_after`` seconds. Owners refresh the mtime from a
heartbeat thread, so a live lock on another host is never older than a few heartbeats;
clocks of hosts sharing the store must agree to well within ``stale_after``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from ..errors import InputError

HOST = socket.gethostname()
STALE_AFTER = 60.0  # seconds without heartbeat before a lock counts as dead (default)
BREAKER_STALE = 10.0  # a ``.break`` file lives for microseconds; older ones are leftovers


def default_stale_after() -> float:
    """``$SPINJAX_LOCK_STALE_AFTER`` seconds, else :data:`STALE_AFTER` (hosts with skewed clocks
    want more; tests of frozen writers want less)."""
    text = os.environ.get("SPINJAX_LOCK_STALE_AFTER")
    if text is None:
        return STALE_AFTER
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise InputError(f"SPINJAX_LOCK_STALE_AFTER={text!r}: expected a positive number of seconds")
    return value


def _start_time(pid: int) -> str | None:
    """The process start time (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    current = _start_time(pid)
    return start is None or current is None or current == start


class LockLostError(InputError):
    """This process's lock was taken over (it was frozen longer than the lock's stale time)."""


class LockFile:
    """An exclusive lock file; ``with LockFile(path):`` waits for it (``timeout`` seconds).

    The file holds a random token of its owner; :meth:`verify` checks that the file is still
    this owner's before a write that the lock protects.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 600.0, stale_after: float | None = None):
        self.path = Path(path)
        self.timeout = timeout
        self.stale_after = default_stale_after() if stale_after is None else stale_after
        self.owner = {"host": HOST, "pid": os.getpid(), "start": _start_time(os.getpid()),
                      "token": uuid.uuid4().hex, "since": time.time()}  # fmt: skip
        self.held = False

    def holder(self) -> dict | None:
        """The owner recorded in the file ({} if unreadable), or None when nobody holds it."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, info: dict, mtime: float) -> bool:
        if time.time() - mtime > self.stale_after:
            return True
        if info.get("host") == HOST and isinstance(info.get("pid"), int):
            return not _alive(info["pid"], info.get("start"))
        return False  # another host: only the heartbeat tells

    def break_if_stale(self) -> bool:
        """Remove the lock file if its owner is dead; True if it is gone now."""
        try:
            seen = (self.path.read_bytes(), os.stat(self.path).st_mtime)
        except FileNotFoundError:
            return True
        try:
            info = json.loads(seen[0] or b"{}")
        except ValueError:
            info = {}
        if not self._stale(info, seen[1]):
            return False
        # Two processes may find the same stale lock: the one holding ``.break`` removes it, after
        # checking it is still the file it judged (not a fresh lock taken meanwhile).
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.stat(breaker).st_mtime > BREAKER_STALE:
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        try:
            os.close(fd)
            try:
                if self.path.read_bytes() == seen[0]:
                    self.path.unlink()
            except FileNotFoundError:
                pass
        finally:
            breaker.unlink(missing_ok=True)
        return True

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale; never waits."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            except FileExistsError:
                if self.break_if_stale():
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.owner))
            self.held = True
            _heartbeat.add(self)
            return True
        return False

    def acquire(self) -> None:
        """Wait (up to ``timeout`` seconds) for the lock; an InputError naming its holder after."""
        deadline, pause = time.monotonic() + self.timeout, 0.01
        while not self.try_acquire():
            if time.monotonic() > deadline:
                info = self.holder() or {}
                raise InputError(
                    f"{self.path}: held by host {info.get('host')!r} pid {info.get('pid')} for more than "
                    f"{self.timeout:.0f} s; if no spinjax process runs there, delete this file"
                )
            time.sleep(pause)
            pause = min(2 * pause, 0.5)

    def verify(self) -> None:
        """Raise :class:`LockLostError` unless this process still holds the lock: a process
        frozen (SIGSTOP, a suspended VM) past the stale time may have lost it to another one."""
        if self.held and self.holder() == self.owner:
            return
        info = self.holder() or {}
        taken = f" by host {info.get('host')!r} pid {info.get('pid')}" if info else ""
        raise LockLostError(
            f"{self.path}: this process lost the lock (it was stopped for more than "
            f"{self.stale_after:.0f} s and the lock was taken over{taken}); it wrote nothing more; "
            "rerun the same command to complete the missing steps"
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _heartbeat.discard(self)
        try:  # only our own file: a lock broken as stale may have a new owner by now
            if self.holder() == self.owner:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> LockFile:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Heartbeat:
    """One daemon thread refreshing the mtime of every held lock of this process."""

    def __init__(self):
        self._locks: set[LockFile] = set()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, lock: LockFile) -> None:
        with self._mutex:
            self._locks.add(lock)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="spinjax-heartbeat")
                self._thread.start()

    def discard(self, lock: LockFile) -> None:
        with self._mutex:
            self._locks.discard(lock)

    def _run(self) -> None:
        while True:
            with self._mutex:
                locks = list(self._locks)
            time.sleep(min([lock.stale_after for lock in locks] + [default_stale_after()]) / 6)
            for lock in locks:
                try:
                    if lock.holder() == lock.owner:  # never refresh a lock taken over meanwhile
                        os.utime(lock.path)
                except OSError:
                    pass


_heartbeat = _Heartbeat()
