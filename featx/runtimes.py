"""``runtime="auto"``: which runner runs the network, measured once per backbone and machine, and remembered.

The runners of :mod:`featx.runners` (ONNX Runtime, OpenVINO, ``torch.compile``) trade a
preparation for speed. :func:`select_runner` is the one place where the loop gets its runner:
an explicit ``runtime`` (or ``compile=True``) is prepared as asked; ``"auto"`` (the default)
measures, the first time, eager torch and every installed CPU runtime on a few batches of the
extraction's shape (seeded random pixels), checks each against eager fp32 features, and keeps
the figures in ``<cache folder>/runtimes/<backbone>-<key>.json`` (beside the layer tables), keyed on the backbone, the
layers, the batch shape, the precision and the machine (CPU model and flags, cores, torch
threads, torch and runtime versions). Later runs read that file (milliseconds; a warm
``featx cv`` answered by the store never gets here) and choose from its figures.

The choice
    Among the verified runtimes, the one with the shortest expected time for the images at
    hand: its preparation in this process plus ``n / images_per_s``. A runtime other than eager
    torch must be at least :data:`MARGIN` faster than eager, so that measurement noise on a
    shared machine does not move the loop off eager. The first time, only eager torch is timed
    (one warm-up and one timed call of one batch, with no fp32 reference: a quarter of what it
    cost before, which on 300 digits in a GridSearchCV was a third of the grid's excess over one
    extraction); the other runtimes are measured, once, when an extraction is expected to take
    at least :data:`MEASURE_MIN_SECONDS` eagerly (a shorter one could not repay the export), so
    that the small extractions of tests and quick looks never pay for an export.
Candidates
    On the CPU: ``onnxruntime`` and ``openvino`` where installed (both run the same ONNX export,
    kept beside the memory file so that later processes do not export again). ``torch.compile``
    is not a candidate of ``auto``: compiling efficientnet_lite0 took 274 s on the shared 2-core
    machine (Inductor's disk cache shortens later compilations, but each process still pays
    seconds), which no "first measurement of a few seconds" allows, and end to end it was
    slower than eager there (48.3 against 52.1 images/s, issue 18). ``compile=True`` still
    asks for it. On CUDA and MPS, ``auto`` is eager torch.
Precision
    Eager torch and ``torch.compile`` run under autocast at the resolved precision; ONNX Runtime
    and OpenVINO always compute in fp32 (more exact than bf16 asks). OpenVINO's own bf16
    inference is not used: it perturbs the pooled features as much as eager bf16 does (per
    feature, about one standard deviation across images at stage1 on digits, for both), and on
    the digits layer table it moved stage1 by 0.021 (eager bf16: 0.003; issue 7 bounds the
    table at 0.01), for 1.18x the speed of ONNX Runtime's fp32 on an AVX512-BF16 CPU (191 against
    163 images/s, model only) and 1.02x on the CI machine. The reference is eager fp32, so
    every runtime meets the same bar eager meets at that precision: :data:`TOLERANCES`.
Tolerance
    Per tap, per row: the cosine similarity between the runtime's and eager fp32's flattened
    tensors, and the largest absolute difference relative to the reference's largest absolute
    value (the feature scale). At fp32 the runtime must agree up to float rounding (cosine
    >= 0.9999, error <= 1e-3; measured on efficientnet_lite0: ONNX Runtime and OpenVINO 1 - 1e-7
    and 2e-6). At bf16 the bound is the bf16 guard eager bf16 passes (cosine >= 0.99, error <=
    0.1; eager bf16 measured 0.9992 and 0.066 over every layer, the stem's raw maps the worst).
    The runtime is then no part of a store's configuration: it changes features no more than
    the precision, which is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from featx.backbones import Tap, run_taps
from featx.devices import autocast
from featx.exceptions import FeatxError, FeatxWarning
from featx.options import ExtractOptions
from featx.paths import atomic_write, default_cache_dir
from featx.runners import compiled_taps, onnx_model, onnx_taps, openvino_taps

__all__ = [
    "MARGIN",
    "MEASURE_MIN_SECONDS",
    "TOLERANCES",
    "Choice",
    "choose",
    "feature_agreement",
    "machine",
    "export_path",
    "memory_folder",
    "memory_path",
    "select_runner",
]

logger = logging.getLogger(__name__)

#: How much faster (expected time for the images at hand) a runtime must be than eager torch to be chosen.
MARGIN = 1.10
#: The other runtimes are measured (once) only for an extraction expected to take at least this many
#: seconds eagerly: a shorter one could not repay the ONNX export (seconds to tens of seconds).
MEASURE_MIN_SECONDS = 10.0
#: Timed calls per runtime in a measurement (after one warm-up call), in turn with the others; the fastest counts.
TIMED_CALLS = 3
#: Per precision: (least cosine similarity per row, largest absolute error relative to the feature scale).
TOLERANCES = {"fp32": (0.9999, 1e-3), "bf16": (0.99, 0.1), "fp16": (0.99, 0.1)}
#: The runtimes ``auto`` measures on the CPU, where installed (the module each needs).
CPU_CANDIDATES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
_VERSION = 2  # 2: OpenVINO computes f32 at every precision (its bf16 figures of version 1 no longer hold)
_ANNOUNCED: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Choice:
    """What ``auto`` chose: the runtime, the one line that says why, and the figures it chose by."""

    runtime: str
    reason: str
    figures: dict
    path: Path | None = None


def machine(precision: str) -> dict:
    """What the speed of a runtime depends on here: CPU model and flags, cores, threads, versions, precision.

    Examples
    --------
    >>> sorted(machine("fp32"))
    ['cores', 'cpu', 'cpu_flags', 'onnxruntime', 'openvino', 'precision', 'threads', 'torch']
    """
    import torch

    model, flags = platform.processor(), ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line.split(":", 1)[1]
                    break
    versions = {}
    for name in ("onnxruntime", "openvino"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": model, "cpu_flags": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16],
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__, **versions,
            "precision": precision}


def memory_folder(store=None) -> Path:
    """The folder the runtime memory and the ONNX exports go in: ``runtimes`` in the cache folder in use.

    Like the layer tables (``<cache folder>/layers``), it belongs to the machine, not to one
    store: ``runtimes`` in the folder of ``store`` when it names one (a folder, or an ``.h5``
    file's folder), else in :func:`~featx.paths.default_cache_dir` (``$FEATX_CACHE/runtimes``, or
    ``./cache/runtimes``). So a run on a given store writes nothing elsewhere.

    Examples
    --------
    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"FEATX_CACHE": "/data/cache"}):
    ...     memory_folder().as_posix(), memory_folder("/runs/a/store.h5").as_posix()
    ('/data/cache/runtimes', '/runs/a/runtimes')
    """
    if isinstance(store, (str, os.PathLike)):
        folder = Path(store)
        return (folder.parent if folder.suffix == ".h5" else folder) / "runtimes"
    return default_cache_dir() / "runtimes"


def feature_agreement(outputs: Sequence, reference: Sequence) -> tuple[float, float]:
    """The least per-row cosine similarity and the largest absolute error relative to the reference's scale.

    Both over every tap: ``outputs`` and ``reference`` hold one tensor per tap, rows first.

    Examples
    --------
    >>> import torch
    >>> ref = [torch.ones(2, 4)]
    >>> feature_agreement([ref[0] * 1.001], ref)
    (1.0, 0.001...)
    """
    import torch

    cosine, error = 1.0, 0.0
    for out, ref in zip(outputs, reference, strict=True):
        out, ref = out.detach().float().reshape(len(out), -1), ref.detach().float().reshape(len(ref), -1)
        if out.shape != ref.shape:
            return -1.0, float("inf")
        if not torch.isfinite(out).all():
            return -1.0, float("inf")
        scale = ref.abs().max().clamp_min(1e-12)
        cosine = min(cosine, torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=1, eps=1e-12)
                     .min().item())
        error = max(error, ((out - ref).abs().max() / scale).item())
    return cosine, error


def _read(path: Path, key: dict) -> dict | None:
    """The remembered figures, or None (absent; unreadable or of another key: warned about, measured again)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            raise ValueError("it was written for another configuration")
        figures = data["figures"]
        if "torch" not in figures or not all(isinstance(f, dict) for f in figures.values()):
            raise ValueError("it lacks the eager figures")
        return figures
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"runtime memory {str(path)!r} is unreadable ({exc}): measuring the runtimes again.",
                      FeatxWarning, stacklevel=3)
        return None


