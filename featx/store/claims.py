"""Claims: extractions running at once into one store divide the images instead of repeating them.

Beside the store, ``<store>.claims/`` holds one file per running extraction,
``run-<pid>-<token>.json`` (its pid, host, process start time and since when it writes), and one
per chunk of images it has claimed, ``claim-<pid>-<token>-<seq>.json`` (the same owner, the
entries it computes and the content keys). Every look at the claims and every new claim happens
under the store's writer lock (:mod:`featx.store.locks`), and a claim is released only after its
rows are committed (or its images failed), so a key is at any moment committed, claimed or free:
two processes never compute the same key, whatever their timing. A process takes a chunk of
free keys at a time (what the store holds meanwhile is dropped first), and at the end waits for
the keys that another process claimed; if that process dies (its files are removed by the next
look: its pid is gone on this host, or reused), or commits nothing for ``timeout`` seconds, the
waiting process computes those keys itself. The last extraction to end removes the folder, so
at rest a store is its ``.h5`` file (and its ``.lock``) again.

The store's file format is unchanged: the claims are advisory files that no reader needs.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import pathlib
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from featx.exceptions import FeatxWarning, StoreError
from featx.store.files import unlink_quietly
from featx.store.locks import writer_lock
from featx.store.names import Entry, claims_dir, utcnow

__all__ = ["Owner", "WorkShare", "live_writers"]

_RUN = "run-"
_CLAIM = "claim-"
_SUFFIX = ".json"
_SEQ = itertools.count()


def _start_time(pid: int) -> str | None:
    """The start time of a process on this host (clock ticks since boot), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19].decode() if len(fields) > 19 else None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        if state in (b"Z", b"X"):  # dead, not yet reaped by its parent
            return False
    except (OSError, IndexError):
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start  # another start time: the pid was reused


@dataclass(frozen=True)
class Owner:
    """Who runs an extraction: pid, host, process start time, a token per run, since when."""

    pid: int
    host: str
    start: str | None
    token: str
    since: str

    @classmethod
    def me(cls) -> Owner:
        pid = os.getpid()
        return cls(pid, socket.gethostname(), _start_time(pid), uuid.uuid4().hex[:12], utcnow())

    @classmethod
    def from_json(cls, data: Mapping) -> Owner:
        return cls(int(data["pid"]), str(data["host"]), data.get("start"), str(data["token"]), str(data["since"]))

    def to_json(self) -> dict:
        return {"pid": self.pid, "host": self.host, "start": self.start, "token": self.token, "since": self.since}

    def alive(self) -> bool:
        """False only when this host knows the process is gone; a process on another host counts as alive."""
        return self.host != socket.gethostname() or _pid_alive(self.pid, self.start)

    def describe(self) -> str:
        """``another process (pid 123 on host, writing since 2026-12-01T20:50:00+00:00)``."""
        return f"another process (pid {self.pid} on {self.host}, writing since {self.since})"


def _read_json(path: pathlib.Path) -> dict | None:
    """A claims file, or None when it is gone or unreadable (half-written by a process that died)."""
    try:
        data = json.loads(path.read_text())
        Owner.from_json(data)
        return data
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_json(path: pathlib.Path, data: dict) -> None:
    # Written under the writer lock, and read only under it: a file is either whole or left by a
    # process that died while writing it, which readers remove. A claim is advisory, so no fsync.
    with open(path, "x") as fh:
        json.dump(data, fh)


