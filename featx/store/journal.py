"""The journal of a store: one durable segment file per written batch, merged later by consolidation.

A segment is ``<store>.journal/seg-<time_ns>-<pid>-<seq>.npz``: an uncompressed ``.npz`` with
``meta`` (JSON: entries, dims, configuration), ``keys`` and one array per entry. It is written to
``.tmp-<name>`` in the journal, fsynced and renamed, so a batch is either fully there or absent;
readers and :func:`segment_names` ignore the temporary names, and the next writer removes them.
Segments never change once committed, so their headers can be cached by name.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import time
from dataclasses import dataclass

import numpy as np

from featx.paths import fsync_dir
from featx.store.files import unlink_quietly, write_failed
from featx.store.names import FORMAT_VERSION, KEY_LEN, Entry, canonical_json, entry_label, journal_dir, key_array, utcnow

__all__ = [
    "SEG_PREFIX",
    "SEG_SUFFIX",
    "TMP_PREFIX",
    "Segment",
    "SegmentVanished",
    "check_segment",
    "journal_files",
    "read_segment",
    "segment_names",
    "write_segment",
]

SEG_PREFIX = "seg-"
SEG_SUFFIX = ".npz"
TMP_PREFIX = ".tmp-"
_SEQ = itertools.count()


class SegmentVanished(Exception):
    """A journal segment was consolidated away while it was being read; read again.

    It never leaves the store: the FeatureStore's reads catch it and take a fresh snapshot.
    """


@dataclass(frozen=True)
class Segment:
    """The header of a committed segment: its file name, sorted keys, entries and meta."""

    name: str
    keys: np.ndarray
    entries: dict[Entry, tuple[int, str]]  # entry -> (dim, member name)
    meta: dict


def journal_files(folder: pathlib.Path) -> tuple[list[str], list[str]]:
    """The names in a journal folder: ``(temporary files, the others)``, each sorted.

    Examples
    --------
    >>> import tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("seg-1.npz", ".tmp-seg-2.npz"):
    ...     _ = (folder / name).write_bytes(b"")
    >>> journal_files(folder), journal_files(folder / "absent")
    ((['.tmp-seg-2.npz'], ['seg-1.npz']), ([], []))
    """
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    return [n for n in names if n.startswith(TMP_PREFIX)], [n for n in names if not n.startswith(TMP_PREFIX)]


def segment_names(folder: pathlib.Path) -> list[str]:
    """The committed segments of a journal folder, oldest first (an absent folder has none)."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if n.startswith(SEG_PREFIX) and n.endswith(SEG_SUFFIX))


def read_segment(folder: pathlib.Path, name: str, expected_hash: str | None) -> Segment | str:
    """Read the header of the committed segment ``name``, or say why it is bad.

    A damaged segment, or one of another configuration than ``expected_hash`` (when given), is
    described by a string: :meth:`~featx.store.FeatureStore.verify` reports it, readers skip it.

    Raises
    ------
    FileNotFoundError
        If the segment is gone (consolidated meanwhile).
    """
    try:
        with np.load(folder / name, allow_pickle=False) as z:
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
        if expected_hash is not None and meta.get("config_hash") != expected_hash:
            raise ValueError(f"it belongs to the configuration {meta.get('config_hash')}, not {expected_hash}")
        return Segment(name, keys.astype(f"S{KEY_LEN}"), entries, meta)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a damaged segment is reported by verify(), never fatal
        return f"{type(exc).__name__}: {exc}"


def write_segment(
    path: pathlib.Path,
    keys: np.ndarray,
    arrays: dict[Entry, np.ndarray],
    *,
    config: dict,
    config_hash: str,
    dtype: str,
    provenance: dict,
) -> None:
    """Commit one batch to the journal of the store ``path``: written, fsynced, renamed.

    The caller holds the writer lock and has validated the batch. This does not go through
    :func:`featx.paths.atomic_path`: the temporary name ``.tmp-<segment>`` (not
    ``<segment>.tmp-<pid>``) is part of the layout (readers list ``seg-*.npz`` only, the next
    writer removes ``.tmp-*``, verify reports them), and the file is created exclusively.

    Raises
    ------
    StoreError
        If the batch cannot be written (a full disk, a read-only folder); nothing is committed
        and the temporary file is removed.
    """
    journal = journal_dir(path)
    name = f"{SEG_PREFIX}{time.time_ns():020d}-{os.getpid():07d}-{next(_SEQ):06d}{SEG_SUFFIX}"
    tmp = journal / f"{TMP_PREFIX}{name}"
    meta = {
        "format_version": FORMAT_VERSION,
        "featx_config": canonical_json(config),
        "config_hash": config_hash,
        "dtype": dtype,
        "provenance": canonical_json(provenance),
        "written": utcnow(),
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
            fsync_dir(journal.parent)
        with open(tmp, "xb") as fh:
            np.savez(fh, **members)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, journal / name)
        fsync_dir(journal)
    except OSError as exc:
        unlink_quietly(tmp)
        raise write_failed(exc, f"a batch of {keys.size} rows", path) from exc
    except BaseException:
        unlink_quietly(tmp)
        raise


def check_segment(path: pathlib.Path, seg: Segment | str, dtype: str, problems: list[str], dims: dict[Entry, int]) -> None:
    """Check every array of a segment against its header, the store's dtype and the dims seen so far.

    Appends what is wrong to ``problems``; records each entry's dim in ``dims``.
    """
    fix = "its rows are ignored; delete it and extract again (only missing rows are computed)"
    if not isinstance(seg, Segment):
        problems.append(f"journal segment {path} is unreadable ({seg}); {fix}")
        return
    try:
        key_array(seg.keys)
        with np.load(path, allow_pickle=False) as z:
            for entry, (dim, member) in seg.entries.items():
                arr = z[member]
                if arr.shape != (seg.keys.size, dim) or arr.dtype != np.dtype(dtype):
                    raise ValueError(f"{entry_label(entry)} has shape {arr.shape} and dtype {arr.dtype}")
                if not np.isfinite(arr).all():
                    raise ValueError(f"{entry_label(entry)} holds NaN or infinite values")
                if dims.setdefault(entry, dim) != dim:
                    raise ValueError(f"{entry_label(entry)} has dim {dim} but the store has {dims[entry]}")
    except FileNotFoundError:
        return
    except Exception as exc:
        problems.append(f"journal segment {path} is damaged ({type(exc).__name__}: {exc}); {fix}")
