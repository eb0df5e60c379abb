"""``featx fit DATA --auto``: the best model that cross-validation on DATA finds within a time budget.

The search scores *candidates*. A candidate is a configuration, an estimate of the seconds it
still needs, a way to score it by stratified K-fold cross-validation on the training data, and a
way to refit it on all of that data as an ordinary featx model (:class:`Candidate`). featx's own
candidates are frozen-feature ones (:class:`FrozenCandidate`): backbones, layers and poolings
(concatenations included), flip averaging and heads. Other kinds, such as partial fine-tuning,
plug in through ``auto_fit(..., extra_candidates=[...])``: anything with ``name``, ``config``,
``estimate(search)``, ``score(search)`` and ``refit(search)``.

How the budget is spent:

- The cheapest pending candidate runs next. Its cost is the extraction it still needs (images
  the feature store lacks, times the per-image time measured on this machine: a short forward
  pass of each backbone, calibrated by every finished extraction) plus its evaluation (seconds
  per sample and feature measured by the evaluations so far). Every extraction computes, in one
  pass, all layers and poolings that any candidate of that backbone and flip setting needs.
- Heads: every feature configuration is first scored with the first head; the other heads are
  tried on the configurations whose score is among the best ``explore_top`` so far.
- A candidate starts only if the time spent, its estimate and the refit of the best so far fit
  in the budget; as candidates run cheapest first, the search stops at the first that does not.
  The cheapest candidate always runs, so that there is a model, even when its estimate alone
  exceeds the budget; its row says so.
- With the default feature sets, the first candidate is ``featx fit``'s own choice for the data
  (:func:`default_candidate`: every layer of the first backbone under avg and spp, chosen by
  the one-standard-error rule, as ``--layers auto`` does).
- The winner is the first candidate within one standard error of the best mean CV accuracy
  (:func:`featx.selection.one_standard_error`), ``featx fit``'s choice first, then in the order
  the search ran them (cheapest first); it is refitted on all the data
  (:func:`featx.models.fit_model`: its head's C and gamma tuned by inner CV).

The search only ever sees the source it is given: there is no argument for held-out data.
Features come from (and go to) the feature store, and cross-validation reports are kept beside
it, so a second search, or ``featx cv`` afterwards, computes nothing twice.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from featx.backbones import load_backbone
from featx.compare import cached_evaluate, reports_folder
from featx.devices import autocast, resolve
from featx.exceptions import FeatxError
from featx.extraction import extract, join_features, kept_labels, prepare, require_kept, store_config, store_location
from featx.featuresets import parse_feature_sets, set_name
from featx.images import ImageSource, content_key, open_source
from featx.options import CACHED, ExtractOptions, FinetuneOptions, check_tta
from featx.paths import split_names
from featx.progress import Progress
from featx.selection import Selection, one_standard_error
from featx.store import FeatureStore

__all__ = ["AutoResult", "Candidate", "FinetuneCandidate", "FrozenCandidate", "Search", "auto_fit", "parse_budget"]

DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
DEFAULT_FEATURE_SETS = ("pre_logits/avg", "stage5/spp", "stage4/spp+pre_logits/avg")
DEFAULT_TTAS = ("none", "hflip")
DEFAULT_HEADS = ("logreg", "linear-svm", "rbf-svm")
# Seconds per (sample x feature) of one nested logistic-regression evaluate(cv=5, inner_cv=3) on
# 2 busy cores (2.2e-5 at n = 300 and at n = 3,068, d = 1,280), and the cost of the other heads
# relative to it: on clothing_small (n = 3,068, d = 1,280) the LinearSVC evaluation took 658 s
# against 88 s for logreg; the RBF SVM, whose kernel grows as n^2, is assumed as costly. A head
# measured in this search uses its own rate; an unmeasured one is scaled from a measured one.
_EVAL_PRIOR = 2.2e-5
_RELATIVE_COST = {"logreg": 1.0, "linear-svm": 8.0, "rbf-svm": 8.0}
# Finished extractions take longer than the bare forward pass (decoding, pooling, writing);
# this is the ratio assumed until one has been measured.
_OVERHEAD_PRIOR = 1.0
# Fine-tuning: an epoch costs more than its training steps (validation pass, BatchNorm statistics
# recomputed on up to 1,024 maps, reading float16 maps); assumed until a candidate has run.
_TRAIN_OVERHEAD_PRIOR = 1.25
# The key of a backbone's float16 map extraction in Search.results (beside (backbone, tta) keys).
MAPS = "maps"


def parse_budget(budget) -> float:
    """Seconds in a budget: a number of seconds, or a string such as ``"90s"``, ``"10m"``, ``"1h30m"``.

    Examples
    --------
    >>> parse_budget("10m"), parse_budget("1h30m"), parse_budget(45), parse_budget("2.5m")
    (600.0, 5400.0, 45.0, 150.0)
    """
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        seconds = float(budget)
    else:
        text = str(budget).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
        if not text or parts is None:
            raise FeatxError(f"Cannot read the budget {budget!r}: expected seconds or a duration such as 90s, 10m, 1h30m.")
        hours, minutes, secs = (float(p) if p else 0.0 for p in parts.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    if not seconds > 0:
        raise FeatxError(f"The budget must be positive, got {budget!r}; e.g. --budget 10m.")
    return seconds


@runtime_checkable
class Candidate(Protocol):
    """What :func:`auto_fit` needs of a candidate (frozen features here; fine-tuning plugs in the same way).

    Attributes
    ----------
    name : str
        One line naming the configuration, unique in a search.
    config : dict
        JSON-serialisable description; ``config["kind"]`` says what sort of candidate it is.
    """

    name: str
    config: dict

    def estimate(self, search: Search) -> float:
        """Seconds this candidate still needs, given what ``search`` has already computed."""

    def score(self, search: Search) -> dict:
        """Cross-validate on ``search.source`` only; return at least ``accuracy_mean``, ``accuracy_std``, ``cv``."""

    def refit(self, search: Search):
        """Fit on all of ``search.source``; return a :class:`~featx.models.FeatxModel`."""


@dataclass(frozen=True)
class FrozenCandidate:
    """Frozen features of one or more backbones (concatenated), with flip averaging or not, and a head.

    Parameters
    ----------
    backbones : tuple of str
    pairs : tuple of (layer, pooling)
        The blocks taken from every backbone, in order.
    tta : str or None
        ``None`` or ``"hflip"``.
    head : str
    """

    backbones: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    tta: str | None
    head: str

    @property
    def features(self) -> str:
        if len(self.backbones) == 1:
            return set_name(self.pairs)
        return set_name([p for _ in self.backbones for p in self.pairs], [b for b in self.backbones for _ in self.pairs])

    @property
    def layer_spec(self) -> str:
        return "+".join(f"{layer}/{pooling}" for layer, pooling in self.pairs)

    @property
    def name(self) -> str:
        return f"{'+'.join(self.backbones)} {self.layer_spec} tta={self.tta or 'none'} {self.head}"

    @property
    def config(self) -> dict:
        return {"kind": "frozen", "backbone": "+".join(self.backbones), "features": self.features,
                "layer": self.layer_spec, "tta": self.tta or "none", "head": self.head}

    def with_head(self, head: str) -> FrozenCandidate:
        return FrozenCandidate(self.backbones, self.pairs, self.tta, head)

    def estimate(self, search: Search) -> float:
        extraction = sum(search.extraction_estimate(b, self.tta) for b in self.backbones)
        return extraction + search.evaluation_estimate(self.head, search.dim(self))

    def score(self, search: Search) -> dict:
        X, y, folder, blocks = search.matrix(self)
        return cached_evaluate(X, y, folder=folder, head=self.head, cv=search.cv, inner_cv=search.inner_cv,
                               random_state=search.random_state, progress=search.progress,
                               **({"blocks": blocks} if len(blocks) > 1 else {}))

    def refit(self, search: Search):
        from featx.models import fit_model  # scikit-learn: 'featx fit' reads this module's defaults light

        options = search.options.replace(backbone=list(self.backbones), layers=self.layer_spec, tta=self.tta)
        model, _ = fit_model(search.source, options, head=self.head, inner_cv=search.inner_cv,
                             random_state=search.random_state)
        return model


@dataclass(frozen=True)
class FinetuneCandidate:
    """Partial fine-tuning of one backbone from ``from_layer`` (:mod:`featx.finetuning`).

    Scored by :func:`featx.finetuning.cross_validate_finetune` on the same outer folds as the
    frozen candidates (a tail trained in every outer fold, with early stopping on a split of that
    fold's training part); refitted by :func:`featx.finetune` on all the data. The maps come from
    one float16 extraction per backbone (all fine-tuning layers of that backbone in one pass).

    Parameters
    ----------
    backbone : str
    from_layer : str
    epochs, lr, patience : training options of :class:`featx.finetuning.TailClassifier`
        Upper bound on epochs (the estimate assumes all of them), learning rate of the tail,
        early-stopping patience.
    """

    backbone: str
    from_layer: str
    epochs: int = 10
    lr: float = 1e-3
    patience: int = 3

    @property
    def name(self) -> str:
        return f"{self.backbone} finetune from {self.from_layer}"

    @property
    def options(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "patience": self.patience}

    @staticmethod
    def val_split(y, n_train: int) -> float:
        """The early-stopping split for ``n_train`` training images of labels like ``y``.

        10 %, raised so that every class can have one validation image; 0 (all epochs, no early
        stopping) when that would take more than a third of the images or a class has fewer than
        three images.

        Examples
        --------
        >>> FinetuneCandidate.val_split(["a", "b"] * 500, 800), FinetuneCandidate.val_split(["a", "b", "c"] * 6, 12)
        (0.1, 0.2917)
        >>> FinetuneCandidate.val_split(["a", "b"] * 2, 3)
        0.0
        """
        _, counts = np.unique(np.asarray(y), return_counts=True)
        split = max(0.1, (len(counts) + 0.5) / max(n_train, 1))
        return round(split, 4) if split <= 1 / 3 and counts.min() >= 3 else 0.0

    @property
    def config(self) -> dict:
        return {"kind": "finetune", "backbone": self.backbone, "features": f"{self.from_layer}/map",
                "layer": self.from_layer, "tta": "none", "head": "finetune", **self.options}

    def estimate(self, search: Search) -> float:
        return search.map_extraction_estimate(self.backbone) + search.finetune_estimate(self)

    def score(self, search: Search) -> dict:
        from featx.finetuning import read_maps  # torch: only when a fine-tuning candidate runs

        result = search.map_extraction(self.backbone)
        X, y = read_maps(result, self.from_layer), kept_labels(result)
        val_split = self.val_split(y, len(y) * (search.cv - 1) // search.cv)
        report = cached_evaluate(X, y, folder=reports_folder(result.store), method="finetune", cv=search.cv,
                                 random_state=search.random_state, backbone=self.backbone,
                                 weights=search.options.weights, layer=self.from_layer,
                                 device=str(search.options.device), val_split=val_split, progress=search.progress,
                                 **self.options)
        return {**report, "n_features": int(X.shape[1])}

    def refit(self, search: Search):
        from featx.finetuning import finetune  # torch: only when a fine-tuning candidate wins

        labels = search.source.labels
        training = FinetuneOptions(val_split=self.val_split(labels, len(labels)), **self.options)
        model, _ = finetune(search.source, search.options.replace(backbone=self.backbone), from_layer=self.from_layer,
                            training=training, random_state=search.random_state)
        return model


class Search:
    """The state of one :func:`auto_fit` run, shared by its candidates.

    It extracts each (backbone, tta) once, with every (layer, pooling) any registered frozen
    candidate needs; keeps the measured extraction and evaluation speeds for the estimates; and
    hands candidates the training source, the store and the CV settings. Candidates of other
    kinds read ``source``, ``cv``, ``inner_cv``, ``random_state`` and :attr:`options`, and may
    advance :attr:`progress` by one step per outer fold (the search counts a candidate's folds
    itself when it did not).

    Attributes
    ----------
    progress : featx.progress.Progress or None
        The search's bar (set by :func:`auto_fit`).
    on_skipped : callable or None
        Called with the ``(image, reason)`` pairs an extraction skipped that no earlier
        extraction of the search had (and the number of images), right after that extraction.
    """

    def __init__(self, source, options: ExtractOptions | None = None, *, cv, inner_cv, random_state, **settings):
        self.source = source
        self.cv = cv
        self.inner_cv = inner_cv
        self.random_state = random_state
        #: The search's extraction settings, device and precision resolved: every extraction of the
        #: search and every store it looks into are built from these.
        self.options = resolve(ExtractOptions.merge(options or CACHED, settings, where="Search"))
        self.needs: dict[tuple[str, str | None], dict[tuple[str, str], None]] = {}
        self.results: dict = {}
        self.extraction_seconds: dict[tuple[str, str | None], float] = {}
        self.overhead: list[float] = []
        self.eval_rate: dict[str, float] = {}
        self._dims: dict = {}
        self._probe: dict[str, float] = {}
        self._missing: dict = {}
        self._keys: list[str] | None = None
        self.map_layers: dict[str, dict[str, None]] = {}
        self.train_rate: dict[tuple[str, str], float] = {}
        self.train_overhead: list[float] = []
        self.progress: Progress | None = None
        self.on_skipped = None
        self._reported: dict[str, str] = {}

    def _extracted(self, result) -> None:
        """Report the images ``result`` skipped that were not reported yet; refuse a result without images."""
        new = [(name, reason) for name, reason in result.skipped if name not in self._reported]
        self._reported.update(new)
        if new and self.on_skipped is not None:
            self.on_skipped(new, len(self.source))
        require_kept(result, "search")

    # ------------------------------------------------------------------ extraction
    def register(self, candidate) -> None:
        """Note what a candidate will need extracted, so that one pass per backbone computes it all."""
        if isinstance(candidate, FinetuneCandidate):
            self.map_layers.setdefault(candidate.backbone, {})[candidate.from_layer] = None
            return
        for backbone in candidate.backbones:
            self.needs.setdefault((backbone, candidate.tta), {}).update(dict.fromkeys(candidate.pairs))

    def extraction(self, backbone: str, tta: str | None):
        """The extraction of every registered (layer, pooling) of ``backbone`` with ``tta``, run once."""
        key = (backbone, tta)
        if key not in self.results:
            estimate = self.extraction_estimate(backbone, tta)
            start = time.perf_counter()
            result = extract(self.source, self.frozen_options(backbone, tta))
            seconds = time.perf_counter() - start
            self._extracted(result)
            if result.n_computed >= 32:
                self.overhead.append(seconds / max(estimate, 1e-9) * self._overhead())
            self.results[key] = result
            self.extraction_seconds[key] = seconds
        return self.results[key]

    def map_extraction(self, backbone: str):
        """The float16 maps of every registered fine-tuning layer of ``backbone``, extracted once."""
        key = (backbone, MAPS)
        if key not in self.results:
            start = time.perf_counter()
            result = extract(self.source, self.maps_options(backbone))
            self._extracted(result)
            self.results[key] = result
            self.extraction_seconds[key] = time.perf_counter() - start
        return self.results[key]

    def frozen_options(self, backbone: str, tta: str | None) -> ExtractOptions:
        """The extraction of every registered (layer, pooling) of ``backbone`` with ``tta``."""
        blocks = tuple(f"{layer}/{pooling}" for layer, pooling in self.needs[(backbone, tta)])
        return self.options.replace(backbone=backbone, layers=blocks, tta=tta)

    def maps_options(self, backbone: str) -> ExtractOptions:
        """The float16 map extraction of every registered fine-tuning layer of ``backbone``."""
        return self.options.for_maps(backbone, tuple(self.map_layers[backbone]))

    def map_extraction_estimate(self, backbone: str) -> float:
        """Seconds the map extraction of ``backbone`` still needs (0 once done)."""
        if (backbone, MAPS) in self.results:
            return 0.0
        missing = self.missing_images(backbone, MAPS)
        return missing * self._probe_seconds(backbone) * self._overhead() if missing else 0.0

    def finetune_estimate(self, candidate: FinetuneCandidate) -> float:
        """Seconds of the outer cross-validation of a fine-tuning candidate, all epochs assumed.

        The training step time per map is timed on this machine
        (:func:`featx.finetuning.train_seconds_per_image`); validation passes and the BatchNorm
        statistics add a measured overhead (25 % assumed until a candidate has run).
        """
        key = (candidate.backbone, candidate.from_layer)
        if key not in self.train_rate:
            from featx.finetuning import train_seconds_per_image  # torch

            self.train_rate[key] = train_seconds_per_image(candidate.backbone, candidate.from_layer,
                                                           weights=self.options.weights,
                                                           device=str(self.options.device))
        overhead = float(np.median(self.train_overhead)) if self.train_overhead else _TRAIN_OVERHEAD_PRIOR
        return max(self.cv, 2) * candidate.epochs * self._trained_per_fold() * self.train_rate[key] * overhead

    def _trained_per_fold(self) -> float:
        """Images one outer fold trains on: its training part, less the early-stopping split (about 10 %)."""
        folds = max(self.cv, 2)
        return len(self._content_keys()) * (folds - 1) / folds * 0.9

    def record_finetune(self, candidate: FinetuneCandidate, report: dict, seconds: float) -> None:
        """Calibrate the training estimates by a scored candidate's measured time."""
        epochs = sum(report.get("epochs_run") or report.get("best_epochs") or [])
        rate = self.train_rate.get((candidate.backbone, candidate.from_layer))
        if report.get("from_cache") or not epochs or not rate:
            return
        self.train_overhead.append(seconds / (epochs * self._trained_per_fold() * rate))

    def _overhead(self) -> float:
        return float(np.median(self.overhead)) if self.overhead else _OVERHEAD_PRIOR

    def _content_keys(self) -> list[str]:
        if self._keys is None:
            keys = []
            for i in range(len(self.source)):
                try:
                    keys.append(content_key(self.source[i]))
                except FeatxError:  # unreadable: extraction reports it; nothing to compute for it here
                    continue
            self._keys = list(dict.fromkeys(keys))
        return self._keys

    def missing_images(self, backbone: str, tta: str | None) -> int:
        """How many images of the source the store still lacks for ``backbone`` with ``tta`` (or its maps: ``MAPS``)."""
        key = (backbone, tta)
        if key not in self._missing:
            keys = self._content_keys()
            loaded = load_backbone(backbone, weights=self.options.weights, lazy=True)
            if tta == MAPS:
                options = self.maps_options(backbone)
                wanted = [(layer, "map") for layer in self.map_layers.get(backbone, {})]
            else:
                options = self.frozen_options(backbone, tta) if key in self.needs else self.options.replace(tta=tta)
                wanted = list(self.needs.get(key, {}))
            # The configuration the extraction itself will key its store by: built by the same function.
            config = store_config(loaded, options=options, kind=self.options.device.type)
            path = store_location(self.options.store, config)
            missing = len(keys)
            if path.exists() and keys:
                with FeatureStore(path) as store:
                    held = store.held(keys, wanted)
                missing = int(np.sum(~np.logical_and.reduce(list(held.values())))) if held else len(keys)
            self._missing[key] = missing
        return self._missing[key]

    def _probe_seconds(self, backbone: str) -> float:
        """Seconds of one forward pass per image, timed on a small batch of blank images."""
        if backbone not in self._probe:
            import torch

            device = self.options.device
            loaded = prepare(load_backbone(backbone, weights=self.options.weights), device)
            size = loaded.preprocess.crop
            x = torch.zeros(16, 3, size, size, device=device)
            if device.type != "mps":
                x = x.contiguous(memory_format=torch.channels_last)
            timings = []
            with torch.inference_mode(), autocast(device, self.options.precision):
                for _ in range(4):
                    start = time.perf_counter()
                    loaded.module(x)
                    timings.append(time.perf_counter() - start)
            self._probe[backbone] = min(timings[1:]) / len(x)
        return self._probe[backbone]

    def extraction_estimate(self, backbone: str, tta: str | None) -> float:
        """Seconds the extraction of ``backbone`` with ``tta`` still needs (0 once done)."""
        if (backbone, tta) in self.results:
            return 0.0
        missing = self.missing_images(backbone, tta)
        if not missing:
            return 0.0
        return missing * self._probe_seconds(backbone) * (2 if tta == "hflip" else 1) * self._overhead()

    # ------------------------------------------------------------------ evaluation
    def dim(self, candidate: FrozenCandidate) -> int:
        if candidate.features not in self._dims:
            from featx.transformers import CNNFeatures  # scikit-learn

            self._dims[candidate.features] = sum(
                CNNFeatures(b, weights=self.options.weights, layer=candidate.layer_spec, device="cpu").fit().n_features_out_
                for b in candidate.backbones
            )
        return self._dims[candidate.features]

    def evaluation_estimate(self, head: str, dim: int) -> float:
        n = len(self._content_keys())
        if head in self.eval_rate:
            rate = self.eval_rate[head]
        else:
            relative = _RELATIVE_COST.get(head, max(_RELATIVE_COST.values()))
            measured = [rate / _RELATIVE_COST.get(h, 1.0) for h, rate in self.eval_rate.items()]
            rate = (max(measured) if measured else _EVAL_PRIOR) * relative
        return rate * n * dim * self.cv / 5

    def record_evaluation(self, head: str, n: int, dim: int, seconds: float) -> None:
        self.eval_rate[head] = seconds / max(n * dim * self.cv / 5, 1)

    def matrix(self, candidate: FrozenCandidate):
        """``(X, y, reports_folder, block_widths)`` of a frozen candidate, from the store."""
        results = [self.extraction(b, candidate.tta) for b in candidate.backbones]
        keys = [f"{layer}/{pooling}" for layer, pooling in candidate.pairs]
        X, widths, kept = join_features(results, [keys] * len(results))
        return X, kept_labels(results[0], kept), reports_folder(results[0].store), widths


@dataclass
class AutoResult:
    """What :func:`auto_fit` returns.

    Attributes
    ----------
    leaderboard : list of dict
        One row per candidate, best first: ``rank`` (None when not run), ``configuration``,
        ``kind``, ``backbone``, ``features``, ``tta``, ``head``, ``dim``, ``accuracy_mean``,
        ``accuracy_std``, ``cv``, ``seconds`` (extraction it triggered + evaluation),
        ``extraction_seconds``, ``estimated_seconds``, ``status`` (``scored`` or why not).
    best : dict
        The chosen row: the cheapest candidate (the first the search ran) whose cross-validated
        accuracy is within one standard error of the highest (:func:`featx.selection.one_standard_error`);
        it is not always ``leaderboard[0]``, whose mean is highest but mostly luck on small data.
    selection : Selection
        The choice: ``chosen``, ``best`` (by mean), the table it chose from, and ``estimate``,
        the score of the whole search (a bootstrap over the folds), not of its winner.
    model : FeatxModel
        The winner, refitted on all the data.
    seconds : float
        Wall time of the whole search, refit included.
    budget : float
        The budget in seconds.
    extractions : list of dict
        ``backbone``, ``tta``, ``maps`` (the float16 maps of fine-tuning candidates), ``seconds``
        and ``n_computed`` of every extraction run.
    advice : dict or None
        :func:`featx.advise.advise`'s report when ``finetune="advise"`` asked it.
    skipped : list of (str, str)
        The ``(image, reason)`` pairs every extraction of the search skipped (unreadable or
        missing images), which no candidate saw; ``n_images`` of the source, for the count.
    n_images : int
        The images of the source, skipped ones included.
    """

    leaderboard: list[dict]
    best: dict
    selection: Selection
    model: object
    seconds: float
    budget: float
    extractions: list[dict] = field(default_factory=list)
    advice: dict | None = None
    skipped: list = field(default_factory=list)
    n_images: int = 0

    def to_json(self) -> dict:
        """The leaderboard, the winner, the timings and the chosen configuration, JSON-serialisable."""
        return {"leaderboard": self.leaderboard, "best": self.best, "seconds": self.seconds, "budget": self.budget,
                "extractions": self.extractions, "advice": self.advice, "model": self.model.describe(),
                "n_images": self.n_images,
                "selection": {"rule": self.selection.rule, "chosen": self.selection.chosen,
                              "best_by_mean": self.selection.best, "estimate": self.selection.estimate,
                              "table": self.selection.table},
                "skipped": [{"image": name, "reason": reason} for name, reason in self.skipped]}


def frozen_candidates(backbones, feature_sets, ttas, heads, *, concat_backbones: bool = True,
                      concat_features: Sequence[str] = ("pre_logits/avg",)) -> list[FrozenCandidate]:
    """The frozen-feature candidates of a search: every backbone x feature set x tta x head, and
    (with ``concat_backbones``) every pair of backbones concatenated on ``concat_features``.

    Examples
    --------
    >>> [c.name for c in frozen_candidates(["a"], ["pre_logits/avg"], ["none", "hflip"], ["logreg"])]
    ['a pre_logits/avg tta=none logreg', 'a pre_logits/avg tta=hflip logreg']
    """
    sets = parse_feature_sets(split_names(feature_sets), "avg")
    extra = parse_feature_sets(split_names(concat_features), "avg") if concat_backbones else []
    backbones = split_names(backbones)
    candidates = []
    for tta in dict.fromkeys(check_tta(t) for t in split_names(ttas)):
        for head in split_names(heads):
            for backbone in backbones:
                candidates += [FrozenCandidate((backbone,), pairs, tta, head) for pairs in sets]
            for first, second in itertools.combinations(backbones, 2):
                candidates += [FrozenCandidate((first, second), pairs, tta, head) for pairs in extra]
    return candidates


def default_candidate(search: Search, backbone: str, head: str, tta: str | None) -> FrozenCandidate:
    """What ``featx fit`` (``--layers auto``) chooses for the search's data, as a candidate of the search.

    Every layer of ``backbone`` under :data:`featx.selection.AUTO_POOLINGS`, in the search's one
    extraction of that backbone, chosen by :func:`featx.selection.select_layer` with ``head`` and
    the search's ``inner_cv`` folds, as :func:`featx.models.fit_model` does: the same choice
    (the default grid of feature sets does not hold every layer: on flowers5 at 30 images per
    class ``featx fit`` took ``stage5/avg``, 0.674 held out, which ``--auto`` could not choose;
    it took ``efficientnet_lite1 stage5/spp``, 0.657).
    """
    from featx.backbones import resolve_layers
    from featx.selection import AUTO_POOLINGS, feature_sets, select_layer

    pairs = [(alias, pooling) for alias, _ in resolve_layers(backbone, "all") for pooling in AUTO_POOLINGS]
    search.needs.setdefault((backbone, tta), {}).update(dict.fromkeys(pairs))
    result = search.extraction(backbone, tta)
    available = feature_sets(result, backbone)
    # Shallow to deep, as layers="all" extracts them: layer_preference reads the depth from this order
    # (the search's extraction lists first the layers its other candidates asked for).
    blocks = {key: available[key] for key in (f"{layer}/{pooling}" for layer, pooling in pairs) if key in available}
    selection = select_layer(blocks, kept_labels(result), head=head, cv=search.inner_cv,
                             random_state=search.random_state)
    layer, pooling = selection.chosen.split("/")
    candidate = FrozenCandidate((backbone,), ((layer, pooling),), tta, head)
    search.register(candidate)
    return candidate


def finetune_candidates(source, backbones, finetune, *, epochs: int = 10,
                        device="auto") -> tuple[dict | None, list[FinetuneCandidate]]:
    """The fine-tuning candidates of a search, and the advisor's report when it was asked.

    ``finetune`` is ``"advise"`` (the layers :func:`featx.advise.advise` names for the data's
    quadrant of the transfer-learning table), ``"none"``, or layers (``"stage5,stage4"``). With
    ``"advise"``, backbones that cannot be split at the advised layer are left out; layers given
    explicitly must split every backbone (:class:`featx.finetuning.FinetuneError` otherwise).
    """
    names = split_names(finetune)
    backbones = split_names(backbones)
    if names in (["none"], []):
        return None, []
    advice = None
    if names == ["advise"]:
        from featx.advise import advise  # torch

        advice = advise(source, backbone=backbones[0] if backbones else "efficientnet_lite0", device=str(device))
        layers, strict = advice["finetune_from"], False
    else:
        layers, strict = names, True
    from featx.finetuning import split_tap  # torch: only when fine-tuning is asked for

    candidates = []
    for backbone in backbones:
        for layer in layers:
            try:
                split_tap(backbone, layer)
            except FeatxError as error:  # FinetuneError, UnknownLayerError
                if strict:
                    raise
                # Advised layers are stage aliases that not every backbone has: say so in the advice.
                advice.setdefault("finetune_skipped", []).append(f"{backbone} from {layer}: {error}")
                continue
            candidates.append(FinetuneCandidate(backbone, layer, epochs=epochs))
    return advice, candidates


def auto_fit(
    source,
    options: ExtractOptions | None = None,
    *,
    budget="10m",
    backbones: str | Sequence[str] = DEFAULT_BACKBONES,
    feature_sets: str | Sequence[str] = DEFAULT_FEATURE_SETS,
    ttas: str | Sequence[str] = DEFAULT_TTAS,
    heads: str | Sequence[str] = DEFAULT_HEADS,
    concat_backbones: bool = True,
    explore_top: int = 2,
    finetune: str | Sequence[str] = "advise",
    finetune_epochs: int = 10,
    extra_candidates: Sequence[Candidate] = (),
    cv: int = 5,
    inner_cv: int = 3,
    random_state: int = 0,
    report: Callable[[dict], None] | None = None,
    on_skipped: Callable[[list, int], None] | None = None,
    **settings,
) -> AutoResult:
    """Search backbones, feature sets, flip averaging and heads by cross-validation on ``source`` within a budget.

    Parameters
    ----------
    source : ImageSource or anything :func:`featx.images.open_source` accepts
        The labelled *training* images, the only data the search reads.
    budget : float or str, default="10m"
        Seconds, or a duration (``"90s"``, ``"15m"``, ``"1h"``), for the whole search and the refit;
        no candidate starts that would not fit, except the cheapest one (there is always a model).
    backbones, feature_sets, ttas, heads
        The frozen-feature grid. Feature sets use the ``--layers`` syntax
        (``"stage4/spp+pre_logits/avg"``); ``ttas`` are ``"none"`` and/or ``"hflip"``.
    concat_backbones : bool, default=True
        Also try every pair of backbones concatenated on ``pre_logits/avg``.
    explore_top : int, default=2
        Heads after the first are tried on the feature configurations whose first-head score is
        among the best ``explore_top`` so far.
    finetune : "advise", "none" or layers, default="advise"
        Partial fine-tuning candidates (:class:`FinetuneCandidate`), one per backbone and layer:
        ``"advise"`` asks :func:`featx.advise.advise` (the transfer-learning table: fine-tuning
        for large data, from ``stage5`` for data similar to ImageNet, from ``stage4`` and
        ``stage3`` for data unlike it; none for small data); ``"none"``; or the layers to
        fine-tune from (``"stage5,stage4"``). Like every candidate, they run only if their
        estimate fits in the budget.
    finetune_epochs : int, default=10
        Upper bound on the epochs of a fine-tuning candidate (early stopping, patience 3).
    extra_candidates : sequence of Candidate
        Candidates of other kinds (e.g. fine-tuning), scheduled by their own estimates.
    cv, inner_cv, random_state
        Stratified K-fold CV that scores each candidate; the heads' C and gamma are tuned by
        ``inner_cv`` folds inside every training part (:func:`featx.heads.evaluate`).
    report : callable, optional
        Called with each leaderboard row as soon as it is scored.
    on_skipped : callable, optional
        Called right after an extraction, before the candidates are scored on it, with the
        ``(image, reason)`` pairs it skipped (those no earlier extraction of the search had
        reported) and the number of images of ``source``; not called when none was skipped.
        ``AutoResult.skipped`` lists them all again at the end.
    options : ExtractOptions, optional
        How to extract (default :data:`featx.options.CACHED`); the search sets ``backbone``,
        ``layers``, ``pooling`` and ``tta`` itself. ``store`` must be ``True`` or a folder
        (several configurations mean several store files). Its ``progress`` decides the search's
        bar on stderr, over the outer folds of the candidates and naming the one being scored
        (by default on a terminal only; never with ``progress=False``).
    **settings
        :class:`~featx.options.ExtractOptions` fields by name (``store=``, ``device=`` …),
        replacing those of ``options``.

    Returns
    -------
    AutoResult

    Raises
    ------
    FeatxError
        For a bad budget or store, or no candidate at all.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from featx.images import open_source
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    >>> images[6:] //= 4
    >>> result = auto_fit(open_source(images, labels=["light"] * 6 + ["dark"] * 6), budget="5m",
    ...                   backbones="featx_tiny_cnn", feature_sets="pre_logits/avg", ttas="none,hflip",
    ...                   heads="logreg", cv=3, device="cpu", store=tempfile.mkdtemp())
    >>> [(row["configuration"], row["accuracy_mean"]) for row in result.leaderboard]
    [('featx_tiny_cnn pre_logits/avg tta=none logreg', 1.0), ('featx_tiny_cnn pre_logits/avg tta=hflip logreg', 1.0)]
    >>> result.model.classes
    ['dark', 'light']
    """
    start = time.perf_counter()
    seconds_budget = parse_budget(budget)
    options = ExtractOptions.merge(options or CACHED, settings, where="auto_fit")
    store = options.store
    if store is None or store is False or (not isinstance(store, bool) and Path(str(store)).suffix == ".h5"):
        raise FeatxError(
            f"auto_fit needs a cache folder (store=True or a folder), got store={store!r}: the search keeps one "
            f"feature store per backbone and flip setting."
        )
    source = source if isinstance(source, ImageSource) else open_source(source)
    source.require_classes("--auto needs a folder of class sub-folders, a labelled CSV or a built-in dataset")
    search = Search(source, options, cv=cv, inner_cv=inner_cv, random_state=random_state)
    search.on_skipped = on_skipped
    frozen = frozen_candidates(backbones, feature_sets, ttas, heads, concat_backbones=concat_backbones)
    for candidate in frozen:  # before any extraction, so that one pass per backbone holds what all need
        search.register(candidate)
    default = None
    if frozen and split_names(feature_sets) == list(DEFAULT_FEATURE_SETS):
        # featx fit's own answer first: the search moves away from it only for more than the noise.
        default = default_candidate(search, split_names(backbones)[0], frozen[0].head, frozen[0].tta)
        frozen = [default, *(c for c in frozen if c.name != default.name)]
    advice, tuned = finetune_candidates(source, backbones, finetune, epochs=finetune_epochs,
                                        device=search.options.device)
    for candidate in tuned:
        search.register(candidate)
    head_list = list(dict.fromkeys(c.head for c in frozen))
    first_head = head_list[0] if head_list else None
    held_back = {c.name: c for c in frozen if c.head != first_head}
    pending: list = [c for c in frozen if c.head == first_head] + tuned + list(extra_candidates)
    rows: dict[str, dict] = {}
    first_scores: dict[FrozenCandidate, float] = {}

    def row_of(candidate, estimate) -> dict:
        config = dict(candidate.config)
        return {"rank": None, "configuration": candidate.name, "kind": config.get("kind", "other"),
                "backbone": config.get("backbone"), "features": config.get("features"), "tta": config.get("tta"),
                "head": config.get("head"), "dim": None, "accuracy_mean": None, "accuracy_std": None, "cv": None,
                "seconds": None, "extraction_seconds": 0.0, "estimated_seconds": round(float(estimate), 1),
                "status": "pending", "config": config}

    if not pending:
        raise FeatxError("auto_fit has no candidate to try: give at least one backbone, feature set, tta and head.")
    best: dict | None = None
    estimates: dict[str, float] = {}
    search.progress = bar = Progress(len(pending) * cv, enabled=options.progress)
    try:
        while pending:
            estimates = {c.name: c.estimate(search) for c in pending}
            candidate = min(pending, key=lambda c: estimates[c.name])  # ties: the first listed
            # Room for the refit of the best so far: about one outer fold of its evaluation, and a half.
            reserve = 1.5 * (best["seconds"] - best["extraction_seconds"]) / max(best["cv"] or 1, 1) if best else 0.0
            elapsed = time.perf_counter() - start
            over = elapsed + estimates[candidate.name] + reserve > seconds_budget
            if over and best is not None:
                for c in pending:
                    rows[c.name] = {**row_of(c, estimates[c.name]),
                                    "status": f"not run: {estimates[c.name]:.0f} s estimated, "
                                              f"{max(seconds_budget - elapsed - reserve, 0):.0f} s left"}
                break
            pending.remove(candidate)
            bar.describe(f"auto {candidate.name} [{len(rows) + 1}/{len(rows) + len(pending) + 1}]")
            counted = bar.n
            done_before = set(search.results)
            begun = time.perf_counter()
            report_ = candidate.score(search)
            if bar.n == counted:  # a candidate of another kind that does not count its folds
                bar.advance(cv)
            seconds = time.perf_counter() - begun
            new_extractions = set(search.results) - done_before
            extraction_seconds = sum(search.extraction_seconds[k] for k in new_extractions)
            if isinstance(candidate, FrozenCandidate) and not report_.get("from_cache"):
                search.record_evaluation(candidate.head, report_.get("n_samples", 0), report_.get("n_features", 0),
                                         seconds - extraction_seconds)
            if isinstance(candidate, FinetuneCandidate):
                search.record_finetune(candidate, report_, seconds - extraction_seconds)
            row = {**row_of(candidate, estimates[candidate.name]), "dim": report_.get("n_features"),
                   "accuracy_mean": float(report_["accuracy_mean"]), "accuracy_std": float(report_["accuracy_std"]),
                   "cv": report_.get("cv"), "fold_accuracy": [float(a) for a in report_.get("fold_accuracy", ())],
                   "seconds": round(seconds, 1), "extraction_seconds": round(extraction_seconds, 1),
                   "status": "scored" + (" (report from the store)" if report_.get("from_cache") else "")
                   + (f" (started over budget: {estimates[candidate.name]:.0f} s estimated; the cheapest candidate "
                      f"always runs)" if over else "")}
            rows[candidate.name] = row
            if best is None or row["accuracy_mean"] > best["accuracy_mean"]:
                best = row
            if report is not None:
                report(row)
            if isinstance(candidate, FrozenCandidate) and candidate.head == first_head:
                first_scores[candidate] = row["accuracy_mean"]
                top = sorted(first_scores.values(), reverse=True)[:explore_top]
                if row["accuracy_mean"] >= top[-1]:
                    for head in head_list[1:]:
                        other = held_back.pop(candidate.with_head(head).name, None)
                        if other is not None:
                            pending.append(other)
                            bar.add_total(cv)
    finally:
        bar.close()
        search.progress = None
    # The winner's curse: choose the first candidate within one standard error of the best, featx
    # fit's own choice first, then in the order the search ran them (cheapest estimate first), and
    # estimate the rule itself.
    ran = [r for r in rows.values() if r["accuracy_mean"] is not None]
    preference = ([default.name] if default is not None else []) + [r["configuration"] for r in ran]
    selection = one_standard_error({r["configuration"]: r["fold_accuracy"] or [r["accuracy_mean"]] for r in ran},
                                   preference, random_state=random_state)
    best = rows[selection.chosen]
    winner = next(c for c in [*frozen, *tuned, *extra_candidates] if c.name == best["configuration"])
    model = winner.refit(search)
    model.info["auto"] = {"configuration": best["config"], "accuracy_mean": best["accuracy_mean"],
                          "accuracy_std": best["accuracy_std"], "cv": best["cv"], "estimate": selection.estimate,
                          "best_by_mean": selection.best, "rule": selection.rule}
    scored = sorted(ran, key=lambda r: (-r["accuracy_mean"], list(rows).index(r["configuration"])))
    within = {row["name"]: row for row in selection.table}
    for rank, row in enumerate(scored, 1):
        row["rank"] = rank
        row["within_1se"] = within[row["configuration"]]["within"]
        row["chosen"] = row["configuration"] == selection.chosen
    leaderboard = scored + [r for r in rows.values() if r["accuracy_mean"] is None]
    extractions = [{"backbone": b, "tta": "none" if t in (None, MAPS) else t, "maps": t == MAPS,
                    "seconds": round(search.extraction_seconds[(b, t)], 1), "n_computed": search.results[(b, t)].n_computed}
                   for b, t in search.results]
    skipped = {name: reason for result in search.results.values() for name, reason in result.skipped}
    return AutoResult(leaderboard=leaderboard, best=best, selection=selection, model=model, seconds=time.perf_counter() - start,
                      budget=seconds_budget, extractions=extractions, advice=advice, skipped=list(skipped.items()),
                      n_images=len(source))
