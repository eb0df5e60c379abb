"""The backbone registry: every model family registers its backbones here.

A model family is one module of :mod:`featx.backbones` that registers itself when it is
imported, with one of two decorators (the way timm's ``@register_model`` works):

* :func:`register_family` over a function that returns the family's :class:`BackboneSpec`
  objects, for families with a fixed list of names (``efficientnet_lite0``, ``resnet50``, …);
* :func:`register_prefix` over a function that builds the spec of ``<prefix>:<model>`` on first
  use, for families that can name any model of a zoo (``timm:<name>``).

``featx/backbones/__init__.py`` imports every family module once, in the order
:func:`list_backbones` lists them. Adding a family is one new module there. This module imports
neither torch nor a model zoo: a spec says *how* to build a network, it builds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from featx.exceptions import UnknownModelError, suggest
from featx.preprocess import Preprocess

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BackboneSpec", "find_registered", "get_spec", "list_backbones", "register_family", "register_prefix"]


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: how to build it and how its layers are named.

    Attributes
    ----------
    name : str
        The name users give (``efficientnet_lite0``, ``timm:resnet18``).
    family : str
        The model family (``efficientnet-lite``, ``torchvision``, ``timm``, ``test``).
    offline : bool
        Whether the default weights work without network.
    description : str
        One line for ``featx models``.
    resolve : callable
        ``resolve(weights) -> (weights name, Preprocess)``: the recorded weights name (never
        ``"DEFAULT"``) and the preprocessing, without reading the weights.
    load : callable
        ``load(weights) -> nn.Module``: the network with those weights.
    architecture : callable
        ``architecture() -> nn.Module``: the network without weights (built on the meta device
        to measure layer shapes).
    aliases : callable
        ``aliases(module) -> dict``: layer alias (``stem``, ``stage1`` …) -> tap label.
    input_size : int, default=224
        Height and width of the input the layer shapes are measured at.

    Examples
    --------
    >>> spec = get_spec("featx_tiny_cnn")
    >>> spec.family, spec.offline, spec.input_size
    ('test', True, 32)
    """

    name: str
    family: str
    offline: bool
    description: str
    resolve: Callable[[object], tuple[str, Preprocess]] = field(repr=False)
    load: Callable[[object], nn.Module] = field(repr=False)
    architecture: Callable[[], nn.Module] = field(repr=False)
    aliases: Callable[[nn.Module], dict[str, str]] = field(repr=False)
    input_size: int = 224


@dataclass(frozen=True)
class _Prefix:
    lookup: Callable[[str], BackboneSpec]
    hint: str


_SPECS: dict[str, BackboneSpec] = {}
_PREFIXES: dict[str, _Prefix] = {}

SpecFactory = TypeVar("SpecFactory", bound=Callable[[], Iterable[BackboneSpec]])
SpecLookup = TypeVar("SpecLookup", bound=Callable[[str], BackboneSpec])


def register_family(factory: SpecFactory) -> SpecFactory:
    """Register the backbones a family's function returns; use it as a decorator.

    ``factory`` is called once, when its module is imported; it must not import torch or the
    model zoo (the specs it returns do that when they are used).

    Parameters
    ----------
    factory : callable
        Takes no argument and returns the family's :class:`BackboneSpec` objects.

    Returns
    -------
    callable
        ``factory`` itself.

    Raises
    ------
    ValueError
        If a name is registered already; then none of the family's names is registered.

    Examples
    --------
    >>> register_family(lambda: [get_spec("featx_tiny_cnn")])
    Traceback (most recent call last):
    ...
    ValueError: Backbone 'featx_tiny_cnn' is registered already (family 'test'); choose another name.
    """
    specs = list(factory())
    for spec in specs:
        if spec.name in _SPECS:
            raise ValueError(
                f"Backbone {spec.name!r} is registered already (family {_SPECS[spec.name].family!r}); "
                f"choose another name."
            )
    _SPECS.update((spec.name, spec) for spec in specs)
    return factory


def register_prefix(prefix: str, *, hint: str) -> Callable[[SpecLookup], SpecLookup]:
    """Register a family whose backbones are named ``<prefix>:<model>``; use it as a decorator.

    The decorated function takes the part after the colon and returns its :class:`BackboneSpec`
    (raising :class:`~featx.exceptions.UnknownModelError` for a model the zoo does not have). It
    runs when such a name is first asked for, so the zoo is imported only then.

    Parameters
    ----------
    prefix : str
        The part before the colon, e.g. ``"timm"``.
    hint : str
        How to name such a model, added to the error for an unknown backbone
        (``"name any timm model as 'timm:<name>'"``).

    Returns
    -------
    callable
        The decorator; it returns the decorated function itself.

    Raises
    ------
    ValueError
        If the prefix is registered already.

    Examples
    --------
    >>> register_prefix("timm", hint="name it as 'timm:<name>'")(get_spec)
    Traceback (most recent call last):
    ...
    ValueError: Backbone prefix 'timm:' is registered already; choose another prefix.
    """

    def decorator(lookup: SpecLookup) -> SpecLookup:
        if prefix in _PREFIXES:
            raise ValueError(f"Backbone prefix '{prefix}:' is registered already; choose another prefix.")
        _PREFIXES[prefix] = _Prefix(lookup, hint)
        return lookup

    return decorator


def find_registered(name: str) -> BackboneSpec | None:
    """The spec registered under exactly ``name``, or ``None``.

    Prefixed names (``timm:<name>``) are not looked up: building their spec needs their zoo.

    Examples
    --------
    >>> find_registered("featx_tiny_cnn").name, find_registered("timm:resnet18")
    ('featx_tiny_cnn', None)
    """
    return _SPECS.get(name)


def get_spec(name: str) -> BackboneSpec:
    """Return the spec of a registered backbone or of a prefixed name such as ``timm:<name>``.

    Raises
    ------
    UnknownModelError
        For a name that is not registered, with the closest names and how to list them.

    Examples
    --------
    >>> get_spec("featx_tiny_cnn").description
    'tiny seeded CNN for tests (32 px, random weights)'
    >>> get_spec("featx_tiny_cnm")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    featx.exceptions.UnknownModelError: Unknown backbone 'featx_tiny_cnm'. Did you mean 'featx_tiny_cnn'? ...
    """
    if name in _SPECS:
        return _SPECS[name]
    if isinstance(name, str):
        prefix, colon, model = name.partition(":")
        if colon and prefix in _PREFIXES:
            return _PREFIXES[prefix].lookup(model)
    hints = "".join(f", or {entry.hint}" for entry in _PREFIXES.values())
    raise UnknownModelError(
        f"Unknown backbone {name!r}.{suggest(name, _SPECS)} Run 'featx models' to list the backbones{hints}."
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