def _names(folder: pathlib.Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def live_writers(store: pathlib.Path, *, exclude: str | None = None) -> list[Owner]:
    """The extractions writing to ``store`` now, removing the files of those that died.

    The caller holds the writer lock of the store.

    Parameters
    ----------
    store : pathlib.Path
        The store's main file.
    exclude : str, optional
        A run token to leave out (the caller's own run).

    Returns
    -------
    list of Owner

    Examples
    --------
    >>> import pathlib, tempfile
    >>> live_writers(pathlib.Path(tempfile.mkdtemp()) / "s-0123456789ab.h5")
    []
    """
    folder = claims_dir(store)
    owners, dead = [], set()
    for name in _names(folder):
        if not name.startswith(_RUN):
            continue
        data = _read_json(folder / name)
        if data is None:
            continue
        owner = Owner.from_json(data) if data else None
        if owner is None or not owner.alive():
            dead.add(name.split("-")[2].removesuffix(_SUFFIX) if owner is None else owner.token)
            unlink_quietly(folder / name)
        elif owner.token != exclude:
            owners.append(owner)
    for name in _names(folder):  # the claims of the dead go with them
        if name.startswith(_CLAIM) and len(name.split("-")) > 3 and name.split("-")[2] in dead:
            unlink_quietly(folder / name)
    return owners


@dataclass(frozen=True)
class _Claim:
    name: str
    owner: Owner
    entries: frozenset
    keys: frozenset


class WorkShare:
    """The part of an extraction's work that no other process is doing: claimed a chunk at a time.

    Use it as a context manager (it registers this run beside the store and unregisters it),
    compute the batches of :meth:`batches`, call :meth:`finished` with the keys of each batch
    once its rows are committed (or its images failed), and :meth:`wait` when the batches end;
    repeat while :meth:`wait` returns True.

    Parameters
    ----------
    store : FeatureStore
        The store the rows are written to (the claims live beside it, under its writer lock).
    lookup : object with ``held(keys, entries)``
        What tells which keys are committed (the store itself, or a shard's combined view).
    keys : sequence of str
        The content keys to compute, in the order to compute them; :meth:`batches` yields
        positions in this sequence.
    needs : mapping of str to frozenset of (layer, pooling)
        For each key, the entries it lacks: another process's claim covers a key only if it
        computes all of them.
    chunk : int
        How many keys one claim takes.
    timeout : float
        Seconds to wait for another process that commits nothing before computing its keys here.
    notify : callable, optional
        Called with each message (another writer found; a stalled writer taken over); default:
        a :class:`~featx.exceptions.FeatxWarning`.

    Attributes
    ----------
    n_from_others : int
        Keys that another process committed while this one ran, so not computed here.
    writers : list of Owner
        The other processes seen writing to the store.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from featx.store import FeatureStore
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
    >>> keys = [f"{i:032x}" for i in range(5)]
    >>> with WorkShare(store, store, keys, {k: frozenset([("stage1", "avg")]) for k in keys}, chunk=4) as share:
    ...     while True:
    ...         for positions in share.batches(2):
    ...             done = [keys[p] for p in positions]
    ...             store.write(done, {("stage1", "avg"): np.ones((len(done), 4))})
    ...             share.finished(done)
    ...         if not share.wait():
    ...             break
    >>> len(store.keys), share.n_from_others, share.last
    (5, 0, True)
    >>> tmp.cleanup()
    """

    def __init__(self, store, lookup, keys: Sequence[str], needs: Mapping[str, frozenset], *, chunk: int,
                 timeout: float = 60.0, notify: Callable[[str], None] | None = None):
        self.store = store
        self.lookup = lookup
        self.keys = list(keys)
        self.needs = needs
        self.chunk = max(int(chunk), 1)
        self.timeout = float(timeout)
        self.notify = notify
        self.folder = claims_dir(store.path)
        self.me = Owner.me()
        self.n_from_others = 0
        self.writers: list[Owner] = []
        self.last = False
        self._position = {key: i for i, key in enumerate(self.keys)}
        self._queue: collections.deque[str] = collections.deque(self.keys)  # free when last looked, in order
        self._awaited: dict[str, None] = {}  # claimed by others when looked: waited for at the end
        self._mine: dict[str, set[str]] = {}  # my claim files and their keys not yet finished
        self._claim_cache: dict[str, _Claim | None] = {}
        self._taken_over: set[str] = set()  # tokens of stalled writers whose claims are ignored
        self._registered = False

    # -- lifetime ----------------------------------------------------------------------------

    def _lock(self):
        return writer_lock(self.store.path, self.store.lock_timeout)

    def __enter__(self) -> WorkShare:
        with self._lock():
            self._others()
            run = self.folder / f"{_RUN}{self.me.pid}-{self.me.token}{_SUFFIX}"
            try:
                self.folder.mkdir(exist_ok=True)
                _write_json(run, self.me.to_json())
            except OSError as exc:
                raise StoreError(f"cannot write {run} ({exc}); the folder {self.folder.parent} must be "
                                 "writable to add features") from exc
            self._registered = True
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> bool:
        """Release every claim and unregister; return whether no other writer is left (:attr:`last`)."""
        if not self._registered:
            return self.last
        for name in list(self._mine):
            unlink_quietly(self.folder / name)
        self._mine.clear()
        with self._lock():
            unlink_quietly(self.folder / f"{_RUN}{self.me.pid}-{self.me.token}{_SUFFIX}")
            self._registered = False
            self.last = not live_writers(self.store.path)
            if self.last:
                for name in _names(self.folder):  # what is left belongs to no live run
                    unlink_quietly(self.folder / name)
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
        return self.last

    # -- the claims of others ----------------------------------------------------------------

    def _others(self) -> list[_Claim]:
        """The live claims of other runs (the caller holds the lock); says once who else writes."""
        live = live_writers(self.store.path, exclude=self.me.token)
        for owner in live:
            if all(owner.token != seen.token for seen in self.writers):
                self.writers.append(owner)
                self._say(f"{owner.describe()} is writing to the store {self.store.path}: "
                          "the images it commits are skipped here")
        tokens = {owner.token for owner in live}
        claims, names = [], set()
        for name in _names(self.folder):
            if not name.startswith(_CLAIM) or name in self._mine:
                continue
            names.add(name)
            if name not in self._claim_cache:
                data = _read_json(self.folder / name)
                if data == {}:  # half-written by a process that died while claiming
                    unlink_quietly(self.folder / name)
                    data = None
                self._claim_cache[name] = None if data is None else _Claim(
                    name, Owner.from_json(data), frozenset(tuple(e) for e in data["entries"]), frozenset(data["keys"]))
            claim = self._claim_cache[name]
            if claim is None or claim.owner.token not in tokens or claim.owner.token in self._taken_over:
                continue  # its run is gone (removed just now) or stalled and taken over
            claims.append(claim)
        for stale in set(self._claim_cache) - names:
            del self._claim_cache[stale]
        return claims

    @staticmethod
    def _covered(claims: list[_Claim], key: str, needs: frozenset) -> bool:
        return any(key in claim.keys and needs <= claim.entries for claim in claims)

    def _done(self, keys: list[str]) -> np.ndarray:
        """Which of ``keys`` the store holds every needed entry of."""
        done = np.zeros(len(keys), dtype=bool)
        groups: dict[frozenset, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self.needs[key], []).append(i)
        for entries, rows in groups.items():
            held = self.lookup.held([keys[i] for i in rows], sorted(entries))
            done[rows] = np.logical_and.reduce([held[e] for e in sorted(entries)])
        return done

    def _say(self, message: str) -> None:
        if self.notify is not None:
            self.notify(message)
        else:
            warnings.warn(message, FeatxWarning, stacklevel=3)

    # -- claiming ----------------------------------------------------------------------------

    def _claim(self) -> list[str]:
        """Claim the next chunk of free keys; [] when no free key is left."""
        with self._lock():
            claims = self._others()
            taken: list[str] = []
            while len(taken) < self.chunk and self._queue:
                window = []
                while len(window) < 2 * self.chunk and self._queue:
                    key = self._queue.popleft()
                    if self._covered(claims, key, self.needs[key]):
                        self._awaited[key] = None
                    else:
                        window.append(key)
                if not window:
                    break
                done = self._done(window)
                self.n_from_others += int(done.sum())
                free = [key for key, ok in zip(window, done) if not ok]
                room = self.chunk - len(taken)
                taken += free[:room]
                self._queue.extendleft(reversed(free[room:]))  # the rest stays queued, in order
            if taken:
                entries = sorted(set().union(*(self.needs[key] for key in taken)))
                name = f"{_CLAIM}{self.me.pid}-{self.me.token}-{next(_SEQ):06d}{_SUFFIX}"
                try:
                    _write_json(self.folder / name, {**self.me.to_json(), "entries": entries, "keys": taken})
                except OSError as exc:
                    raise StoreError(f"cannot write the claim {self.folder / name} ({exc}); the folder "
                                     f"{self.folder.parent} must be writable to add features") from exc
                self._mine[name] = set(taken)
            return taken

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        """Positions in :attr:`keys` to compute, ``batch_size`` at a time, claimed a chunk at a time.

        Ends when no free key is left: the rest is committed or claimed by another process.
        """
        while True:
            taken = self._claim()
            if not taken:
                return
            for start in range(0, len(taken), batch_size):
                yield [self._position[key] for key in taken[start:start + batch_size]]

    def finished(self, keys: Iterable[str]) -> None:
        """Say that these claimed keys are committed (or failed); release the claims they complete."""
        keys = set(keys)
        for name, pending in list(self._mine.items()):
            pending -= keys
            if not pending:
                unlink_quietly(self.folder / name)  # after the rows are committed: never before
                del self._mine[name]

    # -- the end -----------------------------------------------------------------------------

    def wait(self, stop: Callable[[], bool] | None = None, *, poll: float = 0.05) -> bool:
        """Wait for the keys other processes claimed; return True when some are left to compute here.

        Returns False once every key is committed (or was computed here). Returns True when a
        claim was released without its rows (that process failed, was interrupted or died), or
        when its process committed nothing for ``timeout`` seconds: then call :meth:`batches`
        again.

        Raises
        ------
        KeyboardInterrupt
            When ``stop`` returns True (checked at every look).
        """
        seen, since = None, time.monotonic()
        while True:
            if stop is not None and stop():
                raise KeyboardInterrupt
            awaited = list(self._awaited)
            if not awaited:
                return bool(self._queue)
            with self._lock():
                claims = self._others()
                done = self._done(awaited)
                self.n_from_others += int(done.sum())
                left = [key for key, ok in zip(awaited, done) if not ok]
                free = [key for key in left if not self._covered(claims, key, self.needs[key])]
                state = (len(left), frozenset(claim.name for claim in claims))
            self._awaited = dict.fromkeys(key for key in left if key not in set(free))
            if free:
                self._queue += free
                return True
            if not self._awaited:
                return False
            if state != seen:
                seen, since = state, time.monotonic()
            elif time.monotonic() - since > self.timeout:
                stalled = {claim.owner.token: claim.owner for claim in claims}
                self._taken_over |= set(stalled)
                for owner in stalled.values():
                    self._say(f"{owner.describe().replace('another process', 'the process', 1)} has committed "
                              f"nothing for {self.timeout:g} s: computing its {len(self._awaited)} claimed images here")
                self._queue += list(self._awaited)
                self._awaited = {}
                return True
            time.sleep(poll)
            poll = min(poll * 1.5, 0.5)
