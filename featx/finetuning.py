"""Partial fine-tuning: train the top blocks of a backbone on cached lower-layer maps.

The classic transfer-learning table says: with enough data unlike ImageNet, keep the early
layers frozen and fine-tune the later ones with a small learning rate. featx makes that cheap.
The frozen lower part runs once per image through THE extraction loop, and its output map at
the ``from`` layer is kept in the feature store (pooling ``"map"``: the unpooled (C, H, W) map,
flattened, stored as float16). Only the *tail* (the backbone's modules after that layer, up to
its pooled penultimate vector) plus a new linear head are trained, on those cached maps: later
epochs, later runs and prediction on images seen before never run the frozen part again.

:class:`TailClassifier` is the trainable part as a scikit-learn classifier over flattened maps;
:func:`finetune` extracts the maps into the store, fits a :class:`TailClassifier` and returns an
ordinary :class:`featx.models.FeatxModel` (features = the map at the ``from`` layer, head = the
trained tail), which :func:`featx.models.save_model`, ``featx predict`` and ``featx evaluate``
use exactly like a head-only model.

Which backbones can be split
    The tail is the sequence of modules that follow the ``from`` layer in the module tree
    (later siblings inside ``nn.Sequential`` containers, then later top-level children) up to
    the classifier, with a global average pool and flatten where a vector is needed. That is how
    timm's EfficientNet/EfficientNet-Lite/MobileNet, torchvision's ResNet, MobileNetV3 and
    EfficientNet and ``featx_tiny_cnn`` compute. Every split is checked numerically when it is
    built: the tail applied to the tapped map must reproduce the backbone's ``pre_logits``
    vector; a backbone whose forward does something else (DenseNet's final ReLU, Inception's
    input transform) is refused with :class:`FinetuneError`.

BatchNorm in the tail
    ``batchnorm="auto"`` (default) is ``"frozen"`` for pretrained weights and ``"train"`` for a
    random-init network (whose running statistics describe nothing). ``"frozen"`` keeps
    ImageNet's running statistics: the BatchNorm layers
    stay in eval mode while their scale and shift are trained. ``"train"`` normalises with batch
    statistics while training and recomputes the running statistics on up to 1,024 training
    maps after every epoch (see :meth:`TailClassifier._recompute_batchnorm`), which then serve
    at prediction. Measured (efficientnet_lite0 from stage3, batches of 64 or 32, scored on the
    data set's own validation folder, docs/benchmarks.md): clothing_small at 100 images per
    class, 3 epochs, 0.842 frozen against 0.757 train; at 30 per class, 5 epochs, 0.815 against
    0.598; neu_steel at 50 per class, 5 epochs, 1.000 against 0.981. On Fashion-MNIST (from
    stage5, 1,200 images, lr 1e-3, 4 epochs) ``train`` was ahead, 0.870 against 0.857: data
    whose statistics are far from ImageNet's can gain from its own, given enough images.

Augmentation
    ``flip=True`` mirrors half the cached maps of each batch along their width. For a network of
    convolutions, pointwise layers and BatchNorm this equals the map of the mirrored image,
    except at the borders where padding is asymmetric (TF-"same" padding of strided
    convolutions in the EfficientNet-Lite ports pads right/bottom only), so it is a close
    approximation, not exact.

Determinism
    On the CPU, the same ``random_state`` (and the same number of threads) gives identical
    weights: the initialisation, shuffling, flips and dropout draw from generators seeded inside
    :func:`torch.random.fork_rng`, so the caller's global RNG state is left untouched. On CUDA the
    same code runs under fp16 autocast with a gradient scaler; cuDNN kernels are not bit-exact
    from run to run. (The CUDA path has not been run on a GPU by the tests, which run on CPUs.)
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_is_fitted
from torch import nn

from featx import __version__
from featx.backbones import RANDOM_INIT, Backbone, Tap, layer_shape, layer_table, load_backbone, resolve_layers, run_taps
from featx.devices import autocast, device_type, resolve_device, resolve_precision
from featx.exceptions import FinetuneError
from featx.extraction import extract, kept_labels
from featx.heads import fold_means, outer_splits, score_predictions
from featx.images import ImageSource, open_source
from featx.models import FeatxModel, training_keys
from featx.options import CACHED, PRECISIONS, ExtractOptions, FinetuneOptions
from featx.transformers import CNNFeatures

__all__ = ["FinetuneError", "SUPPORTED", "TailClassifier", "build_tail", "cross_validate_finetune", "finetune",
           "extract_maps", "memory_format", "read_maps", "split_tap", "train_seconds_per_image"]

SUPPORTED = (
    "efficientnet_lite0/1/2, featx_tiny_cnn, resnet18/50, mobilenet_v3_large, efficientnet_b0, "
    "and timm EfficientNet/MobileNet-style models"
)
_TRAINING = FinetuneOptions()  # the training defaults, spelled once in featx.options
_DEVICE = ExtractOptions().device
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
BATCHNORM = ("auto", "frozen", "train")
_READ_BLOCK = 512
_PREDICT_BATCH = 256
_BN_SAMPLES = 1024


# --------------------------------------------------------------------------- the tail


class _Tail(nn.Module):
    """The backbone's modules after the tap, applied in order, ending in a pooled vector.

    A 4-D tensor is average-pooled and flattened before an ``nn.Linear`` and at the end.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.body = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.body:
            if isinstance(module, nn.Linear) and x.ndim == 4:
                x = x.mean(dim=(2, 3))
            x = module(x)
        if x.ndim == 4:
            x = x.mean(dim=(2, 3))
        return x.flatten(1)


