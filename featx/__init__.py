"""featx: small-data image classification with frozen, pretrained CNN features.

Images go once through a frozen ImageNet-pretrained backbone; the chosen layers are pooled to
vectors, cached, and fed to scikit-learn heads. The public names are imported lazily so that
``import featx`` (and the torch-free modules such as :mod:`featx.store`) stay cheap.
"""

from __future__ import annotations

import importlib

from featx.threads import set_wait_policy

__version__ = "0.1.0"

# Before torch (lazy below) loads its OpenMP runtime: waiting threads sleep instead of spinning
# (featx.threads says why and how to opt out).
set_wait_policy()

_PUBLIC = {
    "CNNFeatures": "featx.transformers",
    "auto_fit": "featx.auto",
    "compare_layers": "featx.compare",
    "evaluate": "featx.heads",
    "ExtractOptions": "featx.options",
    "extract": "featx.extraction",
    "FinetuneOptions": "featx.options",
    "finetune": "featx.finetuning",
    "list_backbones": "featx.backbones",
    "list_layers": "featx.backbones",
    "load_backbone": "featx.backbones",
    "FeatureStore": "featx.store",
    "FeatxError": "featx.exceptions",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'featx' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
