"""Model files: fit a head on a labelled image set, save it, load it, predict and evaluate.

A :class:`FeatxModel` is a fitted :class:`~featx.transformers.CNNFeatures` (the extraction
configuration, without weights) and a fitted head pipeline. Its :attr:`~FeatxModel.pipeline` is
an ordinary scikit-learn pipeline from images to labels; :func:`predict` and
:func:`evaluate_model` go through the feature store, so images seen before cost no forward pass.

Model files are joblib pickles: load only files from a source you trust, as you would run code.
A file starts with one header line, ``featx-model sha256=<64 hex digits>``, the SHA-256 of the
joblib bytes that follow; :func:`load_model` checks it before unpickling, so a corrupted or
accidentally modified file is refused. The checksum is not a signature: whoever can rewrite the
file can rewrite the checksum too.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import os
import pickle
import re
from dataclasses import dataclass, field

import joblib
import numpy as np
from sklearn.pipeline import Pipeline

from featx import __version__
from featx.backbones import load_backbone
from featx.exceptions import FeatxError, ModelFileError
from featx.extraction import extract, join_features, kept_labels, require_kept
from featx.options import CACHED, DEFAULT_MAX_PIXELS, ExtractOptions
from featx.paths import split_names
from featx.heads import fit_head, score_predictions
from featx.selection import auto_poolings, feature_sets, select_layer
from featx.images import ImageSource, describe, open_source
from featx.progress import Progress
from featx.transformers import CNNFeatures

__all__ = ["FeatxModel", "evaluate_model", "fit_model", "load_model", "predict", "save_model"]

FORMAT = "featx-model"
FORMAT_VERSION = 1
_HEADER = re.compile(rb"featx-model sha256=([0-9a-f]{64})\n")
_HEADER_PREFIX = b"featx-model "
_HEADER_MAX = 128

#: Bytes of each training image's content key that a model file keeps (``info["training_keys"]``):
#: 8 bytes (64 bits) per image, so 80 kB for 10,000 images, and a false "training image" among
#: 10,000 evaluated images against 10,000 training images has odds of about 1 in 10^11. One
#: digest of the whole set would be smaller but detects only the identical set, not an overlap.
TRAINING_KEY_BYTES = 8


def training_keys(keys) -> bytes:
    """The ``info["training_keys"]`` of a model trained on the images of content keys ``keys``."""
    return b"".join(sorted({bytes.fromhex(key[: 2 * TRAINING_KEY_BYTES]) for key in keys}))


def count_training_images(model: "FeatxModel", keys) -> int | None:
    """How many of the images of content keys ``keys`` trained ``model``; None if its file does not say."""
    recorded = model.info.get("training_keys")
    if recorded is None:
        return None
    n = TRAINING_KEY_BYTES
    known = {recorded[i : i + n] for i in range(0, len(recorded), n)}
    return sum(bytes.fromhex(key[: 2 * n]) in known for key in keys)


@dataclass
class FeatxModel:
    """A fitted image classifier: frozen-CNN features and a scikit-learn head.

    A fine-tuned model (:func:`featx.finetune`) is the same object: its features are the unpooled
    map at the ``from`` layer (pooling ``"map"``, a float16 store) and its head is the trained top
    of the network (:class:`featx.finetuning.TailClassifier`); ``info["kind"]`` is ``"finetuned"``.

    Attributes
    ----------
    features : CNNFeatures or list of CNNFeatures
        Fitted; holds the backbone, weights, layer(s), pooling(s), flip averaging and precision.
        A list concatenates the features of several backbones, in order.
    head : sklearn.pipeline.Pipeline
        The fitted head (scaler → classifier), trained on ``features`` output.
    classes : list of str
    info : dict
        ``featx_version``, ``created``, ``head``, ``chosen_params``, ``cv_score`` (the inner-CV
        accuracy of ``chosen_params``; None when not cross-validated), ``trained_on``,
        ``n_images``, ``weights``, and ``training_keys``: the training images, as the first
        :data:`TRAINING_KEY_BYTES` bytes of each distinct content key
        (:func:`featx.images.content_key`), sorted and concatenated, so that
        :func:`evaluate_model` can count the evaluated images that were training images.
        Files written before featx recorded it lack ``training_keys``.
    """

    features: CNNFeatures
    head: Pipeline
    classes: list[str]
    info: dict = field(default_factory=dict)

    @property
    def parts(self) -> list[CNNFeatures]:
        """The feature extractors, one per backbone, in the order their columns are concatenated."""
        return list(self.features) if isinstance(self.features, (list, tuple)) else [self.features]

    @property
    def pipeline(self) -> Pipeline:
        """The scikit-learn pipeline from images to labels."""
        if len(self.parts) == 1:
            return Pipeline([("cnnfeatures", self.parts[0]), ("head", self.head)])
        from sklearn.pipeline import FeatureUnion

        union = FeatureUnion([(f"cnnfeatures{i}", part) for i, part in enumerate(self.parts)])
        return Pipeline([("cnnfeatures", union), ("head", self.head)])

    def extraction_options(self, part: CNNFeatures | None = None) -> ExtractOptions:
        """The :class:`~featx.options.ExtractOptions` of one part (default: the first): its blocks,
        resolved device and precision, store, and the storage dtype it was trained with."""
        f = self.parts[0] if part is None else part
        return f.extraction_options().replace(dtype=self.info.get("dtype", "float32"))

    def describe(self) -> str:
        if self.info.get("kind") == "finetuned":
            f = self.features
            return (
                f"fine-tuned {f.backbone} after {f.layer} (the blocks after it and a new linear head; "
                f"{f.weights_}), {len(self.classes)} classes, trained on {self.info.get('n_images')} images"
            )
        described = " + ".join(
            f"{f.backbone} {'+'.join(r.key for r in f.requests_)}{' hflip' if getattr(f, 'tta', None) else ''} "
            f"({f.weights_})"
            for f in self.parts
        )
        return (
            f"{self.info.get('head')} on {described}, "
            f"{len(self.classes)} classes, trained on {self.info.get('n_images')} images"
        )


def _extract_parts(source, parts, options: list[ExtractOptions]) -> tuple[np.ndarray, object, np.ndarray]:
    """Features of every part (backbone) for ``source``, extracted with its options, concatenated in order.

    Returns the matrix, the first part's extraction result (skipped images and the store), and
    the source positions of its rows: those every part could decode.
    """
    results = [extract(source, part_options) for part_options in options]
    X, _, kept = join_features(results, [[r.key for r in part.requests_] for part in parts])
    return X, results[0], kept


def _check_extracted(results, source, on_skipped) -> None:
    """Tell ``on_skipped`` of the images the extractions skipped; refuse when none is left to fit on."""
    skipped = {name: reason for result in results for name, reason in result.skipped}
    if skipped and on_skipped is not None:
        on_skipped(list(skipped.items()), len(source))
    require_kept(results, "fit a head on")


def _model_blocks(parts) -> list[int] | None:
    """Widths of the concatenated blocks of every part, or None for a single block."""
    blocks = [b for part in parts for b in part.blocks_]
    return blocks if len(blocks) > 1 else None


def fit_model(
    source,
    options: ExtractOptions | None = None,
    *,
    head: str = "logreg",
    inner_cv: int = 3,
    random_state: int = 0,
    class_weight=None,
    on_skipped=None,
    **settings,
) -> tuple[FeatxModel, object]:
    """Tune a head by inner cross-validation on all of ``source`` and refit it.

    Parameters
    ----------
    source : ImageSource or anything :func:`featx.images.open_source` accepts
        Labelled images.
    options : ExtractOptions, optional
        What to extract and how; default :data:`featx.options.CACHED` (the cache folder, bad
        images skipped). Several backbones (``backbone="efficientnet_lite0+efficientnet_lite2"``
        or a list) concatenate their features; with several blocks (layers, poolings or
        backbones) each block is standardised and weighted inside the head
        (:class:`~featx.heads.BlockScaler`).
    head : {"logreg", "linear-svm", "rbf-svm"}, default="logreg"
    inner_cv, random_state, class_weight
        See :func:`featx.heads.fit_head`. The tuning shows a progress bar on stderr, over its
        grid fits and naming what it tunes (``tune stage4/spp logreg``), when
        ``options.progress`` says so (by default on a terminal only; never with ``progress=False``).
        ``layers="auto"`` chooses the layer and pooling (among every layer and the given poolings,
        avg and spp for the default one: :func:`featx.selection.auto_poolings`; from one extraction) by :func:`featx.selection.select_layer` with ``inner_cv`` folds:
        the simplest feature set within one standard error of the best; ``model.info["selection"]``
        keeps the table it chose from and the estimate of that choice.
    on_skipped : callable, optional
        Called once, after extraction and before the tuning, with the ``(image, reason)`` pairs
        the extraction skipped and the number of images of ``source``; not called when none was
        skipped (as in :func:`featx.compare_layers`).
    **settings
        :class:`~featx.options.ExtractOptions` fields by name, replacing those of ``options``
        (``layer=`` is accepted for ``layers``, as :class:`~featx.transformers.CNNFeatures` names it).

    Returns
    -------
    model : FeatxModel
    extraction : ExtractionResult
        What the extraction did (counts, skipped images, timing).

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    >>> images[6:] //= 4
    >>> model, _ = fit_model(open_source(images, labels=["light"] * 6 + ["dark"] * 6), backbone="featx_tiny_cnn",
    ...                      layer="stage1", device="cpu", store=tempfile.mkdtemp())
    >>> model.classes, predict(model, images[:2])[0]["label"]
    (['dark', 'light'], 'light')
    """
    options = ExtractOptions.merge(options or CACHED, settings, aliases={"layer": "layers"}, where="fit_model")
    source = source if isinstance(source, ImageSource) else open_source(source)
    source.require_classes("fit_model needs labelled images")
    names = split_names(options.backbone, sep="+") if isinstance(options.backbone, str) else list(options.backbone)
    selection = None
    if options.layers == "auto":
        if len(names) > 1:
            raise FeatxError(f"layers='auto' chooses a layer of one backbone, got {len(names)} ({options.backbone!r}): "
                             "pass layers= for several backbones, or fit one backbone at a time.")
        # Every layer from one extraction, the choice by the one-standard-error rule, then the
        # chosen block of the same extraction: nothing is extracted twice.
        result = extract(source, options.replace(layers="all", pooling=auto_poolings(options.pooling)))
        _check_extracted([result], source, on_skipped)
        candidates = feature_sets(result, names[0])
        selection = select_layer(candidates, kept_labels(result), head=head, cv=inner_cv, random_state=random_state)
        layer, pooling = selection.chosen.split("/")
        options = options.replace(layers=layer, pooling=pooling)
        parts = [CNNFeatures.from_options(options).fit()]
        X, _, kept = join_features([result], [[selection.chosen]])
    else:
        parts = [CNNFeatures.from_options(options.replace(backbone=name)).fit() for name in names]
        # Each part was built from ``options`` (backbone, blocks, store, max_pixels …); the run adds what a
        # transformer has no parameter for.
        run = [part.extraction_options().replace(dtype=options.dtype, on_error=options.on_error,
                                                 progress=options.progress) for part in parts]
        results = [extract(source, part_options) for part_options in run]
        _check_extracted(results, source, on_skipped)
        X, _, kept = join_features(results, [[r.key for r in part.requests_] for part in parts])
        result = results[0]
    y = kept_labels(result, kept)
    features = " + ".join((f"{part.backbone}:" if len(parts) > 1 else "") + "+".join(r.key for r in part.requests_)
                          for part in parts)
    with Progress(None, enabled=options.progress, unit="fit", desc=f"tune {features} {head}") as bar:
        fitted, params, score = fit_head(X, y, head=head, inner_cv=inner_cv, random_state=random_state,
                                         class_weight=class_weight, blocks=_model_blocks(parts), return_score=True,
                                         progress=bar)
    model = FeatxModel(
        features=parts[0] if len(parts) == 1 else parts,
        head=fitted,
        classes=[str(c) for c in fitted.classes_],
        info={
            "featx_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "head": head,
            "chosen_params": params,
            "cv_score": score["cv_score"],
            "inner_cv": score["inner_cv"],
            "trained_on": source.name,
            "n_images": int(len(y)),
            "training_keys": training_keys(result.keys[i] for i in kept),
            "weights": "+".join(part.weights_ for part in parts),
            "dtype": options.dtype,
            "tta": options.tta,
            "selection": None if selection is None else selection.to_dict(),
        },
    )
    return model, result


def save_model(model: FeatxModel, path: str | os.PathLike) -> None:
    """Write a model file: a checksum header line, then a joblib pickle of the head and the
    extraction configuration (no weights).

    The file is written beside ``path`` under a temporary name, flushed to disk and renamed, so
    ``path`` holds either the previous file or the complete new one.
    """
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "featx_version": __version__, "model": model}
    buffer = io.BytesIO()
    joblib.dump(payload, buffer)
    body = buffer.getvalue()
    header = f"{FORMAT} sha256={hashlib.sha256(body).hexdigest()}\n".encode("ascii")
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(header)
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ModelFileError(f"Cannot write model file {path!r} ({exc}); check the folder and the free space.") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _NoObjectsUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dicts, lists, strings, numbers): never imports or calls anything."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a file without a checksum header")


#: The first bytes of the image formats featx reads, and what to call them in an error.
_IMAGE_SIGNATURES = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"GIF8", "a GIF image"),
                     (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"))


def _kind_of_file(data: bytes) -> str | None:
    """What a file that is plainly no pickle is, for an error (``"a JPEG image"``); None if it may be one.

    Model files of every featx version are joblib pickles of protocol 2 or later, which start with
    the PROTO opcode ``\\x80``: an empty file, an image or a text file (its first line quoted) is none.
    """
    if not data:
        return "an empty file"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WEBP image"
    for signature, kind in _IMAGE_SIGNATURES:
        if data.startswith(signature):
            return kind
    try:
        text = data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    first = text.splitlines()[0] if text.strip() else ""
    first = first if len(first) <= 60 else first[:57] + "..."
    return f"a text file (first line {first!r})" if first else "a text file"


def _read_payload(path: str | os.PathLike) -> object:
    """Return the unpickled payload of a model file whose checksum header is intact.

    The checksum is verified before anything is unpickled. A file without the header (written
    by an older featx, or not by featx) is read only as plain data, so that its format and
    version can be reported: no object is ever built from it.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ModelFileError(f"Cannot read model file {str(path)!r} ({exc}).") from exc
    if not data.startswith(_HEADER_PREFIX):
        kind = _kind_of_file(data)
        if kind is not None:
            raise ModelFileError(
                f"{str(path)!r} is not a featx model file: it is {kind}, and a model file starts with the line "
                "'featx-model sha256=...'; create one with 'featx fit DATA -o model.joblib'."
            )
        try:
            return _NoObjectsUnpickler(io.BytesIO(data)).load()
        except pickle.UnpicklingError as exc:
            if "without a checksum header" not in str(exc):
                raise ModelFileError(
                    f"Cannot read model file {str(path)!r}: it does not start with the line 'featx-model sha256=...' "
                    f"of a featx model file, nor is it a pickle (UnpicklingError: {exc}); create a model file with "
                    "'featx fit DATA -o model.joblib'."
                ) from exc
            raise ModelFileError(
                f"{str(path)!r} is not a featx model file: it lacks the 'featx-model sha256=...' checksum header "
                "(written by an older featx, or not by featx), and featx does not unpickle such files; "
                "create one with 'featx fit'."
            ) from exc
        except Exception as exc:
            raise ModelFileError(f"Cannot read model file {str(path)!r} ({type(exc).__name__}: {exc}).") from exc
    match = _HEADER.match(data, 0, _HEADER_MAX)
    if match is None:
        raise ModelFileError(
            f"Model file {str(path)!r} has a damaged 'featx-model sha256=' header line: the file was modified "
            "or corrupted; refit or re-download it."
        )
    body = memoryview(data)[match.end() :]
    expected, found = match.group(1).decode("ascii"), hashlib.sha256(body).hexdigest()
    if found != expected:
        raise ModelFileError(
            f"Model file {str(path)!r}: checksum mismatch: the file was modified or corrupted; refit or "
            f"re-download it (its header says sha256 {expected[:16]}..., its content has {found[:16]}...)."
        )
    try:
        return joblib.load(io.BytesIO(body))
    except Exception as exc:  # unpickling errors of every kind mean "not a model file we can read"
        raise ModelFileError(f"Cannot read model file {str(path)!r} ({type(exc).__name__}: {exc}).") from exc