class _Net(nn.Module):
    """Tail, dropout and the new linear head."""

    def __init__(self, tail: _Tail, n_features: int, n_classes: int, dropout: float):
        super().__init__()
        self.tail = tail
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(n_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.tail(x)))


def split_tap(backbone: str, layer: str) -> tuple[Tap, Tap]:
    """(tap of ``layer``, tap of pre_logits), refusing layers after which nothing can be trained."""
    (name, tap), = resolve_layers(backbone, [layer])
    aliases = layer_table(backbone).aliases
    if "pre_logits" not in aliases:
        raise FinetuneError(f"{backbone} names no 'pre_logits' layer, so featx cannot tell where its head starts; "
                            f"fine-tuning supports {SUPPORTED}.")
    pre_logits = Tap.parse(aliases["pre_logits"])
    if tap.port != "output" or name in ("pre_logits", "logits") or tap.node == pre_logits.node:
        raise FinetuneError(
            f"Fine-tuning from {layer!r} trains only a linear head: use 'featx fit DATA --layers {layer}' for "
            f"that, or fine-tune from a convolutional stage (e.g. --from stage4; see 'featx layers {backbone}')."
        )
    if len(layer_shape(backbone, tap)) != 3:
        raise FinetuneError(f"Layer {layer!r} of {backbone} gives a vector, not a (C, H, W) map; fine-tune from a "
                            f"convolutional stage (see 'featx layers {backbone}').")
    return tap, pre_logits


def _modules_after(root: nn.Module, node: str, stop: str, backbone: str) -> list[str]:
    """Names of the modules that run after ``node`` and before ``stop``, in order."""
    names: list[str] = []
    while node:
        parent_name, _, child = node.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        if parent_name and not isinstance(parent, nn.Sequential):
            raise FinetuneError(
                f"{backbone} cannot be split after {node!r}: its parent {parent_name!r} is a "
                f"{type(parent).__name__}, not a sequence of modules; choose a stage alias (featx layers "
                f"{backbone}). Fine-tuning supports {SUPPORTED}."
            )
        children = list(parent._modules)
        names += [f"{parent_name}.{c}" if parent_name else c for c in children[children.index(child) + 1:]]
        node = parent_name

    def cut(candidates: list[str]) -> tuple[list[str], bool]:
        kept: list[str] = []
        for name in candidates:
            if name == stop:
                return kept, True
            if stop.startswith(name + "."):
                inner = root.get_submodule(name)
                if not isinstance(inner, nn.Sequential):
                    raise FinetuneError(f"{backbone}: cannot reach its classifier {stop!r} inside {name!r}; "
                                        f"fine-tuning supports {SUPPORTED}.")
                more, found = cut([f"{name}.{c}" for c in inner._modules])
                return kept + more, found
            kept.append(name)
        return kept, False

    kept, found = cut(names)
    if not found:
        raise FinetuneError(f"{backbone}: its classifier {stop!r} does not follow the layer; fine-tuning supports "
                            f"{SUPPORTED}.")
    return kept


def build_tail(backbone: Backbone, layer: str, *, check: bool = True) -> tuple[_Tail, int]:
    """Copy the part of ``backbone`` after ``layer`` (up to its pooled penultimate vector) as a trainable module.

    Parameters
    ----------
    backbone : Backbone
        Its weights are copied; the backbone itself is not changed.
    layer : str
        A stage alias (``stage3``, ``stage4`` …) or raw node name with a (C, H, W) output.
    check : bool, default=True
        Verify on a random input that the tail applied to the map at ``layer`` reproduces the
        backbone's ``pre_logits`` vector.

    Returns
    -------
    tail : torch.nn.Module
        In eval mode, parameters trainable; maps (n, C, H, W) to (n, n_features).
    n_features : int

    Raises
    ------
    FinetuneError
        For ``pre_logits``/``logits`` (that is a head: ``featx fit``), for the last stage of a
        network whose tail has no weights, and for networks that cannot be split there.

    Examples
    --------
    >>> tail, n_features = build_tail(load_backbone("featx_tiny_cnn"), "stage1")
    >>> tail(torch.zeros(2, 16, 8, 8)).shape, n_features
    (torch.Size([2, 32]), 32)
    """
    tap, pre_logits = split_tap(backbone.name, layer)
    names = _modules_after(backbone.module, tap.node, pre_logits.node, backbone.name)
    tail = _Tail([copy.deepcopy(backbone.module.get_submodule(name)) for name in names])
    tail.float().to(memory_format=torch.contiguous_format)
    if not any(True for _ in tail.parameters()):
        raise FinetuneError(
            f"Nothing to fine-tune after {layer!r} of {backbone.name}: only parameter-free layers follow it. Use "
            f"'featx fit DATA --layers {layer}' for a head, or fine-tune from an earlier stage."
        )
    tail.requires_grad_(True).eval()
    shape = layer_shape(backbone.name, tap)
    n_features = int(layer_shape(backbone.name, pre_logits)[0])
    if check:
        _check_tail(backbone, tail, tap, pre_logits, shape)
    return tail, n_features


