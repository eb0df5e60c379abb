"""Shards: one deterministic part of a data set per process, and the merge of their stores.

N processes must never write one HDF5 file, so ``featx extract DATA --shard I/N`` extracts only
the images whose content key falls in part ``I`` of ``N`` (parts are numbered from 0, as
``torchrun``'s ``RANK`` and ``SLURM_ARRAY_TASK_ID`` with ``--array=0-7`` are) into a shard store
of its own, beside the main store of the same configuration::

    <cache>/<backbone>-<hash12>.h5                         the main store
    <cache>/<backbone>-<hash12>.shard-0002-of-0008.h5      part 2 of 8

Membership is a pure function of the content key, ``int(key[:16], 16) % N == I``, so any
launcher (a Slurm array, a loop over hosts, torchrun) can run the parts in any order, on any
machine that sees the images, and two runs agree on who does what. Before computing, a shard run
looks up its keys in the main store and in every shard store of the same configuration (of any
``N``) and computes only what none of them holds. An image that cannot be read has no key and
belongs to no part: every part reports it as skipped.

:func:`merge_stores` (``featx cache merge SHARDS... -o OUT``) copies shard stores into one
ordinary store through the store's own reading and writing API; stores whose configurations
differ are refused with the differing fields named. This module never imports torch.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence

import numpy as np

from featx.exceptions import CacheMismatchError, FeatxError, MissingKeysError, StoreError
from featx.store import FeatureStore, store_path
from featx.store.names import flatten_config

__all__ = ["StoreUnion", "check_shard", "in_shard", "merge_stores", "open_shard", "parse_shard", "shard_path",
           "sibling_shards"]

SHARD_NAME = re.compile(r"^(?P<main>.+-[0-9a-f]{12})\.shard-(?P<index>\d{4,})-of-(?P<count>\d{4,})\.h5$")
_MERGE_BLOCK_BYTES = 32 * 1024 * 1024


def check_shard(shard) -> tuple[int, int]:
    """Validate a shard ``(I, N)``: integers with ``0 <= I < N``.

    Examples
    --------
    >>> check_shard((2, 8))
    (2, 8)
    >>> check_shard((8, 8))
    Traceback (most recent call last):
    ...
    featx.exceptions.FeatxError: shard 8/8 does not exist: parts are numbered from 0, so I must satisfy 0 <= I < N (here 0 ... 7), e.g. --shard 0/8
    """
    try:
        index, count = shard
        if isinstance(index, bool) or isinstance(count, bool):
            raise TypeError
        index, count = int(index), int(count)
        if (index, count) != tuple(shard):
            raise TypeError
    except (TypeError, ValueError):
        raise FeatxError(f"a shard is a pair of integers (I, N), part I of N, numbered from 0; got {shard!r}") from None
    if count < 1:
        raise FeatxError(f"shard {index}/{count}: the number of parts N must be at least 1")
    if not 0 <= index < count:
        raise FeatxError(
            f"shard {index}/{count} does not exist: parts are numbered from 0, so I must satisfy 0 <= I < N "
            f"(here 0 ... {count - 1}), e.g. --shard 0/{count}"
        )
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"I/N"`` (part I of N, numbered from 0) as given to ``--shard``.

    Examples
    --------
    >>> parse_shard("0/3")
    (0, 3)
    >>> parse_shard("3")
    Traceback (most recent call last):
    ...
    featx.exceptions.FeatxError: --shard expects I/N (part I of N, numbered from 0: 0/3, 1/3, 2/3), got '3'
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None:
        raise FeatxError(f"--shard expects I/N (part I of N, numbered from 0: 0/3, 1/3, 2/3), got {text!r}")
    return check_shard((int(match[1]), int(match[2])))


def in_shard(keys: Iterable[str | None], shard) -> np.ndarray:
    """Tell which content keys belong to part ``I`` of ``N``: ``int(key[:16], 16) % N == I``.

    A ``None`` key (an unreadable image) belongs to no part.

    Examples
    --------
    >>> keys = [f"{i:032x}" for i in range(6)]
    >>> in_shard(keys, (1, 3)).tolist()
    [False, False, False, False, False, False]
    >>> [int(in_shard([f"{i:016x}" + "0" * 16 for i in range(6)], (part, 3)).sum()) for part in range(3)]
    [2, 2, 2]
    """
    index, count = check_shard(shard)
    return np.array([key is not None and int(key[:16], 16) % count == index for key in keys], dtype=bool)


def shard_path(main: str | os.PathLike, shard) -> pathlib.Path:
    """The shard store of part ``I`` of ``N`` beside the main store ``main``.

    Examples
    --------
    >>> shard_path("cache/featx_tiny_cnn-0123456789ab.h5", (2, 8)).name
    'featx_tiny_cnn-0123456789ab.shard-0002-of-0008.h5'
    """
    index, count = check_shard(shard)
    main = pathlib.Path(main)
    stem = main.name[:-3] if main.name.endswith(".h5") else main.name
    return main.with_name(f"{stem}.shard-{index:04d}-of-{count:04d}.h5")


def sibling_shards(main: str | os.PathLike) -> list[pathlib.Path]:
    """Every shard store (of any ``N``) beside the main store ``main``, sorted.

    Examples
    --------
    >>> import tempfile
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> for part in range(2):
    ...     _ = shard_path(tmp / "m-0123456789ab.h5", (part, 2)).write_bytes(b"")
    >>> [p.name for p in sibling_shards(tmp / "m-0123456789ab.h5")]
    ['m-0123456789ab.shard-0000-of-0002.h5', 'm-0123456789ab.shard-0001-of-0002.h5']
    """
    main = pathlib.Path(main)
    stem = main.name[:-3] if main.name.endswith(".h5") else main.name
    try:
        names = os.listdir(main.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = set()
    for name in names:
        if name.endswith(".journal"):
            name = name[: -len(".journal")]
        match = SHARD_NAME.match(name)
        if match and match["main"] == stem:
            found.add(main.parent / name)
    return sorted(found)


def _exists(path: pathlib.Path) -> bool:
    return path.exists() or path.with_name(path.name + ".journal").exists()


class StoreUnion:
    """Several stores of one configuration read as one; the first holding a key answers.

    The shard run's :class:`~featx.extraction.ExtractionResult` reads through it, because a shard
    skips what the main store or a sibling shard already holds. Read-only.

    Parameters
    ----------
    stores : sequence of FeatureStore
        The store written by this run first, then the others.

    Attributes
    ----------
    path : pathlib.Path
        The first store's path.
    stores : list of FeatureStore

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> tmp = tempfile.mkdtemp()
    >>> a = FeatureStore.open({"backbone": "featx_tiny_cnn"}, path=f"{tmp}/a.h5")
    >>> b = FeatureStore.open({"backbone": "featx_tiny_cnn"}, path=f"{tmp}/b.h5")
    >>> a.write(["a" * 32], {("stage1", "avg"): np.zeros((1, 2))})
    >>> b.write(["b" * 32], {("stage1", "avg"): np.ones((1, 2))})
    >>> StoreUnion([a, b]).read(["b" * 32, "a" * 32], "stage1", "avg")
    array([[1., 1.],
           [0., 0.]], dtype=float32)
    """

    def __init__(self, stores: Sequence[FeatureStore]):
        if not stores:
            raise FeatxError("a StoreUnion needs at least one store")
        self.stores = list(stores)
        self.path = self.stores[0].path

    def held(self, keys: Iterable[str], entries: Iterable[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
        """Like :meth:`FeatureStore.held`: True where any store holds the key for the entry."""
        keys, entries = list(keys), list(entries)
        out = {entry: np.zeros(len(keys), dtype=bool) for entry in entries}
        for store in self.stores:
            for entry, mask in store.held(keys, entries).items():
                out[entry] |= mask
        return out

    def read(self, keys: Iterable[str], layer: str, pooling: str) -> np.ndarray:
        """Like :meth:`FeatureStore.read`, each row from the first store that holds it."""
        keys = list(keys)
        out, done = None, np.zeros(len(keys), dtype=bool)
        for store in self.stores:
            if done.all():
                break
            held = store.contains(keys, layer, pooling) & ~done
            if not held.any():
                continue
            rows = store.read([k for k, h in zip(keys, held) if h], layer, pooling)
            if out is None:
                out = np.empty((len(keys), rows.shape[1]), dtype=np.float32)
            out[held] = rows
            done |= held
        if not done.all():
            raise MissingKeysError(
                f"{int((~done).sum())} of {len(keys)} keys have no features for {layer}/{pooling} in "
                f"{', '.join(str(s.path) for s in self.stores)}; run featx extract on those images first"
            )
        return out if out is not None else np.empty((0, self.dim(layer, pooling)), dtype=np.float32)

    def dim(self, layer: str, pooling: str) -> int:
        """The entry's dimension, from the first store that holds it."""
        for store in self.stores:
            if (layer, pooling) in store.entries:
                return store.dim(layer, pooling)
        return self.stores[0].dim(layer, pooling)  # raises MissingKeysError naming what is held

    def __repr__(self) -> str:
        return f"StoreUnion({', '.join(str(s.path) for s in self.stores)})"


