"""Spatial pooling: turn a layer's output into one vector per image.

A 4-D map ``(n, C, H, W)`` becomes ``(n, d)``:

========  =====  =====================================================
pooling   d      what
========  =====  =====================================================
avg       C      global average
max       C      global maximum
avgmax    2·C    average and maximum, concatenated
spp       5·C    spatial pyramid of averages: the whole map (1×1), then
                 a 2×2 grid (cells in row-major order, channel-major)
map       C·H·W  no pooling: the whole map flattened in (C, H, W) order,
                 the input that :mod:`featx.finetune` trains the top of the
                 network on (store it as float16: wide rows)
========  =====  =====================================================

A 2-D output ``(n, d)`` (``pre_logits``, ``logits``) passes through unchanged, whatever the pooling.

``avgsq`` (the spatial mean of squares, C values) is internal: with ``avg`` it gives the
per-channel moments that :mod:`featx.advise` compares with a network's BatchNorm statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from featx.exceptions import FeatxError, UnknownPoolingError, suggest

if TYPE_CHECKING:
    import torch

__all__ = ["POOLINGS", "check_pooling", "pool", "pool_each", "pooled_dim", "feature_names"]

POOLINGS: tuple[str, ...] = ("avg", "max", "avgmax", "spp")

_WIDTH = {"avg": 1, "max": 1, "avgmax": 2, "spp": 5, "avgsq": 1, "map": None}

# Names other libraries and papers give these poolings, which difflib would not match by spelling
# ('mean' is closer to 'max' than to 'avg').
_SYNONYMS = {
    "mean": "avg", "average": "avg", "avgpool": "avg", "avg_pool": "avg", "gap": "avg", "global_avg": "avg",
    "maximum": "max", "maxpool": "max", "max_pool": "max", "gmp": "max", "global_max": "max",
    "avg+max": "avgmax", "avg_max": "avgmax", "catavgmax": "avgmax",
    "pyramid": "spp", "spatial_pyramid": "spp",
    "none": "map", "flatten": "map",
}


def check_pooling(pooling: str) -> str:
    """Return ``pooling`` if featx knows it, else raise :class:`UnknownPoolingError`.

    Examples
    --------
    >>> check_pooling("spp")
    'spp'
    >>> check_pooling("mean")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    featx.exceptions.UnknownPoolingError: Unknown pooling 'mean': expected one of ... Did you mean 'avg'?
    """
    if pooling not in _WIDTH:
        raise UnknownPoolingError(
            f"Unknown pooling {pooling!r}: expected one of {', '.join(POOLINGS)} (or 'map', the unpooled map)."
            f"{_suggest_pooling(pooling)}"
        )
    return pooling


def _suggest_pooling(pooling: str) -> str:
    """ " Did you mean 'x'?" for a known synonym or another case of a pooling, else difflib's closest."""
    name = str(pooling).strip().lower().replace("-", "_")
    if name in _WIDTH and name != "avgsq":
        return f" Did you mean {name!r}?"
    if name in _SYNONYMS:
        return f" Did you mean {_SYNONYMS[name]!r}?"
    return suggest(pooling, POOLINGS)


def pooled_dim(shape: Sequence[int], pooling: str) -> int:
    """Length of the pooled vector for a layer whose per-image output has ``shape``.

    Parameters
    ----------
    shape : sequence of int
        The output shape of one image, without the batch axis: ``(C, H, W)`` or ``(d,)``.
    pooling : {"avg", "max", "avgmax", "spp", "map"}

    Examples
    --------
    >>> pooled_dim((320, 7, 7), "spp"), pooled_dim((1280,), "spp"), pooled_dim((112, 14, 14), "map")
    (1600, 1280, 21952)
    """
    check_pooling(pooling)
    if len(shape) == 1:
        return int(shape[0])
    if len(shape) == 3:
        if pooling == "map":
            return int(shape[0]) * int(shape[1]) * int(shape[2])
        return int(shape[0]) * _WIDTH[pooling]
    raise FeatxError(
        f"Cannot pool a layer output of shape {tuple(shape)}: expected (C, H, W) maps or (d,) "
        "vectors. Choose a convolutional stage or 'pre_logits'."
    )