def load_model(path: str | os.PathLike) -> FeatxModel:
    """Read a model file and check that this installation can use it.

    The SHA-256 checksum in the file's header is verified before anything is unpickled; a file
    without the header is never unpickled beyond plain data. The checksum catches corruption and
    accidental edits, not a deliberate forgery (whoever can rewrite the file can rewrite its
    checksum): model files are pickles, trust them as you would code.

    Raises
    ------
    ModelFileError
        If the path is a folder, the file is not a featx model (the message says what it is: an
        image, a text file, an empty file), fails its checksum (modified or corrupted), lacks the
        checksum header, was written by another featx major version, or needs a backbone or
        weights this machine cannot provide (the message says which and how).
    """
    if os.path.isdir(path):
        raise ModelFileError(f"{str(path)!r} is a folder, not a model file; create a model file with "
                             "'featx fit DATA -o model.joblib'.")
    if not os.path.isfile(path):
        raise ModelFileError(f"Model file {str(path)!r} does not exist; create one with 'featx fit DATA -o {path}'.")
    payload = _read_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{str(path)!r} is not a featx model file; create one with 'featx fit'.")
    saved = str(payload.get("featx_version"))
    if payload.get("format_version") != FORMAT_VERSION or saved.split(".")[0] != __version__.split(".")[0]:
        raise ModelFileError(
            f"Model file {str(path)!r} was written by featx {saved} (format {payload.get('format_version')}); "
            f"this is featx {__version__} (format {FORMAT_VERSION}). Refit it with 'featx fit'."
        )
    if not isinstance(payload.get("model"), FeatxModel):
        raise ModelFileError(
            f"{str(path)!r} is not a featx model file (it holds no model); create one with 'featx fit'."
        )
    model = payload["model"]
    for features in model.parts:
        try:
            backbone = load_backbone(features.backbone, weights=features.weights, lazy=True)
        except FeatxError as exc:
            raise ModelFileError(f"Model file {str(path)!r} needs backbone {features.backbone!r}: {exc}") from exc
        if backbone.weights != features.weights_:
            raise ModelFileError(
                f"Model file {str(path)!r} was trained with weights {features.weights_!r}, but here "
                f"{features.backbone!r} resolves to {backbone.weights!r}: install the same weights or refit the model."
            )
        features.backbone_ = backbone
    return model


