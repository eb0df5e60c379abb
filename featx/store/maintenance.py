"""Looking after the stores of a cache folder: list them, remove one.

Checking one store is :meth:`FeatureStore.verify <featx.store.FeatureStore.verify>`.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time

from featx.exceptions import FeatxError, StoreError
from featx.paths import default_cache_dir, fsync_dir
from featx.store.feature_store import FeatureStore
from featx.store.files import temporary_files, unlink_quietly
from featx.store.claims import live_writers
from featx.store.locks import writer_lock
from featx.store.names import JOURNAL_SUFFIX, STORE_NAME, claims_dir, journal_dir, lock_file

__all__ = ["list_stores", "remove_store"]


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
        ``entries`` (list of ``"layer/pooling"``), ``journal_segments``, ``size_bytes`` and
        ``updated`` (UTC, ISO 8601); a store that cannot be read has ``path`` and ``error`` instead.

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
    mains = {n for n in names if STORE_NAME.match(n)}
    journals = (n[: -len(JOURNAL_SUFFIX)] for n in names if n.endswith(JOURNAL_SUFFIX))
    mains |= {n for n in journals if STORE_NAME.match(n)}
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
                "backbone": str(info["config"].get("backbone", STORE_NAME.match(name)["backbone"])),
                "hash": info["config_hash"],
                "dtype": info["dtype"],
                "n_keys": info["n_keys"],
                "entries": [f"{e['layer']}/{e['pooling']}" for e in info["entries"]],
                "journal_segments": info["journal_segments"],
                "size_bytes": info["size_bytes"],
                "updated": info["updated"],
            }
        )
    return out


def remove_store(path: str | os.PathLike, *, lock_timeout: float = 60.0) -> None:
    """Remove a store: its main file, journal, temporary files and lock file.

    Waits for the extractions writing to it to finish (their registrations beside the store,
    :mod:`featx.store.claims`, and the writer lock), so a running extraction is never cut off.

    Parameters
    ----------
    path : str or path-like
        The store's main file ``<backbone>-<hash12>.h5``.
    lock_timeout : float, default=60.0
        Seconds to wait for another process's writer lock.

    Raises
    ------
    StoreError
        If there is no store at ``path``, the file is not a featx store, or a writer still runs
        (or holds the lock) after ``lock_timeout`` seconds.

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
    journal = journal_dir(path)
    if not path.exists() and not journal.exists():
        raise StoreError(f"no feature store at {path} (neither the file nor its journal exists); nothing removed")
    if not STORE_NAME.match(path.name):
        FeatureStore(path).close()  # refuses (StoreError) a file that is not a featx store
    deadline = time.monotonic() + lock_timeout
    while True:
        with writer_lock(path, max(deadline - time.monotonic(), 0.0)):
            writers = live_writers(path)
            if not writers:
                _remove_files(path, journal)
                return
        if time.monotonic() >= deadline:
            raise StoreError(
                f"{writers[0].describe()} is extracting into the store {path}; waited {lock_timeout:g} s for it to "
                "end. Remove the store once that run ends (or stop it first); nothing was removed"
            )
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))


def _remove_files(path: pathlib.Path, journal: pathlib.Path) -> None:
    """Remove every file of the store (the caller holds the writer lock and no extraction runs)."""
    try:
        if journal.is_dir():
            shutil.rmtree(journal)
        if claims_dir(path).is_dir():  # only files of runs that died are left in it
            shutil.rmtree(claims_dir(path))
        for tmp in temporary_files(path):
            unlink_quietly(tmp)
        unlink_quietly(path)
        unlink_quietly(lock_file(path))  # waiters notice the unlinked lock file and take a new one
        fsync_dir(path.parent)
    except OSError as exc:
        raise StoreError(f"could not remove the store {path} ({exc}); check the folder's permissions") from exc
