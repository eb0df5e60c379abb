"""Benchmark: featx's extraction against the naive loop and the model's own limit.

Three measurements on the same images, each in a fresh process (so that peak memory is its own):

(a) ``naive``: the PyTorch transfer-learning tutorial's loop: torchvision ``ImageFolder`` with
    ``Resize``/``CenterCrop``/``ToTensor``/``Normalize``, a ``DataLoader`` with one worker per
    core, the fp32 model in its default memory format under ``torch.no_grad()``;
(b) ``featx``: :func:`featx.extract` into a fresh feature store (hashing, decoding, the
    forward pass, pooling and the durable writes all counted);
(c) ``model_only``: the forward pass alone on random tensors at featx's precision and memory
    format: the limit no loader can beat;
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

Nothing here asserts a time: the figures are printed for people to compare, side by side, from
one run.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from featx.backbones import load_backbone, resolve_layers
from featx.devices import autocast, resolve, resolve_device
from featx.extraction import extract
from featx.images import open_source
from featx.loop import prepare
from featx.options import ExtractOptions
from featx.runners import onnx_taps
from featx.runtimes import choose

__all__ = ["make_jpegs", "run_bench"]


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
    return {"images_per_s": result.n_computed / seconds, "n": result.n_computed, "prepare_seconds": prepare_seconds}


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
        result = {"_naive": _naive, "_featx": _featx, "_model_only": _model_only, "_auto": _auto}[kind](*args)
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
        ``cpu_count``; with ``compile``, also ``model_only_compiled_images_per_s``,
        ``compile_seconds`` (model only), ``featx_compiled_images_per_s``,
        ``featx_compile_seconds`` (the warm-up extraction of one batch), ``compiled_speedup_vs_naive``
        and ``compiled_fraction_of_compiled_limit``; with ``runtime="auto"``, ``auto_runtime``,
        ``auto_reason``, ``auto_figures`` (per runtime: ``images_per_s``, ``cosine``, ``error``,
        ``prepare_seconds``, ``verified``, ``problem``) and ``auto_images_per_s`` (featx's extraction
        with auto's choice).
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
        extra = {"auto_runtime": auto["runtime"], "auto_reason": auto["reason"], "auto_figures": auto["figures"],
                 "auto_images_per_s": ours_auto["images_per_s"] if auto["runtime"] != "torch" else ours["images_per_s"]}
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
        "peak_rss_mb": ours["peak_rss_mb"],
        "naive_peak_rss_mb": naive["peak_rss_mb"],
        **extra,
    }
