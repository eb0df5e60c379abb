"""Extraction: THE loop run over an image source, in memory or into the feature store.

:func:`extract` is the orchestration every workflow calls: it validates the request, looks up
what the feature store already holds (without importing torch when the store answers
everything), runs :func:`featx.loop.iter_batches` — in this process or on an engine
(:mod:`featx.distributed`) — on the images the store lacks, and writes every completed batch.
:func:`store_config` is the one place a store's configuration is built from the options.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from featx import __version__
from featx.backbones import Backbone, load_backbone
from featx.devices import (check_runtime, device_kind, device_type, resolve, resolve_decoder, resolve_device,
                           resolve_precision)
from featx.distributed import RayEngine
from featx.exceptions import FeatxError, ImageDecodeError
from featx.images import ImageSource, content_key, describe, open_source
from featx.loop import Batch, Request, iter_batches, make_requests, prepare
from featx.options import ExtractOptions, check_tta
from featx.shards import check_shard, in_shard, open_shard
from featx.store import FeatureStore, WorkShare, canonical_json, store_path
from featx.threads import extraction_scope

__all__ = [
    "Batch",
    "ExtractionResult",
    "Request",
    "check_runtime",
    "check_tta",
    "extract",
    "iter_batches",
    "join_features",
    "kept_labels",
    "make_requests",
    "open_store",
    "prepare",
    "provenance",
    "resolve_decoder",
    "resolve_device",
    "resolve_engine",
    "resolve_precision",
    "require_kept",
    "skipped_lines",
    "store_config",
    "store_exists",
    "store_location",
]


# --------------------------------------------------------------------------- store configuration


def store_config(backbone: Backbone, *, options: ExtractOptions, kind: str) -> dict:
    """The extraction configuration a feature store is keyed by (its file name hashes this).

    Built from the options (precision, decoder, dtype, tta) resolved for the device type
    ``kind`` (``"cpu"``, ``"cuda"`` …): the one place a store's configuration is made. The
    decoder is recorded only when it is not PIL (the default, and what every store written
    before the option existed used): tensor-decoded pixels differ slightly, so they get a store
    of their own. A test-time augmentation is part of it too (``"tta": "hflip"``), so plain and
    flip-averaged features never share a store; plain stores keep the configuration (and file
    name) they had before ``tta`` existed. The batch size, workers, runtime and compilation are
    not part of it: they change no feature beyond float rounding.

    Examples
    --------
    >>> from featx.backbones import load_backbone
    >>> config = store_config(load_backbone("featx_tiny_cnn", lazy=True),
    ...                       options=ExtractOptions(precision="fp32", tta="hflip"), kind="cpu")
    >>> config["precision"], config["dtype"], config["tta"], "decoder" in config
    ('fp32', 'float32', 'hflip', False)
    """
    config = {**backbone.config(), "precision": resolve_precision(options.precision, kind), "dtype": options.dtype,
              "featx_version": __version__}
    if resolve_decoder(options.decoder, kind) != "pil":
        config["decoder"] = f"torchvision.io.decode_jpeg:{device_kind(kind)}"
    if options.tta is not None:
        config["tta"] = options.tta
    return config


def provenance() -> dict:
    """Versions of the software that computed the features, recorded beside them.

    Read from the installed packages' metadata, so that opening a store imports none of them.
    """
    versions = {"featx": __version__, "python": platform.python_version()}
    for package in ("torch", "torchvision", "timm", "numpy", "pillow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # not installed here: left out
            versions[package] = importlib.metadata.version(package)
    return versions


def store_location(store, config: Mapping) -> Path:
    """Where :func:`open_store` would find the store of ``config`` (nothing is created)."""
    if isinstance(store, FeatureStore):
        return store.path
    if store is True:
        return store_path(config)
    path = Path(store)
    return path if path.suffix == ".h5" else store_path(config, path)


def store_exists(store, config: Mapping) -> bool:
    """Whether ``store`` (as :func:`open_store` takes it) already exists for ``config``."""
    return isinstance(store, FeatureStore) or store_location(store, config).exists()


def open_store(store, config: Mapping, *, dtype: str = "float32"):
    """Open (or create) the feature store for ``config``.

    ``store`` is ``True`` (the default cache folder: ``$FEATX_CACHE`` or ``./cache``), a folder,
    a ``.h5`` file path, or an open :class:`~featx.store.FeatureStore`.
    """
    if isinstance(store, FeatureStore):
        if store.config == json.loads(canonical_json(config)) and store.dtype == dtype:
            return store
        return FeatureStore.open(config, path=store.path, dtype=dtype, provenance=provenance())
    return FeatureStore.open(config, path=store_location(store, config), dtype=dtype, provenance=provenance())


# --------------------------------------------------------------------------- results


class ExtractionResult(Mapping):
    """Features of a source, held in a feature store and read on access.

    A mapping from ``"<layer>/<pooling>"`` to float32 arrays of shape (n_kept, d), rows in
    the order of :attr:`kept` (the source positions whose image could be decoded).

    Attributes
    ----------
    store : FeatureStore
    source : ImageSource
    keys : list of str or None
        Content key of every source item (``None`` when the file could not be read).
    kept : ndarray of int
        Positions of the source that have features.
    skipped : list of (str, str)
        ``(image, reason)`` for every image that was skipped.
    skipped_positions : list of int
        Their positions in the source, in the same order.
    n_computed : int
        Images that went through the network in this run (the others came from the store).
    n_shared : int
        Images that another process extracting into the same store at the same time committed
        while this run went on, so that this run did not compute them.
    seconds : float
        Wall time of the run.
    timings : dict of str to float
        Where the run's time went, in seconds of this process's wall time (all within
        :attr:`seconds`): ``"hash"`` (content keys), ``"decode"`` (reading and decoding images in
        this process), ``"handover"`` (waiting for decoded batches beyond that, collating them,
        moving them to the device), ``"network"`` (normalising, forward pass, pooling),
        ``"write"`` (the store's writes and consolidation). Images decoded by DataLoader worker
        processes add ``"decode_workers"``: their decoding time summed over images, overlapped
        with the rest. Batches an engine computed elsewhere report only ``hash`` and ``write``.
    shard : (int, int) or None
        ``(I, N)`` for a shard run: then :attr:`keys` is ``None`` for the images of other parts,
        :attr:`store` reads this shard's store, the main store and the sibling shards as one, and
        new features went to this shard's store.
    """

    def __init__(self, *, store, source, keys, requests, skipped_positions, skipped, n_computed, seconds,
                 shard=None, timings=None, n_shared=0):
        self.shard = shard
        self.timings = dict(timings or {})
        self.store = store
        self.source = source
        self.keys = keys
        self.requests = list(requests)
        self.skipped_positions = list(skipped_positions)
        bad = set(skipped_positions)
        self.kept = np.array([i for i, key in enumerate(keys) if key is not None and i not in bad], dtype=np.int64)
        self.skipped = skipped
        self.n_computed = n_computed
        self.n_shared = n_shared
        self.seconds = seconds

    @property
    def n_from_store(self) -> int:
        """Images kept whose features the store held when the run began."""
        return max(len(self.kept) - self.n_computed - self.n_shared, 0)

    @property
    def kept_keys(self) -> list[str]:
        return [self.keys[i] for i in self.kept]

    @property
    def images_per_s(self) -> float:
        return self.n_computed / self.seconds if self.seconds > 0 else 0.0

    def _request(self, name: str) -> Request:
        for request in self.requests:
            if request.key == name:
                return request
        raise KeyError(f"{name!r}: this extraction holds {', '.join(r.key for r in self.requests)}")

    def __getitem__(self, name: str) -> np.ndarray:
        request = self._request(name)
        return self.store.read(self.kept_keys, request.layer, request.pooling)

    def __iter__(self):
        return (r.key for r in self.requests)

    def __len__(self) -> int:
        return len(self.requests)

    def summary(self) -> str:
        """Human-readable closing lines: counts, throughput, store, skipped files."""
        # a throughput of nothing computed would read "0.0 images/s": say that nothing was computed, and why
        if self.n_computed:
            timing = f"{self.seconds:.1f} s ({self.images_per_s:.1f} images/s)"
        else:
            timing = f"{'nothing to compute' if len(self.kept) else 'nothing computed'} ({self.seconds:.1f} s)"
        shared = f"{self.n_shared} from another process writing meanwhile, " if self.n_shared else ""
        lines = [
            f"{len(self.keys)} images: {self.n_computed} computed, {shared}"
            f"{self.n_from_store} from the store, {len(self.skipped)} skipped; " + timing,
            f"store: {self.store.path}",
        ]
        if self.shard is not None:
            members = sum(key is not None for key in self.keys)
            lines[0] = (f"shard {self.shard[0]}/{self.shard[1]}: {members} of {len(self.keys)} images belong to it; "
                        + lines[0].replace(f"{len(self.keys)} images: ", "", 1))
        lines += skipped_lines(self.skipped, len(self.keys))
        return "\n".join(lines)


def skipped_lines(skipped, n_images: int | None = None, *, limit: int | None = None,
                  see_all: str | None = None) -> list[str]:
    """The lines that list skipped images, in the one wording every command uses.

    Parameters
    ----------
    skipped : sequence of (image, reason) pairs or of dicts with ``image`` and ``reason``
    n_images : int, optional
        How many images there were in all (``"skipped 4 of 20 images:"``).
    limit : int, optional
        List only the first ``limit``; a last line then says how many more, and ``see_all``.
    see_all : str, optional
        How to see every skipped image, e.g. ``"'featx extract DATA' lists them all"``.

    Returns
    -------
    list of str
        Nothing when nothing was skipped.

    Examples
    --------
    >>> for line in skipped_lines([("a.png", "not found"), ("b.png", "cannot decode")], 5, limit=1,
    ...                           see_all="'featx extract DATA' lists them all"):
    ...     print(line)
    skipped 2 of 5 images:
      a.png: not found
      ... and 1 more: 'featx extract DATA' lists them all
    """
    pairs = [(item["image"], item["reason"]) if isinstance(item, dict) else tuple(item) for item in skipped]
    if not pairs:
        return []
    of = f" of {n_images}" if n_images is not None else ""
    lines = [f"skipped {len(pairs)}{of} image{'' if (len(pairs) if n_images is None else n_images) == 1 else 's'}:"]
    shown = pairs if limit is None else pairs[:limit]
    lines += [f"  {name}: {reason}" for name, reason in shown]
    if len(shown) < len(pairs):
        lines.append(f"  ... and {len(pairs) - len(shown)} more" + (f": {see_all}" if see_all else ""))
    return lines


def require_kept(results, what: str) -> None:
    """Raise when the extractions ``results`` (one, or one per backbone) kept no image in common.

    Every image may have been skipped (unreadable or missing files, ``on_error="skip"``): the
    error then says so, with the count and the first skipped image, instead of reading an empty
    store. ``what`` names the work that needs the images (``"fit a head on"``).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> result = SimpleNamespace(kept=np.array([], dtype=int), keys=[None, None],
    ...                          skipped=[("a.png", "not found"), ("b.png", "not found")])
    >>> require_kept(result, "fit a head on")
    Traceback (most recent call last):
    ...
    featx.exceptions.FeatxError: all 2 images were skipped (unreadable or missing, e.g. a.png), so there is nothing to fit a head on; fix or remove those files (each is listed with its reason in the extraction's 'skipped').
    """
    results = [results] if isinstance(results, ExtractionResult) or not isinstance(results, (list, tuple)) else results
    kept = results[0].kept
    for result in results[1:]:
        kept = np.intersect1d(kept, result.kept)
    if len(kept):
        return
    n = len(results[0].keys)
    skipped = {name: reason for result in results for name, reason in result.skipped}
    if not skipped:
        raise FeatxError(f"no image to {what}: the source holds {n} images, and no image was kept by every extraction.")
    every = f"all {n} images were" if len(skipped) == n else f"{len(skipped)} of {n} images were"
    raise FeatxError(f"{every} skipped (unreadable or missing, e.g. {next(iter(skipped))}), so there is nothing to "
                     f"{what}; fix or remove those files (each is listed with its reason in the extraction's "
                     "'skipped').")


def kept_labels(result: ExtractionResult, positions=None) -> np.ndarray:
    """Labels of the images an extraction kept (or of the source ``positions`` given); raises if the source has none."""
    labels = result.source.require_labels(
        "this needs a folder of class sub-folders, a CSV with a 'label' column, or a built-in dataset"
    )
    return np.asarray(labels)[result.kept if positions is None else positions]


def join_features(results, blocks) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Join the features of several extractions of one source (one per backbone) on their common rows.

    Parameters
    ----------
    results : sequence of ExtractionResult
    blocks : sequence of sequence of str
        For each result, the ``"<layer>/<pooling>"`` blocks to take from it, in order.

    Returns
    -------
    X : ndarray of shape (n_kept, sum of the block widths), float32
        The blocks side by side, on the rows every result kept.
    widths : list of int
        The width of each block, in column order.
    kept : ndarray of int
        The source positions of the rows: those every extraction could decode.
    """
    kept = results[0].kept
    for result in results[1:]:
        kept = np.intersect1d(kept, result.kept)
    arrays = []
    for result, keys in zip(results, blocks):
        rows = np.searchsorted(result.kept, kept)
        arrays += [np.asarray(result[key], dtype=np.float32)[rows] for key in keys]
    X = np.hstack(arrays) if len(arrays) > 1 else arrays[0]
    return X, [int(a.shape[1]) for a in arrays], kept


# --------------------------------------------------------------------------- extraction


def resolve_engine(engine):
    """``None`` for the local loop, else an object with ``resolve_device`` and ``batches``."""
    if engine == "local" or engine is None:
        return None
    if engine == "ray":
        return RayEngine()
    if hasattr(engine, "batches") and hasattr(engine, "resolve_device"):
        return engine
    raise FeatxError(f"Unknown engine {engine!r}: expected 'local', 'ray' or a featx.distributed.RayEngine.")


def extract(images, options: ExtractOptions | None = None, *, stop=None, shard: tuple[int, int] | None = None,
            **settings):
    """Extract pooled features from a frozen backbone, in memory or into a feature store.

    Parameters
    ----------
    images : ImageSource, sequence of paths or PIL images, or array of shape (n, H, W) or (n, H, W, C)
        ``uint8`` arrays are taken as 0–255, float arrays must lie in [0, 1]. For folders,
        CSV files and built-in datasets, pass :func:`featx.images.open_source`'s result.
    options : ExtractOptions, optional
        What to extract and how (backbone, layers, pooling, store, device, precision …); see
        :class:`~featx.options.ExtractOptions` for every setting and its default.
    stop : callable, optional
        Checked after every batch; when it returns True the run stops with
        :class:`KeyboardInterrupt` at that safe point, every completed batch kept. The CLI sets
        it from SIGINT and SIGTERM, so a signal that lands where Python ignores exceptions
        (a finaliser) still stops the run.
    shard : (int, int), optional
        ``(I, N)``: extract only part ``I`` of ``N`` (numbered from 0) of the images, chosen by
        content key, into a shard store beside the main store; keys that the main store or any
        shard store of the configuration holds are not computed again. Merge the parts with
        :func:`featx.shards.merge_stores` (``featx cache merge``). Needs a store.
    **settings
        Any :class:`~featx.options.ExtractOptions` field by name (``backbone=``, ``layers=``,
        ``store=`` …), replacing the value of ``options``. With ``store=None`` (the default)
        everything stays in memory; otherwise features go to the feature store of this
        extraction configuration, only images and layers it lacks are computed, and every
        completed batch is kept even if the run is interrupted. Processes extracting into one
        store at once divide the images (:mod:`featx.store.claims`): each computes the chunks it
        claims and takes the others' rows from the store. ``engine="ray"`` runs the loop on
        a pool of Ray actors and writes their results here (needs a store and the ``ray`` extra).

    Returns
    -------
    dict of str to ndarray, or ExtractionResult
        Keyed ``"<layer>/<pooling>"``, each float32 of shape (n_images, d). With a store, an
        :class:`ExtractionResult`: the same mapping (rows of the images kept), read from the
        store, plus the keys, skipped images and timing.

    Raises
    ------
    ImageDecodeError
        For a bad image when ``on_error="raise"`` (the default in memory); the message names it.

    Examples
    --------
    >>> import numpy as np
    >>> images = np.random.default_rng(0).integers(0, 256, size=(4, 40, 40, 3), dtype=np.uint8)
    >>> features = extract(images, backbone="featx_tiny_cnn", layers=["stage2", "pre_logits"],
    ...                    pooling=["avg", "spp"], device="cpu")
    >>> {key: value.shape for key, value in features.items()}
    {'stage2/avg': (4, 32), 'stage2/spp': (4, 160), 'pre_logits/avg': (4, 32), 'pre_logits/spp': (4, 32)}
    """
    options = ExtractOptions.merge(options, settings, where="featx.extract")
    source = images if isinstance(images, ImageSource) else open_source(images)
    backbone = options.backbone
    if not isinstance(backbone, Backbone):
        backbone = load_backbone(backbone, weights=options.weights, lazy=True)
    requests = make_requests(backbone.name, options.layers, options.pooling)
    engine = resolve_engine(options.engine)
    if options.store is None and (shard is not None or engine is not None):
        raise FeatxError(
            f"{'shard=' if shard is not None else 'engine='}{shard if shard is not None else 'ray'!r} writes to a "
            "feature store, but store=None was given: pass store=True (the cache folder), a folder or a .h5 path"
        )
    if engine is not None and options.runtime == "auto":  # the actors run eager torch
        options = options.replace(runtime="torch")
    if (options.compile or options.runtime != "torch") and engine is not None:
        raise FeatxError(f"{'compile=True' if options.compile else f'runtime={options.runtime!r}'} prepares the "
                         "network in this process; it does not go with engine='ray'. Leave one of them out.")
    if shard is not None:
        shard = check_shard(shard)
    run = options.replace(backbone=backbone, on_error=options.error_policy)
    # With an existing store, the device type is all the configuration needs: found without
    # torch where possible, so that a run the store answers entirely never imports it.
    # (Shards and engines resolve the device with torch: they compute.)
    kind = device_type(run.device) if run.store is not None and shard is None and engine is None else None
    if kind is not None and not store_exists(run.store, store_config(backbone, options=run, kind=kind)):
        kind = None
    if kind is None:
        run = resolve(run) if engine is None else resolve(run, engine.resolve_device(run.device))
        kind = run.device.type
    else:
        run = run.replace(precision=resolve_precision(run.precision, kind), decoder=resolve_decoder(run.decoder, kind))
    if run.store is None:
        prepare(backbone, run.device)
        chunks: dict[Request, list[np.ndarray]] = {r: [] for r in requests}
        with extraction_scope(run.threads):
            for batch in iter_batches(backbone, source, requests, run.replace(on_error="raise")):
                for request in requests:
                    chunks[request].append(batch.features[request])
                _check_stop(stop)
        return {
            r.key: np.concatenate(chunks[r]) if chunks[r] else np.empty((0, 0), dtype=np.float32) for r in requests
        }
    try:
        return _extract_to_store(backbone, source, requests, run, kind=kind, stop=stop, shard=shard, engine=engine)
    except _DeviceTypeChanged as changed:  # the driver said one device type and torch another: torch decides
        return extract(source, options.replace(backbone=backbone, device=changed.device), stop=stop, shard=shard)


class _DeviceTypeChanged(Exception):
    """Raised before anything is computed when torch resolves another device type than guessed."""

    def __init__(self, device):
        super().__init__(str(device))
        self.device = device


def _check_stop(stop) -> None:
    if stop is not None and stop():
        raise KeyboardInterrupt


def _content_keys(source, on_error: str) -> tuple[list[str | None], list[tuple[int, str]]]:
    keys, skipped = [], []
    for i in range(len(source)):
        try:
            keys.append(content_key(source[i]))
        except ImageDecodeError as exc:
            if on_error == "raise":
                raise
            keys.append(None)
            skipped.append((i, str(exc)))
    return keys, skipped


def _extract_to_store(backbone, source, requests, run: ExtractOptions, *, kind, stop=None, shard=None,
                      engine=None) -> ExtractionResult:
    start = time.perf_counter()
    config = store_config(backbone, options=run, kind=kind)
    keys, unreadable = _content_keys(source, run.on_error)
    timings = dict.fromkeys(("hash", "decode", "handover", "network", "write"), 0.0)
    timings["hash"] = time.perf_counter() - start
    if shard is None:
        feature_store = lookup = open_store(run.store, config, dtype=run.dtype)
    else:
        # The shard writes its own store; what the main store or a sibling shard holds is not recomputed.
        feature_store, lookup = open_shard(store_location(run.store, config), config, dtype=run.dtype, shard=shard,
                                           provenance=provenance())
        keys = [key if member else None for key, member in zip(keys, in_shard(keys, shard))]
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is not None:
            first.setdefault(key, i)
    unique = list(first)
    # Per (layer, pooling): the keys the store lacks. Only those are computed and written.
    held = lookup.held(unique, [(r.layer, r.pooling) for r in requests]) if unique else {}
    need = {r: {key for key, ok in zip(unique, held[(r.layer, r.pooling)]) if not ok} for r in requests}
    todo = [r for r in requests if need[r]]
    wanted = set().union(*need.values()) if need else set()
    indices = [first[key] for key in unique if key in wanted]
    failed: dict[str, str] = {}
    n_computed = n_shared = 0
    if indices:
        if engine is None:
            if isinstance(run.device, str):  # the device type was known without torch: torch decides now
                device = resolve_device(run.device)
                if device.type != kind:
                    raise _DeviceTypeChanged(device)
                run = run.replace(device=device)
            prepare(backbone, run.device)
            # Other processes extracting into this store at once take chunks of their own: this
            # run computes the chunks it claims, skips what they commit and, at the end, waits
            # for what they claimed (computing it here if they fail or die).
            needs = {key: frozenset((r.layer, r.pooling) for r in todo if key in need[r]) for key in wanted}
            with extraction_scope(run.threads), WorkShare(
                    feature_store, lookup, [keys[i] for i in indices], needs, chunk=2 * run.batch_size,
                    timeout=feature_store.lock_timeout) as share:
                more = True
                while more:
                    batches = iter_batches(backbone, source, todo, run, indices=indices,
                                           batch_sampler=share.batches(run.batch_size))
                    n_computed += _write_batches(batches, feature_store, keys, todo, need, failed, stop, timings,
                                                 share)
                    more = share.wait(stop)
                n_shared = share.n_from_others
                if share.close():  # the last writer to end merges the journal; the others leave it to it
                    written = time.perf_counter()
                    feature_store.consolidate()
                    timings["write"] += time.perf_counter() - written
        else:
            batches = engine.batches(backbone, source, todo, run, indices=indices)
            with extraction_scope(run.threads), feature_store.writer():
                n_computed += _write_batches(batches, feature_store, keys, todo, need, failed, stop, timings)
                written = time.perf_counter()
                feature_store.consolidate()
                timings["write"] += time.perf_counter() - written
    skipped_positions = [i for i, _ in unreadable]
    skipped = [(describe(source[i], i), message) for i, message in unreadable]
    for i, key in enumerate(keys):
        if key in failed:
            skipped_positions.append(i)
            skipped.append((describe(source[i], i), failed[key]))
    return ExtractionResult(
        store=lookup,
        source=source,
        keys=keys,
        requests=requests,
        skipped_positions=skipped_positions,
        skipped=skipped,
        n_computed=n_computed,
        n_shared=n_shared,
        seconds=time.perf_counter() - start,
        shard=shard,
        timings=timings,
    )


def _write_batches(batches, feature_store, keys, todo, need, failed, stop, timings, share=None) -> int:
    """Write every batch to the store as it comes; return how many images were computed.

    ``failed`` collects the images that could not be decoded (by key); ``timings`` adds up each
    batch's stages and the writes; ``share``, when given, hears which claimed keys are committed
    or failed.
    """
    n_computed = 0
    with contextlib.closing(batches):
        for batch in batches:
            for stage, seconds in batch.seconds.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
            written = time.perf_counter()
            for position, message in batch.skipped:
                failed[keys[position]] = message
            batch_keys = [keys[i] for i in batch.indices]
            if batch_keys:
                groups: dict[tuple[bool, ...], dict] = {}
                for request in todo:
                    mask = tuple(key in need[request] for key in batch_keys)
                    groups.setdefault(mask, {})[(request.layer, request.pooling)] = batch.features[request]
                for mask, features in groups.items():
                    rows = np.flatnonzero(mask)
                    if len(rows):
                        feature_store.write(
                            [batch_keys[i] for i in rows], {entry: value[rows] for entry, value in features.items()}
                        )
                n_computed += len(batch_keys)
            timings["write"] += time.perf_counter() - written
            if share is not None:
                share.finished(batch_keys + [keys[position] for position, _ in batch.skipped])
            _check_stop(stop)
    return n_computed
