"""The FeatureStore: open, write, read and inspect the store of one extraction configuration.

See :mod:`featx.store` for the on-disk layout and why a batch survives any crash.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import h5py
import numpy as np

from featx.exceptions import CacheMismatchError, FeatxError, MissingKeysError, StoreError, StoreInputError, suggest
from featx.paths import fsync_dir
from featx.store.files import temporary_files, unlink_quietly
from featx.store.journal import (
    SEG_PREFIX,
    SEG_SUFFIX,
    Segment,
    SegmentVanished,
    check_segment,
    journal_files,
    read_segment,
    segment_names,
    write_segment,
)
from featx.store.locks import writer_lock
from featx.store.mainfile import (
    MainIndex,
    as_float32,
    check_main_file,
    check_root_attrs,
    create_main,
    index_main_file,
    main_ident,
)
from featx.store.names import (
    DTYPES,
    FORMAT_VERSION,
    KEY_LEN,
    Entry,
    canonical_json,
    check_entry,
    config_diff,
    config_hash,
    entry_label,
    journal_dir,
    key_array,
    store_path,
)
from featx.store.snapshot import Snapshot, write_consolidated

__all__ = ["FeatureSet", "FeatureStore"]

_HOW_TO_CREATE = (
    "create it by extracting features ('featx extract ...'), or in Python with "
    "featx.store.FeatureStore.open(config, cache_dir=...)"
)

T = TypeVar("T")


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
    lock (one writing process at a time); reading takes none. See :mod:`featx.store` for the
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
        self._main_cache: MainIndex | None = None
        self._seg_cache: dict[str, Segment | str] = {}
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
                return check_root_attrs(attrs, str(self.path))
        for name in self._segment_names():
            seg = self._segment(name)
            if isinstance(seg, Segment):
                return check_root_attrs(
                    {k: seg.meta[k] for k in ("featx_config", "config_hash", "dtype", "format_version", "provenance")},
                    str(self._journal_dir / name),
                )
        raise StoreError(f"no feature store at {self.path} (neither the file nor its journal exists); {_HOW_TO_CREATE}")

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
        if dtype not in DTYPES:
            raise StoreInputError(f"unsupported store dtype {dtype!r}; expected 'float32' or 'float16'")
        canon = canonical_json(config)
        path = pathlib.Path(path) if path is not None else store_path(config, cache_dir)
        prov = canonical_json(dict(provenance or {}))
        if not path.exists() and not journal_dir(path).exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the cache folder {path.parent} ({exc}); choose another cache_dir or FEATX_CACHE"
                ) from exc
            with writer_lock(path, lock_timeout):
                if not path.exists():
                    create_main(path, canon, dtype, prov)
        store = cls(path, lock_timeout=lock_timeout)
        requested = json.loads(canon)
        if store.config != requested or store.dtype != dtype:
            lines = config_diff(store.config, requested)
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
        return journal_dir(self.path)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {self.path} is closed; open it again with FeatureStore(path)")

    def _segment_names(self) -> list[str]:
        return segment_names(self._journal_dir)

    def _segment(self, name: str) -> Segment | str:
        """The header of a committed segment (cached: segments never change), or why it is bad."""
        cached = self._seg_cache.get(name)
        if cached is not None:
            return cached
        # while __init__ reads the root attributes from a segment, there is no hash to check yet
        seg = read_segment(self._journal_dir, name, getattr(self, "config_hash", None))
        self._seg_cache[name] = seg
        return seg

    def _segments(self, names: list[str]) -> tuple[list[Segment], list[tuple[str, str]]]:
        good, bad = [], []
        for name in names:
            try:
                seg = self._segment(name)
            except FileNotFoundError as exc:
                raise SegmentVanished(name) from exc
            if isinstance(seg, Segment):
                good.append(seg)
            else:
                bad.append((name, seg))
        for stale in set(self._seg_cache) - set(names):
            del self._seg_cache[stale]
        return good, bad

    def _snapshot(self, f: h5py.File | None, segments: list[Segment], names: tuple) -> Snapshot:
        if f is None:
            main = MainIndex(None)
        else:
            ident = main_ident(f)
            if self._main_cache is None or self._main_cache.ident != ident:
                self._main_cache = index_main_file(f, self.path, ident)
            main = self._main_cache
        cache_key = (main.ident, names)
        if self._jcache_key != cache_key:
            self._jcache_key, self._jcache = cache_key, {}
        return Snapshot(f, main, segments, self._journal_dir, self._jcache)

    def _run(self, fn: Callable[[Snapshot], T], attempts: int = 60) -> T:
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
                return fn(self._snapshot(f, segments, tuple(names)))
            except SegmentVanished:
                continue
            finally:
                if f is not None:
                    f.close()
        raise StoreError(f"the store {self.path} kept changing while being read ({attempts} attempts); try again")

    def _validated_batch(self, keys: Any, features: Any) -> tuple[np.ndarray, dict[Entry, np.ndarray]]:
        query = key_array(keys)
        _, first = np.unique(query, return_index=True)
        keep = np.sort(first)  # a key given twice in one batch: the first copy is kept
        if not isinstance(features, Mapping) or not features:
            raise StoreInputError(
                "features must be a non-empty mapping {(layer, pooling): array of shape (n_keys, dim)}, "
                f"got {type(features).__name__}"
            )
        arrays: dict[Entry, np.ndarray] = {}
        for entry, values in features.items():
            entry = check_entry(entry)
            arr = np.asarray(values)
            if arr.ndim != 2 or arr.shape[0] != query.size or arr.shape[1] == 0:
                raise StoreInputError(
                    f"features for {entry_label(entry)} have shape {arr.shape} but {query.size} keys were "
                    f"given; expected an array of shape ({query.size}, dim) with dim >= 1"
                )
            if arr.dtype.kind not in "fiu":
                raise StoreInputError(
                    f"features for {entry_label(entry)} have dtype {arr.dtype}; expected real numbers"
                )
            arr = arr[keep]
            finite = np.isfinite(arr)
            if not finite.all():
                row = int(np.flatnonzero(~finite.all(axis=1))[0])
                raise StoreInputError(
                    f"features for {entry_label(entry)} contain {int(np.isnan(arr).sum())} NaN and "
                    f"{int(np.isinf(arr).sum())} infinite values (first in the row of key "
                    f"{query[keep][row].decode()}); nothing was written. Check the images and the "
                    "precision (float16 inference can overflow)"
                )
            with np.errstate(over="ignore"):
                stored = np.ascontiguousarray(arr, dtype=self.dtype)
            if not np.isfinite(stored).all():
                raise StoreInputError(
                    f"features for {entry_label(entry)} reach {float(np.abs(arr).max()):.4g}, beyond the "
                    "float16 range (65504); nothing was written. Use a float32 store (dtype='float32')"
                )
            arrays[entry] = stored
        return query[keep], arrays

    def _remove_leftovers(self) -> None:
        """Remove temporary files of interrupted writers (only a lock holder may call this)."""
        for name in journal_files(self._journal_dir)[0]:
            unlink_quietly(self._journal_dir / name)
        for tmp in temporary_files(self.path):
            unlink_quietly(tmp)

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self) -> Iterator[FeatureStore]:
        """Hold the writer lock for a whole run of writes (re-entrant within a process).

        Each :meth:`write` takes the lock by itself, so that extractions running at once into
        one store take turns batch by batch (and divide the images, :mod:`featx.store.claims`);
        a run that must not be interleaved (the Ray engine's) takes it once with this context
        manager. Entering it also removes the temporary files that killed writers left behind.

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
        with writer_lock(self.path, self.lock_timeout) as outermost:
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
                        f"{entry_label(entry)} holds {held[entry]}-dimensional features (existing) but "
                        f"{arr.shape[1]} columns were given (new); one layer and pooling always have one "
                        "dimension: check the layer and pooling names"
                    )
            write_segment(
                self.path,
                batch_keys,
                arrays,
                config=self.config,
                config_hash=self.config_hash,
                dtype=self.dtype,
                provenance=self.provenance,
            )

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
                canon, provenance = canonical_json(self.config), canonical_json(self.provenance)
                merged = self._run(
                    lambda view: write_consolidated(view, self.path, canon=canon, dtype=self.dtype, provenance=provenance)
                )
                for name in merged:
                    unlink_quietly(self._journal_dir / name)
                fsync_dir(self._journal_dir)
            with contextlib.suppress(OSError):  # only succeeds when nothing is left in it
                self._journal_dir.rmdir()
                fsync_dir(self.path.parent)

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

        def collect(view: Snapshot) -> np.ndarray:
            parts = [view.all_keys(entry) for entry in view.entries()]
            found = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=f"S{KEY_LEN}")
            return found.astype(f"U{KEY_LEN}")

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
        labels = [entry_label(e) for e in sorted(held)]
        return MissingKeysError(
            f"the store {self.path} holds no features for layer {entry[0]!r} with pooling {entry[1]!r}."
            f"{suggest(entry_label(entry), labels)} It holds: {', '.join(labels) or 'nothing yet'}. "
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
        entry = check_entry((layer, pooling))

        def find(view: Snapshot) -> int:
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
        entry = check_entry((layer, pooling))
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
        wanted = list(dict.fromkeys(check_entry(e) for e in entries))
        query = key_array(keys)
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
        wanted = [check_entry(e) for e in entries]
        query = key_array(keys)
        _, first = np.unique(query, return_index=True)
        query = query[np.sort(first)]
        if not wanted or query.size == 0:
            return []
        lacking = ~np.logical_and.reduce(list(self.held(query, wanted).values()))
        return query[lacking].astype(f"U{KEY_LEN}").tolist()

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
        entry = check_entry((layer, pooling))
        query = key_array(keys)
        return self._run(lambda view: self._read_view(view, entry, query))

    def _read_view(self, view: Snapshot, entry: Entry, query: np.ndarray) -> np.ndarray:
        dim = view.dim(entry)
        if dim is None:
            raise self._unknown_entry(entry, view.entries())
        source, pos = view.locate(entry, query)
        absent = source == 0
        if absent.any():
            shown = list(dict.fromkeys(query[absent].astype(f"U{KEY_LEN}").tolist()))
            raise MissingKeysError(
                f"{len(shown)} of {len(set(query.tolist()))} keys have no features for "
                f"{entry_label(entry)} in the store {self.path}: {', '.join(shown[:3])}"
                f"{', ...' if len(shown) > 3 else ''}. Run featx extract on those images (with layer "
                f"{entry[0]!r} and pooling {entry[1]!r}) first; it computes only the missing rows"
            )
        in_main = source == 1
        if query.size and in_main.all():  # the usual case after consolidation: no masks, one gather
            rows, inverse = np.unique(pos, return_inverse=True)
            return as_float32(np.take(view.main_rows(entry, rows), inverse, axis=0))
        out = np.empty((query.size, dim), dtype=np.float32)
        if in_main.any():
            rows, inverse = np.unique(pos[in_main], return_inverse=True)
            out[in_main] = as_float32(view.main_rows(entry, rows)[inverse])
        in_journal = source == 2
        if in_journal.any():
            out[in_journal] = as_float32(view.journal_rows(entry, pos[in_journal], self.dtype))
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
        entry = check_entry((layer, pooling))
        query = key_array(keys)
        X = self._run(lambda view: self._read_view(view, entry, query))
        return FeatureSet(X=X, keys=query.astype(f"U{KEY_LEN}"), layer=layer, pooling=pooling)

    # -- inspection --------------------------------------------------------------------------

    def _size_on_disk(self) -> int:
        total = 0
        with contextlib.suppress(FileNotFoundError):
            total += self.path.stat().st_size
        for name in itertools.chain(*journal_files(self._journal_dir)):
            with contextlib.suppress(FileNotFoundError):
                total += (self._journal_dir / name).stat().st_size
        return total

    def _entry_table(self, view: Snapshot) -> list[dict]:
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

        def describe(view: Snapshot) -> dict:
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
                    check_main_file(f, self.path, self.dtype, problems, dims)
            except OSError as exc:
                problems.append(f"the main file {self.path} cannot be read: {exc}")
        elif self._segment_names():
            warnings.append(f"no consolidated file {self.path.name} yet; the store lives in its journal")
        else:
            problems.append(f"neither {self.path} nor its journal exists")
        temps, committed = journal_files(self._journal_dir)
        for name in temps:
            warnings.append(
                f"leftover temporary file {self._journal_dir / name} from an interrupted write: ignored by "
                "readers, removed by the next write or consolidate"
            )
        for tmp in temporary_files(self.path):
            warnings.append(f"leftover temporary file {tmp} from an interrupted consolidation: removed by the next one")
        for name in committed:
            if not (name.startswith(SEG_PREFIX) and name.endswith(SEG_SUFFIX)):
                warnings.append(f"unexpected file {self._journal_dir / name} in the journal: ignored")
                continue
            self._seg_cache.pop(name, None)
            try:
                seg = self._segment(name)
            except FileNotFoundError:
                continue  # consolidated meanwhile
            check_segment(self._journal_dir / name, seg, self.dtype, problems, dims)
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


