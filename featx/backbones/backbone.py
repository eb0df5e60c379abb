"""A loaded backbone: a frozen network with its preprocessing, and :func:`load_backbone` that builds one.

Nothing is downloaded or built before it is needed: the weights name and the preprocessing are
resolved by :func:`load_backbone`, the network is read on first use (``lazy=True``) or at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from featx.backbones.layers import resolve_layers
from featx.backbones.registry import BackboneSpec, get_spec
from featx.backbones.taps import Tap
from featx.preprocess import Preprocess

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Backbone", "load_backbone"]


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


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

    Examples
    --------
    >>> import pickle
    >>> backbone = load_backbone("featx_tiny_cnn", lazy=True)
    >>> backbone, backbone.loaded
    (Backbone('featx_tiny_cnn', weights='random-init:seed0'), False)
    >>> pickle.loads(pickle.dumps(backbone)).config()["weights"]
    'random-init:seed0'
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