def _run_options(model: FeatxModel, *, on_error: str, progress: bool | None, store,
                 max_pixels: int) -> list[ExtractOptions]:
    """The extraction options of every part of ``model`` for one run; ``store`` (not None) replaces its cache."""
    run = [model.extraction_options(part).replace(on_error=on_error, progress=progress, max_pixels=max_pixels)
           for part in model.parts]
    return run if store is None else [options.replace(store=store) for options in run]


def predict(model: FeatxModel, images, *, on_error: str = "skip", progress: bool | None = None,
            store=None, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict]:
    """Predict labels and class probabilities of images, through the feature store.

    ``store`` is the feature store of this run's features (a folder, an ``.h5`` path, or ``True``
    for ``$FEATX_CACHE`` or ``./cache``); default ``None``: the model's own
    cache setting, the one it was fitted with. ``max_pixels`` is the largest width × height of an
    image file decoded (see :class:`~featx.options.ExtractOptions`); a larger one is skipped with
    its reason.

    Returns
    -------
    list of dict
        One row per input image, in order: ``image``, ``label`` (``None`` when skipped),
        ``error`` (the reason, for skipped images), and ``p_<class>`` per class.
    """
    source = images if isinstance(images, ImageSource) else open_source(images)
    X, result, kept = _extract_parts(source, model.parts, _run_options(model, on_error=on_error, progress=progress,
                                                                       store=store, max_pixels=max_pixels))
    rows = [{"image": describe(source[i], i), "label": None, "error": None} for i in range(len(source))]
    for position, (_, reason) in zip(result.skipped_positions, result.skipped):
        rows[position]["error"] = reason
    if len(kept):
        proba = model.head.predict_proba(X)
        labels = model.head.classes_[proba.argmax(axis=1)]
        for i, p, label in zip(kept, proba, labels):
            rows[i]["label"] = str(label)
            rows[i].update({f"p_{c}": float(v) for c, v in zip(model.classes, p)})
    return rows