def _interleaved_best(calls: dict, rounds: int) -> dict:
    """Seconds of each callable's fastest call, timed in turn round after round (after one warm-up call each),
    so that every runtime meets the same load on a shared machine."""
    for call in calls.values():
        call()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _prepare(runtime: str, module, taps, example, onnx_file: Path):
    if runtime == "onnxruntime":
        return onnx_taps(module, taps, example, onnx_file=onnx_file)
    if runtime == "openvino":
        return openvino_taps(module, taps, example, onnx_file=onnx_file)
    raise FeatxError(f"runtime {runtime!r} is not one runtime='auto' measures; expected one of "
                     f"{', '.join(CPU_CANDIDATES)}.")


class _ExportFailed(Exception):
    """The ONNX export every ONNX runtime needs failed already (reported once per runtime, not retried)."""


def _installed() -> list[str]:
    return [runtime for runtime, needed in CPU_CANDIDATES.items() if importlib.util.find_spec(needed) is not None]


def _measure(module, taps, x, device, precision: str, onnx_file: Path, *, eager_only: bool = False) -> dict:
    """Figures per runtime on the batch ``x``: images/s, preparation seconds, agreement with eager fp32."""
    import torch

    def eager_call():
        with torch.inference_mode(), autocast(device, precision):
            return run_taps(module, x, taps)

    figures = {"torch": {"images_per_s": None, "prepare_seconds": 0.0, "cosine": None, "error": None,
                         "verified": True, "problem": None}}
    calls = {"torch": eager_call}
    if eager_only:  # only how long the extraction takes eagerly: one warm-up and one timed call, no reference
        with torch.inference_mode():
            figures["torch"]["images_per_s"] = len(x) / _interleaved_best(calls, 1)["torch"]
        return figures
    with torch.inference_mode():
        reference = run_taps(module, x, taps)
    reference = [reference[tap].float() for tap in taps]
    figures["torch"]["cosine"], figures["torch"]["error"] = feature_agreement([eager_call()[tap] for tap in taps],
                                                                              reference)
    least_cosine, most_error = TOLERANCES[precision]
    example = torch.zeros_like(x).contiguous()
    export_seconds, export_problem = None, None
    for runtime in _installed():
        entry = {"images_per_s": None, "prepare_seconds": None, "export_seconds": None, "cosine": None, "error": None,
                 "verified": False, "problem": export_problem}
        try:
            if export_seconds is None and export_problem is None:  # once for all: both runtimes run this export
                start = time.perf_counter()
                onnx_model(module, taps, example, onnx_file=onnx_file)
                export_seconds = time.perf_counter() - start
            entry["export_seconds"] = export_seconds
            if export_problem is not None:
                raise _ExportFailed(export_problem)
            start = time.perf_counter()  # what a later process pays: the export read from disk, the runtime set up
            runner = _prepare(runtime, module, taps, example, onnx_file)
            entry["prepare_seconds"] = time.perf_counter() - start
            with torch.inference_mode():
                entry["cosine"], entry["error"] = feature_agreement(runner(x), reference)
            if entry["cosine"] >= least_cosine and entry["error"] <= most_error:
                entry["verified"] = True
                calls[runtime] = lambda runner=runner: runner(x)
            else:
                entry["problem"] = (f"its features differ from eager fp32 (least cosine {entry['cosine']:.6f}, "
                                    f"want >= {least_cosine}; error {entry['error']:.2g}, want <= {most_error})")
        except _ExportFailed:
            pass
        except Exception as exc:  # an export or a runtime that fails is reported and not used, never fatal
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            entry["problem"] = f"it failed ({type(exc).__name__}: {first_line})"
            if export_seconds is None:
                export_problem = f"the ONNX export failed ({type(exc).__name__}: {first_line})"
                entry["problem"] = export_problem
        if entry["problem"]:
            warnings.warn(f"runtime auto: {runtime} is not used for this backbone: {entry['problem']}.",
                          FeatxWarning, stacklevel=4)
        figures[runtime] = entry
    with torch.inference_mode():
        for runtime, seconds in _interleaved_best(calls, TIMED_CALLS).items():
            figures[runtime]["images_per_s"] = len(x) / seconds
    return figures