def _check_tail(backbone: Backbone, tail: _Tail, tap: Tap, pre_logits: Tap, shape) -> None:
    size = backbone.spec.input_size
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, size, size, generator=generator)
    module = backbone.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            outputs = run_taps(module, backbone.preprocess.normalize((x * 255).to(torch.uint8)).float(),
                               [tap, pre_logits])
            expected = outputs[pre_logits].float().flatten(1)
            got = tail(outputs[tap].float().contiguous())
    finally:
        module.train(was_training)
    if tuple(outputs[tap].shape[1:]) != tuple(shape) or got.shape != expected.shape or not torch.allclose(
        got, expected, rtol=1e-3, atol=1e-4 * max(1.0, float(expected.abs().max()))
    ):
        raise FinetuneError(
            f"{backbone.name} cannot be split after {tap.label!r}: running its later modules in order does not "
            f"reproduce its forward pass (its forward does more than chain them). Fine-tuning supports {SUPPORTED}."
        )


def train_seconds_per_image(backbone: str, layer: str, *, weights: object = "DEFAULT", device: str = "auto",
                            batch_size: int = 64, steps: int = 3, precision: str = "auto") -> float:
    """Seconds one training step of the tail after ``layer`` takes per map, timed on random maps.

    A forward pass, a backward pass and an AdamW update of the tail and a 10-class head, on
    ``batch_size`` random maps of the layer's shape, in the precision and memory format
    :class:`TailClassifier` trains in (``precision`` as its ``train_precision``), after one
    untimed step; the fastest of
    ``steps`` timed steps, divided by ``batch_size``. :func:`featx.auto_fit` multiplies it by
    images and epochs to estimate what a fine-tuning candidate costs on this machine. The
    caller's random state is left untouched.

    Examples
    --------
    >>> train_seconds_per_image("featx_tiny_cnn", "stage1", device="cpu", batch_size=8) > 0
    True
    """
    loaded = load_backbone(backbone, weights=weights)
    tap, _ = split_tap(loaded.name, layer)
    shape = tuple(int(v) for v in layer_shape(loaded.name, tap))
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    layout = memory_format(device, precision)
    devices = [device.index or 0] if device.type == "cuda" else []
    timings = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        tail, n_features = build_tail(loaded, layer, check=False)
        net = _prepare(_Net(tail, n_features, 10, 0.2), device, precision).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        x = torch.randn(batch_size, *shape, device=device).to(dtype=_DTYPES[precision], memory_format=layout)
        target = torch.randint(0, 10, (batch_size,), device=device)
        for step in range(steps + 1):
            start = time.perf_counter()
            _train_step(net, optimizer, nn.functional.cross_entropy, x, target, device, precision, scaler)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step:
                timings.append(time.perf_counter() - start)
    return min(timings) / batch_size


# --------------------------------------------------------------------------- the classifier


def _lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    if schedule == "step":  # x0.1 at half and at three quarters of the steps
        return 0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4))
    return 1.0


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def memory_format(device: torch.device, precision: str) -> torch.memory_format:
    """The memory format the tail trains in on ``device`` at ``precision``.

    ``channels_last`` on CPUs and CUDA (oneDNN's and cuDNN's convolutions run on NHWC without
    reordering every tensor); ``contiguous_format`` elsewhere (MPS).

    Examples
    --------
    >>> memory_format(torch.device("cpu"), "bf16")
    torch.channels_last
    """
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


class _Float32WhileTraining(nn.Module):
    """A depthwise convolution that runs in float32 inside autocast while gradients are recorded.

    oneDNN's bf16 backward of depthwise convolutions is slow on CPUs with AVX512-BF16: measured
    on efficientnet_lite0's tail after stage3 (64 maps, 1 thread, shared machine), bf16 autocast
    with channels-last took 14.0 s a training step, 13.7 s in float32 channels-last, and 9.0 s
    with these convolutions in float32 and the rest in bf16 (their float32 backward: 0.75 s
    against 1.6-1.9 s in bf16 for 64 x 672 x 14 x 14, 5 x 5). Forward passes without gradients
    (prediction, BatchNorm recomputation) keep bf16, which is 4x faster for them.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and _autocast_enabled(x.device.type)):
            return self.conv(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.conv(x.float())


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 asks per device type under another name
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels == module.out_channels


def _swap_depthwise(net: nn.Module, wrap: bool) -> None:
    """Wrap every depthwise convolution of ``net`` in :class:`_Float32WhileTraining`, or unwrap them."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if wrap and _is_depthwise(child):
                setattr(parent, name, _Float32WhileTraining(child))
            elif not wrap and isinstance(child, _Float32WhileTraining):
                setattr(parent, name, child.conv)