def evaluate_model(model: FeatxModel, source, *, on_error: str = "skip", progress: bool | None = None,
                   store=None, max_pixels: int = DEFAULT_MAX_PIXELS, predictions: bool = False) -> dict:
    """Score a model on labelled images: held-out ones, unless ``n_training_images`` says otherwise.

    ``store`` and ``max_pixels`` are as in :func:`predict`. ``predictions=True`` adds each
    scored image's prediction and class probabilities (what :func:`featx.report.model_report`
    shows of the images the model gets wrong).

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``per_class``, ``confusion_matrix``,
        ``classes``, ``n_images``, ``n_training_images`` (how many of the scored images trained
        the model, by content; None for a model file that does not record its training images)
        and ``skipped``. With ``predictions=True`` also ``predictions``: one dict per scored
        image, in source order, with ``position`` (its index in `source`), ``image`` (its
        description), ``label`` (the true one), ``predicted`` and ``proba`` (the probability
        of every class, in the order of ``classes``).
    """
    source = source if isinstance(source, ImageSource) else open_source(source)
    X, result, kept = _extract_parts(source, model.parts, _run_options(model, on_error=on_error, progress=progress,
                                                                       store=store, max_pixels=max_pixels))
    y = kept_labels(result, kept)
    unknown = sorted(set(map(str, y)) - set(model.classes))
    if unknown:
        raise FeatxError(
            f"{source.name} holds classes the model was not trained on: {unknown}; the model knows {model.classes}."
        )
    predicted = model.head.predict(X)
    report = score_predictions(y, predicted, classes=model.classes)
    if predictions:
        proba = model.head.predict_proba(X) if len(kept) else np.zeros((0, len(model.classes)))
        report["predictions"] = [
            {"position": int(i), "image": describe(source[i], i), "label": str(label), "predicted": str(guess),
             "proba": [float(v) for v in p]}
            for i, label, guess, p in zip(kept, y, predicted, proba)
        ]
    report.update(
        n_images=int(len(y)),
        n_training_images=count_training_images(model, [result.keys[i] for i in kept]),
        skipped=[{"image": name, "reason": reason} for name, reason in result.skipped],
        model=model.describe(),
    )
    return report