def _decide(figures: dict, n_images: int) -> tuple[str, str]:
    """The runtime with the shortest expected time for ``n_images``, eager unless another is MARGIN faster."""
    eager_rate = figures["torch"]["images_per_s"]
    eager_time = n_images / eager_rate
    best, best_time = "torch", eager_time
    for runtime, entry in figures.items():
        if runtime == "torch" or not entry.get("verified") or not entry.get("images_per_s"):
            continue
        expected = entry["prepare_seconds"] + n_images / entry["images_per_s"]
        if expected * MARGIN <= eager_time and expected < best_time:
            best, best_time = runtime, expected
    rates = ", ".join(f"{name} {entry['images_per_s']:.0f}" for name, entry in figures.items()
                      if entry.get("images_per_s"))
    failed = [name for name, entry in figures.items() if entry.get("problem")]
    note = f"; {', '.join(failed)} failed its check" if failed else ""
    if best == "torch":
        why = f"no runtime is {MARGIN - 1:.0%} faster for {n_images} images (images/s: {rates}){note}"
    else:
        why = f"{eager_time / best_time:.2f}x eager for {n_images} images (images/s: {rates}){note}"
    return best, why


def choose(backbone, taps: Sequence[Tap], options: ExtractOptions, *, batch: int, n_images: int,
           measure_min_seconds: float | None = None, refresh: bool = False) -> Choice:
    """What ``runtime="auto"`` runs for ``n_images`` images in batches of ``batch`` (resolved ``options``).

    Parameters
    ----------
    backbone : Backbone
        Prepared on ``options.device`` (:func:`featx.loop.prepare`).
    taps : sequence of Tap
    options : ExtractOptions
        Resolved; its ``precision`` is what eager runs at (the memory is kept in
        :func:`memory_folder`).
    batch : int
        The batch the network sees (twice ``batch_size`` with flip averaging).
    n_images : int
        How many images the extraction computes (the choice weighs preparation against them).
    measure_min_seconds : float, optional
        Default :data:`MEASURE_MIN_SECONDS`.
    refresh : bool, default=False
        Measure every runtime again, whatever is remembered, and remember the new figures
        (what ``featx bench`` does).

    Returns
    -------
    Choice
    """
    import torch

    device, precision = options.device, options.precision
    if device.type != "cpu":
        return Choice("torch", f"eager torch on {device.type} (the other runtimes of auto run on the CPU)", {})
    least_seconds = MEASURE_MIN_SECONDS if measure_min_seconds is None else measure_min_seconds
    path, key = memory_path(backbone, taps, options, batch=batch)
    figures, measured = (None if refresh else _read(path, key)), None
    if refresh:
        least_seconds = 0.0
    installed = _installed()

    def measure(eager_only: bool) -> dict:
        size = backbone.preprocess.crop
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=generator).to(device)
        return _measure(backbone.module, list(taps), x.contiguous(memory_format=torch.channels_last), device,
                        precision, export_path(backbone, taps, options, batch=batch), eager_only=eager_only)

    if figures is None:
        figures, measured = measure(eager_only=True), "eager torch"
    eager_seconds = n_images / figures["torch"]["images_per_s"]
    if set(figures) == {"torch"} and installed and eager_seconds >= least_seconds:
        figures, measured = measure(eager_only=False), "every runtime"
    if measured:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({"key": key, "figures": figures}, indent=1, sort_keys=True))
        except OSError as exc:
            warnings.warn(f"cannot remember the runtime measurement in {str(path)!r} ({exc.strerror or exc}): the "
                          f"next process measures again.", FeatxWarning, stacklevel=3)
    where = f"measured {measured} on one batch of {batch}, remembered in {path}" if measured else f"remembered in {path}"
    if set(figures) == {"torch"}:
        why = (f"{n_images} images take about {eager_seconds:.1f} s eagerly, too short for another runtime to repay "
               f"its export (measured from {least_seconds:g} s)" if installed else
               'no other runtime is installed (pip install "featx[onnx]" or "featx[openvino]")')
        return Choice("torch", f"{why}; {where}", figures, path)
    runtime, why = _decide(figures, n_images)
    return Choice(runtime, f"{why}; {where}", figures, path)


