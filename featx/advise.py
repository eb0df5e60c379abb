"""The transfer-learning advisor: how much data, how far from ImageNet, and what to do.

The classic decision table of transfer learning has two axes:

====================  ==========================================  =======================================
                      similar to ImageNet                         different from ImageNet
====================  ==========================================  =======================================
small data            linear head on late features                linear head on earlier features
large data            fine-tune the top blocks                    fine-tune more of the network
====================  ==========================================  =======================================

*Size* is images per class (small below ``large_per_class``, 1,000 by default). *Similarity* is
measured, not guessed: the pretrained network's first BatchNorm layers hold the mean and
variance that ImageNet images produce there. The advisor runs a sample of the data through the
network (the one extraction loop) and measures how far the data's per-channel statistics lie from
those: the mean Gaussian KL divergence over the first two BatchNorm layers. Natural photos stay
close (clothing photos 0.05, 128-px flower photos 0.26 on ``efficientnet_lite0``); grey
silhouettes and scanned digits do not (Fashion-MNIST 0.61, digits 0.66). The threshold, 0.45,
lies between those calibration sets.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence

import numpy as np
from torch import nn

from featx.backbones import Tap, load_backbone
from featx.compare import best_row
from featx.devices import resolve
from featx.exceptions import FeatxError, ImageDecodeError
from featx.images import ImageSource, open_source
from featx.images.decode import load_image
from featx.images.items import is_path_item
from featx.loop import Request, iter_batches, prepare
from featx.options import ExtractOptions

__all__ = ["FINETUNE_FROM", "QUADRANTS", "advise", "decodable", "imagenet_shift"]

SIMILARITY_BACKBONE = "efficientnet_lite0"
SHIFT_THRESHOLD = 0.45
LARGE_PER_CLASS = 1000

QUADRANTS = {
    ("small", "similar"): "train a linear head on late features (stage5 or pre_logits): featx cv DATA --layers all",
    ("small", "different"): "train a linear head on earlier features (a middle stage, e.g. stage3 or stage4): "
    "featx cv DATA --layers all",
    ("large", "similar"): "fine-tune the top blocks with a small learning rate: featx finetune DATA --from stage5 "
    "(a linear head on late features, featx cv DATA --layers all, is the fast baseline)",
    ("large", "different"): "fine-tune more of the network, from an earlier stage, with a small learning rate: "
    "featx finetune DATA --from stage3 (or --from stage4; compare on a held-out split)",
}
# The layers each quadrant says to fine-tune from (none for small data: a head on frozen features).
FINETUNE_FROM = {
    ("small", "similar"): (),
    ("small", "different"): (),
    ("large", "similar"): ("stage5",),
    ("large", "different"): ("stage4", "stage3"),
}


def _first_batchnorms(module: nn.Module, count: int) -> list[tuple[str, nn.BatchNorm2d]]:
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    return found[:count]


def imagenet_shift(source, *, n_images: int = 200, random_state: int = 0, layers: int = 2,
                   device: str = "auto", batch_size: int = 32) -> float:
    """Distance of the images' low-level statistics from ImageNet's, as the backbone saw them.

    For each of the first ``layers`` BatchNorm layers of ``efficientnet_lite0`` (ImageNet
    weights), the per-channel mean and variance of its input over up to ``n_images`` images are
    compared with the layer's running statistics by the KL divergence of the two Gaussians,
    averaged over channels, then over layers. 0 means ImageNet-like.

    Returns
    -------
    float
    """
    source = source if isinstance(source, ImageSource) else open_source(source)
    if len(source) > n_images:
        picks = np.sort(np.random.default_rng(random_state).choice(len(source), n_images, replace=False))
        source = source.subset(picks)
    backbone = load_backbone(SIMILARITY_BACKBONE)
    norms = _first_batchnorms(backbone.module, layers)
    requests = [Request(name, pooling, Tap(name, "input")) for name, _ in norms for pooling in ("avg", "avgsq")]
    # fp32 whatever the machine: the statistics are compared with ImageNet's running ones.
    options = resolve(ExtractOptions(backbone=backbone, batch_size=batch_size, device=device, precision="fp32",
                                     on_error="skip", progress=False))
    prepare(backbone, options.device)
    sums = {r: 0.0 for r in requests}
    count = 0
    for batch in iter_batches(backbone, source, requests, options):
        if not len(batch.indices):  # every image of the batch was skipped
            continue
        for request in requests:
            sums[request] = sums[request] + batch.features[request].astype(np.float64).sum(axis=0)
        count += len(batch.indices)
    if count == 0:
        raise FeatxError(f"No image of {source.name} could be decoded: nothing to measure.")
    shifts = []
    for name, norm in norms:
        mean = sums[Request(name, "avg", Tap(name, "input"))] / count
        var = np.maximum(sums[Request(name, "avgsq", Tap(name, "input"))] / count - mean**2, 0) + norm.eps
        ref_mean = norm.running_mean.detach().cpu().double().numpy()
        ref_var = norm.running_var.detach().cpu().double().numpy() + norm.eps
        kl = 0.5 * (np.log(ref_var / var) + (var + (mean - ref_mean) ** 2) / ref_var - 1)
        shifts.append(float(kl.mean()))
    return float(np.mean(shifts))


def advise(
    source,
    *,
    backbone: str = "efficientnet_lite0",
    large_per_class: int = LARGE_PER_CLASS,
    n_images: int = 200,
    device: str = "auto",
    comparison: Sequence[dict] | None = None,
    data: str | None = None,
) -> dict:
    """Place a labelled data set in the transfer-learning table and recommend what to do.

    Parameters
    ----------
    source : ImageSource or anything :func:`featx.images.open_source` accepts
    backbone : str, default="efficientnet_lite0"
        The backbone the recommendation is for (layer names are its aliases).
    large_per_class : int, default=1000
        Images per class from which data counts as large.
    n_images : int, default=200
        Images sampled to measure the similarity to ImageNet.
    comparison : list of dict, optional
        Rows of :func:`featx.compare.compare_layers` on this data; the measured best layer is
        then reported, and whether it agrees with the table.
    data : str, optional
        How the recommended commands name the data (``featx advise`` passes its DATA argument).
        Default: ``source`` itself when it is a path or a built-in data set name, else the
        placeholder ``DATA``.

    Returns
    -------
    dict
        ``images_per_class`` (median), ``n_images`` (decodable ones only), ``skipped`` (``image``
        and ``reason`` of each image that cannot be decoded, left out of every count), ``n_classes``, ``size`` (``"small"`` or
        ``"large"``), ``similarity`` (``"similar"`` or ``"different"``), ``similarity_score``
        (the shift from ImageNet, see :func:`imagenet_shift`; lower is closer),
        ``threshold``, ``quadrant``, ``recommendation``, ``finetune_from`` (the layers the
        table says to fine-tune from, as a list; empty for small data), and with a comparison
        ``measured_best`` and ``agrees``.
    """
    if data is None and isinstance(source, (str, os.PathLike)):
        data = os.fspath(source)
    source = source if isinstance(source, ImageSource) else open_source(source)
    source.require_classes("the advisor needs classes to count images per class")
    source, skipped = decodable(source)
    if not len(source):
        raise FeatxError(f"No image of {source.name} could be decoded ({len(skipped)} tried): nothing to advise on.")
    source.require_classes("the advisor needs classes to count images per class")
    _, counts = np.unique(source.labels, return_counts=True)
    per_class = float(np.median(counts))
    shift = imagenet_shift(source, n_images=n_images, device=device)
    size = "large" if per_class >= large_per_class else "small"
    similarity = "similar" if shift < SHIFT_THRESHOLD else "different"
    report = {
        "data": source.name,
        "n_images": len(source),
        "skipped": [{"image": name, "reason": reason} for name, reason in skipped],
        "n_classes": int(len(counts)),
        "images_per_class": per_class,
        "size": size,
        "similarity": similarity,
        "similarity_score": shift,
        "threshold": SHIFT_THRESHOLD,
        "quadrant": f"{size} data, {similarity} {'to' if similarity == 'similar' else 'from'} ImageNet",
        "recommendation": _name_data(QUADRANTS[(size, similarity)], data),
        "finetune_from": list(FINETUNE_FROM[(size, similarity)]),
        "backbone": backbone,
    }
    if comparison:
        rows = [row for row in comparison if row["model"] == backbone] or list(comparison)
        best = best_row(rows)
        depth = max(row["depth"] for row in rows) or 1
        expected_late = similarity == "similar"

        def is_late(row):
            return row["depth"] / depth >= 0.75

        late = is_late(best)
        # Layers within one standard deviation of the best are as good as measured: the table is
        # contradicted only when none of them lies where it says.
        tied = [row for row in rows if row["accuracy_mean"] >= best["accuracy_mean"] - best["accuracy_std"]]
        report["measured_best"] = {k: best[k] for k in ("model", "layer", "pooling", "head", "accuracy_mean")}
        report["agrees"] = any(is_late(row) == expected_late for row in tied)
        where = "a late layer" if late else "an earlier layer"
        report["measurement"] = (
            f"measured best: {best['layer']} ({best['accuracy_mean']:.3f}), {where}"
            + ("" if report["agrees"] else f": this disagrees with the table, which expects "
               f"{'late' if expected_late else 'earlier'} features for {similarity} data; trust the measurement")
        )
    return report


def decodable(source: ImageSource) -> tuple[ImageSource, list[tuple[str, str]]]:
    """The images of ``source`` that decode, and ``(image, reason)`` for each one that does not.

    Every image file is decoded (JPEGs at a reduced draft size: fast); arrays always decode.
    """
    keep, skipped = [], []
    for index, item in enumerate(source.items):
        if is_path_item(item):
            try:
                load_image(item, draft_size=(32, 32))
            except ImageDecodeError as exc:
                skipped.append((str(item), str(exc)))
                continue
        keep.append(index)
    return (source if not skipped else source.subset(keep)), skipped


def _name_data(recommendation: str, data: str | None) -> str:
    """The recommendation with its commands' placeholder ``DATA`` replaced by ``data``, quoted for a shell.

    Examples
    --------
    >>> _name_data("featx cv DATA --layers all", "my photos/train")
    "featx cv 'my photos/train' --layers all"
    >>> _name_data("featx cv DATA --layers all", None)
    'featx cv DATA --layers all'
    """
    if data is None:
        return recommendation
    return re.sub(r"\bDATA\b", lambda _: shlex.quote(data), recommendation)
