"""THE batched extraction loop.

DataLoader workers decode and crop images to ``uint8`` tensors; the main process moves each
batch to the device, normalises it, runs the frozen backbone once under
``torch.inference_mode()`` (and autocast where the precision asks for it), and pools every
requested layer from that one forward pass. Every consumer — the in-memory
:func:`extract`, the feature store, the scikit-learn transformer, the CLI — reads batches from
:func:`iter_batches`; there is no second loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featx.backbones import Backbone, Tap, load_backbone, resolve_layers, run_taps
from featx.exceptions import FeatxError, ImageDecodeError
from featx.images import ImageSource, content_key, describe, jpeg_bytes, load_image, open_source
from featx.pooling import check_pooling, pool
from featx.preprocess import Preprocess

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, not here: a run answered entirely from the feature store
# (a warm 'featx cv') never imports it, which is most of a warm run's time.

__all__ = [
    "Batch",
    "ExtractionResult",
    "Request",
    "check_tta",
    "extract",
    "iter_batches",
    "resolve_decoder",
    "resolve_device",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODERS = ("auto", "pil", "torch")
TTAS = ("none", "hflip")
_DEVICE_TYPES = ("cpu", "cuda", "mps")


# --------------------------------------------------------------------------- device and precision


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple's MPS, then the CPU; anything else is checked.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FeatxError(f"Unknown device {device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FeatxError(f"Device {device!r} was requested but CUDA is not available here; use device='auto' or 'cpu'.")
    return resolved


def _kind(device: str | torch.device) -> str:
    """The device type of a device or of a device type already resolved (``"cpu"``, ``"cuda"`` …)."""
    return device if isinstance(device, str) else device.type


def device_type(device: str | torch.device = "auto") -> str | None:
    """The type (``"cpu"``, ``"cuda"``, ``"mps"``) :func:`resolve_device` would give, without
    importing torch where that can be known; ``None`` where only torch can tell.

    Store configurations depend only on the device type (through the precision and decoder),
    so a run whose features are all in the store is answered without importing torch.

    Examples
    --------
    >>> device_type("cuda:1")
    'cuda'
    >>> device_type("auto") in ("cpu", "cuda", "mps", None)
    True
    """
    if not isinstance(device, str):
        return device.type
    if device != "auto":
        kind = device.split(":", 1)[0]
        return kind if kind in _DEVICE_TYPES else None
    if "torch" in sys.modules:  # already paid for: ask torch itself
        return resolve_device("auto").type
    if not sys.platform.startswith("linux"):  # Apple's MPS, Windows' CUDA: only torch knows
        return None
    count = _cuda_devices_without_torch()
    return None if count is None else ("cuda" if count else "cpu")


def _cuda_devices_without_torch() -> int | None:
    """How many CUDA devices torch would see on Linux, asked of the NVIDIA driver; None if unsure."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        version = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return None
    match = re.search(r"^cuda(?:\s*:[^=]*)?=\s*(.+)$", version, re.MULTILINE)
    if match is None:
        return None
    if match.group(1).strip() == "None":  # a CPU-only build of torch sees no GPU
        return 0
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver: torch sees no GPU either
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    flags = set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """Resolve ``"auto"`` to the fastest precision that keeps features faithful on ``device``.

    ``auto`` is ``fp16`` on CUDA, ``bf16`` on CPUs with native bf16 (AVX512-BF16 or AMX: CPU
    autocast), and ``fp32`` elsewhere (emulated bf16 was 8–18× slower than fp32 on an AVX2 CPU).

    Examples
    --------
    >>> resolve_precision("auto", "cpu") in ("fp32", "bf16")
    True
    """
    kind = _kind(device)
    if precision not in PRECISIONS:
        raise FeatxError(f"Unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}.")
    if precision == "auto":
        if kind == "cuda":
            return "fp16"
        return "bf16" if kind == "cpu" and cpu_has_bf16() else "fp32"
    if precision == "fp16" and kind == "cpu":
        raise FeatxError("precision='fp16' is not supported on the CPU: use 'bf16' or 'fp32'.")
    return precision


