"""One consistent look at a store: its main file and its journal segments merged, and consolidation.

Readers list the journal *before* opening the main file, so a snapshot may hold segments that
a concurrent consolidation has already merged (their keys are then in the main file, which
wins) but never misses a committed batch. A segment removed while its rows are being read
raises :class:`~featx.store.journal.SegmentVanished`, and the reader starts again.
A key present twice (main file and journal, or two segments) holds the same features, and the
earliest copy wins.
"""

from __future__ import annotations

import pathlib
import uuid
from typing import Any

import h5py
import numpy as np

from featx.store.files import replace_durably
from featx.store.journal import Segment, SegmentVanished
from featx.store.mainfile import MainIndex, read_main_rows, set_root_attrs, write_merged_entry
from featx.store.names import KEY_LEN, Entry, isin_sorted, utcnow

__all__ = ["Snapshot", "write_consolidated"]


class Snapshot:
    """One consistent snapshot of a store: an open main file (or None) plus journal segments.

    Parameters
    ----------
    f : h5py.File or None
        The open main file (None when the store lives in its journal only).
    main : MainIndex
        The index of ``f``.
    segments : list of Segment
        The committed segments listed before ``f`` was opened, oldest first.
    journal_dir : pathlib.Path
        Where the segments are.
    jcache : dict
        Where the merged journal index of each entry is kept; the store hands the same dict to
        every snapshot of the same main file and segments.
    """

    def __init__(
        self, f: h5py.File | None, main: MainIndex, segments: list[Segment], journal_dir: pathlib.Path, jcache: dict
    ):
        self.f = f
        self.main = main
        self.segments = segments
        self.journal_dir = journal_dir
        self.jcache = jcache

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
            return np.empty(0, dtype=f"S{KEY_LEN}")
        if ent.keys is None:
            ent.keys = np.asarray(self.f[f"features/{entry[0]}/{entry[1]}/keys"][...]).astype(f"S{KEY_LEN}")
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
            in_main, _ = isin_sorted(self.main_keys(entry), keys)
            keys, seg_idx, rows = keys[~in_main], seg_idx[~in_main], rows[~in_main]
            keys, first = np.unique(keys, return_index=True)  # first occurrence: earliest segment wins
            result = (keys, seg_idx[first], rows[first])
        else:
            result = (np.empty(0, dtype=f"S{KEY_LEN}"), np.empty(0, np.intp), np.empty(0, np.intp))
        self.jcache[entry] = result
        return result

    def all_keys(self, entry: Entry) -> np.ndarray:
        return np.union1d(self.main_keys(entry), self.journal(entry)[0])

    def locate(self, entry: Entry, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (source, position): source 0 missing, 1 main file, 2 journal."""
        source = np.zeros(query.size, np.int8)
        in_main, main_pos = isin_sorted(self.main_keys(entry), query)
        source[in_main] = 1
        in_journal, journal_pos = isin_sorted(self.journal(entry)[0], query)
        in_journal &= ~in_main
        source[in_journal] = 2
        return source, np.where(in_main, main_pos, journal_pos)

    def segment_array(self, index: int, entry: Entry) -> np.ndarray:
        seg = self.segments[index]
        try:
            with np.load(self.journal_dir / seg.name, allow_pickle=False) as z:
                return z[seg.entries[entry][1]]
        except FileNotFoundError as exc:
            raise SegmentVanished(seg.name) from exc

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
        return read_main_rows(self.f, self.main.entries[entry], self.main_dataset(entry), rows)


def write_consolidated(view: Snapshot, path: pathlib.Path, *, canon: str, dtype: str, provenance: str) -> list[str]:
    """Write the snapshot as a new main file that replaces ``path`` durably; return the merged segments.

    Entries the journal adds nothing to are copied as they are; the others get their old rows
    and their journal rows merged in key order. ``canon`` and ``provenance`` (canonical JSON)
    describe the store when there is no main file yet to take the root attributes from.

    Raises
    ------
    StoreError
        If the file cannot be written (the old main file and the journal are then unchanged).
    """
    if not view.segments:
        return []
    with replace_durably(path, "the consolidated store") as tmp:
        with h5py.File(tmp, "w-") as new:
            if view.f is not None:
                for key, value in view.f.attrs.items():
                    new.attrs[key] = value
            else:
                set_root_attrs(new, canon, dtype, provenance)
            new.attrs["updated"] = utcnow()
            new.attrs["generation"] = uuid.uuid4().hex
            features = new.create_group("features")
            for entry in sorted(view.entries()):
                layer_group = features.require_group(entry[0])
                if entry in view.main.entries and view.journal(entry)[0].size == 0:
                    view.f.copy(view.f[f"features/{entry[0]}/{entry[1]}"], layer_group, name=entry[1])
                    continue
                group = layer_group.create_group(entry[1])
                old_keys, new_keys = view.main_keys(entry), view.journal(entry)[0]
                new_rows = view.journal_rows(entry, np.arange(new_keys.size), dtype)
                old_data = view.main_dataset(entry) if old_keys.size else None
                write_merged_entry(group, entry, view.dim(entry), dtype, old_keys, old_data, new_keys, new_rows)
    return [seg.name for seg in view.segments]
