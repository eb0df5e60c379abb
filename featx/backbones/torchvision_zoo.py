"""The torchvision family: ``resnet50``, ``vgg16`` … through torchvision's weights enums.

Pretrained weights are downloaded once by users who are online (into torch hub's checkpoint
folder), or read from a local state-dict file (``weights=PATH``). Each weights enum member
carries its own preprocessing (``weights.transforms()``), and the resolved member name
(``ResNet50_Weights.IMAGENET1K_V2``, never ``DEFAULT``) is what feature stores record.
torch and torchvision are imported where they are used.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from featx.backbones.registry import BackboneSpec, register_family
from featx.backbones.weights import is_weights_file, load_weights_file, local_weights_name, offline_error, reachable, seeded
from featx.exceptions import WeightsUnavailableError, suggest
from featx.preprocess import Preprocess

if TYPE_CHECKING:
    from torch import nn

__all__: list[str] = []

# alias -> module name, per architecture. Stages end where the resolution halves next.
_TORCHVISION_ALIASES: dict[str, dict[str, str]] = {
    "alexnet": {
        "stem": "features.1",
        "stage1": "features.4",
        "stage2": "features.7",
        "stage3": "features.9",
        "stage4": "features.12",
        "pre_logits": "classifier.6:input",
        "logits": "classifier.6",
    },
    "vgg16": {
        "stem": "features.1",
        "stage1": "features.4",
        "stage2": "features.9",
        "stage3": "features.16",
        "stage4": "features.23",
        "stage5": "features.30",
        "pre_logits": "classifier.6:input",
        "logits": "classifier.6",
    },
    "resnet": {
        "stem": "maxpool",
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "stage4": "layer4",
        "pre_logits": "fc:input",
        "logits": "fc",
    },
    "densenet121": {
        "stem": "features.pool0",
        "stage1": "features.denseblock1",
        "stage2": "features.denseblock2",
        "stage3": "features.denseblock3",
        "stage4": "features.norm5",
        "pre_logits": "classifier:input",
        "logits": "classifier",
    },
    "inception_v3": {
        "stem": "maxpool2",
        "stage1": "Mixed_5d",
        "stage2": "Mixed_6e",
        "stage3": "Mixed_7c",
        "pre_logits": "fc:input",
        "logits": "fc",
    },
    "mobilenet_v3_large": {
        "stem": "features.0",
        "stage1": "features.1",
        "stage2": "features.3",
        "stage3": "features.6",
        "stage4": "features.12",
        "stage5": "features.16",
        "pre_logits": "classifier.3:input",
        "logits": "classifier.3",
    },
    "efficientnet_b0": {
        "stem": "features.0",
        "stage1": "features.1",
        "stage2": "features.2",
        "stage3": "features.3",
        "stage4": "features.5",
        "stage5": "features.7",
        "pre_logits": "classifier.1:input",
        "logits": "classifier.1",
    },
}
_TORCHVISION_MODELS = {
    "alexnet": "alexnet",
    "vgg16": "vgg16",
    "resnet18": "resnet",
    "resnet50": "resnet",
    "densenet121": "densenet121",
    "inception_v3": "inception_v3",
    "mobilenet_v3_large": "mobilenet_v3_large",
    "efficientnet_b0": "efficientnet_b0",
}


def _torchvision_kwargs(name: str, pretrained: bool) -> dict:
    if name == "inception_v3":
        # torchvision's pretrained Inception re-normalises its input internally (transform_input).
        return {"aux_logits": True, "transform_input": True, "init_weights": not pretrained}
    return {}


def _torchvision_architecture(name: str) -> nn.Module:
    from torchvision.models import get_model

    return get_model(name, weights=None, **_torchvision_kwargs(name, pretrained=False))


def _torchvision_enum(name: str, weights: str):
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    if weights == "DEFAULT":
        return enum.DEFAULT
    member = weights.split(".")[-1]
    if member not in enum.__members__:
        raise WeightsUnavailableError(
            f"Unknown weights {weights!r} for {name!r}: expected one of "
            f"{', '.join(enum.__members__)}, 'DEFAULT', a state-dict path, or None.{suggest(member, enum.__members__)}"
        )
    return enum[member]


def _torchvision_preprocess(enum_member) -> Preprocess:
    transforms = enum_member.transforms()
    return Preprocess(
        resize=int(transforms.resize_size[0]),
        crop=int(transforms.crop_size[0]),
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        interpolation=transforms.interpolation.value,
    )


def _hub_checkpoint(url: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _torchvision_resolve(name: str, weights: object) -> tuple[str, Preprocess]:
    from torchvision.models import get_model_weights

    local = local_weights_name(weights, name)
    if local is not None:
        return local, _torchvision_preprocess(get_model_weights(name).DEFAULT)
    member = _torchvision_enum(name, str(weights))
    return f"{type(member).__name__}.{member.name}", _torchvision_preprocess(member)


def _torchvision_load(name: str, weights: object) -> nn.Module:
    import torch
    from torchvision.models import get_model

    if weights is None:
        with seeded():
            return get_model(name, weights=None, **_torchvision_kwargs(name, pretrained=False))
    model = get_model(name, weights=None, **_torchvision_kwargs(name, pretrained=True))
    if is_weights_file(weights):
        load_weights_file(model, Path(weights), name)
        return model
    member = _torchvision_enum(name, str(weights))
    resolved = f"{type(member).__name__}.{member.name}"
    checkpoint = _hub_checkpoint(member.url)
    if not checkpoint.is_file():
        if not reachable(member.url):
            raise offline_error(resolved, name, member.url)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(member.url, str(checkpoint), progress=False)
    load_weights_file(model, checkpoint, name, source=resolved)
    return model


def _torchvision_aliases(architecture: str, _model: nn.Module) -> dict[str, str]:
    return dict(_TORCHVISION_ALIASES[architecture])


@register_family
def _torchvision_backbones() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name=name,
            family="torchvision",
            offline=False,
            description=f"torchvision {name}, ImageNet-1k (downloaded once, or weights=PATH)",
            resolve=functools.partial(_torchvision_resolve, name),
            load=functools.partial(_torchvision_load, name),
            architecture=functools.partial(_torchvision_architecture, name),
            aliases=functools.partial(_torchvision_aliases, architecture),
            input_size=299 if name == "inception_v3" else 224,
        )
        for name, architecture in _TORCHVISION_MODELS.items()
    ]