def _prepare(net: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """``net`` on ``device`` in the memory format of ``precision``, its depthwise convolutions
    trained in float32 under CPU bf16 (undone by ``_swap_depthwise(net, False)``)."""
    net.to(device, memory_format=memory_format(device, precision))
    if device.type == "cpu" and precision == "bf16":
        _swap_depthwise(net, True)
    return net


def _feed(maps: torch.Tensor, rows: np.ndarray, shape: tuple, device: torch.device, dtype: torch.dtype,
          layout: torch.memory_format, flip: torch.Tensor | None = None) -> torch.Tensor:
    """The maps ``rows`` of ``maps`` (a zero-copy tensor view of the cached array) as one batch.

    One gather in the cached dtype (float16: half the bytes), the flips on it, then one conversion
    to the compute dtype and layout (bfloat16 channels-last under CPU autocast: the first
    convolution would cast float32 to bfloat16 anyway). On CUDA the float16 batch travels before
    it is converted.
    """
    x = maps.index_select(0, torch.from_numpy(rows)).view(len(rows), *shape)
    if flip is not None and bool(flip.any()):
        x[flip] = x[flip].flip(3)
    return x.to(device, non_blocking=True).to(dtype=dtype, memory_format=layout)


def _as_tensor(X: np.ndarray) -> torch.Tensor:
    """A tensor sharing the memory of the cached maps ``X`` (no copy; batches are gathered from it)."""
    if not X.flags.writeable:  # a read-only memory map: torch shares it but warns; featx only reads it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            return torch.from_numpy(X)
    return torch.from_numpy(X)


def _train_step(net: nn.Module, optimizer, loss_fn, x: torch.Tensor, target: torch.Tensor, device: torch.device,
                precision: str, scaler) -> torch.Tensor:
    """One forward, backward and update under ``precision``'s autocast; the loss, detached."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        loss = loss_fn(net(x), target)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


class TailClassifier(ClassifierMixin, BaseEstimator):
    """The top of a pretrained backbone plus a new linear head, trained on cached maps.

    ``X`` holds the maps of the ``layer`` of ``backbone``, one flattened (C, H, W) map per row
    (pooling ``"map"`` of :func:`featx.extract`; float16 is fine and saves half the memory: rows
    are converted to float32 one batch at a time).

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
    weights : str, path or None, default="DEFAULT"
        The pretrained weights the tail starts from (see :func:`featx.load_backbone`).
    layer : str, default="stage4"
        Where the frozen part ends: the modules after it are trained.
    epochs : int, default=30
        Upper bound; early stopping usually ends sooner.
    batch_size : int, default=64
    optimizer : {"adamw", "sgd"}, default="adamw"
        AdamW, or SGD with Nesterov momentum 0.9.
    lr : float, default=3e-4
        Learning rate of the pretrained tail.
    head_lr : float, optional
        Learning rate of the new head; default ``10 * lr``.
    weight_decay : float, default=0.01
    schedule : {"cosine", "step", "constant"}, default="cosine"
        Decay over all ``epochs`` (per step); ``step`` divides by 10 at half and three quarters.
    label_smoothing : float, default=0.1
    flip : bool, default=True
        Mirror half of each batch's maps along their width (see the module notes).
    batchnorm : {"auto", "frozen", "train"}, default="auto"
        BatchNorm in the tail: ImageNet's running statistics (``frozen``), or batch statistics
        while training (``train``); ``auto``: ``frozen`` for pretrained weights, ``train`` for a
        random-init network, whose statistics mean nothing (see the module notes). The setting
        used is ``batchnorm_``.
    dropout : float, default=0.2
        Before the new head.
    val_split : float, default=0.1
        Fraction held out (stratified) for early stopping; 0 trains all ``epochs`` without it.
    patience : int, default=5
        Epochs without a better validation accuracy before training stops; the best epoch's
        weights are restored.
    train_precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast of the training and prediction passes (the weights and the optimizer stay
        float32): ``auto`` is bf16 on CPUs that compute it natively (AVX512-BF16 or AMX), fp16
        with a gradient scaler on CUDA, fp32 elsewhere (as :func:`featx.devices.resolve_precision`).
    device : {"auto", "cpu", "cuda", "mps"}, default="auto"
    random_state : int, default=0
    on_epoch : callable, optional
        Called with each epoch's record (see ``history_``) as soon as it ends.

    Attributes
    ----------
    net_ : torch.nn.Module
        The trained tail and head, on the CPU, in eval mode.
    classes_ : ndarray of shape (n_classes,)
    map_shape_ : tuple of int
        (C, H, W) of one map.
    n_features_in_ : int
    precision_ : str
        The resolved ``train_precision``.
    history_ : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``val_accuracy``, ``val_loss`` (None without a
        validation split), ``lr``, ``seconds``.
    best_epoch_ : int
    stopped_early_ : bool
    train_seconds_ : float

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 16 * 8 * 8)).astype(np.float16)
    >>> y = np.repeat(["a", "b"], 20)
    >>> X[y == "b"] += 1
    >>> clf = TailClassifier("featx_tiny_cnn", layer="stage1", epochs=3, device="cpu").fit(X, y)
    >>> clf.predict(X[:2]).tolist(), len(clf.history_)
    (['a', 'a'], 3)
    """

    def __init__(
        self,
        backbone="efficientnet_lite0",
        *,
        weights="DEFAULT",
        layer="stage4",
        epochs=_TRAINING.epochs,
        batch_size=_TRAINING.batch_size,
        optimizer=_TRAINING.optimizer,
        lr=_TRAINING.lr,
        head_lr=_TRAINING.head_lr,
        weight_decay=_TRAINING.weight_decay,
        schedule=_TRAINING.schedule,
        label_smoothing=_TRAINING.label_smoothing,
        flip=_TRAINING.flip,
        batchnorm=_TRAINING.batchnorm,
        dropout=_TRAINING.dropout,
        val_split=_TRAINING.val_split,
        patience=_TRAINING.patience,
        train_precision=_TRAINING.train_precision,
        device=_DEVICE,
        random_state=0,
        on_epoch=None,
    ):
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.lr = lr
        self.head_lr = head_lr
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.label_smoothing = label_smoothing
        self.flip = flip
        self.batchnorm = batchnorm
        self.dropout = dropout
        self.val_split = val_split
        self.patience = patience
        self.train_precision = train_precision
        self.device = device
        self.random_state = random_state
        self.on_epoch = on_epoch

    # -- checks ----------------------------------------------------------------------------

    def _check_params(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("batchnorm", BATCHNORM)):
            if getattr(self, name) not in allowed:
                raise FinetuneError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}.")
        if self.train_precision not in PRECISIONS:
            raise FinetuneError(f"train_precision must be one of {', '.join(PRECISIONS)}, got "
                                f"{self.train_precision!r}.")
        if self.train_precision == "fp16" and device_type(self.device) == "cpu":
            raise FinetuneError("train_precision='fp16' needs CUDA; on the CPU use 'bf16' or 'fp32' (or 'auto').")
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise FinetuneError(f"{name} must be a positive integer, got {value!r}.")
        if not 0.0 <= float(self.val_split) < 1.0:
            raise FinetuneError(f"val_split must lie in [0, 1), got {self.val_split!r}; 0 disables early stopping.")
        if not 0.0 <= float(self.label_smoothing) < 1.0 or not 0.0 <= float(self.dropout) < 1.0:
            raise FinetuneError("label_smoothing and dropout must lie in [0, 1).")
        if float(self.lr) <= 0 or (self.head_lr is not None and float(self.head_lr) <= 0):
            raise FinetuneError(f"learning rates must be positive, got lr={self.lr!r}, head_lr={self.head_lr!r}.")

    def _batch(self, maps: torch.Tensor, rows, device: torch.device, precision: str,
               flip: torch.Tensor | None = None) -> torch.Tensor:
        return _feed(maps, np.asarray(rows, dtype=np.int64), self.map_shape_, device, _DTYPES[precision],
                     memory_format(device, precision), flip)

    def _precision_on(self, device: torch.device) -> str:
        """The precision of passes on ``device``: the training's there, the device's own choice elsewhere."""
        precision = self.precision_
        if precision == "fp32" or device.type == self.device_.type:
            return precision
        return resolve_precision("auto", device)

    def _check_X(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim == 4:
            X = X.reshape(len(X), -1)
        if X.ndim != 2 or X.dtype.kind != "f":
            raise FinetuneError(f"X must be float maps of shape (n_samples, C*H*W), got {X.dtype} of shape {X.shape}.")
        return X if X.dtype in (np.float16, np.float32, np.float64) else X.astype(np.float32)

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, X, y):
        """Train the tail and the head on maps ``X`` with labels ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, C*H*W) or (n_samples, C, H, W), float16 or float32
        y : array-like of shape (n_samples,)

        Returns
        -------
        self : TailClassifier

        Raises
        ------
        FinetuneError
            Bad options, maps of the wrong width for ``layer``, a class with too few images for
            the validation split, or a layer that cannot be split (see :func:`build_tail`).
        """
        self._check_params()
        X = self._check_X(X)
        y = np.asarray(y)
        if len(y) != len(X):
            raise FinetuneError(f"X has {len(X)} rows but y has {len(y)} labels; give one label per map.")
        backbone = load_backbone(self.backbone, weights=self.weights, lazy=True)
        tap, _ = split_tap(backbone.name, self.layer)
        self.map_shape_ = tuple(int(v) for v in layer_shape(backbone.name, tap))
        self.n_features_in_ = int(np.prod(self.map_shape_))
        if X.shape[1] != self.n_features_in_:
            raise FinetuneError(
                f"X has {X.shape[1]} columns but the map of {self.layer!r} of {backbone.name} has "
                f"{self.n_features_in_} values ({'x'.join(map(str, self.map_shape_))}); extract it with "
                f"pooling='map' from the same backbone and layer."
            )
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise FinetuneError(f"Fine-tuning needs at least two classes, got {len(self.classes_)}.")
        train, val = np.arange(len(y)), np.array([], dtype=np.int64)
        if self.val_split:
            _, counts = np.unique(y_index, return_counts=True)
            if counts.min() < 2 or round(len(y) * float(self.val_split)) < len(self.classes_):
                raise FinetuneError(
                    f"val_split={self.val_split} holds out too few images for a stratified validation split of "
                    f"{len(self.classes_)} classes ({len(y)} images, smallest class {int(counts.min())}); raise "
                    "val_split, add images, or set val_split=0 to train without early stopping."
                )
            train, val = train_test_split(np.arange(len(y)), test_size=float(self.val_split), stratify=y_index,
                                          random_state=self.random_state)
            train, val = np.sort(train), np.sort(val)
        self.device_ = resolve_device(self.device)
        self.precision_ = resolve_precision(self.train_precision, self.device_)
        # auto: keep pretrained statistics; a random-init network has none worth keeping.
        self.batchnorm_ = (self.batchnorm if self.batchnorm != "auto" else
                           "train" if str(backbone.weights) == RANDOM_INIT else "frozen")
        tail, n_features = build_tail(backbone, self.layer)
        devices = [self.device_.index or 0] if self.device_.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(self.random_state))
            net = _Net(tail, n_features, len(self.classes_), float(self.dropout))
            self._train(net, X, y_index, train, val)
        return self

    def _set_mode(self, net: nn.Module, training: bool) -> None:
        net.train(training)
        if training and self.batchnorm_ == "frozen":
            for module in net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _train(self, net: _Net, X, y_index, train, val) -> None:
        device, precision = self.device_, self.precision_
        maps = _as_tensor(X)
        _prepare(net, device, precision)
        head_lr = float(self.head_lr) if self.head_lr is not None else 10 * float(self.lr)
        groups = [{"params": list(net.tail.parameters()), "lr": float(self.lr)},
                  {"params": list(net.head.parameters()), "lr": head_lr}]
        if self.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, weight_decay=float(self.weight_decay))
        else:
            optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=float(self.weight_decay))
        base = [g["lr"] for g in optimizer.param_groups]
        batch_size = int(self.batch_size)
        drop_last = len(train) > batch_size  # a batch of one cannot be batch-normalised
        steps_per_epoch = len(train) // batch_size if drop_last else 1
        total = steps_per_epoch * int(self.epochs)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=float(self.label_smoothing))
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        generator = torch.Generator().manual_seed(int(self.random_state))
        targets = torch.from_numpy(y_index.astype(np.int64))
        bn_rows = np.sort(np.random.default_rng(int(self.random_state)).permutation(train)[:_BN_SAMPLES])
        self.history_, best, best_state, bad_epochs, step = [], None, None, 0, 0
        self.stopped_early_ = False
        self.best_epoch_ = 0
        start_all = time.perf_counter()
        for epoch in range(1, int(self.epochs) + 1):
            start = time.perf_counter()
            self._set_mode(net, True)
            order = train[torch.randperm(len(train), generator=generator).numpy()]
            losses, seen = 0.0, 0
            for b in range(steps_per_epoch if drop_last else 1):
                rows = order[b * batch_size:(b + 1) * batch_size] if drop_last else order
                rows = np.sort(rows)
                mirror = torch.rand(len(rows), generator=generator) < 0.5 if self.flip else None
                x = self._batch(maps, rows, device, precision, mirror)
                target = targets[rows].to(device, non_blocking=True)
                for group, lr in zip(optimizer.param_groups, base):
                    group["lr"] = lr * _lr_factor(self.schedule, step, total)
                loss = _train_step(net, optimizer, loss_fn, x, target, device, precision, scaler)
                losses += float(loss) * len(rows)
                seen += len(rows)
                step += 1
            if self.batchnorm_ == "train":
                self._recompute_batchnorm(net, maps, bn_rows)
            record = {"epoch": epoch, "train_loss": losses / max(1, seen), "val_accuracy": None, "val_loss": None,
                      "lr": optimizer.param_groups[0]["lr"]}
            if len(val):
                logits = self._logits(net, maps, val)
                record["val_accuracy"] = float((logits.argmax(1).numpy() == y_index[val]).mean())
                record["val_loss"] = float(nn.functional.cross_entropy(logits, targets[val]))
            record["seconds"] = time.perf_counter() - start
            self.history_.append(record)
            if self.on_epoch is not None:
                self.on_epoch(record)
            if len(val):
                score = (record["val_accuracy"], -record["val_loss"])
                if best is None or score > best:
                    best, bad_epochs, self.best_epoch_ = score, 0, epoch
                    best_state = copy.deepcopy(net.state_dict())
                else:
                    bad_epochs += 1
                    if bad_epochs >= int(self.patience):
                        self.stopped_early_ = epoch < int(self.epochs)
                        break
        if best_state is not None:
            net.load_state_dict(best_state)
        else:
            self.best_epoch_ = len(self.history_)
        _swap_depthwise(net, False)
        self.train_seconds_ = time.perf_counter() - start_all
        self.net_ = net.to("cpu").eval()

    def _recompute_batchnorm(self, net: nn.Module, maps: torch.Tensor, rows) -> None:
        """Set the tail's BatchNorm running statistics to their average over the maps ``rows``.

        With a few hundred steps the exponential running average still remembers ImageNet's
        statistics and the early weights, and the model in eval mode then disagrees with the
        model it trained (measured on the tiny backbone: 100 % in train mode, 58 % in eval mode).
        Recomputing them with the final weights ("precise BatchNorm") costs one forward pass over
        at most 1,024 training maps per epoch.
        """
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        device = next(net.parameters()).device
        precision = self._precision_on(device)
        momenta = [m.momentum for m in norms]
        was_training = net.training
        try:
            for module in norms:
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the batches below
            net.train()
            with torch.no_grad(), autocast(device, precision):
                for b in range(0, len(rows), int(self.batch_size)):
                    chunk = rows[b:b + int(self.batch_size)]
                    if len(chunk) > 1:
                        net.tail(self._batch(maps, chunk, device, precision))
        finally:
            for module, momentum in zip(norms, momenta):
                module.momentum = momentum
            net.train(was_training)

    # -- prediction ------------------------------------------------------------------------

    def _logits(self, net: nn.Module, maps: torch.Tensor, rows) -> torch.Tensor:
        device = next(net.parameters()).device
        precision = self._precision_on(device)
        was_training = net.training
        net.eval()
        out = []
        try:
            with torch.inference_mode(), autocast(device, precision):
                for b in range(0, len(rows), _PREDICT_BATCH):
                    x = self._batch(maps, rows[b:b + _PREDICT_BATCH], device, precision)
                    out.append(net(x).float().cpu())
        finally:
            net.train(was_training)
        return torch.cat(out) if out else torch.empty(0, len(self.classes_))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities of maps ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, C*H*W) or (n_samples, C, H, W)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self, "net_")
        X = self._check_X(X)
        if X.shape[1] != self.n_features_in_:
            raise FinetuneError(f"X has {X.shape[1]} columns; this model was trained on maps of "
                                f"{self.n_features_in_} values ({'x'.join(map(str, self.map_shape_))}).")
        logits = self._logits(self.net_, _as_tensor(X), np.arange(len(X)))
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        """Predicted labels of maps ``X``, shape (n_samples,)."""
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def __getstate__(self) -> dict:
        # on_epoch may be a closure (a printer): it is for the fitting run only, not for the model file.
        return {**self.__dict__, "on_epoch": None}

    def __setstate__(self, state):
        # A model saved before train_precision existed trained and predicted in float32 (on the CPU).
        fitted = {"precision_": "fp32"} if "net_" in state else {}
        super().__setstate__({"train_precision": "fp32", **fitted, **state})

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


# --------------------------------------------------------------------------- the workflow


def read_maps(result, layer: str, *, block: int = _READ_BLOCK) -> np.ndarray:
    """The maps of an extraction's kept images, read from its store block by block as float16."""
    keys = result.kept_keys
    dim = result.store.dim(layer, "map")
    out = np.empty((len(keys), dim), dtype=np.float16)
    for start in range(0, len(keys), block):
        out[start:start + block] = result.store.read(keys[start:start + block], layer, "map")
    return out


