"""The HDF5 feature store: pooled CNN features keyed by image content, safe against crashes.

A store holds the features of one *extraction configuration* (backbone, resolved weights,
preprocessing, precision, featx version). Rows are keyed by the content key of an image (32
lowercase hex characters computed by the caller), and each ``(layer, pooling)`` *entry* has its
own set of keys, so a layer can be added later for images that are already stored.

On-disk layout, for ``path = <cache_dir>/<backbone>-<hash12>.h5``:

``<path>``
    The consolidated HDF5 file. It is never modified in place: :meth:`FeatureStore.consolidate`
    writes a new file ``<path>.tmp-<pid>``, fsyncs it, replaces ``<path>`` with ``os.replace``
    and fsyncs the folder. Root attributes: ``featx_config`` (canonical JSON of the
    configuration), ``config_hash``, ``dtype``, ``created``, ``updated`` (ISO-8601 UTC),
    ``format_version``, ``provenance`` (JSON) and ``generation`` (a fresh id each time the file
    is written, which readers use to notice a replaced file). One group per entry,
    ``/features/<layer>/<pooling>``, with attributes ``layer``, ``pooling``, ``dim`` and two
    datasets: ``keys`` of shape ``(n,)``, fixed-length bytes ``S32``, sorted and unique, and
    ``data`` of shape ``(n, dim)``, ``float32`` or ``float16``, chunked (about 256 KiB a chunk),
    resizable (``maxshape=(None, dim)``) and uncompressed (``lzf`` and ``gzip`` + ``shuffle`` were
    measured on ReLU-like features with 40-60 % zeros: they save 30-45 % of the space but make
    reads 10-17 times slower; a ``float16`` store halves the size at no cost in speed). Because chunks are unfiltered, rows
    are read straight from the file (``os.preadv`` at the chunk offsets HDF5 reports), which
    reads only the rows asked; anything else goes through h5py.
``<path>.journal/seg-<time_ns>-<pid>-<seq>.npz``
    One segment per batch written by :meth:`FeatureStore.write`: an uncompressed ``.npz`` with
    ``meta`` (JSON: entries, dims, configuration), ``keys`` and one array per entry. A segment is
    written to ``.tmp-<name>``, fsynced and renamed, so a batch is either fully there or absent.
    Readers see the main file and the journal merged; consolidation empties the journal, so at
    rest a store is a single ``.h5`` file.
``<path>.lock``
    An empty file locked with ``fcntl.flock`` by the one process that writes (it also records
    that process's pid). Readers take no lock.

A process killed at any moment leaves either a committed segment or a temporary file that
readers ignore and the next writer removes; a key present twice (main file and journal, or two
segments) holds the same features, and the earliest copy wins.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import h5py
import numpy as np

from featx.paths import default_cache_dir
from featx.exceptions import CacheMismatchError, FeatxError, MissingKeysError, StoreError, StoreInputError, suggest

__all__ = [
    "FORMAT_VERSION",
    "FeatureSet",
    "FeatureStore",
    "StoreInputError",
    "canonical_json",
    "config_hash",
    "default_cache_dir",
    "list_stores",
    "remove_store",
    "store_path",
]

FORMAT_VERSION = 1
_DTYPES = ("float32", "float16")
_KEY_LEN = 32
_CHUNK_BYTES = 256 * 1024
_KEY_CHUNK_ROWS = 8192
_BLOCK_BYTES = 64 * 1024 * 1024
_JOURNAL_SUFFIX = ".journal"
_LOCK_SUFFIX = ".lock"
_SEG_PREFIX = "seg-"
_SEG_SUFFIX = ".npz"
_TMP_PREFIX = ".tmp-"
_STORE_NAME = re.compile(r"^(?P<backbone>.+)-(?P<hash>[0-9a-f]{12})\.h5$")
_HOW_TO_CREATE = (
    "create it by extracting features ('featx extract ...'), or in Python with "
    "featx.store.FeatureStore.open(config, cache_dir=...)"
)
_SEQ = itertools.count()

T = TypeVar("T")
Entry = tuple[str, str]


class _Vanished(Exception):
    """A journal segment was consolidated away while it was being read; read again."""


# --------------------------------------------------------------------------------------------
# configuration, names and paths


def _plain(obj: Any, where: str) -> Any:
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise StoreInputError(
                    f"{where}: configuration keys must be strings, got {key!r} "
                    f"({type(key).__name__}); convert it with str()"
                )
            out[key] = _plain(value, f"{where}.{key}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return _plain(obj.item(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise StoreInputError(
                f"{where}: {obj!r} cannot be part of a configuration; use a finite number or a string"
            )
        return obj
    raise StoreInputError(
        f"{where}: cannot describe a configuration with a {type(obj).__name__} ({obj!r}); "
        "use strings, numbers, booleans, None, lists and dicts with string keys"
    )


def canonical_json(obj: Any) -> str:
    """Return the canonical JSON text of a configuration: same value, same text, on every run.

    Keys are sorted, separators are compact, text is ASCII; tuples become lists, numpy scalars
    and arrays become Python numbers and lists, paths become strings.

    Parameters
    ----------
    obj : mapping, list, str, int, float, bool or None
        The value to describe. Mapping keys must be strings; floats must be finite.

    Returns
    -------
    str
        The JSON text.

    Raises
    ------
    StoreInputError
        If the value holds something JSON cannot describe stably (a set, an object, NaN).

    Examples
    --------
    >>> from featx.store import canonical_json
    >>> canonical_json({"size": (224, 224), "backbone": "resnet18"})
    '{"backbone":"resnet18","size":[224,224]}'
    """
    return json.dumps(
        _plain(obj, "config"), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def config_hash(config: Mapping) -> str:
    """Return the 12 hex characters of ``sha256(canonical_json(config))``.

    Parameters
    ----------
    config : mapping
        The extraction configuration.

    Returns
    -------
    str
        Twelve lowercase hex characters; equal configurations give equal hashes.

    Raises
    ------
    StoreInputError
        If ``config`` is not a mapping or cannot be described canonically.

    Examples
    --------
    >>> from featx.store import config_hash
    >>> config_hash({"backbone": "resnet18", "size": 224}) == config_hash({"size": 224, "backbone": "resnet18"})
    True
    >>> len(config_hash({"backbone": "resnet18"}))
    12
    """
    if not isinstance(config, Mapping):
        raise StoreInputError(f"the configuration must be a mapping (dict), got {type(config).__name__}")
    return hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()[:12]


def _file_stem(backbone: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", backbone).strip("-.")
    return stem or "backbone"


def store_path(config: Mapping, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the path of the store of a configuration: ``<cache_dir>/<backbone>-<hash12>.h5``.

    Parameters
    ----------
    config : mapping
        The extraction configuration; it must have a ``"backbone"`` string.
    cache_dir : str or path-like, default=None
        The folder of the stores; ``None`` means :func:`default_cache_dir`.

    Returns
    -------
    pathlib.Path
        The path; characters that do not belong in a file name (``:`` for instance) become ``-``.

    Raises
    ------
    StoreInputError
        If the configuration has no backbone name.

    Examples
    --------
    >>> from featx.store import config_hash, store_path
    >>> config = {"backbone": "timm:resnet18", "size": 224}
    >>> path = store_path(config, cache_dir="/data/cache")
    >>> path.name == f"timm-resnet18-{config_hash(config)}.h5"
    True
    """
    if not isinstance(config, Mapping):
        raise StoreInputError(f"the configuration must be a mapping (dict), got {type(config).__name__}")
    backbone = config.get("backbone")
    if not isinstance(backbone, str) or not backbone:
        raise StoreInputError(
            f"the configuration has no backbone name (config['backbone'] is {backbone!r}); "
            "expected a string such as 'resnet18' or 'timm:efficientnet_b0'"
        )
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{_file_stem(backbone)}-{config_hash(config)}.h5"


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_name(name: Any, what: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or name.startswith(".")
        or any(c.isspace() or not c.isprintable() for c in name)
    ):
        raise StoreInputError(
            f"invalid {what} name {name!r}: expected a non-empty string without '/', spaces or a "
            "leading '.' (dots inside are fine, e.g. 'blocks.4')"
        )
    return name


def _check_entry(entry: Any) -> Entry:
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise StoreInputError(f"an entry is a (layer, pooling) pair such as ('stage4', 'avg'), got {entry!r}")
    return _check_name(entry[0], "layer"), _check_name(entry[1], "pooling")


def _entry_label(entry: Entry) -> str:
    return f"{entry[0]}/{entry[1]}"


