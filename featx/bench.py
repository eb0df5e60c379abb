"""Benchmark: featx's extraction against the naive loop and the model's own limit.

Three measurements on the same images, each in a fresh process (so that peak memory is its own):

(a) ``naive``: the PyTorch transfer-learning tutorial's loop: torchvision ``ImageFolder`` with
    ``Resize``/``CenterCrop``/``ToTensor``/``Normalize``, a ``DataLoader`` with one worker per
    core, the fp32 model in its default memory format under ``torch.no_grad()``;
(b) ``featx``: :func:`featx.extract` into a fresh feature store (hashing, decoding, the
    forward pass, pooling and the durable writes all counted);
(c) ``model_only``: the forward pass alone on random tensors at featx's precision and memory
    format: the limit no loader can beat;
(c') ``decode_only``: featx's decoding alone: the loop's own DataLoader (its workers, decoding,
    cropping and hand-over to the main process) with no network. With (c) it gives **the loop's
    own limit**, the network and decoding sharing the cores:
    ``1 / (1 / model_only + 1 / decode_only)`` images/s; (b) also reports where an image's time
    went (decode, hash, hand-over, network, write: :attr:`featx.extraction.ExtractionResult.timings`);
(d) with ``compile=True``, the model-only limit under ``torch.compile``, its compile time apart;
(e) with ``compile=True``, featx's extraction with ``compile=True`` (the network compiled in the
    loop, taps as hooks, short batches padded), timed after a warm-up extraction of one batch
    that compiles it; the compile time is reported apart, so that whether compiling pays for N
    images can be read off: it does when N / featx_images_per_s - N / featx_compiled_images_per_s
    exceeds featx_compile_seconds;
(f) with ``runtime="onnxruntime"``, featx's extraction with the network exported to ONNX and run
    by ONNX Runtime (export timed apart, on one batch first), and (g) ONNX Runtime's own
    model-only limit on random tensors;
(h) with ``runtime="auto"`` (the default), what ``auto`` measures (:mod:`featx.runtimes`, measured
    again and remembered in the cache folder): each runtime's model-only rate on one batch,
    timed in turn, and its agreement with eager fp32; then (i), when auto chose another runtime
    than eager torch, featx's extraction with that runtime.

:func:`run_busy_bench` (``featx bench --busy``) measures (b) at each thread setting
(:mod:`featx.threads`) while a second ``featx extract`` of other images shares the cores, and
reports featx's default against its best setting.

Nothing here asserts a time: the figures are printed for people to compare, side by side, from
one run.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featx.backbones import load_backbone, resolve_layers
from featx.decoding import decode_on_device, make_loader
from featx.devices import autocast, resolve, resolve_device
from featx.extraction import extract
from featx.images import open_source
from featx.loop import prepare
from featx.options import ExtractOptions
from featx.runners import onnx_taps
from featx.runtimes import choose
from featx.threads import available_cores

__all__ = ["STAGES", "breakdown", "busy_neighbour", "loop_limit", "make_jpegs", "run_bench", "run_busy_bench"]


def make_jpegs(folder: str | os.PathLike, n: int, *, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """Write ``n`` photo-like JPEGs (smooth colour fields with texture) in two class folders."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        target = folder / f"class{i % 2}"
        target.mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        base = np.stack([np.sin(fx * xx + phase + c) * np.cos(fy * yy - c) for c in range(3)], axis=-1)
        pixels = 127.5 + 90 * base + rng.normal(0, 20, size=(height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target / f"{i:05d}.jpg", quality=90)
    return folder


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


def _naive(folder: str, options: ExtractOptions) -> dict:
    import torch
    from torchvision import datasets, transforms

    backbone = load_backbone(options.backbone)
    p = backbone.preprocess
    transform = transforms.Compose(
        [
            transforms.Resize(p.resize, interpolation=transforms.InterpolationMode(p.interpolation)),
            transforms.CenterCrop(p.crop),
            transforms.ToTensor(),
            transforms.Normalize(p.mean, p.std),
        ]
    )
    dataset = datasets.ImageFolder(folder, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=options.batch_size, num_workers=os.cpu_count() or 1)
    device = resolve_device(options.device)
    net = backbone.module.to(device)
    start = time.perf_counter()
    n = 0
    with torch.no_grad():
        for x, _ in loader:
            net(x.to(device))
            n += len(x)
    return {"images_per_s": n / (time.perf_counter() - start), "n": n}


def _featx(folder: str, options: ExtractOptions) -> dict:
    backbone = load_backbone(options.backbone)  # loaded before the clock starts, as in the naive loop
    source = open_source(folder)
    options = options.replace(backbone=backbone, layers="pre_logits", progress=False)
    prepare_seconds = None
    if options.compile or options.runtime != "torch":  # prepare on one batch, in a store of its own, off the clock
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            extract(source.subset(list(range(min(options.batch_size, len(source))))), options, store=cache)
            prepare_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        result = extract(source, options, store=cache)
        seconds = time.perf_counter() - start
    return {"images_per_s": result.n_computed / seconds, "n": result.n_computed, "prepare_seconds": prepare_seconds,
            "seconds": seconds, "timings": result.timings}


def _decode_only(folder: str, options: ExtractOptions) -> dict:
    """The loop's own data path alone: decode, crop, hand every batch over to the device; no network."""
    import torch

    backbone = load_backbone(options.backbone, lazy=True)
    source = open_source(folder)
    run = resolve(options)
    loader = make_loader(source, range(len(source)), backbone.preprocess, decoder=run.decoder,
                         max_pixels=run.max_pixels, batch_size=run.batch_size, num_workers=run.num_workers,
                         device=run.device)
    start = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for loaded in loader:
            if len(loaded.indices):  # JPEG bytes (the "torch" decoder) are decoded on the device, as in the loop
                n += len(decode_on_device(loaded, source, backbone.preprocess, run.device,
                                          max_pixels=run.max_pixels)[1])
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": n / (time.perf_counter() - start), "n": n}


def _model_only(folder: str, options: ExtractOptions, n: int) -> dict:
    import torch

    backbone = load_backbone(options.backbone)
    run = resolve(options)
    dev, batch_size = run.device, run.batch_size
    prepare(backbone, dev)
    size = backbone.preprocess.crop
    x = torch.randn(batch_size, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    batches = max(1, n // batch_size)
    net = torch.compile(backbone.module) if run.compile else backbone.module
    if run.runtime == "onnxruntime":
        taps = [tap for _, tap in resolve_layers(backbone.name, ["pre_logits"])]
        net = onnx_taps(backbone.module, taps, x.contiguous())
    with torch.inference_mode(), autocast(dev, run.precision):
        warm_up = time.perf_counter()
        net(x)  # warm-up (and, compiled, the compilation)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            net(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return {"images_per_s": batches * batch_size / (time.perf_counter() - start), "precision": run.precision,
            "warm_up_s": start - warm_up}


def _auto(folder: str, options: ExtractOptions, n: int) -> dict:
    backbone = load_backbone(options.backbone)
    run = resolve(options)
    prepare(backbone, run.device)
    taps = [tap for _, tap in resolve_layers(backbone.name, ["pre_logits"])]
    choice = choose(backbone, taps, run, batch=run.batch_size, n_images=n, refresh=True)
    return {"runtime": choice.runtime, "reason": choice.reason, "figures": choice.figures}


def _child(kind: str, args: tuple, queue) -> None:
    try:
        result = {"_naive": _naive, "_featx": _featx, "_model_only": _model_only, "_decode_only": _decode_only,
                  "_auto": _auto}[kind](*args)
        result["peak_rss_mb"] = _peak_rss_mb()
        queue.put(result)
    except BaseException as exc:  # reported to the parent, which raises it
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def _isolated(kind: str, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(kind, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"benchmark step {kind.strip('_')} failed: {result['error']}")
    return result


#: The stages of an image's time in :func:`run_bench`'s ``breakdown_ms_per_image``, in loop order.
STAGES = ("decode", "hash", "handover", "network", "write", "other")


def loop_limit(model_only: float, decode_only: float) -> float:
    """The loop's own limit in images/s: the network and decoding sharing the cores.

    Examples
    --------
    >>> loop_limit(100.0, 300.0)
    75.0
    """
    return 1.0 / (1.0 / model_only + 1.0 / decode_only)


def breakdown(timings: dict, seconds: float, n: int) -> dict:
    """Milliseconds per image of each of :data:`STAGES` from an extraction's ``timings``.

    Every stage is wall time of the main process, and ``other`` is what its wall time
    ``seconds`` holds beyond them (the store lookup, the bookkeeping), so that the stages sum to
    the time per image; except that images decoded in worker processes (``"decode_workers"``)
    count their summed decoding time under ``decode``, overlapped with the rest.

    Examples
    --------
    >>> breakdown({"decode": 0.4, "hash": 0.1, "handover": 0.2, "network": 0.5, "write": 0.1}, 1.5, 100)
    {'decode': 4.0, 'hash': 1.0, 'handover': 2.0, 'network': 5.0, 'write': 1.0, 'other': 2.0}
    """
    per = {stage: 1000.0 * timings.get(stage, 0.0) / n for stage in STAGES[:-1]}
    per["other"] = max(0.0, 1000.0 * seconds / n - sum(per.values()))
    per["decode"] += 1000.0 * timings.get("decode_workers", 0.0) / n
    return {stage: round(v, 3) for stage, v in per.items()}


def run_bench(folder=None, options: ExtractOptions | None = None, *, n: int = 256, out=print, **settings) -> dict:
    """Measure naive, featx and model-only throughput on the same images, side by side.

    Parameters
    ----------
    folder : path, optional
        A folder of class sub-folders of images; by default ``n`` generated 500×375 JPEGs.
    options : ExtractOptions, optional
        The ``backbone`` (``model=`` is accepted for it), ``batch_size`` and ``device`` measured.
        ``compile=True`` also measures the model-only limit under ``torch.compile`` and featx's
        extraction with ``compile=True``; ``runtime="onnxruntime"`` also measures featx's
        extraction and the model-only limit with ONNX Runtime (``onnx_images_per_s``,
        ``model_only_onnx_images_per_s``, ``onnx_export_seconds``, ``onnx_speedup_vs_naive``,
        ``onnx_fraction_of_onnx_limit``, ``onnx_peak_rss_mb``). The plain featx run (b) uses
        eager torch either way.
    n : int, default=256
        Images to generate (ignored with ``folder``).
    **settings
        :class:`~featx.options.ExtractOptions` fields by name, replacing those of ``options``.

    Returns
    -------
    dict
        ``naive_images_per_s``, ``featx_images_per_s``, ``model_only_images_per_s``,
        ``speedup_vs_naive``, ``fraction_of_model_limit``, ``peak_rss_mb`` (featx's run),
        ``naive_peak_rss_mb``, ``n_images``, ``model``, ``device``, ``precision``, ``decoder``,
        ``cpu_count``, ``decode_only_images_per_s`` (the loop's loader alone),
        ``loop_limit_images_per_s`` (:func:`loop_limit` of the model-only and decode-only rates),
        ``fraction_of_loop_limit`` (featx's rate over it) and ``breakdown_ms_per_image``
        (:func:`breakdown`: milliseconds per image of decode, hash, handover, network, write,
        other); with ``compile``, also ``model_only_compiled_images_per_s``,
        ``compile_seconds`` (model only), ``featx_compiled_images_per_s``,
        ``featx_compile_seconds`` (the warm-up extraction of one batch), ``compiled_speedup_vs_naive``
        and ``compiled_fraction_of_compiled_limit``; with ``runtime="auto"``, ``auto_runtime``,
        ``auto_reason``, ``auto_figures`` (per runtime: ``images_per_s``, ``cosine``, ``error``,
        ``prepare_seconds``, ``verified``, ``problem``), ``auto_images_per_s`` (featx's extraction
        with auto's choice: featx's default), ``auto_speedup_vs_naive``,
        ``auto_loop_limit_images_per_s`` (1 / (1/auto's model-only rate + 1/decode only)) and
        ``auto_fraction_of_loop_limit``.
    """
    options = ExtractOptions.merge(options, settings, aliases={"model": "backbone"}, where="run_bench")
    resolved = resolve(options)
    model, batch_size, device, decoder = options.backbone, options.batch_size, str(resolved.device), resolved.decoder
    compile, runtime = options.compile, options.runtime
    # Plain options for the children (they start with spawn): the device as a string, eager torch.
    plain = options.replace(device=device, compile=False, runtime="torch")
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            out(f"generating {n} JPEGs of 500×375 …")
            folder = make_jpegs(Path(tmp) / "images", n)
        folder = str(folder)
        out(f"(a) naive loop (ImageFolder + DataLoader + fp32 model) on {model} …")
        naive = _isolated("_naive", folder, plain)
        out(f"    {naive['images_per_s']:.1f} images/s")
        out("(b) featx extraction into a fresh store …")
        ours = _isolated("_featx", folder, plain)
        out(f"    {ours['images_per_s']:.1f} images/s")
        out("(c) model-only forward pass on random tensors …")
        limit = _isolated("_model_only", folder, plain, ours["n"])
        out(f"    {limit['images_per_s']:.1f} images/s at {limit['precision']}")
        out("(c') decoding alone (the loop's own loader, no network) …")
        decoding = _isolated("_decode_only", folder, plain)
        own_limit = loop_limit(limit["images_per_s"], decoding["images_per_s"])
        out(f"    {decoding['images_per_s']:.1f} images/s; the loop's own limit {own_limit:.1f} images/s")
        if compile:
            out("(d) model-only forward pass under torch.compile …")
            compiled = _isolated("_model_only", folder, plain.replace(compile=True), ours["n"])
            out(f"    {compiled['images_per_s']:.1f} images/s (compiling took {compiled['warm_up_s']:.0f} s)")
            out("(e) featx extraction with compile=True into a fresh store …")
            ours_compiled = _isolated("_featx", folder, plain.replace(compile=True))
            out(f"    {ours_compiled['images_per_s']:.1f} images/s (compiling, on one batch first, took "
                f"{ours_compiled['prepare_seconds']:.0f} s)")
        if runtime == "onnxruntime":
            out("(f) featx extraction with runtime='onnxruntime' into a fresh store …")
            ours_onnx = _isolated("_featx", folder, plain.replace(runtime=runtime))
            out(f"    {ours_onnx['images_per_s']:.1f} images/s (exporting, on one batch first, took "
                f"{ours_onnx['prepare_seconds']:.0f} s)")
            out("(g) model-only forward pass with ONNX Runtime …")
            limit_onnx = _isolated("_model_only", folder, plain.replace(runtime=runtime), ours["n"])
            out(f"    {limit_onnx['images_per_s']:.1f} images/s")
        if runtime == "auto":
            out("(h) runtime='auto': every installed runtime on one batch, timed in turn, checked against eager fp32 …")
            auto = _isolated("_auto", folder, plain.replace(runtime="auto"), ours["n"])
            for name, entry in auto["figures"].items():
                rate = f"{entry['images_per_s']:.1f} images/s" if entry["images_per_s"] else "not used"
                check = (f"cosine {entry['cosine']:.6f}, error {entry['error']:.1e}" if entry["cosine"] is not None
                         else entry["problem"])
                setup = f", prepare {entry['prepare_seconds']:.1f} s" if entry["prepare_seconds"] else ""
                setup += f", export {entry['export_seconds']:.0f} s" if entry.get("export_seconds") else ""
                out(f"    {name:12s} {rate} ({check}{setup})")
            out(f"    auto chose {auto['runtime']}: {auto['reason']}")
            if auto["runtime"] != "torch":
                out(f"(i) featx extraction with auto's choice, runtime={auto['runtime']!r}, into a fresh store …")
                ours_auto = _isolated("_featx", folder, plain.replace(runtime=auto["runtime"]))
                out(f"    {ours_auto['images_per_s']:.1f} images/s")
    extra = {}
    if runtime == "auto":
        auto_rate = ours_auto["images_per_s"] if auto["runtime"] != "torch" else ours["images_per_s"]
        # The default's own limit: its runtime's model-only rate (auto's measurement) sharing the cores with decoding.
        auto_model = (auto["figures"][auto["runtime"]]["images_per_s"] if auto["runtime"] != "torch"
                      else limit["images_per_s"])
        auto_limit = loop_limit(auto_model, decoding["images_per_s"])
        extra = {"auto_runtime": auto["runtime"], "auto_reason": auto["reason"], "auto_figures": auto["figures"],
                 "auto_images_per_s": auto_rate, "auto_speedup_vs_naive": auto_rate / naive["images_per_s"],
                 "auto_loop_limit_images_per_s": auto_limit, "auto_fraction_of_loop_limit": auto_rate / auto_limit}
    if runtime == "onnxruntime":
        extra |= {"onnx_images_per_s": ours_onnx["images_per_s"], "onnx_export_seconds": ours_onnx["prepare_seconds"],
                 "onnx_peak_rss_mb": ours_onnx["peak_rss_mb"], "model_only_onnx_images_per_s": limit_onnx["images_per_s"],
                 "onnx_speedup_vs_naive": ours_onnx["images_per_s"] / naive["images_per_s"],
                 "onnx_fraction_of_onnx_limit": ours_onnx["images_per_s"] / limit_onnx["images_per_s"]}
    if compile:
        extra |= {"model_only_compiled_images_per_s": compiled["images_per_s"], "compile_seconds": compiled["warm_up_s"],
                 "featx_compiled_images_per_s": ours_compiled["images_per_s"],
                 "featx_compile_seconds": ours_compiled["prepare_seconds"],
                 "featx_compiled_peak_rss_mb": ours_compiled["peak_rss_mb"],
                 "compiled_speedup_vs_naive": ours_compiled["images_per_s"] / naive["images_per_s"],
                 "compiled_fraction_of_compiled_limit": ours_compiled["images_per_s"] / compiled["images_per_s"]}
    return {
        "model": model,
        "device": device,
        "precision": limit["precision"],
        "decoder": decoder,
        "n_images": ours["n"],
        "batch_size": batch_size,
        "cpu_count": os.cpu_count(),
        "naive_images_per_s": naive["images_per_s"],
        "featx_images_per_s": ours["images_per_s"],
        "model_only_images_per_s": limit["images_per_s"],
        "speedup_vs_naive": ours["images_per_s"] / naive["images_per_s"],
        "fraction_of_model_limit": ours["images_per_s"] / limit["images_per_s"],
        "decode_only_images_per_s": decoding["images_per_s"],
        "loop_limit_images_per_s": own_limit,
        "fraction_of_loop_limit": ours["images_per_s"] / own_limit,
        "breakdown_ms_per_image": breakdown(ours["timings"], ours["seconds"], ours["n"]),
        "peak_rss_mb": ours["peak_rss_mb"],
        "naive_peak_rss_mb": naive["peak_rss_mb"],
        **extra,
    }


# --- featx bench --busy: the thread plan under load ------------------------------------------------

# The neighbour: 'featx extract' of its own images, again and again on a fresh store, until stopped.
_NEIGHBOUR = """
import subprocess, sys, tempfile
folder, model = sys.argv[1:3]
while True:
    with tempfile.TemporaryDirectory() as cache:
        subprocess.run([sys.executable, "-m", "featx", "extract", folder, "--model", model, "--cache", cache],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
"""


@contextlib.contextmanager
def busy_neighbour(folder, *, model: str = ExtractOptions.backbone, settle_s: float = 5.0):
    """A second ``featx extract`` (of ``model``) of the images in ``folder`` running beside the block.

    It is a multithreaded job of its own (torch threads and decoding processes), restarted on a
    fresh store whenever it finishes, and stopped (with every process it started) when the block
    ends. The block starts ``settle_s`` seconds after it, once its network is running.
    """
    process = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR, str(folder), str(model)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(settle_s)
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the loop and the extraction it runs
        process.wait()


@contextlib.contextmanager
def _environment(**changes):
    """``os.environ`` with ``changes`` (None removes a name) for the block; the child processes
    started inside it inherit them."""
    def apply(values: dict) -> None:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    saved = {name: os.environ.get(name) for name in changes}
    try:
        apply(changes)
        yield
    finally:
        apply(saved)


def _label(threads) -> str:
    return {"auto": "auto (default)", None: "none"}.get(threads, f"{threads} torch threads")


def run_busy_bench(folder=None, options: ExtractOptions | None = None, *, n: int = 256, settings=None,
                   repeat: int = 1, settle_s: float = 5.0, out=print, **extract_settings) -> dict:
    """featx's extraction at each thread setting while a second ``featx extract`` shares the cores.

    Each setting runs in a fresh process (like (b) of :func:`run_bench`), one after the other,
    ``repeat`` rounds, while :func:`busy_neighbour` extracts other generated images beside them.
    ``threads=None`` runs without featx's OpenMP wait policy (``OMP_WAIT_POLICY`` and
    ``FEATX_THREADS=none`` as a user who opts out has them): the behaviour before the plan.

    Parameters
    ----------
    folder : path, optional
        A folder of class sub-folders of images; by default ``n`` generated 500×375 JPEGs.
    options : ExtractOptions, optional
        The ``backbone``, ``batch_size`` and ``device`` measured; ``threads`` is what is varied.
    n : int, default=256
        Images to generate (ignored with ``folder``); the neighbour gets as many of its own.
    settings : sequence, optional
        The ``threads`` values to measure; default ``"auto"``, 1 … the cores, and None.
    repeat : int, default=1
        Rounds over the settings; a setting's best round counts.
    settle_s : float, default=5.0
        Seconds the neighbour runs before the first measurement.

    Returns
    -------
    dict
        ``results`` (one dict per setting: ``threads``, ``images_per_s``, ``rounds``),
        ``default_images_per_s``, ``best_threads``, ``best_images_per_s``, ``best_over_default``
        (acceptance: at most 1.5), ``load_before``, ``load_after``, ``cpu_count``, ``model``, ``n_images``.
    """
    options = ExtractOptions.merge(options, extract_settings, aliases={"model": "backbone"}, where="run_busy_bench")
    cores = available_cores()
    settings = list(settings) if settings is not None else ["auto", *range(1, cores + 1), None]
    plain = options.replace(device=str(resolve(options).device), compile=False, runtime="torch")
    model = options.backbone if isinstance(options.backbone, str) else options.backbone.name
    rounds: dict = {_label(s): [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            out(f"generating {n} JPEGs of 500×375 …")
            folder = make_jpegs(Path(tmp) / "images", n)
        out(f"generating {n} other JPEGs for the neighbouring 'featx extract' …")
        other = make_jpegs(Path(tmp) / "neighbour", n, seed=1)
        load_before = os.getloadavg()[0]
        with busy_neighbour(other, model=model, settle_s=settle_s):
            for r in range(repeat):
                for threads in settings:
                    env = {"OMP_WAIT_POLICY": None, "FEATX_THREADS": "none"} if threads is None else {}
                    with _environment(**env):
                        result = _isolated("_featx", str(folder), plain.replace(threads=threads))
                    rounds[_label(threads)].append(result["images_per_s"])
                    out(f"    round {r + 1}, threads={_label(threads)}: {result['images_per_s']:.1f} images/s "
                        f"(beside the neighbour)")
            n_images = result["n"]
        load_after = os.getloadavg()[0]
    results = [{"threads": s, "images_per_s": max(rounds[_label(s)]), "rounds": rounds[_label(s)]} for s in settings]
    by_label = {_label(r["threads"]): r for r in results}
    default = by_label[_label(options.threads)] if _label(options.threads) in by_label else results[0]
    best = max(results, key=lambda r: r["images_per_s"])
    return {"model": model, "n_images": n_images, "cpu_count": cores, "load_before": load_before, "load_after": load_after,
            "results": results, "default_threads": default["threads"], "default_images_per_s": default["images_per_s"],
            "best_threads": best["threads"], "best_images_per_s": best["images_per_s"],
            "best_over_default": best["images_per_s"] / default["images_per_s"]}