def extract_maps(source, options: ExtractOptions, *, from_layer: str, stop=None):
    """The frozen part of fine-tuning: the maps at ``from_layer`` of ``source``, through the store.

    The extraction :func:`finetune` trains on (``options.for_maps``, resolved as a
    :class:`~featx.transformers.CNNFeatures` resolves it, so a saved model finds the same store).

    Returns
    -------
    result : featx.extraction.ExtractionResult
        Read its maps with :func:`read_maps` and its labels with :func:`featx.extraction.kept_labels`.
    features : CNNFeatures
        The fitted transformer of those maps (what a fine-tuned model's ``features`` are).
    """
    loaded = load_backbone(options.backbone, weights=options.weights, lazy=True)
    maps = options.for_maps(loaded, from_layer)
    features = CNNFeatures.from_options(maps, prefetch="none").fit()
    result = extract(source, maps.replace(device=features.device_, precision=features.precision_), stop=stop)
    return result, features


def finetune(
    source,
    options: ExtractOptions | None = None,
    *,
    from_layer: str = "stage4",
    training: FinetuneOptions | dict | None = None,
    random_state: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
    stop=None,
    **settings,
):
    """Fine-tune the top of a backbone, from ``from_layer`` on, on a labelled image set.

    The frozen part runs through :func:`featx.extract` with pooling ``"map"`` into a float16
    feature store (only images the store lacks are computed), the maps are read back, and a
    :class:`TailClassifier` is trained on them with early stopping on a stratified held-out
    split of ``source``.

    Parameters
    ----------
    source : ImageSource or anything :func:`featx.images.open_source` accepts
        Labelled images.
    options : ExtractOptions, optional
        The frozen part's extraction (default :data:`featx.options.CACHED`): ``backbone``,
        ``weights``, ``store`` (where the maps are kept, a float16 store of this configuration;
        ``None`` is refused: caching the frozen part is the point), ``device`` (the training runs
        there too), ``precision``, ``num_workers``, ``on_error``, ``progress``.
    from_layer : str, default="stage4"
        The last frozen layer (CLI ``--from``); the modules after it are trained.
    training : FinetuneOptions or dict, optional
        How the tail trains (:class:`~featx.options.FinetuneOptions`: ``epochs``, ``batch_size``,
        ``lr`` …).
    random_state, on_epoch
        See :class:`TailClassifier`.
    stop : callable, optional
        See :func:`featx.extract`.
    **settings
        Fields of :class:`~featx.options.FinetuneOptions` (``epochs=``, ``batch_size=`` (maps per
        training step) …) or of :class:`~featx.options.ExtractOptions` (``backbone=``,
        ``store=`` …; ``extract_batch_size=`` is the extraction's ``batch_size``), by name.

    Returns
    -------
    model : FeatxModel
        Saves, loads, predicts and evaluates like a head-only model (:mod:`featx.models`).
    report : dict
        ``frozen_seconds`` (the extraction: 0 computed images costs only hashing and a store
        lookup), ``n_computed``, ``n_from_store``, ``read_seconds``, ``train_seconds``,
        ``train_precision`` (the resolved autocast of the training),
        ``history``, ``best_epoch``, ``val_accuracy`` (at the best epoch; None without a split),
        ``stopped_early``, ``skipped`` and ``store``.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from featx.images import open_source
    >>> from featx.models import predict
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    >>> images[12:] //= 4
    >>> source = open_source(images, labels=["light"] * 12 + ["dark"] * 12)
    >>> model, report = finetune(source, backbone="featx_tiny_cnn", from_layer="stage1", epochs=3,
    ...                          val_split=0.25, device="cpu", store=tempfile.mkdtemp())
    >>> report["n_computed"], len(report["history"]), model.classes
    (24, 3, ['dark', 'light'])
    >>> predict(model, images[:1])[0]["label"]
    'light'
    """
    trained = {f.name for f in dataclasses.fields(FinetuneOptions)}
    training = FinetuneOptions.merge(training, {k: v for k, v in settings.items() if k in trained}, where="finetune")
    options = ExtractOptions.merge(options or CACHED, {k: v for k, v in settings.items() if k not in trained},
                                   aliases={"extract_batch_size": "batch_size"}, where="finetune")
    if options.store is None or options.store is False:
        raise FinetuneError("finetune needs a feature store for the frozen part's maps: pass store=True or a folder.")
    source = source if isinstance(source, ImageSource) else open_source(source)
    source.require_classes("finetune needs labelled images")
    loaded = load_backbone(options.backbone, weights=options.weights, lazy=True)
    split_tap(loaded.name, from_layer)  # a bad --from fails before any image is processed
    classifier = TailClassifier(loaded.name, weights=options.weights, layer=from_layer, device=options.device,
                                random_state=random_state, on_epoch=on_epoch, **training.as_params())
    classifier._check_params()
    result, features = extract_maps(source, options, from_layer=from_layer, stop=stop)
    y = kept_labels(result)
    start = time.perf_counter()
    X = read_maps(result, from_layer)
    read_seconds = time.perf_counter() - start
    classifier.fit(X, y)
    best = classifier.history_[classifier.best_epoch_ - 1]
    settings = {k: v for k, v in classifier.get_params().items() if k not in ("on_epoch", "backbone", "weights")}
    model = FeatxModel(
        features=features,
        head=classifier,
        classes=[str(c) for c in classifier.classes_],
        info={
            "featx_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "head": "finetune",
            "kind": "finetuned",
            "chosen_params": {"best_epoch": classifier.best_epoch_, **settings},
            "trained_on": source.name,
            "n_images": int(len(y)),
            "training_keys": training_keys(result.kept_keys),
            "weights": features.weights_,
            "dtype": "float16",
            "val_accuracy": best["val_accuracy"],
        },
    )
    report = {
        "frozen_seconds": result.seconds,
        "n_computed": result.n_computed,
        "n_from_store": int(len(result.kept)) - min(result.n_computed, len(result.kept)),
        "read_seconds": read_seconds,
        "train_seconds": classifier.train_seconds_,
        "train_precision": classifier.precision_,
        "history": classifier.history_,
        "best_epoch": classifier.best_epoch_,
        "val_accuracy": best["val_accuracy"],
        "stopped_early": classifier.stopped_early_,
        "skipped": result.skipped,
        "store": str(result.store.path),
    }
    return model, report