def open_shard(main: str | os.PathLike, config, *, dtype: str, shard, provenance=None):
    """Open (creating it) the shard store of part ``shard`` and the stores it must not recompute.

    Parameters
    ----------
    main : path
        Where the main store of ``config`` is (it need not exist).
    config : mapping
        The extraction configuration.
    dtype : {'float32', 'float16'}
    shard : (int, int)
        ``(I, N)``, numbered from 0.
    provenance : mapping, optional
        Recorded in a new shard store.

    Returns
    -------
    own : FeatureStore
        The shard store this run writes.
    lookup : StoreUnion
        ``own``, then the main store and every other shard store of the configuration that exists.

    Raises
    ------
    CacheMismatchError
        If the main store or a sibling shard was written with another configuration.
    """
    main = pathlib.Path(main)
    own = FeatureStore.open(config, path=shard_path(main, shard), dtype=dtype, provenance=provenance)
    others = [
        FeatureStore.open(config, path=path, dtype=dtype)
        for path in [main, *sibling_shards(main)]
        if path != own.path and _exists(path)
    ]
    return own, StoreUnion([own, *others])


def _shard_files(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    files = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            found = sorted(path / n for n in os.listdir(path) if SHARD_NAME.match(n))
            if not found:
                raise StoreError(f"{path} holds no shard stores (<backbone>-<hash12>.shard-IIII-of-NNNN.h5)")
            files += found
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def _differences(a: FeatureStore, b: FeatureStore) -> list[str]:
    old = flatten_config({**a.config, "(store dtype)": a.dtype})
    new = flatten_config({**b.config, "(store dtype)": b.dtype})
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "nothing") != new.get(key, "nothing"):
            lines.append(f"{key}: {json.dumps(old.get(key, 'nothing'))} in {a.path.name} but "
                         f"{json.dumps(new.get(key, 'nothing'))} in {b.path.name}")
    return lines


