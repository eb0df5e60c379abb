"""``CNNFeatures``: the scikit-learn adapter over extraction and the feature store.

It owns no loop: :meth:`CNNFeatures.transform` calls :func:`featx.extract`. With a cache (the
default), the first time the network sees an image it computes *every* layer alias and pooling of
the backbone (``prefetch="all"``), so a grid search over ``layer`` and ``pooling`` runs the
network at most once per image; later fits and transforms read the store.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featx.backbones import Backbone, layer_shape, list_layers, load_backbone
from featx.devices import check_runtime, resolve
from featx.exceptions import FeatxError
from featx.extraction import extract
from featx.images import ImageSource, open_source
from featx.loop import make_requests
from featx.options import ExtractOptions
from featx.pooling import POOLINGS, feature_names, pooled_dim
from featx.threads import leave_blas_at_one, plan

__all__ = ["CNNFeatures"]

_DEFAULT = ExtractOptions()


class CNNFeatures(TransformerMixin, BaseEstimator):
    """Pooled features of a frozen, pretrained CNN, as a scikit-learn transformer.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        A name from ``featx models`` or ``"timm:<name>"``.
    weights : str, path or None, default="DEFAULT"
        ``"DEFAULT"``, a weights name, a state-dict path, or ``None`` (seeded random init).
    layer : str or list of str, default="pre_logits"
        A layer alias (``stem``, ``stage1`` …, ``pre_logits``, ``logits``) or raw node name;
        several layers (a list, or names joined by ``+`` or ``,``) are concatenated in the order
        given into one output. ``LAYER/POOLING`` fixes the pooling of one layer
        (``"stage4/spp+pre_logits/avg"``).
    pooling : str or list of str, default="avg"
        ``avg``, ``max``, ``avgmax`` or ``spp``, for layers that name none; several are concatenated.
    batch_size : int, default=32
    device : {"auto", "cpu", "cuda", "mps"}, default="auto"
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
    cache : bool, str, path or None, default=True
        ``True`` uses the feature store in ``$FEATX_CACHE`` or ``./cache``; a folder or
        ``.h5`` path uses that store; ``None`` (or ``False``) keeps nothing and runs the network
        on every ``transform``.
    prefetch : {"all", "none"}, default="all"
        With a cache, whether a forward pass also stores every other layer alias and pooling,
        so that changing ``layer`` or ``pooling`` later costs no forward pass.
    num_workers : int or "auto", default="auto"
        Decoding processes (``"auto"``: see :class:`~featx.options.ExtractOptions`).
    progress : bool, default=False
        Show a progress bar while the network runs.
    tta : {None, "hflip"}, default=None
        ``"hflip"``: features averaged over each image and its horizontal mirror (one forward
        pass on both; kept in a store of their own).
    runtime : {"auto", "torch", "onnxruntime", "openvino"}, default="auto"
        What runs the network: ``"auto"`` the fastest runtime installed and verified for this
        backbone on this machine (measured once, remembered in the cache folder; see
        :mod:`featx.runtimes`); ``"onnxruntime"`` (``pip install "featx[onnx]"``) and
        ``"openvino"`` run an ONNX export on the CPU. Features within the precision's tolerance
        of eager (same store).
    max_pixels : int, default=DEFAULT_MAX_PIXELS
        Largest width × height of an image file that is decoded (decompression-bomb guard); a
        larger one fails ``transform`` with :class:`~featx.exceptions.ImageDecodeError`. Not part
        of the store: it decides which images are accepted, not their features.
    threads : "auto", int or None, default="auto"
        The thread plan (:mod:`featx.threads`). ``"auto"``: the forward pass on torch's threads
        capped by the cores (the caller's torch count comes back after), and, after every
        ``transform``, the process's BLAS libraries are left at **one thread**, so that the
        scikit-learn head that follows in a Pipeline or GridSearchCV is not slowed by BLAS
        threads fighting over the cores (measured: a ``LogisticRegression`` on 200 × 1280
        features 2.6× faster idle, 50× under load); :func:`featx.threads.restore_blas` gives
        the BLAS libraries their counts back. N: the forward pass on N torch threads, BLAS left
        alone. ``None``: featx changes no thread setting.

    Attributes
    ----------
    backbone_ : Backbone
        The resolved backbone; its network is loaded only when a forward pass is needed and
        is never pickled.
    weights_ : str
        The resolved weights name.
    device_ : torch.device
    precision_ : str
    n_features_out_ : int
        Width of the transformed output.
    blocks_ : list of int
        Width of each concatenated (layer, pooling) block, in output order: pass it to
        :class:`featx.heads.BlockScaler` (or ``featx.evaluate(..., blocks=...)``) to give
        every block the same weight.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    >>> y = [0, 1, 0, 1, 0, 1]
    >>> model = make_pipeline(CNNFeatures("featx_tiny_cnn", layer="stage2", pooling="spp",
    ...                                   device="cpu", cache=None), LogisticRegression())
    >>> model.fit(X, y).predict(X).shape
    (6,)
    >>> model[0].get_feature_names_out()[:2].tolist()
    ['stage2_spp_0', 'stage2_spp_1']
    >>> both = CNNFeatures("featx_tiny_cnn", layer="stage2/spp+pre_logits", device="cpu", cache=None).fit()
    >>> both.blocks_, both.get_feature_names_out()[[0, -1]].tolist()
    ([160, 32], ['stage2_spp_0', 'pre_logits_avg_31'])
    """

    # The defaults are ExtractOptions' (spelled there once), except the transformer's own choices:
    # it caches by default (a grid search then runs the network once per image) and is quiet.
    def __init__(
        self,
        backbone=_DEFAULT.backbone,
        *,
        weights=_DEFAULT.weights,
        layer=_DEFAULT.layers,
        pooling=_DEFAULT.pooling,
        batch_size=_DEFAULT.batch_size,
        device=_DEFAULT.device,
        precision=_DEFAULT.precision,
        cache=True,
        prefetch="all",
        num_workers=_DEFAULT.num_workers,
        progress=False,
        tta=_DEFAULT.tta,
        runtime=_DEFAULT.runtime,
        max_pixels=_DEFAULT.max_pixels,
        threads=_DEFAULT.threads,
    ):
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.cache = cache
        self.prefetch = prefetch
        self.num_workers = num_workers
        self.progress = progress
        self.tta = tta
        self.runtime = runtime
        self.max_pixels = max_pixels
        self.threads = threads

    def fit(self, X=None, y=None):
        """Resolve the backbone, layers and poolings; no image is processed.

        Parameters
        ----------
        X : ignored
            Accepted for the scikit-learn API.
        y : ignored

        Returns
        -------
        self : CNNFeatures
        """
        if self.prefetch not in ("all", "none"):
            raise FeatxError(f"prefetch must be 'all' or 'none', got {self.prefetch!r}.")
        options = self._options()  # checks every setting before anything is loaded
        if options.layers == "auto":
            raise FeatxError(
                "CNNFeatures(layer='auto'): a transformer cannot choose its layer without labels. Put the layer in "
                "GridSearchCV's grid ({'cnnfeatures__layer': ['stage4', 'pre_logits']}), or let "
                "featx.fit_model(data, layers='auto') choose it by cross-validation.")
        backbone = load_backbone(options.backbone, weights=options.weights, lazy=True)
        self.requests_ = make_requests(backbone.name, options.layers, options.pooling)
        resolved = resolve(options)
        check_runtime(options.runtime, resolved.device)
        self.device_ = resolved.device
        self.precision_ = resolved.precision
        self.backbone_ = backbone
        self.weights_ = backbone.weights
        dims = {(r.layer, r.pooling): _dim(backbone, r) for r in self.requests_}
        self.blocks_ = [int(dims[(r.layer, r.pooling)]) for r in self.requests_]
        self.n_features_out_ = int(sum(dims.values()))
        self._names = np.concatenate(
            [feature_names(r.layer, r.pooling, dims[(r.layer, r.pooling)]) for r in self.requests_]
        ).astype(object)
        return self

    @classmethod
    def from_options(cls, options: ExtractOptions, **params) -> CNNFeatures:
        """A transformer (unfitted) that extracts what ``options`` say; ``params`` set its own
        parameters (``prefetch``, ``progress`` …) or override one.

        ``store`` becomes ``cache`` and ``layers`` ``layer``; the settings a transformer has no
        parameter for (``dtype``, ``on_error``, ``decoder``, ``compile``, ``engine``) are left out.

        Examples
        --------
        >>> CNNFeatures.from_options(ExtractOptions(backbone="featx_tiny_cnn", layers="stage2", store=None)).cache is None
        True
        """
        return cls(options.backbone if isinstance(options.backbone, str) else options.backbone.name,
                   **{"weights": options.weights, "layer": options.layers, "pooling": options.pooling,
                      "batch_size": options.batch_size, "device": options.device, "precision": options.precision,
                      "cache": options.store, "num_workers": options.num_workers, "tta": options.tta,
                      "runtime": options.runtime, "max_pixels": options.max_pixels, "threads": options.threads,
                      **params})

    def _options(self) -> ExtractOptions:
        return ExtractOptions(backbone=self.backbone, weights=self.weights, layers=self.layer, pooling=self.pooling,
                              batch_size=self.batch_size, device=self.device, precision=self.precision,
                              store=None if self.cache is False else self.cache, num_workers=self.num_workers,
                              progress=self.progress, on_error="raise", tta=self.tta, runtime=self.runtime,
                              max_pixels=self.max_pixels, threads=self.threads)

    def extraction_options(self) -> ExtractOptions:
        """The options this fitted transformer extracts its blocks with (device and precision resolved).

        Their ``layers`` are the output blocks (``"stage4/spp"`` …), in order; ``store`` is the
        ``cache``; ``on_error`` is ``"raise"``, as a transformer cannot drop rows.

        Returns
        -------
        ExtractOptions
        """
        check_is_fitted(self, "requests_")
        return self._options().replace(backbone=self.backbone_, layers=tuple(r.key for r in self.requests_),
                                       pooling=tuple(dict.fromkeys(r.pooling for r in self.requests_)),
                                       device=self.device_, precision=self.precision_)

    def __setstate__(self, state):
        # Transformers pickled (in model files) before a parameter existed get its default.
        super().__setstate__({"tta": None, "runtime": "torch", "max_pixels": _DEFAULT.max_pixels,
                              "threads": _DEFAULT.threads, **state})

    def transform(self, X):
        """Pooled features of the images in ``X``.

        Parameters
        ----------
        X : sequence of paths or PIL images, array of shape (n, H, W) or (n, H, W, C), or ImageSource

        Returns
        -------
        ndarray of shape (n_samples, n_features_out_), float32

        Raises
        ------
        ImageDecodeError
            For an image that cannot be decoded; its message names the image.
        """
        check_is_fitted(self, "requests_")
        source = X if isinstance(X, ImageSource) else open_source(X)
        options = self.extraction_options()
        if options.store is not None and self.prefetch == "all":
            aliases = [info.alias for info in list_layers(self.backbone_.name)]
            options = options.replace(layers=(*aliases, *options.layers), pooling=tuple(POOLINGS))
        features = extract(source, options)
        if plan(self.threads, torch_default=1).blas_after == 1:
            leave_blas_at_one()  # for the head that follows (see the threads parameter)
        blocks = [np.asarray(features[r.key], dtype=np.float32) for r in self.requests_]
        return np.hstack(blocks) if len(blocks) > 1 else blocks[0]

    def get_feature_names_out(self, input_features=None):
        """Names ``<layer>_<pooling>_<i>`` of the output columns.

        Parameters
        ----------
        input_features : ignored
            Accepted for the scikit-learn API; images have no input feature names.

        Returns
        -------
        ndarray of str of shape (n_features_out_,)
        """
        check_is_fitted(self, "requests_")
        return self._names.copy()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.target_tags.required = False
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float32"]
        tags.non_deterministic = False
        return tags


def _dim(backbone: Backbone, request) -> int:
    return pooled_dim(layer_shape(backbone.name, request.tap), request.pooling)
