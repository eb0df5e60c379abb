"""The settings of an extraction and of a fine-tuning, each spelled once, in one frozen dataclass.

Every workflow (:func:`featx.extract`, :func:`featx.compare_layers`, :func:`featx.models.fit_model`,
:func:`featx.auto_fit`, :func:`featx.finetune`, the Ray engine, ``featx bench`` and the CLI) takes
an :class:`ExtractOptions` or builds one from the keywords it is given (:meth:`ExtractOptions.merge`),
and passes that one object on. :class:`~featx.transformers.CNNFeatures` keeps its flat
scikit-learn parameters and builds its options in ``fit``. The names and defaults below are the
only place these settings are written down; the checks of their values are here too, run once
when an object is made.

This module imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from featx.exceptions import FeatxError, suggest
from featx.threads import check_threads

__all__ = [
    "CACHED",
    "DECODERS",
    "DEFAULT_MAX_PIXELS",
    "ExtractOptions",
    "FinetuneOptions",
    "ON_ERROR",
    "PRECISIONS",
    "RUNTIMES",
    "STORE_DTYPES",
    "TTAS",
    "check_tta",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODERS = ("auto", "pil", "torch")
TTAS = ("none", "hflip")
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
STORE_DTYPES = ("float32", "float16")
ON_ERROR = ("raise", "skip")

DEFAULT_MAX_PIXELS: int = 89_478_485
"""Largest width × height of an image file decoded by default (PIL's own default limit): the
decompression-bomb guard of :func:`featx.images.load_image` and of ``ExtractOptions.max_pixels``."""


def check_tta(tta: str | None) -> str | None:
    """Normalise a test-time augmentation: ``None``/``"none"`` (plain features) or ``"hflip"``.

    Examples
    --------
    >>> check_tta("none") is None, check_tta("hflip")
    (True, 'hflip')
    """
    if tta is None or tta == "none":
        return None
    if tta not in TTAS:
        raise FeatxError(
            f"Unknown tta {tta!r}: expected 'none' (plain features) or 'hflip' (features averaged over the "
            f"image and its horizontal mirror)."
        )
    return tta


def _as_names(value):
    """A string stays a string (it may hold a comma-separated list); a sequence becomes a tuple."""
    return value if isinstance(value, str) else tuple(value)


def _check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise FeatxError(f"Unknown {name} {value!r}: expected one of {', '.join(map(str, choices))}.")


def _merge(cls, base, settings: Mapping, aliases: Mapping[str, str], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    changes, given = {}, {}
    for name, value in settings.items():
        target = aliases.get(name, name)
        if target not in names:
            raise FeatxError(f"{where} got an unknown setting {name!r}.{suggest(name, [*names, *aliases])} "
                             f"Its settings are those of featx.{cls.__name__}: {', '.join(sorted(names))}.")
        if target in changes:
            raise FeatxError(f"{where} got both {given[target]!r} and {name!r}: they are one setting; pass one of "
                             f"them.")
        changes[target], given[target] = value, name
    return dataclasses.replace(base, **changes) if changes else base


@dataclass(frozen=True)
class ExtractOptions:
    """What to extract and how: the one object the extraction settings travel in.

    Parameters
    ----------
    backbone : str or Backbone, default="efficientnet_lite0"
        A name from ``featx models`` (or ``"timm:<name>"``), or a loaded backbone.
    weights : str, path or None, default="DEFAULT"
        See :func:`featx.backbones.load_backbone`; ignored when ``backbone`` is loaded.
    layers : str or sequence of str, default="pre_logits"
        Layer aliases (``stem``, ``stage1`` …, ``pre_logits``, ``logits``), raw node names, or ``"all"``.
    pooling : str or sequence of str, default="avg"
        ``avg``, ``max``, ``avgmax``, ``spp`` (or ``map``); several come from one forward pass.
    store : None, True, folder, ``.h5`` path or FeatureStore, default=None
        ``None`` keeps features in memory; otherwise they go to the feature store of this
        configuration (``True``: the cache folder ``$FEATX_CACHE`` or ``./cache``).
    dtype : {"float32", "float16"}, default="float32"
        Storage precision of a new store.
    on_error : {"raise", "skip"} or None, default=None
        What a bad image does; ``None``: ``"raise"`` in memory, ``"skip"`` with a store.
    batch_size : int, default=32
        Images per forward pass.
    device : {"auto", "cpu", "cuda", "cuda:N", "mps"} or torch.device, default="auto"
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        See :func:`featx.extraction.resolve_precision`.
    num_workers : int or "auto", default="auto"
        Decoding processes. ``"auto"``: on a CPU device none, the images are decoded by threads
        of this process, one batch at a time between forward passes (decoding and the network
        take turns on the cores); on other devices one process per core for image files, none
        for arrays.
    progress : bool or None, default=None
        Progress bars on stderr, of the extraction and of the cross-validation and search of the
        workflows that take these options; ``None``: only when stderr is a terminal and ``$CI`` is
        not set (:func:`featx.progress.show_progress`); ``False``: never.
    decoder : {"auto", "pil", "torch"}, default="auto"
        Where JPEG files are decoded (see :func:`featx.extraction.resolve_decoder`).
    tta : {None, "hflip"}, default=None
        ``"hflip"`` averages features over the image and its mirror (``"none"`` reads as None).
    runtime : {"auto", "torch", "onnxruntime", "openvino"}, default="auto"
        What runs the network (see :mod:`featx.runners`); ``"auto"``: the fastest runtime
        installed and verified against eager features for this backbone on this machine,
        measured once and remembered in the cache folder (see :mod:`featx.runtimes`).
    compile : bool, default=False
        Run the network under ``torch.compile``.
    engine : "local", "ray" or RayEngine, default="local"
        Where the loop runs (see :mod:`featx.distributed`).
    max_pixels : int, default=DEFAULT_MAX_PIXELS
        Largest width × height of an image file that is decoded (decompression-bomb guard,
        checked from the header); a larger one is a bad image (``on_error``). It decides which
        images are accepted, not their features, so it is no part of a store's configuration:
        an image whose features a store already holds is not decoded again, nor checked.
    threads : "auto", int or None, default="auto"
        The thread plan (:mod:`featx.threads`): ``"auto"`` runs the forward pass on torch's
        threads capped by the cores this process may use (one when OpenMP threads spin and the
        machine is busy) and gives the caller's count back after; N runs it on N torch
        threads; ``None`` changes no thread setting. It does not change the features beyond
        float rounding, so it is no part of a store's configuration.

    Examples
    --------
    >>> options = ExtractOptions(backbone="featx_tiny_cnn", layers="stage2,pre_logits", device="cpu")
    >>> options.replace(batch_size=8).batch_size, options.tta
    (8, None)
    >>> ExtractOptions.merge(options, {"layer": "stage1"}, aliases={"layer": "layers"}).layers
    'stage1'
    >>> ExtractOptions(precision="fp64")
    Traceback (most recent call last):
    ...
    featx.exceptions.FeatxError: Unknown precision 'fp64': expected one of auto, fp32, bf16, fp16.
    """

    backbone: object = "efficientnet_lite0"
    weights: object = "DEFAULT"
    layers: str | tuple = "pre_logits"
    pooling: str | tuple = "avg"
    store: object = None
    dtype: str = "float32"
    on_error: str | None = None
    batch_size: int = 32
    device: object = "auto"
    precision: str = "auto"
    num_workers: int | str = "auto"
    progress: bool | None = None
    decoder: str = "auto"
    tta: str | None = None
    runtime: str = "auto"
    compile: bool = False
    engine: object = "local"
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int | str | None = "auto"

    def __post_init__(self):
        object.__setattr__(self, "layers", _as_names(self.layers))
        object.__setattr__(self, "pooling", _as_names(self.pooling))
        object.__setattr__(self, "tta", check_tta(self.tta))
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("decoder", self.decoder, DECODERS)
        _check_choice("runtime", self.runtime, RUNTIMES)
        _check_choice("dtype", self.dtype, STORE_DTYPES)
        if self.on_error is not None:
            _check_choice("on_error", self.on_error, ON_ERROR)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise FeatxError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if self.num_workers != "auto" and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                           or self.num_workers < 0):
            raise FeatxError(f"num_workers must be 'auto' or a whole number >= 0, got {self.num_workers!r}.")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise FeatxError(f"max_pixels must be a positive integer (width × height; default {DEFAULT_MAX_PIXELS}), "
                             f"got {self.max_pixels!r}.")
        check_threads(self.threads)
        if self.runtime in ("onnxruntime", "openvino") and self.compile:
            raise FeatxError(f"compile=True compiles the torch runtime; it does not go with runtime={self.runtime!r}. "
                             "Leave one of them out.")

    @property
    def error_policy(self) -> str:
        """``on_error``, or its default: ``"raise"`` in memory, ``"skip"`` with a store."""
        return self.on_error or ("raise" if self.store is None else "skip")

    def replace(self, **changes) -> ExtractOptions:
        """A copy with ``changes`` (field names only); the checks run again."""
        return dataclasses.replace(self, **changes)

    def for_maps(self, backbone, layers) -> ExtractOptions:
        """The extraction fine-tuning trains on: the unpooled maps (pooling ``"map"``) of ``layers``
        of ``backbone``, stored as float16, without flip averaging, in this process with eager torch;
        the device, precision, store, batch size, workers and progress stay these options'.

        Examples
        --------
        >>> maps = ExtractOptions(tta="hflip", store=True).for_maps("featx_tiny_cnn", "stage1")
        >>> maps.pooling, maps.dtype, maps.tta, maps.store
        ('map', 'float16', None, True)
        """
        return self.replace(backbone=backbone, layers=layers, pooling="map", dtype="float16", tta=None,
                            engine="local", runtime="torch", compile=False)

    @classmethod
    def merge(cls, options: ExtractOptions | None = None, settings: Mapping | None = None, *,
              aliases: Mapping[str, str] | None = None, where: str = "featx") -> ExtractOptions:
        """``options`` (or the defaults) with the keyword ``settings`` a workflow was called with.

        Parameters
        ----------
        options : ExtractOptions, optional
            The base; default: ``ExtractOptions()``.
        settings : mapping, optional
            Field names (or ``aliases`` of them) to values; an unknown name fails with the
            closest one suggested.
        aliases : mapping of str to str, optional
            Names a public signature has kept for a field (``{"layer": "layers", "cache": "store"}``).
        where : str
            The caller, named in errors.

        Returns
        -------
        ExtractOptions
        """
        if options is not None and not isinstance(options, cls):
            raise FeatxError(f"{where}: options must be a featx.{cls.__name__}, got {type(options).__name__}.")
        return _merge(cls, options if options is not None else cls(), settings or {}, aliases or {}, where)


#: The defaults of the workflows that cross-validate or train (compare, fit, auto, finetune):
#: features go to the cache folder, and a bad image is skipped and reported.
CACHED = ExtractOptions(store=True, on_error="skip")


@dataclass(frozen=True)
class FinetuneOptions:
    """How the top of a backbone is trained on its cached maps (:mod:`featx.finetuning`).

    :class:`~featx.finetuning.TailClassifier` keeps these as flat scikit-learn parameters (with
    the defaults read from here); :func:`featx.finetune`, ``featx compare --finetune-from`` and
    the fine-tuning candidates of ``featx fit --auto`` pass one object.

    Parameters
    ----------
    epochs : int, default=30
    batch_size : int, default=64
        Maps per training step.
    optimizer : {"adamw", "sgd"}, default="adamw"
    lr : float, default=3e-4
        Learning rate of the trained blocks.
    head_lr : float or None, default=None
        Learning rate of the new head (default: ``10 * lr``).
    weight_decay : float, default=0.01
    schedule : {"cosine", "step", "constant"}, default="cosine"
    label_smoothing : float, default=0.1
    flip : bool, default=True
        Random horizontal flips of the maps while training.
    batchnorm : {"auto", "frozen", "train"}, default="auto"
        ImageNet's running statistics (frozen) or batch statistics while training (train); auto:
        frozen for pretrained weights, train for a random-init network.
    dropout : float, default=0.2
    val_split : float, default=0.1
        Held-out share for early stopping (0: none).
    patience : int, default=5
        Epochs without a better validation accuracy before stopping.
    train_precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast of the tail's training (weights and optimizer stay float32): bf16 on CPUs that
        compute it natively, fp16 on CUDA, fp32 elsewhere. Not the frozen part's ``precision``.

    Examples
    --------
    >>> FinetuneOptions(epochs=3).replace(lr=1e-3).as_params()["epochs"]
    3
    """

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 3e-4
    head_lr: float | None = None
    weight_decay: float = 0.01
    schedule: str = "cosine"
    label_smoothing: float = 0.1
    flip: bool = True
    batchnorm: str = "auto"
    dropout: float = 0.2
    val_split: float = 0.1
    patience: int = 5
    train_precision: str = "auto"

    def replace(self, **changes) -> FinetuneOptions:
        return dataclasses.replace(self, **changes)

    def as_params(self) -> dict:
        """The settings as :class:`~featx.finetuning.TailClassifier` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def changes(self) -> dict:
        """The settings that differ from the defaults (what a report or a cache key names).

        Examples
        --------
        >>> FinetuneOptions(epochs=3).changes()
        {'epochs': 3}
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    @classmethod
    def merge(cls, options: FinetuneOptions | Mapping | None = None, settings: Mapping | None = None, *,
              where: str = "featx") -> FinetuneOptions:
        """``options`` (an object, a mapping of settings, or None for the defaults) with ``settings``."""
        if isinstance(options, Mapping):
            options, settings = None, {**options, **(settings or {})}
        if options is not None and not isinstance(options, cls):
            raise FeatxError(f"{where}: finetune options must be a featx.{cls.__name__} or a dict, got "
                             f"{type(options).__name__}.")
        return _merge(cls, options if options is not None else cls(), settings or {}, {}, where)