def merge_stores(shards: Iterable[str | os.PathLike], output: str | os.PathLike, *, lock_timeout: float = 60.0) -> dict:
    """Copy shard stores (or any stores of one configuration) into one ordinary store.

    The output is written through :meth:`FeatureStore.write` and consolidated: one ``.h5`` file
    that ``featx cache verify``, ``cv``, ``fit``, ``compare`` and ``CNNFeatures`` read like any
    other. Rows the output already holds are not copied again, so merging twice, or merging into
    an existing main store, is safe. The shard files are left in place (remove them with
    ``featx cache rm``).

    Parameters
    ----------
    shards : iterable of path
        Store files, or folders whose shard stores are all taken.
    output : path
        A ``.h5`` file, or a folder: then the store gets its canonical name
        ``<folder>/<backbone>-<hash12>.h5``, where ``--cache <folder>`` finds it.
    lock_timeout : float, default=60.0

    Returns
    -------
    dict
        ``output``, ``config_hash``, ``shards`` (path and key count of each), ``rows_copied``
        (rows written, all entries together), ``n_keys`` and ``entries`` of the merged store.

    Raises
    ------
    CacheMismatchError
        If two shards, or a shard and an existing output, differ in configuration or dtype; the
        message names both stores and every differing field.
    StoreError
        If a path is not a feature store, or the output is one of the inputs.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> config = {"backbone": "featx_tiny_cnn", "weights": "seed0"}
    >>> main = store_path(config, tmp)
    >>> for part in range(2):
    ...     shard = FeatureStore.open(config, path=shard_path(main, (part, 2)))
    ...     shard.write([f"{part}" * 32], {("stage1", "avg"): np.full((1, 2), part)})
    >>> report = merge_stores(sibling_shards(main), tmp)
    >>> report["output"] == str(main), report["n_keys"], report["rows_copied"]
    (True, 2, 2)
    >>> FeatureStore(main).read(["1" * 32], "stage1", "avg")
    array([[1., 1.]], dtype=float32)
    """
    files = _shard_files(shards)
    if not files:
        raise StoreError("no shard stores given to merge; pass shard files or the folder that holds them")
    stores = [FeatureStore(path, lock_timeout=lock_timeout) for path in files]
    first = stores[0]
    for store in stores[1:]:
        if store.config != first.config or store.dtype != first.dtype:
            raise CacheMismatchError(
                f"cannot merge {store.path} into one store with {first.path}: they were extracted with other "
                f"configurations ({first.config_hash} and {store.config_hash}):\n  "
                + "\n  ".join(_differences(first, store))
                + "\nMerge only shards of one configuration (the same hash in their names)"
            )
    output = pathlib.Path(output)
    target = output if output.suffix == ".h5" else store_path(first.config, output)
    if target.resolve() in {path.resolve() for path in files}:
        raise StoreError(f"the output {target} is one of the shards to merge; choose another output")
    provenance = {**first.provenance, "merged_from": [path.name for path in files]}
    out = FeatureStore.open(first.config, path=target, dtype=first.dtype, provenance=provenance,
                            lock_timeout=lock_timeout)
    copied, described = 0, []
    with out.writer():
        for store in stores:
            keys = store.keys
            described.append({"path": str(store.path), "n_keys": len(keys)})
            for entry in store.entries:
                todo = keys[store.held(keys, [entry])[entry] & ~out.held(keys, [entry])[entry]]
                step = max(1, _MERGE_BLOCK_BYTES // (4 * store.dim(*entry)))
                for start in range(0, len(todo), step):
                    block = todo[start : start + step]
                    out.write(block, {entry: store.read(block, *entry)})
                    copied += len(block)
        out.consolidate()
    return {
        "output": str(out.path),
        "config_hash": out.config_hash,
        "shards": described,
        "rows_copied": copied,
        "n_keys": len(out.keys),
        "entries": [f"{layer}/{pooling}" for layer, pooling in out.entries],
    }
