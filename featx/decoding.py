"""Images to pixels for THE loop: the dataset, its batches and their loader, and decoding on the device.

:func:`make_loader` builds the loop's loader: on a CPU, threads of the main process that decode a
batch when the loop asks for it (:class:`ThreadedLoader`), elsewhere DataLoader worker processes.
Either decodes and crops images to ``uint8`` tensors (:class:`ImageDataset`), or, with
the ``"torch"`` decoder, read a JPEG file's bytes for the main process to decode on the device
(:func:`decode_on_device`: nvjpeg on CUDA). A bad image comes back as its error message, never
as an exception in a worker.
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featx.exceptions import ImageDecodeError
from featx.images import jpeg_bytes, load_image
from featx.options import DEFAULT_MAX_PIXELS
from featx.preprocess import Preprocess

if TYPE_CHECKING:
    import torch

__all__ = ["ImageDataset", "LoadedBatch", "auto_workers", "collate", "decode_crop", "decode_on_device", "make_loader",
           "worker_init"]


class ImageDataset:
    """Decodes and crops one image per item; a bad image comes back as its error message.

    With the ``"torch"`` decoder, a plain JPEG file comes back as its encoded bytes, for the
    main process to decode on the device. A file above ``max_pixels`` (width × height) is a bad
    image (decompression-bomb guard). Each item also carries the seconds it took (reading and
    decoding, or reading the bytes), summed per batch in :attr:`LoadedBatch.decode_seconds`.
    """

    def __init__(self, source, indices: Sequence[int], preprocess: Preprocess, decoder: str = "pil",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.source = source
        self.indices = list(indices)
        self.preprocess = preprocess
        self.decoder = decoder
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        start = time.perf_counter()
        index = self.indices[position]
        item = self.source[index]
        if self.decoder == "torch":
            import torch

            data = jpeg_bytes(item, max_pixels=self.max_pixels)
            if data is not None:
                return index, None, None, torch.frombuffer(bytearray(data), dtype=torch.uint8), time.perf_counter() - start
        try:
            pixels = decode_crop(item, self.preprocess, max_pixels=self.max_pixels)
            return index, pixels, None, None, time.perf_counter() - start
        except ImageDecodeError as exc:
            return index, None, str(exc), None, time.perf_counter() - start


def decode_crop(item, preprocess: Preprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode with PIL and crop: ``uint8`` tensor of shape (crop, crop, 3)."""
    import torch

    image = load_image(item, draft_size=preprocess.draft_size, max_pixels=max_pixels)
    return torch.from_numpy(preprocess.crop_array(image))


@dataclass
class LoadedBatch:
    """One collated batch: ``indices`` in batch order; rows of ``pixels`` are decoded crops,
    ``encoded`` holds (row, JPEG bytes) for the rows still to decode."""

    indices: torch.Tensor
    pixels: torch.Tensor | None
    pixel_rows: torch.Tensor
    encoded: list[tuple[int, torch.Tensor]]
    errors: list[tuple[int, str]]
    #: Reading and decoding this batch's images: in worker processes, summed over images (overlapped
    #: with the main process); decoded in this process, the wall time the main process waited for it.
    decode_seconds: float = 0.0
    in_workers: bool = False

    def pin_memory(self):
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def collate(samples) -> LoadedBatch:
    import torch

    kept = [s for s in samples if s[2] is None]
    errors = [(s[0], s[2]) for s in samples if s[2] is not None]
    indices = torch.tensor([s[0] for s in kept], dtype=torch.long)
    rows = [row for row, s in enumerate(kept) if s[1] is not None]
    encoded = [(row, s[3]) for row, s in enumerate(kept) if s[3] is not None]
    # (n, H, W, 3) stacked, then viewed as (n, 3, H, W): channels-last, with no copy. NumPy stacks on
    # one thread: torch.stack's OpenMP threads took 1.1 s for 32 crops on a loaded machine (3 ms on one).
    pixels = torch.from_numpy(np.stack([kept[row][1].numpy() for row in rows])).permute(0, 3, 1, 2) if rows else None
    from torch.utils.data import get_worker_info

    return LoadedBatch(indices, pixels, torch.tensor(rows, dtype=torch.long), encoded, errors,
                       decode_seconds=float(sum(s[4] for s in samples)), in_workers=get_worker_info() is not None)