def resolve_decoder(decoder: str, device: str | torch.device) -> str:
    """Resolve ``"auto"``: JPEG files decode on the GPU (``"torch"``) when the device is CUDA.

    ``"pil"`` decodes in the DataLoader workers with PIL, at a reduced JPEG scale (draft mode)
    when the file is much larger than the network's input: the fastest choice on a CPU.
    ``"torch"`` has the workers read only the file's bytes; the main process decodes each batch
    of JPEGs with ``torchvision.io.decode_jpeg`` on the extraction device (nvjpeg on CUDA), then
    resizes and crops there. Other formats, CMYK and EXIF-rotated JPEGs still go through PIL.

    Examples
    --------
    >>> resolve_decoder("auto", "cpu")
    'pil'
    >>> resolve_decoder("auto", "cuda")
    'torch'
    """
    kind = _kind(device)
    if decoder not in DECODERS:
        raise FeatxError(f"Unknown decoder {decoder!r}: expected one of {', '.join(DECODERS)}.")
    if decoder == "auto":
        return "torch" if kind == "cuda" else "pil"
    return decoder
def check_tta(tta: str | None) -> str | None:
    """Normalise a test-time augmentation: ``None``/``"none"`` (plain features) or ``"hflip"``.

    Examples
    --------
    >>> check_tta("none") is None, check_tta("hflip")
    (True, 'hflip')
    """
    if tta is None or tta == "none":
        return None
    if tta not in TTAS:
        raise FeatxError(
            f"Unknown tta {tta!r}: expected 'none' (plain features) or 'hflip' (features averaged over the "
            f"image and its horizontal mirror)."
        )
    return tta


def check_runtime(runtime: str, device=None, compile: bool = False) -> str:
    """Validate ``runtime`` (``"torch"`` or ``"onnxruntime"``) against ``compile`` and, when given, the device."""
    from featx.runners import RUNTIMES

    if runtime not in RUNTIMES:
        raise FeatxError(f"Unknown runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}.")
    if runtime == "onnxruntime":
        kind = None if device is None else _kind(device)
        if kind not in (None, "cpu"):
            raise FeatxError(f"runtime='onnxruntime' runs on the CPU, not on {kind!r}: use device='cpu', or the "
                             f"default runtime='torch' on {kind!r}.")
        if compile:
            raise FeatxError("compile=True compiles the torch runtime; it does not go with runtime='onnxruntime'. "
                             "Leave one of them out.")
    return runtime


