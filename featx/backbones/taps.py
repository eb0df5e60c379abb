"""Taps: where a layer is read, and one forward pass that reads several of them.

torch is imported where it is used: a :class:`Tap` is a name, known without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from featx.exceptions import FeatxError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Tap", "run_taps"]


@dataclass(frozen=True)
class Tap:
    """Where a layer is read: the output (or, for ``pre_logits``, the input) of a module.

    Examples
    --------
    >>> tap = Tap.parse("classifier:input")
    >>> tap, tap.label
    (Tap(node='classifier', port='input'), 'classifier:input')
    >>> Tap.parse("stage2").label
    'stage2'
    """

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


class _StopForward(Exception):
    """Raised by a hook once every requested tap is captured: the rest of the network is skipped."""


def run_taps(module: nn.Module, x: torch.Tensor, taps: Sequence[Tap]) -> dict[Tap, torch.Tensor]:
    """Run ``module`` on ``x`` and return the tensors seen at ``taps``, from one forward pass.

    The forward pass stops as soon as the last requested tap has been seen, so asking for an
    early layer does not pay for the rest of the network.

    Examples
    --------
    >>> import torch
    >>> from featx.backbones import load_backbone
    >>> module = load_backbone("featx_tiny_cnn").module
    >>> out = run_taps(module, torch.zeros(2, 3, 32, 32), [Tap("stage1"), Tap("classifier", "input")])
    >>> [tuple(out[tap].shape) for tap in out]
    [(2, 16, 8, 8), (2, 32)]
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