def memory_path(backbone, taps: Sequence[Tap], options: ExtractOptions, *, batch: int) -> tuple[Path, dict]:
    """Where the runtime memory of this backbone, taps, batch and machine is kept, and the key it holds.

    The file is ``<memory_folder>/<backbone>-<digest of the key>.json``.
    """
    key = {**_network_key(backbone, taps, batch), **machine(options.precision),
           "tolerance": list(TOLERANCES.get(options.precision, TOLERANCES["fp32"]))}  # another bound: verify again
    return memory_folder(options.store) / f"{_file_stem(backbone, key)}.json", key


def export_path(backbone, taps: Sequence[Tap], options: ExtractOptions, *, batch: int) -> Path:
    """Where the ONNX export of this backbone, taps and batch is kept (:func:`featx.runners.onnx_model`
    adds the digest of the weights): beside the memory, shared by every precision and runtime."""
    import torch

    key = {**_network_key(backbone, taps, batch), "torch": torch.__version__}
    return memory_folder(options.store) / f"{_file_stem(backbone, key)}.onnx"


def _network_key(backbone, taps: Sequence[Tap], batch: int) -> dict:
    size = backbone.preprocess.crop
    return {"version": _VERSION, "backbone": backbone.name, "weights": str(backbone.weights),
            "taps": [[tap.node, tap.port] for tap in taps], "batch": [batch, 3, size, size]}


