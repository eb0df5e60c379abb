"""The Ray engine: extraction on a pool of Ray actors, cross-validation on Ray's joblib backend.

``featx extract DATA --engine ray`` (or ``featx.extract(..., engine=RayEngine(...))``) works like
the local run: the driver lists the source, computes content keys, drops what the store already
holds and keeps the one writer of the store. Only the forward passes move: the images still to
compute are cut into blocks of whole batches, a pool of actors each loads the frozen backbone
once (on a GPU when ``gpus_per_worker > 0``) and runs the same loop,
:func:`featx.loop.iter_batches`, on its blocks; the pooled features come back to the driver,
which writes them as they arrive.

Why results stream to the driver rather than into shard stores on the workers: pooled features
are small next to the images (1280 float32 = 5 KiB per image for ``pre_logits/avg`` against
~100 KiB for a JPEG), the store's writer commits a 32-image batch in about a millisecond (see
``docs/scaling.md``), so one writer keeps up with far more workers than a CPU cluster has, and
there is then nothing to merge and no HDF5 file on a shared file system with several writers.
Past that rate, run shards (``--shard I/N``) and merge instead.

Why :class:`ray.util.ActorPool` and not Ray Data's ``map_batches``: the listing, the keys, the
decoding and the store are already featx's; ActorPool passes our blocks as they are to actors
that run our loop, and needs neither Arrow blocks nor a Ray Data datasource for our sources (nor
the ``ray[data]`` dependencies).

Images must be readable from the workers: file sources are sent as absolute paths (the workers
must see the same file system: a shared or network file system, or one machine), in-memory and
built-in sources as the pixels of each block only (never the whole data set per task).

Ray is optional: ``pip install "featx[ray]"``. Importing this module does not import Ray.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from featx.devices import check_resolved, resolve
from featx.exceptions import FeatxError, RayUnavailableError
from featx.loop import Batch, iter_batches, prepare
from featx.options import ExtractOptions
from featx.progress import Progress

__all__ = ["RayEngine", "joblib_on_ray", "require_ray", "ray_session"]

_EXTRA = 'pip install "featx[ray]"'


def require_ray():
    """Import and return :mod:`ray`, or raise an error that names the extra to install.

    Raises
    ------
    RayUnavailableError
        When Ray is not installed.

    Examples
    --------
    >>> import sys
    >>> from unittest import mock
    >>> with mock.patch.dict(sys.modules, {"ray": None}):
    ...     require_ray()
    Traceback (most recent call last):
    ...
    featx.exceptions.RayUnavailableError: the Ray engine needs Ray, which is not installed: pip install "featx[ray]" (or pip install ray), or run without --engine ray
    """
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(
            f"the Ray engine needs Ray, which is not installed: {_EXTRA} (or pip install ray), "
            "or run without --engine ray"
        ) from exc
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None):
    """Connect to the Ray cluster at ``address`` (default: start a local one) for a ``with`` block.

    If Ray is already initialised in this process (a notebook, a test fixture), that session is
    used and left running; a session this function started is shut down on the way out, also on
    Ctrl-C.

    Parameters
    ----------
    address : str, optional
        ``"auto"``, ``"ray://head:10001"`` or ``"head:6379"``; ``None`` starts a local cluster.
    num_cpus : int, optional
        CPUs of a local cluster (default: all of this machine's).

    Yields
    ------
    module
        :mod:`ray`.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    options = {"address": address, "include_dashboard": False, "log_to_driver": False}
    if address is None and num_cpus is not None:
        options["num_cpus"] = num_cpus
    try:
        ray.init(**options)
    except ConnectionError as exc:
        raise FeatxError(
            f"cannot connect to a Ray cluster at {address!r} ({exc}); start one with 'ray start --head' and "
            "pass its address, or leave --address out to start a local one"
        ) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def joblib_on_ray(address: str | None = None):
    """Run scikit-learn's and featx's joblib work (CV folds, grid search) on Ray in a ``with`` block.

    ``ray.util.joblib.register_ray()`` and ``joblib.parallel_backend("ray")``: every
    ``Parallel(n_jobs=...)`` inside becomes Ray tasks (``n_jobs=-1``: all the cluster's CPUs).
    """
    import joblib

    with ray_session(address) as ray:
        from ray.util.joblib import register_ray

        register_ray()
        with joblib.parallel_backend("ray"):
            yield ray


class _Worker:
    """A Ray actor's state: the backbone, loaded once, and the loop run on each block."""

    def __init__(self, backbone, requests, options: ExtractOptions):
        self.options = resolve(options)
        self.backbone = prepare(backbone, self.options.device)
        self.requests = list(requests)

    def run(self, positions: Sequence[int], items: Sequence) -> tuple:
        """Features of one block, its batches joined: ``(source positions, {request key: array}, skipped)``.

        One result per block means one durable write per block on the driver (an fsync costs
        ~10 ms on a busy disk: per 32-image batch that would cap the driver at ~3,000 images/s).
        """
        done, features, skipped = [], {request.key: [] for request in self.requests}, []
        for batch in iter_batches(self.backbone, list(items), self.requests, self.options):
            done += [positions[i] for i in batch.indices]
            skipped += [(positions[i], message) for i, message in batch.skipped]
            for request, value in batch.features.items():
                features[request.key].append(value)
        return done, {key: np.concatenate(parts) for key, parts in features.items() if parts}, skipped


def _item(source, position: int):
    item = source[position]
    if isinstance(item, (str, os.PathLike)):
        return os.path.abspath(os.fsdecode(item))  # the workers' working folder is not the driver's
    return item


@dataclass(frozen=True)
class RayEngine:
    """Where and how :func:`featx.extract` runs on Ray.

    Parameters
    ----------
    address : str, optional
        The cluster (``"auto"``, ``"ray://head:10001"``, ``"head:6379"``); ``None`` starts a local
        Ray, or uses the session already initialised in this process.
    workers : int, optional
        Actors, each holding one copy of the backbone. Default: the cluster's GPUs divided by
        ``gpus_per_worker``, else its CPUs divided by ``cpus_per_worker``.
    gpus_per_worker : float, default=0
        GPUs per actor (``num_gpus``; fractions share a GPU); above 0 the actors run on CUDA.
    cpus_per_worker : float, default=1
        CPUs per actor; it decodes and runs the network with them (from 2 CPUs on, with one
        decoding process per CPU, unless ``num_workers`` is given to :func:`featx.extract`). A GPU
        actor is limited by decoding: give it most of its node's cores.
    block_size : int, optional
        Images per task, rounded up to whole batches. Default: 8 batches, fewer for small runs so
        every actor gets work.
    num_cpus : int, optional
        CPUs of a local cluster that this engine starts (default: all).

    Examples
    --------
    >>> engine = RayEngine(workers=2)
    >>> engine.resolve_device("auto")
    device(type='cpu')
    >>> RayEngine(gpus_per_worker=1).resolve_device("auto")
    device(type='cuda')
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    block_size: int | None = None
    num_cpus: int | None = None

    def resolve_device(self, device="auto"):
        """The device of the actors: CUDA when they get GPUs, else the CPU (not this machine's)."""
        import torch

        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise FeatxError(
                f"gpus_per_worker must be >= 0 and cpus_per_worker > 0; got {self.gpus_per_worker} and "
                f"{self.cpus_per_worker}"
            )
        if self.workers is not None and self.workers < 1:
            raise FeatxError(f"workers must be a positive number of Ray actors, got {self.workers}")
        wanted = "cuda" if self.gpus_per_worker > 0 else "cpu"
        if str(device) not in ("auto", wanted) and torch.device(device).type != wanted:
            raise FeatxError(
                f"device={str(device)!r} does not fit gpus_per_worker={self.gpus_per_worker}: Ray actors run on "
                f"{wanted}; leave device='auto' (or set gpus_per_worker > 0 for CUDA)"
            )
        return torch.device(wanted)

    def _n_workers(self, ray) -> int:
        if self.workers is not None:
            return int(self.workers)
        resources = ray.cluster_resources()
        if self.gpus_per_worker > 0:
            return max(1, int(resources.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_worker))

    def batches(self, backbone, source, requests, options: ExtractOptions, *, indices) -> Iterator:
        """Yield :class:`featx.loop.Batch` objects of ``source[indices]`` computed by the actors.

        ``options`` are resolved for the actors' device (:meth:`resolve_device`); each actor runs
        :func:`featx.loop.iter_batches` with them.

        Blocks are contiguous runs of ``indices`` of whole batches, so every actor's batches are
        the local loop's batches: the features are the same, row for row (up to the float32
        rounding that a different number of torch threads brings on real backbones). One Batch comes per
        block (the driver writes it as one segment), in the order the blocks finish. Closing the generator (the run ends, fails or is interrupted) kills
        the actors; what was already yielded is the caller's.
        """
        check_resolved(options, "RayEngine.batches")
        batch_size = options.batch_size
        indices = list(indices)
        by_key = {request.key: request for request in requests}
        with ray_session(self.address, num_cpus=self.num_cpus) as ray:
            from ray.util import ActorPool

            n_workers = self._n_workers(ray)
            size = self.block_size or min(8 * batch_size, math.ceil(len(indices) / n_workers))
            size = batch_size * max(1, math.ceil(size / batch_size))
            blocks = [indices[i : i + size] for i in range(0, len(indices), size)]
            n_workers = max(1, min(n_workers, len(blocks)))
            actor = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker)(_Worker)
            # "auto": an actor of one CPU decodes in its own process; with more CPUs (a GPU actor
            # needs them: decoding is its limit), one DataLoader decoding process per CPU.
            num_workers = options.num_workers
            if num_workers == "auto":
                num_workers = int(self.cpus_per_worker) if self.cpus_per_worker >= 2 else 0
            # What an actor needs, and nothing it cannot unpickle: the backbone travels once, apart.
            remote = options.replace(backbone=backbone.name, store=None, engine="local", device=options.device.type,
                                     num_workers=num_workers, progress=False)
            shared = ray.put(backbone)
            actors = [actor.remote(shared, requests, remote) for _ in range(n_workers)]
            bar = Progress(len(indices), enabled=options.progress, unit="img",
                           desc=f"{backbone.name} on {n_workers} Ray workers")
            try:
                pool = ActorPool(actors)
                for block in blocks:  # the pool submits when an actor is free: one block's pixels per actor
                    pool.submit(lambda worker, b: worker.run.remote(b, [_item(source, i) for i in b]), block)
                while pool.has_next():
                    try:
                        results = pool.get_next_unordered()
                    except ray.exceptions.RayTaskError as exc:
                        if isinstance(exc.cause, FeatxError):  # a bad image with on_error="raise"
                            raise exc.cause from None
                        raise
                    positions, features, skipped = results
                    bar.advance(len(positions) + len(skipped))
                    yield Batch(
                        indices=np.asarray(positions, dtype=np.int64),
                        features={by_key[key]: value for key, value in features.items()},
                        skipped=skipped,
                    )
            finally:
                bar.close()
                for worker in actors:
                    ray.kill(worker)
