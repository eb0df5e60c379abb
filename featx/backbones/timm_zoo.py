"""The timm family: any timm model, named ``timm:<name>`` (``timm:resnet18.a1_in1k``).

A spec is built on first use of a name, on the meta device (timm's pretrained config gives the
input size and preprocessing without weights). Pretrained weights come from timm's hub cache,
or are downloaded by users who are online; ``weights=PATH`` reads a local state-dict file.
torch, timm and huggingface_hub are imported where they are used.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from featx.backbones.registry import BackboneSpec, register_prefix
from featx.backbones.weights import is_weights_file, load_weights_file, local_weights_name, offline_error, reachable, seeded
from featx.exceptions import UnknownModelError, WeightsUnavailableError, suggest
from featx.preprocess import Preprocess

if TYPE_CHECKING:
    from torch import nn

__all__: list[str] = []


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
    local = local_weights_name(weights, name)
    if local is not None:
        return local, preprocess
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
    if weights is None or is_weights_file(weights):
        with seeded():
            model = timm.create_model(arch, pretrained=False)
        if weights is not None:
            load_weights_file(model, Path(weights), name)
        return model
    with torch.device("meta"):
        cfg = _timm_architecture(arch).pretrained_cfg
    hub_id = cfg.get("hf_hub_id")
    url = f"https://huggingface.co/{hub_id}" if hub_id else cfg.get("url") or "https://huggingface.co"
    cached = _timm_cached_file(hub_id)
    if cached is None and not reachable(url):
        raise offline_error(f"of timm model {arch!r}", name, url)
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


@register_prefix("timm", hint="name any timm model as 'timm:<name>'")
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