def cross_validate_finetune(X, y, *, cv: int = 5, repeats: int = 1, random_state: int = 0, **options) -> dict:
    """Outer cross-validation of fine-tuning on cached maps, on the folds :func:`featx.heads.evaluate` uses.

    The folds are ``StratifiedKFold(cv, shuffle=True, random_state)`` (repeated when
    ``repeats > 1``) over ``y``, exactly as for the frozen heads, so a fine-tuned row and the
    frozen rows of one comparison are scored on the same held-out images. In each outer fold a
    :class:`TailClassifier` is trained on the training part only (its early-stopping split is
    taken from that part) and scored on the held-out part.

    Parameters
    ----------
    X : array-like of shape (n_samples, C*H*W)
    y : array-like of shape (n_samples,)
    cv, repeats, random_state
        As in :func:`featx.heads.evaluate`.
    **options
        :class:`TailClassifier` parameters (``backbone``, ``layer``, ``epochs`` …).

    Returns
    -------
    dict
        ``accuracy_mean``, ``accuracy_std``, ``balanced_accuracy``, ``macro_f1``,
        ``fold_accuracy``, ``best_epochs``, ``epochs_run``, ``cv``, ``n_samples``, ``n_classes``,
        ``fit_time``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(30, 16 * 8 * 8)).astype(np.float16)
    >>> y = np.repeat(["a", "b"], 15)
    >>> X[y == "b"] += 1
    >>> report = cross_validate_finetune(X, y, cv=3, backbone="featx_tiny_cnn", layer="stage1", epochs=2,
    ...                                  val_split=0, device="cpu")
    >>> report["cv"], len(report["fold_accuracy"])
    (3, 3)
    """
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    n_splits = int(min(cv, counts.min()))
    if n_splits < 2:
        raise FinetuneError("Cross-validating fine-tuning needs at least two images in every class.")
    start = time.perf_counter()
    folds, best_epochs, epochs_run = [], [], []
    for train, test in outer_splits(y, n_splits, repeats=repeats, random_state=random_state):
        model = TailClassifier(random_state=random_state, **options).fit(X[train], y[train])
        folds.append(score_predictions(y[test], model.predict(X[test]), classes=classes))
        best_epochs.append(model.best_epoch_)
        epochs_run.append(len(model.history_))
    return {
        **fold_means(folds),
        "best_epochs": best_epochs,
        "epochs_run": epochs_run,
        "cv": n_splits,
        "n_samples": int(len(y)),
        "n_classes": int(len(classes)),
        "fit_time": time.perf_counter() - start,
    }
