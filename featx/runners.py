"""Faster ways to run a backbone's forward pass to its taps, for THE extraction loop.

:func:`featx.backbones.run_taps` is the plain way: eager PyTorch, stopping as soon as the last tap
has been seen. The runners here trade a one-off preparation for speed, and both return the
tensors at the taps for a batch of a *fixed* size (the loop pads a short last batch, which
changes no real row: the networks are in eval mode, where every row is computed on its own):

- :func:`compiled_taps`: ``torch.compile`` (CPU or CUDA);
- :func:`onnx_taps`: the network exported to ONNX and run by ONNX Runtime on the CPU
  (``pip install "featx[onnx]"``).

Both give the eager features up to float rounding (measured on ``efficientnet_lite0``: about
1e-6 relative), so neither is part of a feature store's configuration, like the batch size.
The taps are persistent forward hooks that record their tensors while the wrapper runs (the
eager path stops the pass by raising, which neither compiled nor exported code can); the whole
network then runs, even when the taps are early.
"""

from __future__ import annotations

import importlib.util
import io
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

from featx.backbones import Tap
from featx.exceptions import FeatxError
from featx.options import RUNTIMES

if TYPE_CHECKING:
    import torch

__all__ = ["RUNTIMES", "compiled_taps", "onnx_taps"]


# Prepared runners, per module (weakly: they go with the backbone) and (taps, device or batch shape).
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tap_module(module, taps: Sequence[Tap]):
    """``module`` wrapped to return the tensors at ``taps`` as a tuple, through recording hooks."""
    from torch import nn

    class TapModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = module
            self.seen: dict = {}
            self.recording = False

        def forward(self, x):
            self.seen.clear()
            self.recording = True  # the hooks stay on the module: eager runs elsewhere must not feed them
            self.net(x)
            self.recording = False
            outputs = tuple(self.seen[i] for i in range(len(taps)))
            self.seen.clear()
            return outputs

    wrapper = TapModule()

    def make_hook(i: int, port: str):
        def hook(_module, args, output=None):
            if wrapper.recording:
                wrapper.seen[i] = args[0] if port == "input" else output

        return hook

    for i, tap in enumerate(taps):
        sub = module.get_submodule(tap.node)
        if tap.port == "input":
            sub.register_forward_pre_hook(make_hook(i, "input"))
        else:
            sub.register_forward_hook(make_hook(i, "output"))
    return wrapper.eval()


def compiled_taps(module, taps: Sequence[Tap], device: torch.device):
    """``module`` under ``torch.compile``, returning the tensors at ``taps`` as a tuple.

    Compiled once per module, layer set and device in a process, with static shapes. Compiling
    costs seconds to minutes the first time (Inductor keeps a cache on disk for later processes)
    and pays on large extractions; ``featx bench --compile`` measures both.
    """
    import torch

    if device.type not in ("cpu", "cuda"):
        raise FeatxError(f"compile=True runs on the CPU or CUDA, not on {device.type!r}; leave it off there.")
    key = ("compile", tuple(taps), str(device))
    prepared = _PREPARED.setdefault(module, {})
    if key not in prepared:
        prepared[key] = torch.compile(_tap_module(module, taps), dynamic=False)
    return prepared[key]


def onnx_taps(module, taps: Sequence[Tap], example: torch.Tensor, *, threads: int | None = None):
    """``module`` exported to ONNX and run by ONNX Runtime on the CPU: a callable from a batch to the taps' tensors.

    The export (``torch.onnx.export(..., dynamo=True)``, a few seconds) is done once per module,
    layer set and input shape in a process; batches must have ``example``'s shape. ONNX Runtime
    uses ``threads`` intra-op threads (default: torch's thread count).

    Raises
    ------
    FeatxError
        When ``onnxruntime`` (or the exporter's ``onnx``/``onnxscript``) is not installed, naming
        the extra to install.

    Examples
    --------
    >>> import torch
    >>> from featx.backbones import load_backbone, resolve_layers, run_taps
    >>> backbone = load_backbone("featx_tiny_cnn")
    >>> taps = [tap for _, tap in resolve_layers(backbone.name, ["stage1", "pre_logits"])]
    >>> x = torch.rand(4, 3, 32, 32)
    >>> run = onnx_taps(backbone.module, taps, x)  # doctest: +SKIP
    >>> [tuple(t.shape) for t in run(x)]  # doctest: +SKIP
    [(4, 16, 8, 8), (4, 32)]
    """
    import torch

    missing = [name for name in ("onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:  # onnxscript: torch.onnx's exporter needs it
        raise FeatxError(
            f"runtime='onnxruntime' needs ONNX Runtime and the ONNX exporter ({', '.join(missing)} missing): "
            f'pip install "featx[onnx]", or use the default runtime="torch".'
        )
    import onnxruntime
    key = ("onnx", tuple(taps), tuple(example.shape), threads)
    prepared = _PREPARED.setdefault(module, {})
    if key not in prepared:
        buffer = io.BytesIO()
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                program = torch.onnx.export(_tap_module(module, taps), (example.contiguous(),), dynamo=True,
                                            input_names=["x"], verbose=False, optimize=True)
            program.save(buffer)
        finally:
            module.train(was_training)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = session.run(None, {"x": x.detach().float().contiguous().numpy()})
            return tuple(torch.from_numpy(output) for output in outputs)

        prepared[key] = run
    return prepared[key]
