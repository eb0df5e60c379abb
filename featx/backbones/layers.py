"""Layers of a backbone: names, shapes and pooled dimensions, measured once and kept on disk.

Every backbone speaks the same layer vocabulary: ``stem``, ``stage1`` … ``stageN`` (the
network's downsampling stages, early → late), ``pre_logits`` (the pooled penultimate vector,
i.e. the input of the final classifier) and ``logits``. Each alias maps to a real module of the
network; any module name (``featx layers MODEL --all`` lists them) is accepted as well.

A backbone's :class:`LayerTable` is measured by running its architecture once on the meta
device (no weights, no FLOPs) and kept as JSON in the cache folder, so that listing or
resolving layers later needs neither torch nor the model zoo.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from featx import __version__
from featx.backbones.registry import find_registered, get_spec
from featx.backbones.taps import Tap
from featx.exceptions import UnknownLayerError, suggest
from featx.paths import atomic_write, default_cache_dir, split_names
from featx.pooling import POOLINGS, pooled_dim

__all__ = ["LayerInfo", "LayerTable", "layer_shape", "layer_table", "list_layers", "resolve_layers"]


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a backbone: alias, node, per-image output shape and pooled dimensions.

    Examples
    --------
    >>> layer = list_layers("featx_tiny_cnn")[1]
    >>> layer.name, layer.channels, layer.spatial, layer.dims["avg"]
    ('stage1', 16, (8, 8), 16)
    """

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
class LayerTable:
    """What one forward pass of a backbone's architecture shows: its layers, in call order.

    Attributes
    ----------
    aliases : dict of str to str
        Alias (``stem``, ``stage1`` …, ``pre_logits``, ``logits``) -> tap label.
    order : tuple of str
        Module names in call order.
    shapes : dict of str to tuple of int
        Tap label -> per-image output shape at the backbone's input size.
    calls : dict of str to int
        Module name -> number of calls in one forward pass.

    Examples
    --------
    >>> table = layer_table("featx_tiny_cnn")
    >>> table.aliases["pre_logits"], table.shapes["classifier:input"], table.calls["stage2"]
    ('classifier:input', (32,), 1)
    """

    aliases: dict[str, str]
    order: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    calls: dict[str, int]


@functools.lru_cache(maxsize=32)
def layer_table(name: str) -> LayerTable:
    """The layer table of a backbone: kept in the cache folder, measured once by :func:`_measure`.

    The file is keyed by the backbone, its input size and the versions of featx, torch,
    torchvision and timm, so a table is reused only for the network that produced it; reading
    it needs neither torch nor timm. An unreadable file is measured again and rewritten.
    Tables are also kept in memory (``layer_table.cache_clear()`` forgets them).

    Examples
    --------
    >>> layer_table("featx_tiny_cnn").order[:3]
    ('stem.0', 'stem.1', 'stem.2')
    """
    path = _table_file(name)
    if path is not None and path.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # unreadable: measured again below
            data = json.loads(path.read_text())
            return LayerTable(
                aliases=dict(data["aliases"]),
                order=tuple(data["order"]),
                shapes={label: tuple(shape) for label, shape in data["shapes"].items()},
                calls=dict(data["calls"]),
            )
    table = _measure(name)
    if path is not None:
        _write_table(path, table)
    return table


def _table_file(name: str) -> Path | None:
    """Where the layer table of a registered backbone is kept (``None`` for timm's: its spec needs timm)."""
    spec = find_registered(name)
    if spec is None:
        return None
    import importlib.metadata

    versions = {"featx": __version__, "name": name, "input_size": spec.input_size}
    for package in ("torch", "torchvision", "timm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir() / "layers" / f"{name}-{digest}.json"


def _write_table(path: Path, table: LayerTable) -> None:
    data = {"aliases": table.aliases, "order": list(table.order), "calls": table.calls,
            "shapes": {label: list(shape) for label, shape in table.shapes.items()}}
    with contextlib.suppress(OSError):  # a read-only cache folder only means measuring again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data))


def _measure(name: str) -> LayerTable:
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
    return LayerTable(aliases=aliases, order=tuple(order), shapes=shapes, calls=calls)


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
    table = layer_table(backbone)
    layers = [_layer_info(alias, label, table.shapes[label]) for alias, label in table.aliases.items()]
    if all_nodes:
        layers += [_layer_info(None, node, table.shapes[node]) for node in table.order if node in table.shapes]
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
    table = layer_table(backbone)
    if isinstance(layers, str):
        layers = split_names(layers)
    resolved = []
    for name in layers:
        if name == "all":
            resolved += [(alias, Tap.parse(label)) for alias, label in table.aliases.items() if alias != "logits"]
            continue
        if name in table.aliases:
            resolved.append((name, Tap.parse(table.aliases[name])))
            continue
        tap = Tap.parse(name)
        if tap.port == "output" and tap.node in table.calls:
            if table.calls[tap.node] != 1:
                raise UnknownLayerError(
                    f"Layer {name!r} of {backbone} runs {table.calls[tap.node]} times per forward pass, so its "
                    f"output is ambiguous; choose its parent module. Run 'featx layers {backbone} --all'."
                )
            if tap.node not in table.shapes:
                raise UnknownLayerError(f"Layer {name!r} of {backbone} does not output a tensor; choose another.")
            resolved.append((name, tap))
            continue
        choices = [*table.aliases, *table.order]
        raise UnknownLayerError(
            f"Unknown layer {name!r} for {backbone}.{suggest(name, choices)} Run 'featx layers {backbone}'."
        )
    return list(dict.fromkeys(resolved))


def layer_shape(backbone: str, tap: Tap) -> tuple[int, ...]:
    """Per-image output shape of ``tap`` at the backbone's input size.

    Examples
    --------
    >>> layer_shape("featx_tiny_cnn", Tap("stage2"))
    (32, 4, 4)
    """
    return layer_table(backbone).shapes[tap.label]
