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
``<path>.claims/``
    Only while extractions run: one ``run-*.json`` per running extraction and one
    ``claim-*.json`` per chunk of keys it computes (:mod:`~featx.store.claims`), so that
    concurrent runs divide the work. Advisory: no reader needs them; the last run removes them.
``<path>.lock``
    An empty file locked with ``fcntl.flock`` by the one process that writes (it also records
    that process's pid). Readers take no lock.

A process killed at any moment leaves either a committed segment or a temporary file that
readers ignore and the next writer removes; a key present twice (main file and journal, or two
segments) holds the same features, and the earliest copy wins.

The package holds one concept per module: :mod:`~featx.store.names` (configurations, file
names, keys), :mod:`~featx.store.files` (durable replacement, leftovers, failed writes),
:mod:`~featx.store.locks` (the writer lock), :mod:`~featx.store.claims` (the work of concurrent
extractions), :mod:`~featx.store.journal` (segments),
:mod:`~featx.store.mainfile` (the HDF5 file), :mod:`~featx.store.snapshot` (the merged view
and consolidation), :mod:`~featx.store.feature_store` (:class:`FeatureStore`) and
:mod:`~featx.store.maintenance` (listing and removing stores). Import the public names from
``featx.store``. Nothing here imports torch.
"""

from __future__ import annotations

from featx.exceptions import StoreInputError
from featx.paths import default_cache_dir
from featx.store.claims import WorkShare
from featx.store.feature_store import FeatureSet, FeatureStore
from featx.store.maintenance import list_stores, remove_store
from featx.store.names import FORMAT_VERSION, canonical_json, config_hash, store_path

__all__ = [
    "FORMAT_VERSION",
    "FeatureSet",
    "FeatureStore",
    "StoreInputError",
    "WorkShare",
    "canonical_json",
    "config_hash",
    "default_cache_dir",
    "list_stores",
    "remove_store",
    "store_path",
]