def _key_array(keys: Any) -> np.ndarray:
    """Return the content keys as a validated ``S32`` array (order and duplicates kept)."""
    if isinstance(keys, (str, bytes)):
        raise StoreInputError(f"keys must be a sequence of content keys, not one string ({keys!r}); wrap it in a list")
    if not isinstance(keys, np.ndarray):
        try:
            keys = list(keys)
        except TypeError as exc:
            raise StoreInputError(f"keys must be a sequence of content keys, got {type(keys).__name__}") from exc
    arr = np.asarray(keys)
    if arr.size == 0:
        return np.empty(0, dtype=f"S{_KEY_LEN}")
    if arr.ndim != 1:
        raise StoreInputError(f"keys must be one-dimensional, got an array of shape {arr.shape}")
    if arr.dtype.kind == "O" or arr.dtype.kind == "T":
        arr = np.array([k.decode("ascii", "replace") if isinstance(k, bytes) else k for k in arr.tolist()])
    if arr.dtype.kind not in "US":
        raise StoreInputError(f"keys must be strings of {_KEY_LEN} hex characters, got an array of {arr.dtype}")
    lengths = np.char.str_len(arr)
    try:
        raw = arr.astype(f"S{_KEY_LEN}")
    except UnicodeEncodeError:
        raw = None
    if raw is not None:
        codes = raw.view(np.uint8).reshape(-1, _KEY_LEN)
        hexchar = ((codes >= 48) & (codes <= 57)) | ((codes >= 97) & (codes <= 102))
        bad = ~hexchar.all(axis=1) | (lengths != _KEY_LEN)
    else:
        bad = np.array([len(k) != _KEY_LEN or re.fullmatch("[0-9a-f]+", str(k)) is None for k in arr.tolist()])
    if bad.any():
        first = arr[np.flatnonzero(bad)[0]]
        first = first.decode("ascii", "replace") if isinstance(first, bytes) else str(first)
        raise StoreInputError(
            f"{int(bad.sum())} of {arr.size} keys are not content keys: expected {_KEY_LEN} lowercase hex "
            f"characters, got e.g. {first!r}; pass the content keys featx computed for the images"
        )
    return raw


