"""Faster ways to run a backbone's forward pass to its taps, for THE extraction loop.

:func:`featx.backbones.run_taps` is the plain way: eager PyTorch, stopping as soon as the last tap
has been seen. The runners here trade a one-off preparation for speed, and both return the
tensors at the taps for a batch of a *fixed* size (the loop pads a short last batch, which
changes no real row: the networks are in eval mode, where every row is computed on its own):

- :func:`compiled_taps`: ``torch.compile`` (CPU or CUDA);
- :func:`onnx_taps`: the network exported to ONNX and run by ONNX Runtime on the CPU
  (``pip install "featx[onnx]"``);
- :func:`openvino_taps`: the same export run by OpenVINO on the CPU (``pip install openvino``).

Each gives the eager features within the tolerance of the precision (:mod:`featx.runtimes`:
at fp32 float rounding, measured on ``efficientnet_lite0`` about 2e-6 relative), so none is
part of a feature store's configuration, like the batch size. Which one runs by default is
chosen and remembered by :mod:`featx.runtimes`.
The taps are persistent forward hooks that record their tensors while the wrapper runs (the
eager path stops the pass by raising, which neither compiled nor exported code can); the whole
network then runs, even when the taps are early.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from featx.backbones import Tap
from featx.exceptions import FeatxError, FeatxWarning
from featx.options import RUNTIMES
from featx.paths import atomic_write

if TYPE_CHECKING:
    import torch

__all__ = ["RUNTIMES", "compiled_taps", "onnx_model", "onnx_taps", "openvino_taps", "state_digest"]


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


def state_digest(module) -> str:
    """A short digest of ``module``'s parameters and buffers: what an exported file on disk is checked against."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def onnx_model(module, taps: Sequence[Tap], example: torch.Tensor, *, onnx_file: str | os.PathLike | None = None) -> bytes:
    """``module`` exported to ONNX (``torch.onnx.export(..., dynamo=True)``), returning the taps' tensors.

    With ``onnx_file``, the export is kept on disk as ``<onnx_file stem>-<state digest>.onnx``
    (written atomically) and read from there by later processes: exporting costs seconds to
    tens of seconds, reading milliseconds. The digest of the module's weights in the name keeps
    a file from serving other weights.

    Raises
    ------
    FeatxError
        When the exporter's ``onnx``/``onnxscript`` is not installed, naming the extra to install.
    """
    import torch

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:  # torch.onnx's exporter needs them
        raise FeatxError(f"exporting to ONNX needs {', '.join(missing)}: pip install \"featx[onnx]\", or use "
                         f"runtime=\"torch\".")
    path = None
    if onnx_file is not None:
        onnx_file = Path(onnx_file)
        path = onnx_file.with_name(f"{onnx_file.stem}-{state_digest(module)}.onnx")
        if path.exists():
            return path.read_bytes()
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
    data = buffer.getvalue()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        except OSError as exc:
            warnings.warn(f"cannot keep the ONNX export in {str(path)!r} ({exc.strerror or exc}): the next process "
                          f"exports again.", FeatxWarning, stacklevel=2)
    return data


def onnx_taps(module, taps: Sequence[Tap], example: torch.Tensor, *, threads: int | None = None,
              onnx_file: str | os.PathLike | None = None):
    """``module`` exported to ONNX and run by ONNX Runtime on the CPU: a callable from a batch to the taps' tensors.

    The export (:func:`onnx_model`, kept on disk with ``onnx_file``) is done once per module,
    layer set and input shape in a process; batches must have ``example``'s shape. ONNX Runtime
    uses ``threads`` intra-op threads (default: torch's thread count) and computes in fp32
    whatever the precision (more exact than bf16 asks).

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
            f'pip install "featx[onnx]", or use runtime="torch".'
        )
    import onnxruntime

    key = ("onnx", tuple(taps), tuple(example.shape), threads)
    prepared = _PREPARED.setdefault(module, {})
    if key not in prepared:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        # No spinning between calls: the decoding threads need the cores then (as OMP_WAIT_POLICY=PASSIVE
        # for torch, featx.threads); measured 57.0 against 55.4 and 52.4 against 50.8 images/s end to end.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(onnx_model(module, taps, example, onnx_file=onnx_file), options,
                                               providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = session.run(None, {"x": x.detach().float().contiguous().numpy()})
            return tuple(torch.from_numpy(output) for output in outputs)

        prepared[key] = run
    return prepared[key]


def openvino_taps(module, taps: Sequence[Tap], example: torch.Tensor, *, threads: int | None = None,
                  onnx_file: str | os.PathLike | None = None):
    """``module`` exported to ONNX and run by OpenVINO on the CPU: a callable from a batch to the taps' tensors.

    The same export as :func:`onnx_taps` (kept on disk with ``onnx_file``), compiled by
    OpenVINO's CPU plugin in f32 whatever the precision, like ONNX Runtime, with ``threads``
    threads (default: torch's). Not OpenVINO's bf16 inference: on the digits layer table it
    moved stage1's accuracy by 0.021 against fp32 (eager bf16: 0.003; the bound is 0.01), for
    1.18x the speed of ONNX Runtime's fp32 on an AVX512-BF16 CPU and 1.02x on the CI machine.

    Raises
    ------
    FeatxError
        When ``openvino`` (or the exporter's ``onnx``/``onnxscript``) is not installed.
    """
    import torch

    if importlib.util.find_spec("openvino") is None:
        raise FeatxError('runtime="openvino" needs OpenVINO: pip install "featx[openvino]", or use runtime="torch".')
    import openvino

    key = ("openvino", tuple(taps), tuple(example.shape), threads)
    prepared = _PREPARED.setdefault(module, {})
    if key not in prepared:
        core = openvino.Core()
        model = core.read_model(onnx_model(module, taps, example, onnx_file=onnx_file), b"")
        compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        })
        request = compiled.create_infer_request()
        outputs = compiled.outputs

        def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            result = request.infer({0: x.detach().float().contiguous().numpy()})
            return tuple(torch.from_numpy(result[output].copy()) for output in outputs)  # the request reuses its memory

        prepared[key] = run
    return prepared[key]
