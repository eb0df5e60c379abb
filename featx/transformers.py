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
from featx.exceptions import FeatxError
from featx.extraction import check_runtime, check_tta, extract, make_requests, resolve_device, resolve_precision
from featx.images import ImageSource, open_source
from featx.pooling import POOLINGS, feature_names, pooled_dim

__all__ = ["CNNFeatures"]


def _as_list(value) -> list[str]:
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    return list(value)


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
        Decoding processes.
    progress : bool, default=False
        Show a progress bar while the network runs.
    tta : {None, "hflip"}, default=None
        ``"hflip"``: features averaged over each image and its horizontal mirror (one forward
        pass on both; kept in a store of their own).
    runtime : {"torch", "onnxruntime"}, default="torch"
        ``"onnxruntime"``: the network is exported to ONNX once per process and run by ONNX
        Runtime on the CPU (``pip install "featx[onnx]"``): several times faster there, same
        features up to float rounding (same store).

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

    def __init__(
        self,
        backbone="efficientnet_lite0",
        *,
        weights="DEFAULT",
        layer="pre_logits",
        pooling="avg",
        batch_size=32,
        device="auto",
        precision="auto",
        cache=True,
        prefetch="all",
        num_workers="auto",
        progress=False,
        tta=None,
        runtime="torch",
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
        check_tta(self.tta)
        backbone = load_backbone(self.backbone, weights=self.weights, lazy=True)
        self.requests_ = _requests(backbone.name, self.layer, self.pooling)
        self.device_ = resolve_device(self.device)
        self.precision_ = resolve_precision(self.precision, self.device_)
        check_runtime(getattr(self, "runtime", "torch"), self.device_)
        self.backbone_ = backbone
        self.weights_ = backbone.weights
        dims = {(r.layer, r.pooling): _dim(backbone, r) for r in self.requests_}
        self.blocks_ = [int(dims[(r.layer, r.pooling)]) for r in self.requests_]
        self.n_features_out_ = int(sum(dims.values()))
        self._names = np.concatenate(
            [feature_names(r.layer, r.pooling, dims[(r.layer, r.pooling)]) for r in self.requests_]
        ).astype(object)
        return self

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
        cache = None if self.cache is False else self.cache
        common = dict(
            backbone=self.backbone_,
            batch_size=self.batch_size,
            device=self.device_,
            precision=self.precision_,
            num_workers=self.num_workers,
            progress=self.progress,
            on_error="raise",
            tta=getattr(self, "tta", None),
            runtime=getattr(self, "runtime", "torch"),  # models saved before runtime existed lack it
        )
        layers = [r.layer for r in self.requests_]
        poolings = [r.pooling for r in self.requests_]
        if cache is not None and self.prefetch == "all":
            layers = [*(info.alias for info in list_layers(self.backbone_.name)), *layers]
            poolings = list(POOLINGS)
        features = extract(
            source, layers=list(dict.fromkeys(layers)), pooling=list(dict.fromkeys(poolings)), store=cache, **common
        )
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


def _requests(backbone: str, layer, pooling) -> list:
    """One request per distinct (layer, pooling) block, in output order.

    ``layer`` entries (a list, or a string split at ``,`` and ``+``) are ``LAYER`` (with every
    pooling of ``pooling``), ``LAYER/POOLING`` or ``all``.
    """
    poolings = _as_list(pooling)
    pairs: list[tuple[str, str]] = []
    for entry in _as_list(layer):
        for part in entry.split("+"):
            name, _, fixed = part.strip().partition("/")
            if not name:
                raise FeatxError(f"Empty layer name in {layer!r}: expected names such as 'stage4' or 'stage4/spp'.")
            pairs += [(name, fixed)] if fixed else [(name, p) for p in poolings]
    if not pairs:
        raise FeatxError(f"No layer given (layer={layer!r}): expected one or more layer names, or 'all'.")
    requests = []
    for name, p in dict.fromkeys(pairs):
        requests += make_requests(backbone, [name], [p])
    return list({(r.layer, r.pooling): r for r in requests}.values())


def _dim(backbone: Backbone, request) -> int:
    return pooled_dim(layer_shape(backbone.name, request.tap), request.pooling)