def _isin_sorted(sorted_keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (found, position) of each query key in a sorted unique key array."""
    if sorted_keys.size == 0 or query.size == 0:
        return np.zeros(query.shape, bool), np.zeros(query.shape, np.intp)
    pos = np.searchsorted(sorted_keys, query)
    clipped = np.minimum(pos, sorted_keys.size - 1)
    return (pos < sorted_keys.size) & (sorted_keys[clipped] == query), clipped


# --------------------------------------------------------------------------------------------
# durable files


def _fsync_dir(folder: pathlib.Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_no_space(exc: BaseException) -> bool:
    text = str(exc)
    no_space = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    return no_space or "No space left" in text or "errno = 28" in text


def _write_failed(exc: BaseException, what: str, path: pathlib.Path) -> StoreError:
    if _is_no_space(exc):
        return StoreError(
            f"no space left on device while writing {what} to {path.parent} ({exc}). Nothing was "
            f"committed and the store {path.name} is unchanged (the partial file was removed); free "
            "some disk space or point FEATX_CACHE / cache_dir at a larger disk, then run again "
            "(completed batches are kept)"
        )
    return StoreError(
        f"could not write {what} to {path.parent} ({exc}). Nothing was committed and the store "
        f"{path.name} is unchanged; check that the folder exists and is writable"
    )


def _unlink_quietly(path: pathlib.Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# --------------------------------------------------------------------------------------------
# the writer lock: fcntl.flock on <store>.lock, re-entrant within a process


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
                owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": _utcnow()}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(owner).encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def _writer_lock(store: pathlib.Path, timeout: float) -> Iterator[bool]:
    """Hold the writer lock of ``store``; yield True for the outermost holder in this process."""
    lock_path = store.with_name(store.name + _LOCK_SUFFIX)
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


# --------------------------------------------------------------------------------------------
# in-memory indexes


@dataclass
class _MainEntry:
    dim: int
    n: int
    keys: np.ndarray | None = None
    offsets: np.ndarray | None = None  # file offset of each chunk, when rows can be read directly
    offsets_checked: bool = False


@dataclass
class _MainIndex:
    ident: tuple | None
    entries: dict[Entry, _MainEntry] = field(default_factory=dict)


# Indexes (sorted keys, chunk offsets) of recently read main files, shared by the FeatureStore
# instances of one process. A main file is never modified in place and every rewrite gets a new
# identity (inode, mtime, generation), so an entry can be stale only in being unused.
_MAIN_INDEXES: dict[str, _MainIndex] = {}
_MAIN_INDEXES_KEPT = 8


@dataclass(frozen=True)
class _Segment:
    name: str
    keys: np.ndarray
    entries: dict[Entry, tuple[int, str]]  # entry -> (dim, member name)
    meta: dict


def _main_ident(f: h5py.File) -> tuple:
    """Identify the open main file: every write of a main file gets a new ``generation``."""
    try:
        st = os.fstat(f.id.get_vfd_handle())
    except Exception:  # a driver without a file descriptor: fall back on the path
        st = os.stat(f.filename)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, str(f.attrs.get("generation", "")))


@functools.lru_cache(maxsize=1)
def _float16_table() -> np.ndarray:
    return np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _as_float32(arr: np.ndarray) -> np.ndarray:
    """Convert to float32; float16 goes through a lookup table (3x faster than astype on ReLU zeros)."""
    if arr.dtype == np.dtype(np.float16):
        return _float16_table()[arr.view(np.uint16)]
    return arr.astype(np.float32, copy=False)


def _chunk_offsets(f: h5py.File, dset: h5py.Dataset) -> np.ndarray | None:
    """File offset of each chunk of an unfiltered, fully written 2-D dataset, else None."""
    n, d = dset.shape
    if not hasattr(os, "preadv") or n == 0 or dset.chunks is None or dset.chunks[1] != d or f.userblock_size:
        return None
    rows = dset.chunks[0]
    offsets = np.full(-(-n // rows), -1, dtype=np.int64)
    chunk_bytes = rows * d * dset.dtype.itemsize

    def visit(info: Any) -> None:
        if info.size == chunk_bytes and info.filter_mask == 0 and info.chunk_offset[0] % rows == 0:
            offsets[info.chunk_offset[0] // rows] = info.byte_offset

    try:
        if dset.id.get_create_plist().get_nfilters():
            return None
        if hasattr(dset.id, "chunk_iter"):
            dset.id.chunk_iter(visit)
        else:
            for i in range(dset.id.get_num_chunks()):
                visit(dset.id.get_chunk_info(i))
    except Exception:  # an HDF5 without chunk queries: read through h5py instead
        return None
    return offsets if (offsets >= 0).all() else None


def _pread_rows(fd: int, offsets: np.ndarray, dset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read the sorted unique ``rows`` straight from the file, one system call per run of rows.

    Used for unfiltered chunks, whose bytes are the array's bytes; much faster than HDF5 for
    scattered rows because only the rows asked are read.
    """
    d = dset.shape[1]
    chunk_rows = dset.chunks[0]
    row_bytes = d * dset.dtype.itemsize
    out = np.empty((rows.size, d), dtype=dset.dtype)
    where = offsets[rows // chunk_rows] + (rows % chunk_rows) * row_bytes
    breaks = np.flatnonzero(np.diff(where) != row_bytes) + 1
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    for start, stop in zip(np.r_[0, breaks].tolist(), np.r_[breaks, rows.size].tolist()):
        position, view = int(where[start]), buffer[start * row_bytes : stop * row_bytes]
        while view.nbytes:
            got = os.preadv(fd, [view], position)
            if got <= 0:
                raise StoreError(f"{dset.file.filename} ends before its data does; run verify() on the store")
            view, position = view[got:], position + got
    return out


def _read_rows(dset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read the sorted unique ``rows`` of a chunked 2-D dataset, chunk run by chunk run.

    h5py fancy indexing with thousands of indices is slow; reading the runs of touched chunks as
    slices is as fast as reading the whole dataset at worst.
    """
    n, d = dset.shape
    out = np.empty((rows.size, d), dtype=dset.dtype)
    if rows.size == 0:
        return out
    chunk = dset.chunks[0] if dset.chunks else max(1, _CHUNK_BYTES // max(1, d * dset.dtype.itemsize))
    block = max(chunk, _BLOCK_BYTES // max(1, d * dset.dtype.itemsize) // chunk * chunk)
    touched = np.unique(rows // chunk)
    for run in np.split(touched, np.flatnonzero(np.diff(touched) != 1) + 1):
        start, stop = int(run[0]) * chunk, min((int(run[-1]) + 1) * chunk, n)
        for b0 in range(start, stop, block):
            b1 = min(b0 + block, stop)
            i0, i1 = np.searchsorted(rows, (b0, b1))
            if i0 == i1:
                continue
            if i1 - i0 == b1 - b0:
                dset.read_direct(out, np.s_[b0:b1], np.s_[i0:i1])
            else:
                out[i0:i1] = dset[b0:b1][rows[i0:i1] - b0]
    return out


class _View:
    """One consistent snapshot of a store: an open main file (or None) plus journal segments."""

    def __init__(self, store: FeatureStore, f: h5py.File | None, segments: list[_Segment], names: tuple):
        self.store = store
        self.f = f
        self.main = store._main_index(f)
        self.segments = segments
        cache_key = (self.main.ident, names)
        if store._jcache_key != cache_key:
            store._jcache_key, store._jcache = cache_key, {}
        self.jcache = store._jcache

    def entries(self) -> set[Entry]:
        found = set(self.main.entries)
        for seg in self.segments:
            found.update(seg.entries)
        return found

    def dim(self, entry: Entry) -> int | None:
        if entry in self.main.entries:
            return self.main.entries[entry].dim
        for seg in self.segments:
            if entry in seg.entries:
                return seg.entries[entry][0]
        return None

    def main_keys(self, entry: Entry) -> np.ndarray:
        ent = self.main.entries.get(entry)
        if ent is None:
            return np.empty(0, dtype=f"S{_KEY_LEN}")
        if ent.keys is None:
            ent.keys = np.asarray(self.f[f"features/{entry[0]}/{entry[1]}/keys"][...]).astype(f"S{_KEY_LEN}")
        return ent.keys

    def journal(self, entry: Entry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sorted journal-only keys of an entry, with the segment index and row of each."""
        if entry in self.jcache:
            return self.jcache[entry]
        parts = [(i, seg.keys) for i, seg in enumerate(self.segments) if entry in seg.entries]
        if parts:
            keys = np.concatenate([k for _, k in parts])
            seg_idx = np.concatenate([np.full(k.size, i, np.intp) for i, k in parts])
            rows = np.concatenate([np.arange(k.size, dtype=np.intp) for _, k in parts])
            in_main, _ = _isin_sorted(self.main_keys(entry), keys)
            keys, seg_idx, rows = keys[~in_main], seg_idx[~in_main], rows[~in_main]
            keys, first = np.unique(keys, return_index=True)  # first occurrence: earliest segment wins
            result = (keys, seg_idx[first], rows[first])
        else:
            result = (np.empty(0, dtype=f"S{_KEY_LEN}"), np.empty(0, np.intp), np.empty(0, np.intp))
        self.jcache[entry] = result
        return result

    def all_keys(self, entry: Entry) -> np.ndarray:
        return np.union1d(self.main_keys(entry), self.journal(entry)[0])

    def locate(self, entry: Entry, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (source, position): source 0 missing, 1 main file, 2 journal."""
        source = np.zeros(query.size, np.int8)
        in_main, main_pos = _isin_sorted(self.main_keys(entry), query)
        source[in_main] = 1
        in_journal, journal_pos = _isin_sorted(self.journal(entry)[0], query)
        in_journal &= ~in_main
        source[in_journal] = 2
        return source, np.where(in_main, main_pos, journal_pos)

    def segment_array(self, index: int, entry: Entry) -> np.ndarray:
        seg = self.segments[index]
        try:
            with np.load(self.store._journal_dir / seg.name, allow_pickle=False) as z:
                return z[seg.entries[entry][1]]
        except FileNotFoundError as exc:
            raise _Vanished(seg.name) from exc

    def journal_rows(self, entry: Entry, index: np.ndarray, dtype: Any) -> np.ndarray:
        """Rows of the journal index positions ``index`` (any order, duplicates allowed)."""
        _, seg_idx, seg_row = self.journal(entry)
        out = np.empty((index.size, self.dim(entry)), dtype=dtype)
        segs, rows = seg_idx[index], seg_row[index]
        for s in np.unique(segs):
            sel = segs == s
            out[sel] = self.segment_array(int(s), entry)[rows[sel]]
        return out

    def main_dataset(self, entry: Entry) -> h5py.Dataset:
        return self.f[f"features/{entry[0]}/{entry[1]}/data"]

    def main_rows(self, entry: Entry, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted, unique) of an entry of the main file, in the stored dtype."""
        dset = self.main_dataset(entry)
        ent = self.main.entries[entry]
        if not ent.offsets_checked:
            ent.offsets, ent.offsets_checked = _chunk_offsets(self.f, dset), True
        if ent.offsets is not None:
            fd = None
            with contextlib.suppress(Exception):
                fd = self.f.id.get_vfd_handle()
            if isinstance(fd, int):
                return _pread_rows(fd, ent.offsets, dset, rows)
        return _read_rows(dset, rows)


# --------------------------------------------------------------------------------------------
# public API


@dataclass(frozen=True, eq=False)
class FeatureSet:
    """Features of some images for one (layer, pooling) entry, as read from a store.

    Attributes
    ----------
    X : ndarray of shape (n_samples, n_features), dtype float32
        The features, one row per key, in the order the keys were asked.
    keys : ndarray of shape (n_samples,), dtype str
        The content keys of the rows.
    layer : str
        The layer the features were taken at.
    pooling : str
        The pooling that made a vector of the layer's map.

    Examples
    --------
    >>> import numpy as np
    >>> from featx.store import FeatureSet
    >>> fs = FeatureSet(X=np.zeros((2, 3), np.float32), keys=np.array(["a" * 32, "b" * 32]),
    ...                 layer="stage4", pooling="avg")
    >>> fs.X.shape, fs.layer
    ((2, 3), 'stage4')
    """

    X: np.ndarray
    keys: np.ndarray
    layer: str
    pooling: str


class FeatureStore:
    """An HDF5 store of pooled CNN features for one extraction configuration.

    Opening a store reads its metadata only; no file handle stays open between calls, so the
    consolidated file can be replaced under a reader at any time. Writing takes an exclusive
    lock (one writing process at a time); reading takes none. See the module docstring for the
    on-disk layout.

    Parameters
    ----------
    path : str or path-like
        The store's main file ``<backbone>-<hash12>.h5``; the store must exist (its main file,
        its journal or both). Use :meth:`open` to create one.
    lock_timeout : float, default=60.0
        Seconds a write waits for another process's writer lock before raising
        :class:`~featx.exceptions.StoreError`.

    Attributes
    ----------
    path : pathlib.Path
        The main file.
    config : dict
        The extraction configuration the store was created with.
    config_hash : str
        Twelve hex characters, ``config_hash(config)``.
    dtype : {'float32', 'float16'}
        How the features are stored on disk (reads always return float32).
    provenance : dict
        What the creator recorded (versions of featx, torch, timm...).
    lock_timeout : float
        As given.

    Raises
    ------
    StoreError
        If there is no store at ``path``, or the file is not a featx store.

    Notes
    -----
    Closing a store (or leaving a ``with`` block) does not consolidate: the extraction run calls
    :meth:`consolidate` explicitly at its end, so an interrupted run (an exception, Ctrl-C) never
    starts a long copy on its way out. Until then readers see the journal merged in.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from featx.store import FeatureStore
    >>> tmp = tempfile.TemporaryDirectory()
    >>> config = {"backbone": "featx_tiny_cnn", "weights": "seed0", "size": 32}
    >>> store = FeatureStore.open(config, cache_dir=tmp.name, provenance={"featx": "0.1.0"})
    >>> keys = [f"{i:032x}" for i in range(3)]
    >>> store.write(keys, {("stage1", "avg"): np.arange(12.0).reshape(3, 4)})
    >>> store.consolidate()
    >>> with FeatureStore(store.path) as reader:
    ...     reader.read([keys[2], keys[0]], "stage1", "avg")
    array([[ 8.,  9., 10., 11.],
           [ 0.,  1.,  2.,  3.]], dtype=float32)
    >>> tmp.cleanup()
    """

    def __init__(self, path: str | os.PathLike, *, lock_timeout: float = 60.0) -> None:
        self.path = pathlib.Path(path)
        self.lock_timeout = lock_timeout
        self._closed = False
        self._main_cache: _MainIndex | None = None
        self._seg_cache: dict[str, _Segment | str] = {}
        self._jcache_key: tuple | None = None
        self._jcache: dict[Entry, tuple] = {}
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not a feature store; expected a <backbone>-<hash12>.h5 file")
        attrs = self._read_root_attrs()
        self.config: dict = json.loads(attrs["featx_config"])
        self.config_hash: str = str(attrs.get("config_hash") or config_hash(self.config))
        self.dtype: str = str(attrs["dtype"])
        self.provenance: dict = json.loads(attrs.get("provenance") or "{}")
        self._created = str(attrs.get("created", ""))
        self._updated = str(attrs.get("updated", ""))
        self._format_version = int(attrs.get("format_version", FORMAT_VERSION))

    # -- construction ------------------------------------------------------------------------

    def _read_root_attrs(self) -> dict:
        if self.path.is_file():
            try:
                with h5py.File(self.path, "r") as f:
                    attrs = {k: f.attrs[k] for k in f.attrs}
            except FileNotFoundError:
                attrs = None  # consolidated away and replaced: fall through to the journal check
            except OSError as exc:
                raise StoreError(
                    f"{self.path} is not a featx feature store: it cannot be read as HDF5 ({exc}). "
                    "Remove or rename it, then extract again"
                ) from exc
            if attrs is not None:
                return self._check_root_attrs(attrs, str(self.path))
        for name in self._segment_names():
            seg = self._segment(name)
            if isinstance(seg, _Segment):
                return self._check_root_attrs(
                    {k: seg.meta[k] for k in ("featx_config", "config_hash", "dtype", "format_version", "provenance")},
                    str(self._journal_dir / name),
                )
        raise StoreError(f"no feature store at {self.path} (neither the file nor its journal exists); {_HOW_TO_CREATE}")

    def _check_root_attrs(self, attrs: Mapping, where: str) -> dict:
        missing = [k for k in ("featx_config", "dtype") if k not in attrs]
        if missing:
            raise StoreError(
                f"{where} is not a featx feature store: it lacks the attribute(s) {', '.join(missing)}. "
                "Use another cache folder or file name, or remove it"
            )
        out = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        version = int(out.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{where} was written by a newer featx (store format {version}, this featx reads up to "
                f"{FORMAT_VERSION}); upgrade featx"
            )
        if out["dtype"] not in _DTYPES:
            raise StoreError(f"{where} declares dtype {out['dtype']!r}; expected one of {', '.join(_DTYPES)}")
        return out

    @classmethod
    def open(
        cls,
        config: Mapping,
        *,
        cache_dir: str | os.PathLike | None = None,
        path: str | os.PathLike | None = None,
        dtype: str = "float32",
        provenance: Mapping | None = None,
        lock_timeout: float = 60.0,
    ) -> FeatureStore:
        """Open the store of a configuration, creating it (empty) if it does not exist.

        Parameters
        ----------
        config : mapping
            The extraction configuration; its ``"backbone"`` names the file and its canonical
            JSON is kept in the store and checked on every open.
        cache_dir : str or path-like, default=None
            The folder of the stores; ``None`` means :func:`default_cache_dir`.
        path : str or path-like, default=None
            An explicit store file instead of the one named after the configuration.
        dtype : {'float32', 'float16'}, default='float32'
            How features are stored on disk; fixed when the store is created.
        provenance : mapping, default=None
            Free-form description recorded at creation (versions of featx, torch, timm...).
        lock_timeout : float, default=60.0
            Seconds to wait for another writer's lock.

        Returns
        -------
        FeatureStore

        Raises
        ------
        CacheMismatchError
            If the existing store was written with another configuration or dtype.
        StoreInputError
            If ``dtype`` is not supported or the configuration cannot be described.
        StoreError
            If the folder cannot be written.

        Examples
        --------
        >>> import tempfile
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "timm:resnet18"}, cache_dir=tmp.name, dtype="float16")
        >>> store.path.name.startswith("timm-resnet18-"), store.dtype, store.entries
        (True, 'float16', [])
        >>> tmp.cleanup()
        """
        if dtype not in _DTYPES:
            raise StoreInputError(f"unsupported store dtype {dtype!r}; expected 'float32' or 'float16'")
        canon = canonical_json(config)
        path = pathlib.Path(path) if path is not None else store_path(config, cache_dir)
        prov = canonical_json(dict(provenance or {}))
        journal = path.with_name(path.name + _JOURNAL_SUFFIX)
        if not path.exists() and not journal.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the cache folder {path.parent} ({exc}); choose another cache_dir or FEATX_CACHE"
                ) from exc
            with _writer_lock(path, lock_timeout):
                if not path.exists():
                    _create_main(path, canon, dtype, prov)
        store = cls(path, lock_timeout=lock_timeout)
        requested = json.loads(canon)
        if store.config != requested or store.dtype != dtype:
            lines = _config_diff(store.config, requested)
            if store.dtype != dtype:
                lines.append(f"dtype: existing {store.dtype!r} but {dtype!r} was requested")
            raise CacheMismatchError(
                f"the store {path} was written with another configuration:\n  "
                + "\n  ".join(lines)
                + "\nA store is never reused for another configuration: request the existing values, "
                "use another cache_dir, or remove the store (featx.store.remove_store(path), 'featx cache')"
            )
        return store

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def _journal_dir(self) -> pathlib.Path:
        return self.path.with_name(self.path.name + _JOURNAL_SUFFIX)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {self.path} is closed; open it again with FeatureStore(path)")

    def _segment_names(self) -> list[str]:
        try:
            names = os.listdir(self._journal_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if n.startswith(_SEG_PREFIX) and n.endswith(_SEG_SUFFIX))

    def _segment(self, name: str) -> _Segment | str:
        """The header of a committed segment (cached: segments never change), or why it is bad."""
        cached = self._seg_cache.get(name)
        if cached is not None:
            return cached
        try:
            with np.load(self._journal_dir / name, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
                keys = np.asarray(z["keys"])
                members = set(z.files)
            if keys.ndim != 1 or keys.dtype.kind != "S":
                raise ValueError(f"keys have shape {keys.shape} and dtype {keys.dtype}")
            entries = {}
            for layer, pooling, dim, member in meta["entries"]:
                if member not in members:
                    raise ValueError(f"member {member!r} is missing")
                entries[(str(layer), str(pooling))] = (int(dim), str(member))
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise ValueError(f"written by a newer featx (format {meta['format_version']})")
            if hasattr(self, "config_hash") and meta.get("config_hash") != self.config_hash:
                raise ValueError(f"it belongs to the configuration {meta.get('config_hash')}, not {self.config_hash}")
            seg: _Segment | str = _Segment(name, keys.astype(f"S{_KEY_LEN}"), entries, meta)
        except FileNotFoundError:
            raise
        except Exception as exc:  # a damaged segment is reported by verify(), never fatal
            seg = f"{type(exc).__name__}: {exc}"
        self._seg_cache[name] = seg
        return seg

    def _segments(self, names: list[str]) -> tuple[list[_Segment], list[tuple[str, str]]]:
        good, bad = [], []
        for name in names:
            try:
                seg = self._segment(name)
            except FileNotFoundError as exc:
                raise _Vanished(name) from exc
            if isinstance(seg, _Segment):
                good.append(seg)
            else:
                bad.append((name, seg))
        for stale in set(self._seg_cache) - set(names):
            del self._seg_cache[stale]
        return good, bad

    def _main_index(self, f: h5py.File | None) -> _MainIndex:
        if f is None:
            return _MainIndex(None)
        ident = _main_ident(f)
        if self._main_cache is not None and self._main_cache.ident == ident:
            return self._main_cache
        shared = _MAIN_INDEXES.get(str(self.path))
        if shared is not None and shared.ident == ident:  # another instance already indexed this file
            self._main_cache = shared
            return shared
        index = _MainIndex(ident)
        group = f.get("features")
        if isinstance(group, h5py.Group):
            for layer, layer_group in group.items():
                if not isinstance(layer_group, h5py.Group):
                    continue
                for pooling, entry_group in layer_group.items():
                    if isinstance(entry_group, h5py.Group) and "data" in entry_group and "keys" in entry_group:
                        shape = entry_group["data"].shape
                        if len(shape) == 2:
                            index.entries[(layer, pooling)] = _MainEntry(dim=int(shape[1]), n=int(shape[0]))
        self._main_cache = index
        _MAIN_INDEXES[str(self.path)] = index
        while len(_MAIN_INDEXES) > _MAIN_INDEXES_KEPT:
            _MAIN_INDEXES.pop(next(iter(_MAIN_INDEXES)))
        return index

    def _run(self, fn: Callable[[_View], T], attempts: int = 60) -> T:
        """Run ``fn`` on a consistent snapshot; start again if consolidation removed a segment.

        Consolidation removes merged segments one by one after replacing the main file; a reader
        that keeps meeting a removed segment pauses a little longer each time (up to 50 ms, under
        3 s in all) until the removal is over, rather than giving up.
        """
        self._check_open()
        pause = 0.001
        for attempt in range(attempts):
            if attempt:
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            names = self._segment_names()  # list the journal BEFORE opening the main file
            try:
                f = h5py.File(self.path, "r")
            except FileNotFoundError:
                f = None
            except OSError as exc:
                raise StoreError(
                    f"cannot read the store {self.path} ({exc}); check it with FeatureStore(path).verify()"
                ) from exc
            try:
                segments, _ = self._segments(names)
                return fn(_View(self, f, segments, tuple(names)))
            except _Vanished:
                continue
            finally:
                if f is not None:
                    f.close()
        raise StoreError(f"the store {self.path} kept changing while being read ({attempts} attempts); try again")

    def _validated_batch(self, keys: Any, features: Any) -> tuple[np.ndarray, dict[Entry, np.ndarray]]:
        query = _key_array(keys)
        _, first = np.unique(query, return_index=True)
        keep = np.sort(first)  # a key given twice in one batch: the first copy is kept
        if not isinstance(features, Mapping) or not features:
            raise StoreInputError(
                "features must be a non-empty mapping {(layer, pooling): array of shape (n_keys, dim)}, "
                f"got {type(features).__name__}"
            )
        arrays: dict[Entry, np.ndarray] = {}
        for entry, values in features.items():
            entry = _check_entry(entry)
            arr = np.asarray(values)
            if arr.ndim != 2 or arr.shape[0] != query.size or arr.shape[1] == 0:
                raise StoreInputError(
                    f"features for {_entry_label(entry)} have shape {arr.shape} but {query.size} keys were "
                    f"given; expected an array of shape ({query.size}, dim) with dim >= 1"
                )
            if arr.dtype.kind not in "fiu":
                raise StoreInputError(
                    f"features for {_entry_label(entry)} have dtype {arr.dtype}; expected real numbers"
                )
            arr = arr[keep]
            finite = np.isfinite(arr)
            if not finite.all():
                row = int(np.flatnonzero(~finite.all(axis=1))[0])
                raise StoreInputError(
                    f"features for {_entry_label(entry)} contain {int(np.isnan(arr).sum())} NaN and "
                    f"{int(np.isinf(arr).sum())} infinite values (first in the row of key "
                    f"{query[keep][row].decode()}); nothing was written. Check the images and the "
                    "precision (float16 inference can overflow)"
                )
            with np.errstate(over="ignore"):
                stored = np.ascontiguousarray(arr, dtype=self.dtype)
            if not np.isfinite(stored).all():
                raise StoreInputError(
                    f"features for {_entry_label(entry)} reach {float(np.abs(arr).max()):.4g}, beyond the "
                    "float16 range (65504); nothing was written. Use a float32 store (dtype='float32')"
                )
            arrays[entry] = stored
        return query[keep], arrays

    def _write_segment(self, keys: np.ndarray, arrays: dict[Entry, np.ndarray]) -> None:
        journal = self._journal_dir
        name = f"{_SEG_PREFIX}{time.time_ns():020d}-{os.getpid():07d}-{next(_SEQ):06d}{_SEG_SUFFIX}"
        tmp = journal / f"{_TMP_PREFIX}{name}"
        meta = {
            "format_version": FORMAT_VERSION,
            "featx_config": canonical_json(self.config),
            "config_hash": self.config_hash,
            "dtype": self.dtype,
            "provenance": canonical_json(self.provenance),
            "written": _utcnow(),
            "n": int(keys.size),
            "entries": [],
        }
        members: dict[str, np.ndarray] = {"keys": keys}
        for i, (entry, arr) in enumerate(sorted(arrays.items())):
            meta["entries"].append([entry[0], entry[1], int(arr.shape[1]), f"e{i}"])
            members[f"e{i}"] = arr
        members["meta"] = np.array(json.dumps(meta))
        try:
            if not journal.is_dir():
                journal.mkdir(exist_ok=True)
                _fsync_dir(journal.parent)
            with open(tmp, "xb") as fh:
                np.savez(fh, **members)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, journal / name)
            _fsync_dir(journal)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _write_failed(exc, f"a batch of {keys.size} rows", self.path) from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def _remove_leftovers(self) -> None:
        """Remove temporary files of interrupted writers (only a lock holder may call this)."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for name in os.listdir(self._journal_dir):
                if name.startswith(_TMP_PREFIX):
                    _unlink_quietly(self._journal_dir / name)
        for tmp in self.path.parent.glob(glob.escape(self.path.name) + ".tmp-*"):
            _unlink_quietly(tmp)

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self) -> Iterator[FeatureStore]:
        """Hold the writer lock for a whole run of writes (re-entrant within a process).

        Each :meth:`write` takes the lock by itself; an extraction run takes it once with this
        context manager so that no other process can interleave. Entering it also removes the
        temporary files that killed writers left behind.

        Yields
        ------
        FeatureStore
            This store.

        Raises
        ------
        StoreError
            If another process holds the lock for longer than ``lock_timeout`` seconds.

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> with store.writer():
        ...     for start in (0, 2):
        ...         keys = [f"{i:032x}" for i in range(start, start + 2)]
        ...         store.write(keys, {("stage1", "avg"): np.ones((2, 4))})
        ...     store.consolidate()
        >>> len(store.keys)
        4
        >>> tmp.cleanup()
        """
        self._check_open()
        with _writer_lock(self.path, self.lock_timeout) as outermost:
            if outermost:
                self._remove_leftovers()
            yield self

    def write(self, keys: Iterable[str], features: Mapping[Entry, Any]) -> None:
        """Commit one batch durably: every given entry for the given keys.

        The batch goes to the journal as one segment (written, fsynced, renamed): after this
        returns the batch survives a crash; if the process dies before, nothing of it is seen.
        Keys already stored may be written again (the first stored copy wins).

        Parameters
        ----------
        keys : sequence of str of length n_keys
            Content keys (32 lowercase hex characters). A key repeated in the batch is kept once.
        features : mapping of (layer, pooling) to array-like of shape (n_keys, dim)
            Finite real numbers; converted to the store's dtype.

        Raises
        ------
        StoreInputError
            Bad keys, entry names, shapes, NaN or infinite values, a dim that differs from the
            entry's stored dim, values beyond the float16 range in a float16 store.
        StoreError
            If another process holds the writer lock past ``lock_timeout``, or the disk is full
            (the store is then unchanged).

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> keys = [f"{i:032x}" for i in range(2)]
        >>> store.write(keys, {("stage1", "avg"): np.zeros((2, 4)), ("stage2", "max"): np.ones((2, 8))})
        >>> store.entries
        [('stage1', 'avg'), ('stage2', 'max')]
        >>> tmp.cleanup()
        """
        self._check_open()
        batch_keys, arrays = self._validated_batch(keys, features)
        if batch_keys.size == 0:
            return
        with self.writer():
            held = self._run(lambda view: {e: view.dim(e) for e in arrays})
            for entry, arr in arrays.items():
                if held[entry] is not None and held[entry] != arr.shape[1]:
                    raise StoreInputError(
                        f"{_entry_label(entry)} holds {held[entry]}-dimensional features (existing) but "
                        f"{arr.shape[1]} columns were given (new); one layer and pooling always have one "
                        "dimension: check the layer and pooling names"
                    )
            self._write_segment(batch_keys, arrays)

    def consolidate(self) -> None:
        """Merge the journal into a new main file, replace the old one atomically, empty the journal.

        Safe to interrupt at any point and to repeat: the main file is only ever replaced by a
        complete, fsynced copy, and merged segments are removed afterwards (a segment left behind
        by a kill is merely redundant). A no-op when the journal is empty. A damaged segment is
        skipped and left in place for :meth:`verify` to report.

        Raises
        ------
        StoreError
            If another process holds the writer lock past ``lock_timeout``, or the disk is full
            (the store is then unchanged).

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> store.write([f"{i:032x}" for i in range(3)], {("stage1", "avg"): np.ones((3, 4))})
        >>> store.info()["journal_segments"]
        1
        >>> store.consolidate()
        >>> store.info()["journal_segments"], store.info()["entries"][0]["n"]
        (0, 3)
        >>> tmp.cleanup()
        """
        with self.writer():
            names = self._segment_names()
            if names:
                merged = self._run(self._merge_into_new_main)
                for name in merged:
                    _unlink_quietly(self._journal_dir / name)
                with contextlib.suppress(OSError):
                    _fsync_dir(self._journal_dir)
            with contextlib.suppress(OSError):  # only succeeds when nothing is left in it
                self._journal_dir.rmdir()
                _fsync_dir(self.path.parent)

    def _merge_into_new_main(self, view: _View) -> list[str]:
        if not view.segments:
            return []
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        _unlink_quietly(tmp)
        try:
            with h5py.File(tmp, "w-") as new:
                if view.f is not None:
                    for key, value in view.f.attrs.items():
                        new.attrs[key] = value
                else:
                    _set_root_attrs(new, canonical_json(self.config), self.dtype, canonical_json(self.provenance))
                new.attrs["updated"] = _utcnow()
                new.attrs["generation"] = uuid.uuid4().hex
                features = new.create_group("features")
                for entry in sorted(view.entries()):
                    layer_group = features.require_group(entry[0])
                    if entry in view.main.entries and view.journal(entry)[0].size == 0:
                        view.f.copy(view.f[f"features/{entry[0]}/{entry[1]}"], layer_group, name=entry[1])
                    else:
                        self._write_merged_entry(view, entry, layer_group.create_group(entry[1]))
            _fsync_file(tmp)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            _unlink_quietly(tmp)
            if isinstance(exc, FeatxError):
                raise
            raise _write_failed(exc, "the consolidated store", self.path) from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return [seg.name for seg in view.segments]

    def _write_merged_entry(self, view: _View, entry: Entry, group: h5py.Group) -> None:
        old_keys = view.main_keys(entry)
        new_keys = view.journal(entry)[0]
        dim = view.dim(entry)
        new_rows = view.journal_rows(entry, np.arange(new_keys.size), self.dtype)
        total = old_keys.size + new_keys.size
        new_pos = np.searchsorted(old_keys, new_keys) + np.arange(new_keys.size)
        is_new = np.zeros(total, bool)
        is_new[new_pos] = True
        merged = np.empty(total, dtype=f"S{_KEY_LEN}")
        merged[new_pos] = new_keys
        merged[~is_new] = old_keys
        group.attrs["layer"], group.attrs["pooling"], group.attrs["dim"] = entry[0], entry[1], dim
        group.create_dataset(
            "keys", data=merged, chunks=(max(1, min(total, _KEY_CHUNK_ROWS)),), maxshape=(None,)
        )
        itemsize = np.dtype(self.dtype).itemsize
        data = group.create_dataset(
            "data",
            shape=(total, dim),
            dtype=self.dtype,
            chunks=(max(1, min(total, _CHUNK_BYTES // (dim * itemsize))), dim),
            maxshape=(None, dim),
        )
        old_data = view.main_dataset(entry) if old_keys.size else None
        block = max(1, _BLOCK_BYTES // (dim * itemsize))
        for o0 in range(0, total, block):
            o1 = min(o0 + block, total)
            n0, n1 = np.searchsorted(new_pos, (o0, o1))
            out = np.empty((o1 - o0, dim), dtype=self.dtype)
            out[new_pos[n0:n1] - o0] = new_rows[n0:n1]
            if old_data is not None and (o1 - o0) > (n1 - n0):
                old = old_data[o0 - n0 : o1 - n1]
                out[~is_new[o0:o1]] = old
            data[o0:o1] = out

    # -- reading -----------------------------------------------------------------------------

    @property
    def keys(self) -> np.ndarray:
        """ndarray of str: the sorted unique content keys that have at least one entry.

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> store.write(["b" * 32, "a" * 32], {("stage1", "avg"): np.ones((2, 4))})
        >>> [k[:4] for k in store.keys]
        ['aaaa', 'bbbb']
        >>> tmp.cleanup()
        """

        def collect(view: _View) -> np.ndarray:
            parts = [view.all_keys(entry) for entry in view.entries()]
            found = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=f"S{_KEY_LEN}")
            return found.astype(f"U{_KEY_LEN}")

        return self._run(collect)

    @property
    def entries(self) -> list[Entry]:
        """list of (layer, pooling): the entries held (main file and journal), sorted.

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> store.write(["a" * 32], {("blocks.4", "avg"): np.ones((1, 4))})
        >>> store.entries
        [('blocks.4', 'avg')]
        >>> tmp.cleanup()
        """
        return sorted(self._run(lambda view: view.entries()))

    def _unknown_entry(self, entry: Entry, held: Iterable[Entry]) -> MissingKeysError:
        labels = [_entry_label(e) for e in sorted(held)]
        return MissingKeysError(
            f"the store {self.path} holds no features for layer {entry[0]!r} with pooling {entry[1]!r}."
            f"{suggest(_entry_label(entry), labels)} It holds: {', '.join(labels) or 'nothing yet'}. "
            f"Run featx extract with layer {entry[0]!r} and pooling {entry[1]!r} to add them"
        )

    def dim(self, layer: str, pooling: str) -> int:
        """Return the number of features of an entry.

        Parameters
        ----------
        layer : str
        pooling : str

        Returns
        -------
        int

        Raises
        ------
        MissingKeysError
            If the store holds no such entry (the message lists the entries held).

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> store.write(["a" * 32], {("stage1", "avg"): np.ones((1, 4))})
        >>> store.dim("stage1", "avg")
        4
        >>> tmp.cleanup()
        """
        entry = _check_entry((layer, pooling))

        def find(view: _View) -> int:
            dim = view.dim(entry)
            if dim is None:
                raise self._unknown_entry(entry, view.entries())
            return dim

        return self._run(find)

    def contains(self, keys: Iterable[str], layer: str, pooling: str) -> np.ndarray:
        """Tell which keys have features for an entry.

        Parameters
        ----------
        keys : sequence of str of length n_keys
        layer : str
        pooling : str

        Returns
        -------
        ndarray of shape (n_keys,), dtype bool
            All False for an entry the store does not hold.

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> store.write(["a" * 32], {("stage1", "avg"): np.ones((1, 4))})
        >>> store.contains(["a" * 32, "b" * 32], "stage1", "avg")
        array([ True, False])
        >>> tmp.cleanup()
        """
        entry = _check_entry((layer, pooling))
        return self.held(keys, [entry])[entry]

    def held(self, keys: Iterable[str], entries: Iterable[Entry]) -> dict[Entry, np.ndarray]:
        """Tell which keys have features, for several entries from one look at the store.

        Parameters
        ----------
        keys : sequence of str of length n_keys
        entries : iterable of (layer, pooling)

        Returns
        -------
        dict of (layer, pooling) to ndarray of shape (n_keys,), dtype bool

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> store.write(["a" * 32], {("stage1", "avg"): np.ones((1, 4))})
        >>> store.held(["a" * 32], [("stage1", "avg"), ("stage2", "avg")])
        {('stage1', 'avg'): array([ True]), ('stage2', 'avg'): array([False])}
        >>> tmp.cleanup()
        """
        wanted = list(dict.fromkeys(_check_entry(e) for e in entries))
        query = _key_array(keys)
        return self._run(lambda view: {entry: view.locate(entry, query)[0] > 0 for entry in wanted})

    def missing(self, keys: Iterable[str], entries: Iterable[Entry]) -> list[str]:
        """Return the keys that lack at least one of the entries: what an extraction must compute.

        Parameters
        ----------
        keys : sequence of str
            Content keys; duplicates are reported once, in the order first given.
        entries : iterable of (layer, pooling)

        Returns
        -------
        list of str

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> store.write(["a" * 32], {("stage1", "avg"): np.ones((1, 4))})
        >>> [k[:4] for k in store.missing(["c" * 32, "a" * 32, "c" * 32], [("stage1", "avg")])]
        ['cccc']
        >>> len(store.missing(["a" * 32], [("stage1", "avg"), ("stage2", "avg")]))
        1
        >>> tmp.cleanup()
        """
        wanted = [_check_entry(e) for e in entries]
        query = _key_array(keys)
        _, first = np.unique(query, return_index=True)
        query = query[np.sort(first)]
        if not wanted or query.size == 0:
            return []
        lacking = ~np.logical_and.reduce(list(self.held(query, wanted).values()))
        return query[lacking].astype(f"U{_KEY_LEN}").tolist()

    def read(self, keys: Iterable[str], layer: str, pooling: str) -> np.ndarray:
        """Return the features of the keys for one entry, as float32, in the order asked.

        Parameters
        ----------
        keys : sequence of str of length n_keys
            Content keys; duplicates are allowed.
        layer : str
        pooling : str

        Returns
        -------
        ndarray of shape (n_keys, dim), dtype float32

        Raises
        ------
        MissingKeysError
            If some keys have no features for this entry (how many, the first few, how to fix),
            or the store holds no such entry (the message lists the entries held).

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> keys = [f"{i:032x}" for i in range(3)]
        >>> store.write(keys, {("stage1", "avg"): np.arange(6.0).reshape(3, 2)})
        >>> store.read([keys[1], keys[1], keys[0]], "stage1", "avg")
        array([[2., 3.],
               [2., 3.],
               [0., 1.]], dtype=float32)
        >>> tmp.cleanup()
        """
        entry = _check_entry((layer, pooling))
        query = _key_array(keys)
        return self._run(lambda view: self._read_view(view, entry, query))

    def _read_view(self, view: _View, entry: Entry, query: np.ndarray) -> np.ndarray:
        dim = view.dim(entry)
        if dim is None:
            raise self._unknown_entry(entry, view.entries())
        source, pos = view.locate(entry, query)
        absent = source == 0
        if absent.any():
            shown = list(dict.fromkeys(query[absent].astype(f"U{_KEY_LEN}").tolist()))
            raise MissingKeysError(
                f"{len(shown)} of {len(set(query.tolist()))} keys have no features for "
                f"{_entry_label(entry)} in the store {self.path}: {', '.join(shown[:3])}"
                f"{', ...' if len(shown) > 3 else ''}. Run featx extract on those images (with layer "
                f"{entry[0]!r} and pooling {entry[1]!r}) first; it computes only the missing rows"
            )
        in_main = source == 1
        if query.size and in_main.all():  # the usual case after consolidation: no masks, one gather
            rows, inverse = np.unique(pos, return_inverse=True)
            return _as_float32(np.take(view.main_rows(entry, rows), inverse, axis=0))
        out = np.empty((query.size, dim), dtype=np.float32)
        if in_main.any():
            rows, inverse = np.unique(pos[in_main], return_inverse=True)
            out[in_main] = _as_float32(view.main_rows(entry, rows)[inverse])
        in_journal = source == 2
        if in_journal.any():
            out[in_journal] = _as_float32(view.journal_rows(entry, pos[in_journal], self.dtype))
        return out

    def read_set(self, keys: Iterable[str], layer: str, pooling: str) -> FeatureSet:
        """Return :meth:`read` wrapped with its keys, layer and pooling.

        Parameters
        ----------
        keys : sequence of str of length n_keys
        layer : str
        pooling : str

        Returns
        -------
        FeatureSet

        Raises
        ------
        MissingKeysError
            As :meth:`read`.

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> store.write(["a" * 32], {("stage1", "avg"): np.ones((1, 4))})
        >>> fs = store.read_set(["a" * 32], "stage1", "avg")
        >>> fs.X.shape, fs.layer, fs.pooling
        ((1, 4), 'stage1', 'avg')
        >>> tmp.cleanup()
        """
        entry = _check_entry((layer, pooling))
        query = _key_array(keys)
        X = self._run(lambda view: self._read_view(view, entry, query))
        return FeatureSet(X=X, keys=query.astype(f"U{_KEY_LEN}"), layer=layer, pooling=pooling)

    # -- inspection --------------------------------------------------------------------------

    def _journal_files(self) -> tuple[list[str], list[str]]:
        try:
            names = sorted(os.listdir(self._journal_dir))
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        return [n for n in names if n.startswith(_TMP_PREFIX)], [n for n in names if not n.startswith(_TMP_PREFIX)]

    def _size_on_disk(self) -> int:
        total = 0
        with contextlib.suppress(FileNotFoundError):
            total += self.path.stat().st_size
        for name in itertools.chain(*self._journal_files()):
            with contextlib.suppress(FileNotFoundError):
                total += (self._journal_dir / name).stat().st_size
        return total

    def _entry_table(self, view: _View) -> list[dict]:
        return [
            {"layer": e[0], "pooling": e[1], "n": int(view.all_keys(e).size), "dim": view.dim(e)}
            for e in sorted(view.entries())
        ]

    def info(self) -> dict:
        """Describe the store.

        Returns
        -------
        dict
            ``path``, ``size_bytes`` (main file and journal), ``config``, ``config_hash``,
            ``dtype``, ``format_version``, ``created``, ``updated`` (the latest journal batch
            counts), ``n_keys``, ``entries`` (list of dicts with ``layer``, ``pooling``, ``n``,
            ``dim``), ``journal_segments`` and ``provenance``.

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> store.write(["a" * 32], {("stage1", "avg"): np.ones((1, 4))})
        >>> info = store.info()
        >>> info["n_keys"], info["entries"], info["dtype"]
        (1, [{'layer': 'stage1', 'pooling': 'avg', 'n': 1, 'dim': 4}], 'float32')
        >>> tmp.cleanup()
        """

        def describe(view: _View) -> dict:
            created, updated = self._created, self._updated
            if view.f is not None:
                created = str(view.f.attrs.get("created", created))
                updated = str(view.f.attrs.get("updated", updated))
            for seg in view.segments:
                updated = max(updated, str(seg.meta.get("written", "")))
            entries = self._entry_table(view)
            parts = [view.all_keys((e["layer"], e["pooling"])) for e in entries]
            return {
                "path": str(self.path),
                "size_bytes": self._size_on_disk(),
                "config": self.config,
                "config_hash": self.config_hash,
                "dtype": self.dtype,
                "format_version": self._format_version,
                "created": created,
                "updated": updated,
                "n_keys": int(np.unique(np.concatenate(parts)).size) if parts else 0,
                "entries": entries,
                "journal_segments": len(view.segments),
                "provenance": self.provenance,
            }

        return self._run(describe)

    def verify(self) -> dict:
        """Check the whole store, reading every row once.

        Checks that the main file opens and matches its configuration hash; that every entry's
        keys are valid, sorted, unique and as many as its rows, its dim matches its attribute,
        its dtype is the store's and it holds no NaN or infinity; that every journal segment is
        readable and consistent. Leftovers of interrupted writers (temporary files) are harmless
        and reported as warnings.

        Returns
        -------
        dict
            ``ok`` (no problem found), ``problems`` and ``warnings`` (lists of str), ``n_keys``,
            ``entries`` (``{"layer/pooling": {"n": ..., "dim": ...}}``), ``journal_segments``.

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
        >>> store.write(["a" * 32], {("stage1", "avg"): np.ones((1, 4))})
        >>> report = store.verify()
        >>> report["ok"], report["problems"], report["entries"]
        (True, [], {'stage1/avg': {'n': 1, 'dim': 4}})
        >>> tmp.cleanup()
        """
        self._check_open()
        problems: list[str] = []
        warnings: list[str] = []
        dims: dict[Entry, int] = {}
        if self.path.is_file():
            try:
                with h5py.File(self.path, "r") as f:
                    self._verify_main(f, problems, dims)
            except OSError as exc:
                problems.append(f"the main file {self.path} cannot be read: {exc}")
        elif self._segment_names():
            warnings.append(f"no consolidated file {self.path.name} yet; the store lives in its journal")
        else:
            problems.append(f"neither {self.path} nor its journal exists")
        temps, committed = self._journal_files()
        for name in temps:
            warnings.append(
                f"leftover temporary file {self._journal_dir / name} from an interrupted write: ignored by "
                "readers, removed by the next write or consolidate"
            )
        for tmp in sorted(self.path.parent.glob(glob.escape(self.path.name) + ".tmp-*")):
            warnings.append(f"leftover temporary file {tmp} from an interrupted consolidation: removed by the next one")
        for name in committed:
            if not (name.startswith(_SEG_PREFIX) and name.endswith(_SEG_SUFFIX)):
                warnings.append(f"unexpected file {self._journal_dir / name} in the journal: ignored")
                continue
            self._seg_cache.pop(name, None)
            self._verify_segment(name, problems, dims)
        try:
            summary = self._run(lambda view: (self._entry_table(view), len(view.segments)))
            table, n_segments = summary
            n_keys = int(self.keys.size)
        except FeatxError as exc:
            problems.append(str(exc))
            table, n_segments, n_keys = [], 0, 0
        return {
            "ok": not problems,
            "problems": problems,
            "warnings": warnings,
            "n_keys": n_keys,
            "entries": {f"{e['layer']}/{e['pooling']}": {"n": e["n"], "dim": e["dim"]} for e in table},
            "journal_segments": n_segments,
        }

    def _verify_main(self, f: h5py.File, problems: list[str], dims: dict[Entry, int]) -> None:
        where = str(self.path)
        try:
            attrs = self._check_root_attrs({k: f.attrs[k] for k in f.attrs}, where)
            stored_config = json.loads(attrs["featx_config"])
        except (StoreError, ValueError) as exc:
            problems.append(str(exc))
            return
        if attrs.get("config_hash") != config_hash(stored_config):
            problems.append(f"{where}: config_hash {attrs.get('config_hash')!r} does not match its featx_config")
        match = _STORE_NAME.match(self.path.name)
        if match and match["hash"] != config_hash(stored_config):
            problems.append(
                f"{where}: the file name says configuration {match['hash']} but it holds {config_hash(stored_config)}"
            )
        group = f.get("features")
        if not isinstance(group, h5py.Group):
            problems.append(f"{where}: no /features group")
            return
        for layer, layer_group in group.items():
            for pooling, entry_group in layer_group.items() if isinstance(layer_group, h5py.Group) else []:
                label = f"{where}:/features/{layer}/{pooling}"
                if not (isinstance(entry_group, h5py.Group) and "keys" in entry_group and "data" in entry_group):
                    problems.append(f"{label} lacks its keys or data dataset")
                    continue
                keys, data = entry_group["keys"], entry_group["data"]
                if keys.ndim != 1 or keys.dtype != np.dtype(f"S{_KEY_LEN}"):
                    problems.append(
                        f"{label}/keys has shape {keys.shape} and dtype {keys.dtype}; expected (n,) S{_KEY_LEN}"
                    )
                    continue
                if data.ndim != 2 or data.shape[0] != keys.shape[0]:
                    problems.append(f"{label}: {keys.shape[0]} keys but data of shape {data.shape}")
                    continue
                if int(entry_group.attrs.get("dim", -1)) != data.shape[1]:
                    problems.append(
                        f"{label}: attribute dim={entry_group.attrs.get('dim')} but data has {data.shape[1]} columns"
                    )
                if data.dtype != np.dtype(self.dtype):
                    problems.append(f"{label}: data dtype {data.dtype} but the store is {self.dtype}")
                key_values = keys[...]
                try:
                    _key_array(key_values)
                except StoreInputError as exc:
                    problems.append(f"{label}: {exc}")
                if key_values.size > 1 and not (key_values[1:] > key_values[:-1]).all():
                    problems.append(f"{label}: keys are not sorted and unique")
                step = max(1, _BLOCK_BYTES // max(1, data.shape[1] * data.dtype.itemsize))
                bad = sum(int((~np.isfinite(data[i : i + step])).sum()) for i in range(0, data.shape[0], step))
                if bad:
                    problems.append(f"{label}: {bad} NaN or infinite values")
                dims[(layer, pooling)] = data.shape[1]

    def _verify_segment(self, name: str, problems: list[str], dims: dict[Entry, int]) -> None:
        path = self._journal_dir / name
        fix = "its rows are ignored; delete it and extract again (only missing rows are computed)"
        try:
            seg = self._segment(name)
        except FileNotFoundError:
            return  # consolidated meanwhile
        if not isinstance(seg, _Segment):
            problems.append(f"journal segment {path} is unreadable ({seg}); {fix}")
            return
        try:
            _key_array(seg.keys)
            with np.load(path, allow_pickle=False) as z:
                for entry, (dim, member) in seg.entries.items():
                    arr = z[member]
                    if arr.shape != (seg.keys.size, dim) or arr.dtype != np.dtype(self.dtype):
                        raise ValueError(f"{_entry_label(entry)} has shape {arr.shape} and dtype {arr.dtype}")
                    if not np.isfinite(arr).all():
                        raise ValueError(f"{_entry_label(entry)} holds NaN or infinite values")
                    if dims.setdefault(entry, dim) != dim:
                        raise ValueError(f"{_entry_label(entry)} has dim {dim} but the store has {dims[entry]}")
        except FileNotFoundError:
            return
        except Exception as exc:
            problems.append(f"journal segment {path} is damaged ({type(exc).__name__}: {exc}); {fix}")

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Forget the in-memory indexes; later calls raise. Does not consolidate.

        Examples
        --------
        >>> import tempfile
        >>> from featx.store import FeatureStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> with FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name) as store:
        ...     store.entries
        []
        >>> tmp.cleanup()
        """
        self._closed = True
        self._main_cache = None
        self._seg_cache = {}
        self._jcache_key, self._jcache = None, {}

    def __enter__(self) -> FeatureStore:
        self._check_open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, dtype={self.dtype!r})"


# --------------------------------------------------------------------------------------------
# helpers of the store's life cycle


def _set_root_attrs(f: h5py.File, canon: str, dtype: str, provenance: str) -> None:
    now = _utcnow()
    config = json.loads(canon)
    f.attrs["featx_config"] = canon
    f.attrs["config_hash"] = config_hash(config)
    f.attrs["dtype"] = dtype
    f.attrs["created"] = now
    f.attrs["updated"] = now
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["provenance"] = provenance
    f.attrs["generation"] = uuid.uuid4().hex


def _create_main(path: pathlib.Path, canon: str, dtype: str, provenance: str) -> None:
    """Write an empty main file atomically (the caller holds the writer lock)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    _unlink_quietly(tmp)
    try:
        with h5py.File(tmp, "w-") as f:
            _set_root_attrs(f, canon, dtype, provenance)
            f.create_group("features")
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _write_failed(exc, "a new store", path) from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix or "(config)": obj}


def _config_diff(existing: Mapping, requested: Mapping) -> list[str]:
    old, new = _flatten(dict(existing)), _flatten(dict(requested))
    absent = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, absent), new.get(key, absent)
        if a != b or type(a) is not type(b):
            a_text = "nothing" if a is absent else json.dumps(a)
            b_text = "nothing" if b is absent else json.dumps(b)
            lines.append(f"{key}: existing {a_text} but {b_text} was requested")
    return lines


def list_stores(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Describe every store in a cache folder.

    Parameters
    ----------
    cache_dir : str or path-like, default=None
        The folder; ``None`` means :func:`default_cache_dir`. A missing folder holds no store.

    Returns
    -------
    list of dict
        One per store, sorted by path: ``path``, ``backbone``, ``hash``, ``dtype``, ``n_keys``,
        ``entries`` (list of ``"layer/pooling"``), ``journal_segments`` and ``size_bytes``; a
        store that cannot be read has ``path`` and ``error`` instead.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from featx.store import FeatureStore, list_stores
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
    >>> store.write(["a" * 32], {("stage1", "avg"): np.ones((1, 4))})
    >>> [(s["backbone"], s["n_keys"], s["entries"]) for s in list_stores(tmp.name)]
    [('featx_tiny_cnn', 1, ['stage1/avg'])]
    >>> tmp.cleanup()
    """
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    mains = {n for n in names if _STORE_NAME.match(n)}
    journals = (n[: -len(_JOURNAL_SUFFIX)] for n in names if n.endswith(_JOURNAL_SUFFIX))
    mains |= {n for n in journals if _STORE_NAME.match(n)}
    out = []
    for name in sorted(mains):
        path = folder / name
        try:
            with FeatureStore(path) as store:
                info = store.info()
        except FeatxError as exc:
            out.append({"path": str(path), "error": str(exc)})
            continue
        out.append(
            {
                "path": info["path"],
                "backbone": str(info["config"].get("backbone", _STORE_NAME.match(name)["backbone"])),
                "hash": info["config_hash"],
                "dtype": info["dtype"],
                "n_keys": info["n_keys"],
                "entries": [f"{e['layer']}/{e['pooling']}" for e in info["entries"]],
                "journal_segments": info["journal_segments"],
                "size_bytes": info["size_bytes"],
            }
        )
    return out


def remove_store(path: str | os.PathLike, *, lock_timeout: float = 60.0) -> None:
    """Remove a store: its main file, journal, temporary files and lock file.

    Waits for a writer to finish (it takes the writer lock), so a running extraction is never cut
    off mid-batch.

    Parameters
    ----------
    path : str or path-like
        The store's main file ``<backbone>-<hash12>.h5``.
    lock_timeout : float, default=60.0
        Seconds to wait for another process's writer lock.

    Raises
    ------
    StoreError
        If there is no store at ``path``, the file is not a featx store, or a writer holds the
        lock past ``lock_timeout``.

    Examples
    --------
    >>> import tempfile
    >>> from featx.store import FeatureStore, list_stores, remove_store
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp.name)
    >>> remove_store(store.path)
    >>> list_stores(tmp.name)
    []
    >>> tmp.cleanup()
    """
    path = pathlib.Path(path)
    journal = path.with_name(path.name + _JOURNAL_SUFFIX)
    if not path.exists() and not journal.exists():
        raise StoreError(f"no feature store at {path} (neither the file nor its journal exists); nothing removed")
    if not _STORE_NAME.match(path.name):
        FeatureStore(path).close()  # refuses (StoreError) a file that is not a featx store
    lock_path = path.with_name(path.name + _LOCK_SUFFIX)
    with _writer_lock(path, lock_timeout):
        try:
            if journal.is_dir():
                shutil.rmtree(journal)
            for tmp in path.parent.glob(glob.escape(path.name) + ".tmp-*"):
                _unlink_quietly(tmp)
            _unlink_quietly(path)
            _unlink_quietly(lock_path)  # waiters notice the unlinked lock file and take a new one
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError(f"could not remove the store {path} ({exc}); check the folder's permissions") from exc
