"""The consolidated HDF5 file of a store: its root attributes, its entries, and reading rows fast.

The main file holds one group per entry, ``/features/<layer>/<pooling>``, with a ``keys``
dataset (``S32``, sorted, unique) and a ``data`` dataset (``(n, dim)``, chunked about 256 KiB a
chunk, resizable, unfiltered). It is never modified in place: it is created empty by
:func:`create_main` and replaced whole by consolidation, each time with a fresh ``generation``
attribute, so an index read from one version of the file is never wrong for it. Because chunks
are unfiltered, rows are read straight from the file at the chunk offsets HDF5 reports
(:func:`read_main_rows`), which reads only the rows asked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from featx.exceptions import StoreError, StoreInputError
from featx.store.files import replace_durably
from featx.store.names import DTYPES, FORMAT_VERSION, KEY_LEN, STORE_NAME, Entry, config_hash, key_array, utcnow

__all__ = [
    "MainEntry",
    "MainIndex",
    "as_float32",
    "check_main_file",
    "check_root_attrs",
    "chunk_offsets",
    "create_main",
    "index_main_file",
    "main_ident",
    "pread_rows",
    "read_main_rows",
    "read_rows",
    "set_root_attrs",
    "write_merged_entry",
]

CHUNK_BYTES = 256 * 1024
KEY_CHUNK_ROWS = 8192
#: Rows are copied and checked in blocks of about this many bytes.
BLOCK_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# root attributes


def set_root_attrs(f: h5py.File, canon: str, dtype: str, provenance: str) -> None:
    """Write the root attributes of a new main file (``canon`` and ``provenance`` are canonical JSON)."""
    now = utcnow()
    config = json.loads(canon)
    f.attrs["featx_config"] = canon
    f.attrs["config_hash"] = config_hash(config)
    f.attrs["dtype"] = dtype
    f.attrs["created"] = now
    f.attrs["updated"] = now
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["provenance"] = provenance
    f.attrs["generation"] = uuid.uuid4().hex


def create_main(path: pathlib.Path, canon: str, dtype: str, provenance: str) -> None:
    """Write an empty main file atomically (the caller holds the writer lock)."""
    with replace_durably(path, "a new store") as tmp:
        with h5py.File(tmp, "w-") as f:
            set_root_attrs(f, canon, dtype, provenance)
            f.create_group("features")


def check_root_attrs(attrs: Mapping, where: str) -> dict:
    """Return the root attributes of a store (bytes decoded) if this featx can read it.

    Raises
    ------
    StoreError
        If ``featx_config`` or ``dtype`` is missing, the format is newer than this featx reads,
        or the dtype is not one a store may have.
    """
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
    if out["dtype"] not in DTYPES:
        raise StoreError(f"{where} declares dtype {out['dtype']!r}; expected one of {', '.join(DTYPES)}")
    return out


# --------------------------------------------------------------------------------------------
# the index of a main file


@dataclass
class MainEntry:
    """What is known of one entry of a main file; keys and chunk offsets are read when first needed."""

    dim: int
    n: int
    keys: np.ndarray | None = None
    offsets: np.ndarray | None = None  # file offset of each chunk, when rows can be read directly
    offsets_checked: bool = False


@dataclass
class MainIndex:
    """The entries of one version of a main file (``ident`` None: there is no main file)."""

    ident: tuple | None
    entries: dict[Entry, MainEntry] = field(default_factory=dict)


# Indexes (sorted keys, chunk offsets) of recently read main files, shared by the FeatureStore
# instances of one process. A main file is never modified in place and every rewrite gets a new
# identity (inode, mtime, generation), so an entry can be stale only in being unused.
_MAIN_INDEXES: dict[str, MainIndex] = {}
_MAIN_INDEXES_KEPT = 8


def main_ident(f: h5py.File) -> tuple:
    """Identify the open main file: every write of a main file gets a new ``generation``."""
    try:
        st = os.fstat(f.id.get_vfd_handle())
    except Exception:  # a driver without a file descriptor: fall back on the path
        st = os.stat(f.filename)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, str(f.attrs.get("generation", "")))


def index_main_file(f: h5py.File, path: pathlib.Path, ident: tuple) -> MainIndex:
    """The index of the open main file ``f`` of the store ``path``, whose :func:`main_ident` is ``ident``.

    Shared by the stores of this process: another instance may already have indexed this file.
    """
    shared = _MAIN_INDEXES.get(str(path))
    if shared is not None and shared.ident == ident:
        return shared
    index = MainIndex(ident)
    group = f.get("features")
    if isinstance(group, h5py.Group):
        for layer, layer_group in group.items():
            if not isinstance(layer_group, h5py.Group):
                continue
            for pooling, entry_group in layer_group.items():
                if isinstance(entry_group, h5py.Group) and "data" in entry_group and "keys" in entry_group:
                    shape = entry_group["data"].shape
                    if len(shape) == 2:
                        index.entries[(layer, pooling)] = MainEntry(dim=int(shape[1]), n=int(shape[0]))
    _MAIN_INDEXES[str(path)] = index
    while len(_MAIN_INDEXES) > _MAIN_INDEXES_KEPT:
        _MAIN_INDEXES.pop(next(iter(_MAIN_INDEXES)))
    return index


# --------------------------------------------------------------------------------------------
# reading rows


@functools.lru_cache(maxsize=1)
def _float16_table() -> np.ndarray:
    return np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def as_float32(arr: np.ndarray) -> np.ndarray:
    """Convert to float32; float16 goes through a lookup table (3x faster than astype on ReLU zeros).

    Examples
    --------
    >>> as_float32(np.array([1.5, 0.0], np.float16))
    array([1.5, 0. ], dtype=float32)
    """
    if arr.dtype == np.dtype(np.float16):
        return _float16_table()[arr.view(np.uint16)]
    return arr.astype(np.float32, copy=False)


def chunk_offsets(f: h5py.File, dset: h5py.Dataset) -> np.ndarray | None:
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


def pread_rows(fd: int, offsets: np.ndarray, dset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
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


def read_rows(dset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read the sorted unique ``rows`` of a chunked 2-D dataset, chunk run by chunk run.

    h5py fancy indexing with thousands of indices is slow; reading the runs of touched chunks as
    slices is as fast as reading the whole dataset at worst.
    """
    n, d = dset.shape
    out = np.empty((rows.size, d), dtype=dset.dtype)
    if rows.size == 0:
        return out
    chunk = dset.chunks[0] if dset.chunks else max(1, CHUNK_BYTES // max(1, d * dset.dtype.itemsize))
    block = max(chunk, BLOCK_BYTES // max(1, d * dset.dtype.itemsize) // chunk * chunk)
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


def read_main_rows(f: h5py.File, ent: MainEntry, dset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted, unique) of the entry ``ent`` of the open main file, in the stored dtype.

    Straight from the file (:func:`pread_rows`) where the chunks allow it, else through h5py.
    """
    if not ent.offsets_checked:
        ent.offsets, ent.offsets_checked = chunk_offsets(f, dset), True
    if ent.offsets is not None:
        fd = None
        with contextlib.suppress(Exception):
            fd = f.id.get_vfd_handle()
        if isinstance(fd, int):
            return pread_rows(fd, ent.offsets, dset, rows)
    return read_rows(dset, rows)


# --------------------------------------------------------------------------------------------
# writing an entry


def write_merged_entry(
    group: h5py.Group,
    entry: Entry,
    dim: int,
    dtype: str,
    old_keys: np.ndarray,
    old_data: h5py.Dataset | None,
    new_keys: np.ndarray,
    new_rows: np.ndarray,
) -> None:
    """Fill the empty entry ``group`` with the old rows and the new ones, in key order.

    ``old_keys`` (sorted) and ``old_data`` are the entry of the main file being replaced
    (``old_data`` None when it has no rows); ``new_keys`` (sorted, none of them old) and
    ``new_rows`` come from the journal. Rows are copied in blocks of :data:`BLOCK_BYTES`.
    """
    total = old_keys.size + new_keys.size
    new_pos = np.searchsorted(old_keys, new_keys) + np.arange(new_keys.size)
    is_new = np.zeros(total, bool)
    is_new[new_pos] = True
    merged = np.empty(total, dtype=f"S{KEY_LEN}")
    merged[new_pos] = new_keys
    merged[~is_new] = old_keys
    group.attrs["layer"], group.attrs["pooling"], group.attrs["dim"] = entry[0], entry[1], dim
    group.create_dataset(
        "keys", data=merged, chunks=(max(1, min(total, KEY_CHUNK_ROWS)),), maxshape=(None,)
    )
    itemsize = np.dtype(dtype).itemsize
    data = group.create_dataset(
        "data",
        shape=(total, dim),
        dtype=dtype,
        chunks=(max(1, min(total, CHUNK_BYTES // (dim * itemsize))), dim),
        maxshape=(None, dim),
    )
    block = max(1, BLOCK_BYTES // (dim * itemsize))
    for o0 in range(0, total, block):
        o1 = min(o0 + block, total)
        n0, n1 = np.searchsorted(new_pos, (o0, o1))
        out = np.empty((o1 - o0, dim), dtype=dtype)
        out[new_pos[n0:n1] - o0] = new_rows[n0:n1]
        if old_data is not None and (o1 - o0) > (n1 - n0):
            old = old_data[o0 - n0 : o1 - n1]
            out[~is_new[o0:o1]] = old
        data[o0:o1] = out


# --------------------------------------------------------------------------------------------
# checking


def check_main_file(f: h5py.File, path: pathlib.Path, dtype: str, problems: list[str], dims: dict[Entry, int]) -> None:
    """Check the open main file of the store ``path``, reading every row once.

    Appends what is wrong to ``problems``; records each entry's dim in ``dims``.
    """
    where = str(path)
    try:
        attrs = check_root_attrs({k: f.attrs[k] for k in f.attrs}, where)
        stored_config = json.loads(attrs["featx_config"])
    except (StoreError, ValueError) as exc:
        problems.append(str(exc))
        return
    if attrs.get("config_hash") != config_hash(stored_config):
        problems.append(f"{where}: config_hash {attrs.get('config_hash')!r} does not match its featx_config")
    match = STORE_NAME.match(path.name)
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
            if keys.ndim != 1 or keys.dtype != np.dtype(f"S{KEY_LEN}"):
                problems.append(
                    f"{label}/keys has shape {keys.shape} and dtype {keys.dtype}; expected (n,) S{KEY_LEN}"
                )
                continue
            if data.ndim != 2 or data.shape[0] != keys.shape[0]:
                problems.append(f"{label}: {keys.shape[0]} keys but data of shape {data.shape}")
                continue
            if int(entry_group.attrs.get("dim", -1)) != data.shape[1]:
                problems.append(
                    f"{label}: attribute dim={entry_group.attrs.get('dim')} but data has {data.shape[1]} columns"
                )
            if data.dtype != np.dtype(dtype):
                problems.append(f"{label}: data dtype {data.dtype} but the store is {dtype}")
            key_values = keys[...]
            try:
                key_array(key_values)
            except StoreInputError as exc:
                problems.append(f"{label}: {exc}")
            if key_values.size > 1 and not (key_values[1:] > key_values[:-1]).all():
                problems.append(f"{label}: keys are not sorted and unique")
            step = max(1, BLOCK_BYTES // max(1, data.shape[1] * data.dtype.itemsize))
            bad = sum(int((~np.isfinite(data[i : i + step])).sum()) for i in range(0, data.shape[0], step))
            if bad:
                problems.append(f"{label}: {bad} NaN or infinite values")
            dims[(layer, pooling)] = data.shape[1]