def pool(output: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool a batch of layer outputs to ``(n, d)`` vectors in the output's dtype.

    Parameters
    ----------
    output : torch.Tensor of shape (n, C, H, W) or (n, d)
    pooling : {"avg", "max", "avgmax", "spp", "map"}

    Returns
    -------
    torch.Tensor of shape (n, d)
        For ``"map"``, ``d = C·H·W`` in (C, H, W) order, whatever the memory format.

    Examples
    --------
    >>> import torch
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> pool(x, "avgmax").tolist()
    [[7.5, 15.0]]
    >>> pool(x, "spp").tolist()
    [[7.5, 2.5, 4.5, 10.5, 12.5]]
    >>> pool(x, "map").shape
    torch.Size([1, 16])
    """
    import torch
    import torch.nn.functional as F

    pooled_dim(tuple(output.shape[1:]), pooling)  # validates pooling and rank
    if output.ndim == 2:
        return output
    if pooling == "avg":
        return output.mean(dim=(2, 3))
    if pooling == "max":
        return output.amax(dim=(2, 3))
    if pooling == "avgmax":
        return torch.cat([output.mean(dim=(2, 3)), output.amax(dim=(2, 3))], dim=1)
    if pooling == "avgsq":
        return output.square().mean(dim=(2, 3))
    if pooling == "map":
        return output.reshape(output.shape[0], -1)  # logical (C, H, W) order, also for channels-last
    grid = F.adaptive_avg_pool2d(output, 2).flatten(1)  # (n, C*4), channel-major
    return torch.cat([output.mean(dim=(2, 3)), grid], dim=1)


def pool_each(output: torch.Tensor, poolings: Sequence[str]) -> dict[str, torch.Tensor]:
    """Several poolings of one layer output, in float32, sharing their work.

    The same values as ``pool(output.float(), p)`` for each ``p``, with the output converted to
    float once and its mean and max computed once for ``avg``, ``max``, ``avgmax`` and ``spp``:
    a ``CNNFeatures`` cache pools every layer four ways on the first transform, and the
    conversions and reductions repeated per pooling cost a quarter of the forward pass.

    Examples
    --------
    >>> import torch
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4).bfloat16()
    >>> pooled = pool_each(x, ["avg", "avgmax", "spp"])
    >>> pooled["avgmax"].tolist(), pooled["spp"].dtype
    ([[7.5, 15.0]], torch.float32)
    """
    import torch
    import torch.nn.functional as F

    output = output.float()
    if output.ndim == 2:
        for p in poolings:
            pooled_dim(tuple(output.shape[1:]), p)  # validates pooling and rank
        return {p: output for p in poolings}
    shared: dict[str, torch.Tensor] = {}

    def reduced(name):
        if name not in shared:
            shared[name] = output.mean(dim=(2, 3)) if name == "avg" else output.amax(dim=(2, 3))
        return shared[name]

    result = {}
    for p in poolings:
        if p in ("avg", "max"):
            pooled_dim(tuple(output.shape[1:]), p)
            result[p] = reduced(p)
        elif p == "avgmax":
            result[p] = torch.cat([reduced("avg"), reduced("max")], dim=1)
        elif p == "spp":
            result[p] = torch.cat([reduced("avg"), F.adaptive_avg_pool2d(output, 2).flatten(1)], dim=1)
        else:
            result[p] = pool(output, p)
    return result


def feature_names(layer: str, pooling: str, dim: int) -> list[str]:
    """Column names ``<layer>_<pooling>_<i>`` for a pooled layer (scikit-learn's feature names).

    Examples
    --------
    >>> feature_names("stage4", "avg", 3)
    ['stage4_avg_0', 'stage4_avg_1', 'stage4_avg_2']
    """
    prefix = f"{layer.replace('.', '_')}_{pooling}"
    return [f"{prefix}_{i}" for i in range(dim)]
