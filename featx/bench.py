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
    model-only limit on random tensors.

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


def _naive(folder: str, model: str, batch_size: int, device: str) -> dict:
    import torch
    from torchvision import datasets, transforms

    from featx.backbones import load_backbone

    backbone = load_backbone(model)
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
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=os.cpu_count() or 1)
    net = backbone.module.to(device)
    start = time.perf_counter()
    n = 0
    with torch.no_grad():
        for x, _ in loader:
            net(x.to(device))
            n += len(x)
    return {"images_per_s": n / (time.perf_counter() - start), "n": n}


def _featx(folder: str, model: str, batch_size: int, device: str, compiled: bool = False,
           runtime: str = "torch") -> dict:
    from featx.backbones import load_backbone
    from featx.extraction import extract
    from featx.images import open_source

    backbone = load_backbone(model)  # loaded before the clock starts, as in the naive loop
    source = open_source(folder)
    prepare_seconds = None
    if compiled or runtime != "torch":  # prepare on one batch, into a store of its own, before the clock starts
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            extract(source.subset(list(range(min(batch_size, len(source))))), backbone=backbone,
                    layers=["pre_logits"], store=cache, batch_size=batch_size, device=device, progress=False,
                    compile=compiled, runtime=runtime)
            prepare_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        result = extract(source, backbone=backbone, layers=["pre_logits"], store=cache,
                         batch_size=batch_size, device=device, progress=False, compile=compiled, runtime=runtime)
        seconds = time.perf_counter() - start
    return {"images_per_s": result.n_computed / seconds, "n": result.n_computed, "prepare_seconds": prepare_seconds}


def _model_only(folder: str, model: str, batch_size: int, device: str, n: int, compiled: bool = False,
                runtime: str = "torch") -> dict:
    import torch

    from featx.backbones import load_backbone
    from featx.extraction import _autocast, prepare, resolve_device, resolve_precision

    backbone = load_backbone(model)
    dev = resolve_device(device)
    precision = resolve_precision("auto", dev)
    prepare(backbone, dev)
    size = backbone.preprocess.crop
    x = torch.randn(batch_size, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    batches = max(1, n // batch_size)
    net = torch.compile(backbone.module) if compiled else backbone.module
    if runtime == "onnxruntime":
        from featx.backbones import resolve_layers
        from featx.runners import onnx_taps

        taps = [tap for _, tap in resolve_layers(backbone.name, ["pre_logits"])]
        net = onnx_taps(backbone.module, taps, x.contiguous())
    with torch.inference_mode(), _autocast(dev, precision):
        warm_up = time.perf_counter()
        net(x)  # warm-up (and, compiled, the compilation)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            net(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return {"images_per_s": batches * batch_size / (time.perf_counter() - start), "precision": precision,
            "warm_up_s": start - warm_up}


def _child(kind: str, args: tuple, queue) -> None:
    try:
        result = {"_naive": _naive, "_featx": _featx, "_model_only": _model_only}[kind](*args)
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


def run_bench(folder=None, *, model: str = "efficientnet_lite0", n: int = 256, batch_size: int = 32,
              device: str = "auto", compile: bool = False, runtime: str = "torch", out=print) -> dict:
    """Measure naive, featx and model-only throughput on the same images, side by side.

    Parameters
    ----------
    folder : path, optional
        A folder of class sub-folders of images; by default ``n`` generated 500×375 JPEGs.
    model : str, default="efficientnet_lite0"
    n : int, default=256
        Images to generate (ignored with ``folder``).
    compile : bool, default=False
        Also measure the model-only limit under ``torch.compile`` and featx's extraction with
        ``compile=True``.
    runtime : {"torch", "onnxruntime"}, default="torch"
        ``"onnxruntime"``: also measure featx's extraction and the model-only limit with ONNX
        Runtime (``onnx_images_per_s``, ``model_only_onnx_images_per_s``, ``onnx_export_seconds``,
        ``onnx_speedup_vs_naive``, ``onnx_fraction_of_onnx_limit``, ``onnx_peak_rss_mb``).

    Returns
    -------
    dict
        ``naive_images_per_s``, ``featx_images_per_s``, ``model_only_images_per_s``,
        ``speedup_vs_naive``, ``fraction_of_model_limit``, ``peak_rss_mb`` (featx's run),
        ``naive_peak_rss_mb``, ``n_images``, ``model``, ``device``, ``precision``, ``decoder``,
        ``cpu_count``; with ``compile``, also ``model_only_compiled_images_per_s``,
        ``compile_seconds`` (model only), ``featx_compiled_images_per_s``,
        ``featx_compile_seconds`` (the warm-up extraction of one batch), ``compiled_speedup_vs_naive``
        and ``compiled_fraction_of_compiled_limit``.
    """
    from featx.extraction import resolve_decoder, resolve_device

    resolved = resolve_device(device)
    device, decoder = str(resolved), resolve_decoder("auto", resolved)
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            out(f"generating {n} JPEGs of 500×375 …")
            folder = make_jpegs(Path(tmp) / "images", n)
        folder = str(folder)
        out(f"(a) naive loop (ImageFolder + DataLoader + fp32 model) on {model} …")
        naive = _isolated("_naive", folder, model, batch_size, device)
        out(f"    {naive['images_per_s']:.1f} images/s")
        out("(b) featx extraction into a fresh store …")
        ours = _isolated("_featx", folder, model, batch_size, device)
        out(f"    {ours['images_per_s']:.1f} images/s")
        out("(c) model-only forward pass on random tensors …")
        limit = _isolated("_model_only", folder, model, batch_size, device, ours["n"])
        out(f"    {limit['images_per_s']:.1f} images/s at {limit['precision']}")
        if compile:
            out("(d) model-only forward pass under torch.compile …")
            compiled = _isolated("_model_only", folder, model, batch_size, device, ours["n"], True)
            out(f"    {compiled['images_per_s']:.1f} images/s (compiling took {compiled['warm_up_s']:.0f} s)")
            out("(e) featx extraction with compile=True into a fresh store …")
            ours_compiled = _isolated("_featx", folder, model, batch_size, device, True)
            out(f"    {ours_compiled['images_per_s']:.1f} images/s (compiling, on one batch first, took "
                f"{ours_compiled['prepare_seconds']:.0f} s)")
        if runtime == "onnxruntime":
            out("(f) featx extraction with runtime='onnxruntime' into a fresh store …")
            ours_onnx = _isolated("_featx", folder, model, batch_size, device, False, runtime)
            out(f"    {ours_onnx['images_per_s']:.1f} images/s (exporting, on one batch first, took "
                f"{ours_onnx['prepare_seconds']:.0f} s)")
            out("(g) model-only forward pass with ONNX Runtime …")
            limit_onnx = _isolated("_model_only", folder, model, batch_size, device, ours["n"], False, runtime)
            out(f"    {limit_onnx['images_per_s']:.1f} images/s")
    extra = {}
    if runtime == "onnxruntime":
        extra = {"onnx_images_per_s": ours_onnx["images_per_s"], "onnx_export_seconds": ours_onnx["prepare_seconds"],
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