def _autocast(device: torch.device, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


# --------------------------------------------------------------------------- data loading


class _Images:
    """Decodes and crops one image per item; a bad image comes back as its error message.

    With the ``"torch"`` decoder, a plain JPEG file comes back as its encoded bytes, for the
    main process to decode on the device.
    """

    def __init__(self, source, indices: Sequence[int], preprocess: Preprocess, decoder: str = "pil"):
        self.source = source
        self.indices = list(indices)
        self.preprocess = preprocess
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        item = self.source[index]
        if self.decoder == "torch":
            import torch

            data = jpeg_bytes(item)
            if data is not None:
                return index, None, None, torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            return index, _decode_crop(item, self.preprocess), None, None
        except ImageDecodeError as exc:
            return index, None, str(exc), None


def _decode_crop(item, preprocess: Preprocess) -> torch.Tensor:
    """Decode with PIL and crop: ``uint8`` tensor of shape (crop, crop, 3)."""
    import torch

    image = load_image(item, draft_size=preprocess.draft_size)
    return torch.from_numpy(preprocess.crop_array(image))


@dataclass
class _Loaded:
    """One collated batch: ``indices`` in batch order; rows of ``pixels`` are decoded crops,
    ``encoded`` holds (row, JPEG bytes) for the rows still to decode."""

    indices: torch.Tensor
    pixels: torch.Tensor | None
    pixel_rows: torch.Tensor
    encoded: list[tuple[int, torch.Tensor]]
    errors: list[tuple[int, str]]

    def pin_memory(self):
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def _collate(samples) -> _Loaded:
    import torch

    kept = [s for s in samples if s[2] is None]
    errors = [(i, e) for i, _, e, _ in samples if e is not None]
    indices = torch.tensor([s[0] for s in kept], dtype=torch.long)
    rows = [row for row, s in enumerate(kept) if s[1] is not None]
    encoded = [(row, s[3]) for row, s in enumerate(kept) if s[3] is not None]
    # (n, H, W, 3) stacked, then viewed as (n, 3, H, W): channels-last, with no copy.
    pixels = torch.stack([kept[row][1] for row in rows]).permute(0, 3, 1, 2) if rows else None
    return _Loaded(indices, pixels, torch.tensor(rows, dtype=torch.long), encoded, errors)


def _decode_on_device(loaded: _Loaded, source, preprocess: Preprocess, device: torch.device):
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
                image = _decode_crop(source[index], preprocess).permute(2, 0, 1).to(device)
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


def _worker_init(_worker_id: int) -> None:
    # Inside a worker process only: decoding is single-threaded, one core per worker.
    import torch

    torch.set_num_threads(1)


def _auto_workers(source, n_items: int) -> int:
    """One decoding process per core for image files; none for in-memory images or short runs."""
    if n_items < 64 or not isinstance(source[0], (str, os.PathLike)):
        return 0
    return max(1, min(8, os.cpu_count() or 1))


# --------------------------------------------------------------------------- the loop


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
    """What one forward pass produced: source indices, pooled features per request, and skips."""

    indices: np.ndarray
    features: dict[Request, np.ndarray]
    skipped: list[tuple[int, str]] = field(default_factory=list)


def make_requests(backbone: str, layers, pooling) -> list[Request]:
    """Validate layers and poolings; one :class:`Request` per (layer, pooling) pair."""
    poolings = [pooling] if isinstance(pooling, str) else list(pooling)
    poolings = [check_pooling(p) for p in (",".join(poolings)).split(",") if p]
    if not poolings:
        raise FeatxError("No pooling given: expected one or more of avg, max, avgmax, spp.")
    pairs = resolve_layers(backbone, layers)
    if not pairs:
        raise FeatxError("No layer given: expected one or more layer names, or 'all'.")
    return [Request(name, p, tap) for name, tap in pairs for p in poolings]


def iter_batches(
    backbone: Backbone,
    source,
    requests: Sequence[Request],
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 32,
    device: torch.device,
    precision: str,
    num_workers: int | str = "auto",
    on_error: str = "skip",
    progress: bool | None = None,
    decoder: str = "pil",
    tta: str | None = None,
    compile: bool = False,
    runtime: str = "torch",
) -> Iterator[Batch]:
    """Yield pooled features batch by batch: the single loop every consumer uses.

    Parameters
    ----------
    backbone : Backbone
        Already moved to ``device`` (see :func:`prepare`).
    source : ImageSource or sequence
        Indexable images; ``source[i]`` is a path, PIL image or array.
    requests : sequence of Request
    indices : sequence of int, optional
        Which items of ``source`` to run (default: all), in this order.
    on_error : {"skip", "raise"}
        A bad image is reported in :attr:`Batch.skipped`, or stops the loop with
        :class:`~featx.exceptions.ImageDecodeError` naming the file. Batches already yielded
        are the caller's and are never lost.
    progress : bool, optional
        Show a progress bar; by default only when stderr is a terminal.
    decoder : {"pil", "torch"}, default="pil"
        Resolved by :func:`resolve_decoder`.
    tta : {None, "none", "hflip"}, optional
        ``"hflip"``: every batch and its horizontal mirror go through the network together (one
        forward pass on the doubled batch) and the pooled features of the two views are averaged.
    compile : bool, default=False
        Run the network under ``torch.compile`` (:func:`featx.runners.compiled_taps`).
    runtime : {"torch", "onnxruntime"}, default="torch"
        ``"onnxruntime"`` exports the network to ONNX once and runs it with ONNX Runtime on the
        CPU (:func:`featx.runners.onnx_taps`). With either, every batch has ``batch_size`` images
        (a short last batch is padded) and the forward pass runs to the end of the network.
    """
    tta = check_tta(tta)
    runtime = check_runtime(runtime, device, compile)
    if on_error not in ("skip", "raise"):
        raise FeatxError(f"Unknown on_error {on_error!r}: expected 'skip' or 'raise'.")
    if batch_size < 1:
        raise FeatxError(f"batch_size must be a positive integer, got {batch_size!r}.")
    indices = list(range(len(source))) if indices is None else list(indices)
    if not indices:
        return
    if num_workers == "auto":
        num_workers = _auto_workers(source, len(indices))
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _Images(source, indices, backbone.preprocess, decoder),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    taps = list(dict.fromkeys(r.tap for r in requests))
    full = batch_size * (2 if tta == "hflip" else 1)  # the batch the network sees
    runner = None
    if compile:
        from featx.runners import compiled_taps

        runner = compiled_taps(backbone.module, taps, device)
    elif runtime == "onnxruntime":
        from featx.runners import onnx_taps

        size = backbone.preprocess.crop
        runner = onnx_taps(backbone.module, taps, torch.zeros(full, 3, size, size))
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), unit="img", desc=f"{backbone.name}", leave=False)
    try:
        for loaded in loader:
            skipped = [(int(i), message) for i, message in loaded.errors]
            if skipped and on_error == "raise":
                raise ImageDecodeError(skipped[0][1])
            features = {}
            batch_indices = loaded.indices
            if len(batch_indices):
                with torch.inference_mode():
                    pixels, batch_indices, refused = _decode_on_device(loaded, source, backbone.preprocess, device)
                if refused and on_error == "raise":
                    raise ImageDecodeError(refused[0][1])
                skipped += refused
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
                    with _autocast(device, precision):
                        if runner is None:
                            outputs = run_taps(backbone.module, x, taps)
                        else:
                            width = 2 * n if tta == "hflip" else n
                            outputs = {tap: out[:width] for tap, out in zip(taps, runner(x))}
                    for request in requests:
                        pooled = pool(outputs[request.tap].float(), request.pooling)
                        if tta == "hflip":
                            pooled = (pooled[:n] + pooled[n:]) / 2
                        features[request] = pooled.cpu().numpy().astype(np.float32, copy=False)
            if bar is not None:
                bar.update(len(batch_indices) + len(skipped))
            yield Batch(indices=batch_indices.numpy(), features=features, skipped=skipped)
    finally:
        if bar is not None:
            bar.close()