class ThreadedLoader:
    """Batches of an :class:`ImageDataset` decoded by ``threads`` threads of this process, one batch per request.

    PIL releases the GIL while it decodes and resizes, so the threads use every core; and since
    a batch is decoded only when THE loop asks for it (nothing is prefetched), decoding and the
    network take turns on the cores instead of fighting over them (on a CPU device, the
    network's own threads stall whenever one of them shares a core with a decoder).
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, threads: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.threads = max(1, int(threads))

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        n = len(self.dataset)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="featx-decode") as pool:
            for first in range(0, n, self.batch_size):
                start = time.perf_counter()
                samples = self._decode(pool, range(first, min(first + self.batch_size, n)))
                decoded = time.perf_counter() - start
                loaded = collate(samples)
                loaded.decode_seconds = decoded
                yield loaded

    def _decode(self, pool, positions: range) -> list:
        """The batch's samples, in order: each thread takes the next image until none is left.

        One task per thread, not one per image: the main process wakes once per thread, not
        once per image (each wake-up costs a context switch, dear on a loaded machine).
        """
        samples = [None] * len(positions)
        taken = itertools.count()  # next() on a count is atomic under the GIL

        def work():
            for k in taken:
                if k >= len(positions):
                    return
                samples[k] = self.dataset[positions[k]]

        for task in [pool.submit(work) for _ in range(min(self.threads, len(positions)))]:
            task.result()
        return samples


def make_loader(source, indices: Sequence[int], preprocess: Preprocess, *, decoder: str, max_pixels: int,
                batch_size: int, num_workers, device: torch.device):
    """The batches THE loop reads: :class:`ImageDataset` items collated by :func:`collate`.

    On a CPU device with ``num_workers="auto"``, a :class:`ThreadedLoader` with as many threads
    as the network's (``torch.get_num_threads()``) for image files, one for in-memory images:
    decoding and the network take turns on the same cores. Otherwise a DataLoader with ``num_workers`` decoding processes (``"auto"``:
    :func:`auto_workers`) that decode ahead while the device runs the network; memory is pinned
    for a CUDA device only. ``featx bench`` times this same loader alone (decoding without the
    network).
    """
    import torch
    from torch.utils.data import DataLoader

    if num_workers == "auto" and device.type == "cpu":
        dataset = ImageDataset(source, indices, preprocess, decoder, max_pixels)
        # Files: one thread per network thread. In-memory images stay on one thread, as before: a
        # PIL image listed twice must not be loaded by two threads at once.
        files = len(indices) > 0 and isinstance(source[indices[0]], (str, os.PathLike))
        return ThreadedLoader(dataset, batch_size, torch.get_num_threads() if files else 1)
    if num_workers == "auto":
        num_workers = auto_workers(source, len(indices))
    return DataLoader(
        ImageDataset(source, indices, preprocess, decoder, max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init if num_workers else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )


def decode_on_device(loaded: LoadedBatch, source, preprocess: Preprocess, device: torch.device, *,
                     max_pixels: int = DEFAULT_MAX_PIXELS):
    """The batch's pixels on ``device``, decoding its JPEG bytes there (nvjpeg on CUDA).

    Returns ``(pixels, indices, skipped)``: an image the tensor decoder refuses is decoded by
    PIL instead, and one that PIL refuses too is skipped with PIL's message.
    """
    import torch

    n = len(loaded.indices)
    if not loaded.encoded:
        return loaded.pixels.to(device, non_blocking=True), loaded.indices, []
    from torchvision.io import ImageReadMode, decode_jpeg

    crop = preprocess.crop
    pixels = torch.empty((n, 3, crop, crop), dtype=torch.uint8, device=device)
    if loaded.pixels is not None:
        pixels[loaded.pixel_rows.to(device)] = loaded.pixels.to(device, non_blocking=True)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; the call is unchanged.
        warnings.simplefilter("ignore", DeprecationWarning)
        data = [b for _, b in loaded.encoded]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad image fails the batched call: decode one by one
            images = []
            for b in data:
                try:
                    images.append(decode_jpeg(b, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(None)
    keep = torch.ones(n, dtype=torch.bool)
    skipped = []
    for (row, _), image in zip(loaded.encoded, images):
        index = int(loaded.indices[row])
        if image is None:  # the tensor decoder refused it: PIL decodes it, or says why it cannot
            try:
                image = decode_crop(source[index], preprocess, max_pixels=max_pixels).permute(2, 0, 1).to(device)
            except ImageDecodeError as exc:
                keep[row] = False
                skipped.append((index, str(exc)))
                continue
        else:
            image = preprocess.crop_tensor(image)
        pixels[row] = image
    if not keep.all():
        pixels, indices = pixels[keep.to(device)], loaded.indices[keep]
    else:
        indices = loaded.indices
    return pixels, indices, skipped


def worker_init(_worker_id: int) -> None:
    # Inside a worker process only: decoding is single-threaded, one core per worker.
    import torch

    torch.set_num_threads(1)


def auto_workers(source, n_items: int) -> int:
    """One decoding process per core for image files; none for in-memory images or short runs."""
    if n_items < 64 or not isinstance(source[0], (str, os.PathLike)):
        return 0
    return max(1, min(8, os.cpu_count() or 1))