def _file_stem(backbone, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone.name) + f"-{digest}"


def select_runner(backbone, taps: Sequence[Tap], options: ExtractOptions, *, batch: int, n_images: int):
    """The runner the loop runs the network with: ``None`` for eager torch, else a callable from a batch to the taps.

    ``compile=True`` compiles with ``torch.compile``; ``runtime="onnxruntime"`` or ``"openvino"``
    prepares that runtime; ``"auto"`` runs :func:`choose` and says once per process, in one
    ``logging`` line (the CLI prints it), which runtime it chose and why.
    """
    import torch

    device, runtime = options.device, options.runtime
    if options.compile:
        return compiled_taps(backbone.module, taps, device)
    size = backbone.preprocess.crop
    example = torch.zeros(batch, 3, size, size)
    if runtime == "auto":
        choice = choose(backbone, taps, options, batch=batch, n_images=n_images)
        announce = f"{backbone.name}:{choice.runtime}:{choice.path}"
        if announce not in _ANNOUNCED:
            _ANNOUNCED.add(announce)
            # Said on the terminal when auto chose by measuring the runtimes; eager torch kept for a
            # short run, or with no other runtime installed, is the plain default and stays quiet.
            level = logging.INFO if choice.runtime != "torch" or set(choice.figures) != {"torch"} else logging.DEBUG
            logger.log(level, "runtime auto: %s for %s: %s", choice.runtime, backbone.name, choice.reason)
        if choice.runtime == "torch":
            return None
        try:
            return _prepare(choice.runtime, backbone.module, taps, example,
                            export_path(backbone, taps, options, batch=batch))
        except Exception as exc:  # what was verified once cannot be set up now: eager, said in one line
            warnings.warn(f"runtime auto: {choice.runtime} could not be set up ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}): eager torch runs; delete "
                          f"{str(choice.path)!r} to measure again.", FeatxWarning, stacklevel=2)
            return None
    if runtime == "torch":
        return None
    return _prepare(runtime, backbone.module, taps, example,
                    export_path(backbone, taps, options, batch=batch))
