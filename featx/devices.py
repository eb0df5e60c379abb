"""Where the network runs and in what precision: devices, precisions, decoders and runtimes resolved.

``"auto"`` settings become concrete here: the device (CUDA, then MPS, then the CPU), the precision
(fp16 on CUDA, bf16 on CPUs that compute it natively, fp32 elsewhere) and where JPEG files are
decoded. :func:`device_type` answers without importing torch where the driver can tell, so that a
run answered entirely from the feature store never pays for torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from featx.exceptions import FeatxError
from featx.options import DECODERS, PRECISIONS, RUNTIMES, ExtractOptions

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICE_TYPES",
    "autocast",
    "check_resolved",
    "check_runtime",
    "cpu_has_bf16",
    "device_kind",
    "device_type",
    "resolve",
    "resolve_decoder",
    "resolve_device",
    "resolve_precision",
]

DEVICE_TYPES = ("cpu", "cuda", "mps")


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


def device_kind(device: str | torch.device) -> str:
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
        return kind if kind in DEVICE_TYPES else None
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
    kind = device_kind(device)
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
    kind = device_kind(device)
    if decoder not in DECODERS:
        raise FeatxError(f"Unknown decoder {decoder!r}: expected one of {', '.join(DECODERS)}.")
    if decoder == "auto":
        return "torch" if kind == "cuda" else "pil"
    return decoder
def check_runtime(runtime: str, device=None, compile: bool = False) -> str:
    """Validate ``runtime`` (``"auto"``, ``"torch"``, ``"onnxruntime"`` or ``"openvino"``) against ``compile``
    and, when given, the device.

    ``"auto"`` goes with every device (off the CPU it is eager torch) and with ``compile=True``
    (which then compiles eager torch); the CPU runtimes refuse other devices and ``compile``.
    """
    if runtime not in RUNTIMES:
        raise FeatxError(f"Unknown runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}.")
    if runtime in ("onnxruntime", "openvino"):
        kind = None if device is None else device_kind(device)
        if kind not in (None, "cpu"):
            raise FeatxError(f"runtime={runtime!r} runs on the CPU, not on {kind!r}: use device='cpu', or "
                             f"runtime='auto' or 'torch' on {kind!r}.")
        if compile:
            raise FeatxError(f"compile=True compiles the torch runtime; it does not go with runtime={runtime!r}. "
                             "Leave one of them out.")
    return runtime


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (none for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def resolve(options: ExtractOptions, device=None) -> ExtractOptions:
    """``options`` with a concrete ``torch.device``, precision and decoder (this imports torch).

    ``device`` replaces ``options.device`` when given (an engine may resolve it its own way).

    Examples
    --------
    >>> from featx.options import ExtractOptions
    >>> resolved = resolve(ExtractOptions(device="cpu", precision="fp32"))
    >>> resolved.device, resolved.precision, resolved.decoder
    (device(type='cpu'), 'fp32', 'pil')
    """
    device = resolve_device(options.device if device is None else device)
    return options.replace(device=device, precision=resolve_precision(options.precision, device),
                           decoder=resolve_decoder(options.decoder, device))


def check_resolved(options: ExtractOptions, where: str) -> None:
    """Raise unless ``options`` came through :func:`resolve` (what the loop and the engines need)."""
    if isinstance(options.device, str) or options.precision == "auto" or options.decoder == "auto":
        raise FeatxError(f"{where} needs resolved options (a torch.device, a precision and a decoder), got "
                         f"device={options.device!r}, precision={options.precision!r}, decoder={options.decoder!r}: "
                         f"pass featx.devices.resolve(options).")
