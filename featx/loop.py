"""THE batched extraction loop.

The loader of :mod:`featx.decoding` decodes and crops images to ``uint8`` tensors (on a CPU in
threads of this process, between forward passes; elsewhere in DataLoader workers); the main
process moves each batch to the device, normalises it, runs the frozen backbone once under
``torch.inference_mode()`` (and autocast where the precision asks for it), and pools every
requested layer from that one forward pass. Every consumer — the in-memory
:func:`featx.extract`, the feature store, the scikit-learn transformer, the Ray engine's actors,
the advisor — reads batches from :func:`iter_batches`; there is no second loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from featx.backbones import Backbone, Tap, resolve_layers, run_taps
from featx.decoding import decode_on_device, make_loader
from featx.devices import autocast, check_resolved, check_runtime
from featx.exceptions import ImageDecodeError
from featx.options import ExtractOptions
from featx.featuresets import parse_blocks
from featx.paths import split_names
from featx.pooling import check_pooling, pool_each
from featx.progress import Progress
from featx.runtimes import select_runner

if TYPE_CHECKING:
    import torch

__all__ = ["Batch", "Request", "iter_batches", "make_requests", "prepare"]


@dataclass(frozen=True)
class Request:
    """One (layer, pooling) output: ``name`` is what the user asked for, ``tap`` where it is read."""

    layer: str
    pooling: str
    tap: Tap

    @property
    def key(self) -> str:
        return f"{self.layer}/{self.pooling}"


@dataclass
class Batch:
    """What one forward pass produced: source indices, pooled features per request, and skips.

    ``seconds`` says where the batch's time went: ``"decode"`` (reading and decoding its images
    in this process, wall time) or ``"decode_workers"`` (the same, summed over images, in
    DataLoader worker processes, overlapped with the main process), ``"handover"`` (the main
    process waiting for the decoded batch beyond that, collating it and moving it to the device;
    the first batch's includes starting the decoding) and ``"network"`` (normalising, the
    forward pass, pooling, back to NumPy).
    """

    indices: np.ndarray
    features: dict[Request, np.ndarray]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def make_requests(backbone: str, layers, pooling) -> list[Request]:
    """Validate layers and poolings; one :class:`Request` per distinct (layer, pooling) block.

    ``layers`` uses the one layer grammar of :func:`featx.featuresets.parse_feature_sets`: names
    (a list, or comma-separated), ``all``, ``LAYER/POOLING`` for a block with its own pooling,
    and ``+`` between the blocks of a concatenation; here only the blocks matter, in order.

    Examples
    --------
    >>> [r.key for r in make_requests("featx_tiny_cnn", "stage2/spp+pre_logits", ["avg", "max"])]
    ['stage2/spp', 'pre_logits/avg', 'pre_logits/max']
    """
    poolings = [check_pooling(p) for p in split_names(pooling)]
    everything = [name for name, _ in resolve_layers(backbone, ["all"])]
    requests = []
    for layer, p in parse_blocks(layers, poolings, all_layers=everything):
        check_pooling(p)
        (name, tap), = resolve_layers(backbone, [layer])
        requests.append(Request(name, p, tap))
    return list(dict.fromkeys(requests))


def iter_batches(
    backbone: Backbone,
    source,
    requests: Sequence[Request],
    options: ExtractOptions,
    *,
    indices: Sequence[int] | None = None,
    batch_sampler: Iterable[Sequence[int]] | None = None,
) -> Iterator[Batch]:
    """Yield pooled features batch by batch: the single loop every consumer uses.

    Parameters
    ----------
    backbone : Backbone
        Already moved to the device (see :func:`prepare`).
    source : ImageSource or sequence
        Indexable images; ``source[i]`` is a path, PIL image or array.
    requests : sequence of Request
    options : ExtractOptions
        Resolved (:func:`featx.devices.resolve`): a concrete device, precision and decoder. The
        loop reads ``batch_size``, ``num_workers``, ``progress``, ``tta``, ``compile``,
        ``runtime``, ``max_pixels`` and ``on_error`` from it (``None``: ``"skip"``). A bad image is reported in
        :attr:`Batch.skipped`, or with ``"raise"`` stops the loop with
        :class:`~featx.exceptions.ImageDecodeError` naming the file; batches already yielded
        are the caller's and are never lost. ``tta="hflip"``: every batch and its mirror go
        through the network together and their pooled features are averaged. The runner
        comes from :func:`featx.runtimes.select_runner` (``runtime="auto"``: measured once and
        remembered); any runner but eager torch gives every batch ``batch_size`` images (a short
        last batch is padded) and runs the forward pass to the end of the network.
    indices : sequence of int, optional
        Which items of ``source`` to run (default: all), in this order.
    batch_sampler : iterable of sequences of int, optional
        The batches to run, as positions in ``indices`` of at most ``batch_size`` each, drawn
        while the loop runs (default: ``indices`` in order, ``batch_size`` at a time). The
        feature store's :class:`~featx.store.claims.WorkShare` draws them from what no other
        process computes.
    """
    check_resolved(options, "iter_batches")
    device, precision, decoder, tta = options.device, options.precision, options.decoder, options.tta
    batch_size, num_workers, progress, compile = options.batch_size, options.num_workers, options.progress, options.compile
    on_error = options.on_error or "skip"
    check_runtime(options.runtime, device, compile)
    indices = list(range(len(source))) if indices is None else list(indices)
    if not indices:
        return
    import torch

    loader = make_loader(source, indices, backbone.preprocess, decoder=decoder, max_pixels=options.max_pixels,
                         batch_size=batch_size, num_workers=num_workers, device=device, batch_sampler=batch_sampler)
    taps = list(dict.fromkeys(r.tap for r in requests))
    full = batch_size * (2 if tta == "hflip" else 1)  # the batch the network sees
    runner = select_runner(backbone, taps, options, batch=full, n_images=len(indices) * (full // batch_size))
    bar = Progress(len(indices), enabled=progress, unit="img", desc=backbone.name)
    try:
        start = time.perf_counter()  # the first hand-over includes starting the decoding processes
        loaded_batches = iter(loader)
        while True:
            loaded = next(loaded_batches, None)
            if loaded is None:
                break
            skipped = [(int(i), message) for i, message in loaded.errors]
            if skipped and on_error == "raise":
                raise ImageDecodeError(skipped[0][1])
            features = {}
            batch_indices = loaded.indices
            if len(batch_indices):
                with torch.inference_mode():
                    pixels, batch_indices, refused = decode_on_device(loaded, source, backbone.preprocess, device,
                                                                       max_pixels=options.max_pixels)
                if refused and on_error == "raise":
                    raise ImageDecodeError(refused[0][1])
                skipped += refused
            handed_over = time.perf_counter()
            if len(batch_indices):
                with torch.inference_mode():
                    x = backbone.preprocess.normalize(pixels)
                    n = x.shape[0]
                    if tta == "hflip":
                        x = torch.cat([x, x.flip(-1)])
                    if runner is not None and len(x) < full:
                        # one input shape, one compilation: pad the short last batch (eval-mode
                        # BatchNorm treats rows independently, so the padding changes no real row)
                        x = torch.cat([x, x.new_zeros(full - len(x), *x.shape[1:])])
                    if device.type != "mps":
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast(device, precision):
                        if runner is None:
                            outputs = run_taps(backbone.module, x, taps)
                        else:
                            width = 2 * n if tta == "hflip" else n
                            outputs = {tap: out[:width] for tap, out in zip(taps, runner(x))}
                    poolings: dict = {}
                    for request in requests:
                        poolings.setdefault(request.tap, []).append(request.pooling)
                    pooled_at = {tap: pool_each(outputs[tap], names) for tap, names in poolings.items()}
                    for request in requests:
                        pooled = pooled_at[request.tap][request.pooling]
                        if tta == "hflip":
                            pooled = (pooled[:n] + pooled[n:]) / 2
                        features[request] = pooled.cpu().numpy().astype(np.float32, copy=False)
            waited = handed_over - start
            if loaded.in_workers:
                seconds = {"decode_workers": loaded.decode_seconds, "handover": waited}
            else:
                seconds = {"decode": loaded.decode_seconds, "handover": max(0.0, waited - loaded.decode_seconds)}
            seconds["network"] = time.perf_counter() - handed_over
            bar.advance(len(batch_indices) + len(skipped))
            yield Batch(indices=batch_indices.numpy(), features=features, skipped=skipped, seconds=seconds)
            start = time.perf_counter()
    finally:
        bar.close()


def prepare(backbone: Backbone, device: torch.device) -> Backbone:
    """Move a backbone to ``device`` in the memory format the loop feeds it."""
    import torch

    memory_format = torch.preserve_format if device.type == "mps" else torch.channels_last
    backbone.module.to(device=device, memory_format=memory_format)
    return backbone
