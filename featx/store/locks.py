"""The writer lock of a store: ``fcntl.flock`` on ``<store>.lock``, re-entrant within a process.

One process writes a store at a time; readers take no lock. Within a process the lock is
re-entrant (a run holds it across many writes, each of which takes it again) and one thread
holds it at a time. The lock file records the pid, host and start time of its holder, so that a
process that waits can say who it waits for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import threading
import time
from collections.abc import Iterator

from featx.exceptions import StoreError
from featx.store.names import lock_file, utcnow

__all__ = ["writer_lock"]


class _HeldLock:
    __slots__ = ("depth", "fd", "rlock")

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.fd: int | None = None
        self.depth = 0


_HELD: dict[str, _HeldLock] = {}
_HELD_GUARD = threading.Lock()


def _forget_locks_in_child() -> None:
    # A forked child shares the parent's open lock descriptions: closing its copies leaves the
    # parent's locks held, and the child takes its own lock if it writes.
    global _HELD_GUARD
    for held in _HELD.values():
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
    _HELD.clear()
    _HELD_GUARD = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _lock_owner(lock_path: pathlib.Path) -> str:
    try:
        owner = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        owner = {}
    if not owner.get("pid"):
        return "another process"
    return f"another process (pid {owner['pid']} on {owner.get('host', '?')}, writing since {owner.get('since', '?')})"


def _acquire_flock(lock_path: pathlib.Path, deadline: float, store: pathlib.Path, timeout: float) -> int:
    delay = 0.005
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot create the writer lock {lock_path} ({exc}); the folder {lock_path.parent} must "
                "be writable to add features (reading needs no lock)"
            ) from exc
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now >= deadline:
                        raise StoreError(
                            f"{_lock_owner(lock_path)} is writing to the store {store}; waited "
                            f"{timeout:g} s for its lock {lock_path.name}. Wait until that run ends "
                            "(reading the store meanwhile is safe) or pass a longer lock_timeout"
                        ) from None
                    time.sleep(min(delay, deadline - now))
                    delay = min(delay * 2, 0.1)
            try:  # remove_store may have unlinked the lock file while we waited on it
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            with contextlib.suppress(OSError):
                owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": utcnow()}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(owner).encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def writer_lock(store: pathlib.Path, timeout: float) -> Iterator[bool]:
    """Hold the writer lock of ``store``; yield True for the outermost holder in this process.

    Parameters
    ----------
    store : pathlib.Path
        The store's main file (the lock is ``<store>.lock`` beside it).
    timeout : float
        Seconds to wait for another process's lock, or another thread's.

    Yields
    ------
    bool
        Whether this is the outermost hold in this process (the one that took the flock).

    Raises
    ------
    StoreError
        If the lock is still held by another process or thread after ``timeout`` seconds, or
        the lock file cannot be created.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> store = pathlib.Path(tempfile.mkdtemp()) / "s-0123456789ab.h5"
    >>> with writer_lock(store, 1.0) as outer:
    ...     with writer_lock(store, 1.0) as inner:
    ...         outer, inner
    (True, False)
    """
    lock_path = lock_file(store)
    timeout = max(float(timeout), 0.0)
    deadline = time.monotonic() + timeout
    with _HELD_GUARD:
        held = _HELD.setdefault(os.path.realpath(lock_path), _HeldLock())
    if not held.rlock.acquire(timeout=timeout):
        raise StoreError(
            f"another thread of this process is writing to the store {store}; waited {timeout:g} s. "
            "Write from one thread, or pass a longer lock_timeout"
        )
    try:
        outermost = held.depth == 0
        if outermost:
            held.fd = _acquire_flock(lock_path, deadline, store, timeout)
        held.depth += 1
        try:
            yield outermost
        finally:
            held.depth -= 1
            if held.depth == 0 and held.fd is not None:
                fd, held.fd = held.fd, None
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)  # closing the only descriptor releases the flock
    finally:
        held.rlock.release()