def prepare(backbone: Backbone, device: torch.device) -> Backbone:
    """Move a backbone to ``device`` in the memory format the loop feeds it."""
    import torch

    memory_format = torch.preserve_format if device.type == "mps" else torch.channels_last
    backbone.module.to(device=device, memory_format=memory_format)
    return backbone


# --------------------------------------------------------------------------- extraction


def store_config(backbone: Backbone, precision: str, dtype: str = "float32", decoder: str = "pil",
                 device: str | torch.device = "cpu", tta: str | None = None) -> dict:
    """The extraction configuration a feature store is keyed by (its file name hashes this).

    The decoder is recorded only when it is not PIL (the default, and what every store written
    before the option existed used): tensor-decoded pixels differ slightly, so they get a store
    of their own. A test-time augmentation is part of it too (``"tta": "hflip"``), so plain and
    flip-averaged features never share a store; plain stores keep the configuration (and file
    name) they had before ``tta`` existed.
    """
    from featx import __version__

    config = {**backbone.config(), "precision": precision, "dtype": dtype, "featx_version": __version__}
    if decoder != "pil":
        config["decoder"] = f"torchvision.io.decode_jpeg:{_kind(device)}"
    tta = check_tta(tta)
    if tta is not None:
        config["tta"] = tta
    return config


