"""The test family: ``featx_tiny_cnn``, a tiny seeded CNN (32 px, random weights) for tests and doctests.

Its network, :class:`featx.backbones.tiny_cnn.TinyCNN`, imports torch, so it is imported where
it is used: registering the family stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from featx.backbones.registry import BackboneSpec, register_family
from featx.backbones.weights import RANDOM_INIT, load_weights_file, local_weights_name, seeded
from featx.exceptions import WeightsUnavailableError
from featx.preprocess import Preprocess

if TYPE_CHECKING:
    from torch import nn

__all__: list[str] = []

_NAME = "featx_tiny_cnn"
_TINY_PREPROCESS = Preprocess(resize=32, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")


def _tiny_architecture() -> nn.Module:
    from featx.backbones.tiny_cnn import TinyCNN

    return TinyCNN()


def _tiny_resolve(weights: object) -> tuple[str, Preprocess]:
    if weights == "DEFAULT":
        return RANDOM_INIT, _TINY_PREPROCESS
    local = local_weights_name(weights, _NAME)
    if local is not None:
        return local, _TINY_PREPROCESS
    raise WeightsUnavailableError(f"Unknown weights {weights!r} for '{_NAME}': expected 'DEFAULT', a path or None.")


def _tiny_load(weights: object) -> nn.Module:
    from torch import nn

    from featx.backbones.tiny_cnn import TinyCNN

    with seeded():
        model = TinyCNN()
        # Non-trivial running statistics, so that forgetting eval() changes the features.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    if weights not in (None, "DEFAULT"):
        load_weights_file(model, Path(weights), _NAME)
    return model


def _tiny_aliases(_model: nn.Module) -> dict[str, str]:
    return {
        "stem": "stem",
        "stage1": "stage1",
        "stage2": "stage2",
        "stage3": "stage3",
        "pre_logits": "classifier:input",
        "logits": "classifier",
    }


@register_family
def _tiny_backbones() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name=_NAME,
            family="test",
            offline=True,
            description="tiny seeded CNN for tests (32 px, random weights)",
            resolve=_tiny_resolve,
            load=_tiny_load,
            architecture=_tiny_architecture,
            aliases=_tiny_aliases,
            input_size=32,
        )
    ]