def provenance() -> dict:
    """Versions of the software that computed the features, recorded beside them.

    Read from the installed packages' metadata, so that opening a store imports none of them.
    """
    import platform

    from featx import __version__

    versions = {"featx": __version__, "python": platform.python_version()}
    for package in ("torch", "torchvision", "timm", "numpy", "pillow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # not installed here: left out
            versions[package] = importlib.metadata.version(package)
    return versions


def store_location(store, config: Mapping) -> Path:
    """Where :func:`open_store` would find the store of ``config`` (nothing is created)."""
    from featx.store import FeatureStore, store_path

    if isinstance(store, FeatureStore):
        return store.path
    if store is True:
        return store_path(config)
    path = Path(store)
    return path if path.suffix == ".h5" else store_path(config, path)


def open_store(store, config: Mapping, *, dtype: str = "float32"):
    """Open (or create) the feature store for ``config``.

    ``store`` is ``True`` (the default cache folder: ``$FEATX_CACHE`` or ``./cache``), a folder,
    a ``.h5`` file path, or an open :class:`~featx.store.FeatureStore`.
    """
    from featx.store import FeatureStore, canonical_json

    if isinstance(store, FeatureStore):
        if store.config == json.loads(canonical_json(config)) and store.dtype == dtype:
            return store
        return FeatureStore.open(config, path=store.path, dtype=dtype, provenance=provenance())
    return FeatureStore.open(config, path=store_location(store, config), dtype=dtype, provenance=provenance())


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
    seconds : float
        Wall time of the run.
    shard : (int, int) or None
        ``(I, N)`` for a shard run: then :attr:`keys` is ``None`` for the images of other parts,
        :attr:`store` reads this shard's store, the main store and the sibling shards as one, and
        new features went to this shard's store.
    """

    def __init__(self, *, store, source, keys, requests, skipped_positions, skipped, n_computed, seconds,
                 shard=None):
        self.shard = shard
        self.store = store
        self.source = source
        self.keys = keys
        self.requests = list(requests)
        self.skipped_positions = list(skipped_positions)
        bad = set(skipped_positions)
        self.kept = np.array([i for i, key in enumerate(keys) if key is not None and i not in bad], dtype=np.int64)
        self.skipped = skipped
        self.n_computed = n_computed
        self.seconds = seconds

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
        lines = [
            f"{len(self.keys)} images: {self.n_computed} computed, "
            f"{len(self.kept) - min(self.n_computed, len(self.kept))} from the store, {len(self.skipped)} skipped; "
            f"{self.seconds:.1f} s ({self.images_per_s:.1f} images/s)",
            f"store: {self.store.path}",
        ]
        if self.shard is not None:
            members = sum(key is not None for key in self.keys)
            lines[0] = (f"shard {self.shard[0]}/{self.shard[1]}: {members} of {len(self.keys)} images belong to it; "
                        + lines[0].replace(f"{len(self.keys)} images: ", "", 1))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} of {len(self.keys)} images:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


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


def extract(
    images,
    *,
    backbone: str | Backbone = "efficientnet_lite0",
    layers: str | Sequence[str] = ("pre_logits",),
    pooling: str | Sequence[str] = "avg",
    weights: object = "DEFAULT",
    store=None,
    dtype: str = "float32",
    on_error: str | None = None,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    precision: str = "auto",
    num_workers: int | str = "auto",
    progress: bool | None = None,
    stop=None,
    decoder: str = "auto",
    shard: tuple[int, int] | None = None,
    engine="local",
    tta: str | None = None,
    compile: bool = False,
    runtime: str = "torch",
):
    """Extract pooled features from a frozen backbone, in memory or into a feature store.

    Parameters
    ----------
    images : ImageSource, sequence of paths or PIL images, or array of shape (n, H, W) or (n, H, W, C)
        ``uint8`` arrays are taken as 0–255, float arrays must lie in [0, 1]. For folders,
        CSV files and built-in datasets, pass :func:`featx.images.open_source`'s result.
    backbone : str or Backbone, default="efficientnet_lite0"
        A name from ``featx models`` (or ``"timm:<name>"``), or a loaded backbone.
    layers : str or sequence of str, default=("pre_logits",)
        Layer aliases (``stem``, ``stage1`` …, ``pre_logits``, ``logits``), raw node names,
        or ``"all"``.
    pooling : str or sequence of str, default="avg"
        ``avg``, ``max``, ``avgmax`` or ``spp``; several are computed from one forward pass.
    weights : str, path or None, default="DEFAULT"
        See :func:`featx.backbones.load_backbone`; ignored when ``backbone`` is loaded.
    store : None, True, folder, ``.h5`` path or FeatureStore, default=None
        ``None`` keeps everything in memory. Otherwise features go to the feature store of
        this extraction configuration (``True``: the cache folder ``$FEATX_CACHE`` or
        ``./cache``), only images and layers it lacks are computed, and every completed batch
        is kept even if the run is interrupted.
    dtype : {"float32", "float16"}, default="float32"
        Storage precision of a new store.
    on_error : {"raise", "skip"}, optional
        What a bad image does: stop with an error naming it, or be skipped and reported.
        Default: ``"raise"`` in memory, ``"skip"`` with a store.
    batch_size : int, default=32
    device : {"auto", "cpu", "cuda", "mps"} or torch.device, default="auto"
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
    num_workers : int or "auto", default="auto"
        Decoding processes; ``"auto"`` uses the cores for image files, none for arrays.
    progress : bool, optional
        Progress bar; by default only on a terminal.
    stop : callable, optional
        Checked after every batch; when it returns True the run stops with
        :class:`KeyboardInterrupt` at that safe point, every completed batch kept. The CLI sets
        it from SIGINT and SIGTERM, so a signal that lands where Python ignores exceptions
        (a finaliser) still stops the run.
    decoder : {"auto", "pil", "torch"}, default="auto"
        Where JPEG files are decoded: ``"auto"`` decodes them on the GPU when ``device`` is CUDA
        and with PIL in the decoding processes elsewhere (see :func:`resolve_decoder`).
    shard : (int, int), optional
        ``(I, N)``: extract only part ``I`` of ``N`` (numbered from 0) of the images, chosen by
        content key, into a shard store beside the main store; keys that the main store or any
        shard store of the configuration holds are not computed again. Merge the parts with
        :func:`featx.shards.merge_stores` (``featx cache merge``). Needs a store.
    engine : "local", "ray" or featx.distributed.RayEngine, default="local"
        ``"local"`` runs the loop in this process. ``"ray"`` (or a configured
        :class:`~featx.distributed.RayEngine`) runs it on a pool of Ray actors that each hold
        the backbone, and writes their results to the store here; needs a store and the
        ``ray`` extra (``pip install "featx[ray]"``).
    tta : {None, "none", "hflip"}, default=None
        ``"hflip"`` averages every feature over the image and its horizontal mirror, computed
        in the same forward pass (twice the network work). It is part of the store's
        configuration: plain and averaged features live in different store files.
    compile : bool, default=False
        Run the network under ``torch.compile`` (CPU or CUDA, local engine): faster once
        compiled (``featx bench --compile`` measures by how much, and the compile time), equal
        features up to float rounding, so not part of the store's configuration.

    Returns
    -------
    dict of str to ndarray, or ExtractionResult
        Keyed ``"<layer>/<pooling>"``, each float32 of shape (n_images, d). With a store, an
        :class:`ExtractionResult`: the same mapping (rows of the images kept), read from the
        store, plus the keys, skipped images and timing.

    Raises
    ------
    ImageDecodeError
        For a bad image when ``on_error="raise"``; the message names it.

    Examples
    --------
    >>> import numpy as np
    >>> images = np.random.default_rng(0).integers(0, 256, size=(4, 40, 40, 3), dtype=np.uint8)
    >>> features = extract(images, backbone="featx_tiny_cnn", layers=["stage2", "pre_logits"],
    ...                    pooling=["avg", "spp"], device="cpu")
    >>> {key: value.shape for key, value in features.items()}
    {'stage2/avg': (4, 32), 'stage2/spp': (4, 160), 'pre_logits/avg': (4, 32), 'pre_logits/spp': (4, 32)}
    """
    source = images if isinstance(images, ImageSource) else open_source(images)
    if not isinstance(backbone, Backbone):
        backbone = load_backbone(backbone, weights=weights, lazy=True)
    requests = make_requests(backbone.name, layers, pooling)
    engine = _resolve_engine(engine)
    if store is None and (shard is not None or engine is not None):
        raise FeatxError(
            f"{'shard=' if shard is not None else 'engine='}{shard if shard is not None else 'ray'!r} writes to a "
            "feature store, but store=None was given: pass store=True (the cache folder), a folder or a .h5 path"
        )
    check_runtime(runtime, compile=compile)  # the name and the combination; the loop checks the device
    if (compile or runtime != "torch") and engine is not None:
        raise FeatxError(f"{'compile=True' if compile else f'runtime={runtime!r}'} prepares the network in this "
                         "process; it does not go with engine='ray'. Leave one of them out.")
    if shard is not None:
        from featx.shards import check_shard

        shard = check_shard(shard)
    on_error = on_error or ("raise" if store is None else "skip")
    # With an existing store, the device type is all the configuration needs: found without
    # torch where possible, so that a run the store answers entirely never imports it.
    # (Shards and engines resolve the device with torch: they compute.)
    tta = check_tta(tta)
    kind = device_type(device) if store is not None and shard is None and engine is None else None
    if kind is not None:
        config = store_config(backbone, resolve_precision(precision, kind), dtype, resolve_decoder(decoder, kind), kind,
                              tta)
        if not _store_exists(store, config):
            kind = None
    if kind is None:
        device = resolve_device(device) if engine is None else engine.resolve_device(device)
        kind = device.type
    arguments = dict(precision=precision, decoder=decoder)
    precision = resolve_precision(precision, kind)
    decoder = resolve_decoder(decoder, kind)
    loop = dict(batch_size=batch_size, device=device, precision=precision, num_workers=num_workers, progress=progress,
                decoder=decoder, tta=tta,
                # only when asked for: an engine's batches() (refused with them above) takes neither
                **({"compile": True} if compile else {}), **({"runtime": runtime} if runtime != "torch" else {}))
    if store is None:
        prepare(backbone, device)
        chunks: dict[Request, list[np.ndarray]] = {r: [] for r in requests}
        for batch in iter_batches(backbone, source, requests, on_error="raise", **loop):
            for request in requests:
                chunks[request].append(batch.features[request])
            _check_stop(stop)
        return {
            r.key: np.concatenate(chunks[r]) if chunks[r] else np.empty((0, 0), dtype=np.float32) for r in requests
        }
    try:
        return _extract_to_store(backbone, source, requests, store=store, dtype=dtype, on_error=on_error, loop=loop,
                                 kind=kind, stop=stop, shard=shard, engine=engine)
    except _DeviceTypeChanged as changed:  # the driver said one device type and torch another: torch decides
        return extract(source, backbone=backbone, layers=layers, pooling=pooling, store=store, dtype=dtype,
                       on_error=on_error, batch_size=batch_size, device=changed.device, num_workers=num_workers,
                       progress=progress, stop=stop, shard=shard, engine=engine, tta=tta, compile=compile,
                       runtime=runtime, **arguments)


class _DeviceTypeChanged(Exception):
    """Raised before anything is computed when torch resolves another device type than guessed."""

    def __init__(self, device):
        super().__init__(str(device))
        self.device = device


def _store_exists(store, config: Mapping) -> bool:
    """Whether ``store`` (as :func:`open_store` takes it) already exists for ``config``."""
    from featx.store import FeatureStore

    return isinstance(store, FeatureStore) or store_location(store, config).exists()


def _resolve_engine(engine):
    """``None`` for the local loop, else an object with ``resolve_device`` and ``batches``."""
    if engine == "local" or engine is None:
        return None
    if engine == "ray":
        from featx.distributed import RayEngine

        return RayEngine()
    if hasattr(engine, "batches") and hasattr(engine, "resolve_device"):
        return engine
    raise FeatxError(f"Unknown engine {engine!r}: expected 'local', 'ray' or a featx.distributed.RayEngine.")


def _check_stop(stop) -> None:
    if stop is not None and stop():
        raise KeyboardInterrupt


def _extract_to_store(backbone, source, requests, *, store, dtype, on_error, loop, kind, stop=None, shard=None,
                      engine=None) -> ExtractionResult:
    start = time.perf_counter()
    config = store_config(backbone, loop["precision"], dtype, loop["decoder"], kind, loop["tta"])
    keys, unreadable = _content_keys(source, on_error)
    if shard is None:
        feature_store = lookup = open_store(store, config, dtype=dtype)
    else:
        from featx.shards import in_shard, open_shard

        # The shard writes its own store; what the main store or a sibling shard holds is not recomputed.
        feature_store, lookup = open_shard(store_location(store, config), config, dtype=dtype, shard=shard,
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
    n_computed = 0
    if indices:
        if engine is None:
            device = resolve_device(loop["device"])
            if device.type != kind:
                raise _DeviceTypeChanged(device)
            loop = {**loop, "device": device}
            prepare(backbone, device)
            batches = iter_batches(backbone, source, todo, indices=indices, on_error=on_error, **loop)
        else:
            batches = engine.batches(backbone, source, todo, indices=indices, on_error=on_error, **loop)
        with feature_store.writer(), contextlib.closing(batches):
            for batch in batches:
                for position, message in batch.skipped:
                    failed[keys[position]] = message
                batch_keys = [keys[i] for i in batch.indices]
                if not batch_keys:  # every image of the batch was skipped: nothing was computed
                    _check_stop(stop)
                    continue
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
                _check_stop(stop)
            feature_store.consolidate()
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
        seconds=time.perf_counter() - start,
        shard=shard,
    )
