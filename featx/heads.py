"""Heads: scikit-learn pipelines on frozen features, tuned and scored by nested cross-validation.

A head is a :class:`~sklearn.pipeline.Pipeline` ``StandardScaler -> [Normalizer] -> [PCA] ->
classifier`` built by :func:`make_head`. :func:`evaluate` is the one evaluation loop of featx
(``compare``, the CLI and ``pipelines/`` call it): an outer stratified cross-validation scores
heads whose ``C`` (and ``gamma``) were tuned by an inner cross-validation on the outer training
part only. :func:`fit_head` runs the same tuning on all the data and returns the fitted head,
with ``predict_proba`` for every head.

Probabilities of the SVMs come from ``CalibratedClassifierCV(svm, method="temperature",
ensemble=False)`` added by :func:`fit_head`: scikit-learn 1.9 deprecates
``SVC(probability=True)`` and names this as its replacement, ``LinearSVC`` has no probabilities
at all, and temperature scaling divides the decision values by one fitted number, so the
arg-max, hence every prediction, is the one :func:`evaluate` scored. Temperature scaling needs
scikit-learn >= 1.8.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
)
from sklearn.model_selection import GridSearchCV, RepeatedStratifiedKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.parallel import Parallel, delayed
from sklearn.utils.validation import check_is_fitted, validate_data

from featx.exceptions import EvaluationError, FeatxError, UnknownHeadError, suggest
from featx.threads import head_limits

__all__ = [
    "BlockScaler",
    "HEADS",
    "EvaluationError",
    "UnknownHeadError",
    "evaluate",
    "fit_head",
    "make_head",
    "param_grid",
]

HEADS: tuple[str, ...] = ("logreg", "linear-svm", "rbf-svm")

# Log grids, in units of 1 / n_features where the scale of the data matters: standardised
# features have a squared norm of about n_features, so the best C of the linear heads and the
# best gamma of the RBF SVM move as 1 / n_features (measured on CNN-like features with
# d = 16 … 1280, n ≈ 1,800: their best C sits inside these grids at every d). The kernel of the
# RBF SVM is scale-free, so its C is absolute; C = 100 scored as C = 10 there. Large-C LinearSVC
# fits cost seconds at d = 1280 and are never the best there: its grid stops at 1 / n_features.
# Grid sizes keep one evaluate() of 1,800 x 1,280 features, cv=5, inner_cv=3, at seconds
# (logreg) to tens of seconds (the SVMs) on 2 cores.
_GRID = {
    "logreg": {"classifier__C": (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)},
    "linear-svm": {"classifier__C": (1e-3, 1e-2, 1e-1, 1.0)},
    "rbf-svm": {"classifier__C": (1.0, 10.0), "classifier__gamma": (0.25, 1.0, 4.0)},
}
_RELATIVE = {"logreg": {"classifier__C"}, "linear-svm": {"classifier__C"},
             "rbf-svm": {"classifier__gamma"}}
_MAX_ITER = {"logreg": 500, "linear-svm": 1000}
# LinearSVC at tol=1e-3 scored as at its default 1e-4 on those features, 20 % faster.
_LINEAR_SVM_TOL = 1e-3


def _check_head(head: str) -> str:
    if head not in HEADS:
        raise UnknownHeadError(
            f"Unknown head {head!r}.{suggest(head, HEADS)} Choose one of {', '.join(HEADS)}."
        )
    return head


def _check_pca(pca):
    if pca is None:
        return None
    if isinstance(pca, Integral) and not isinstance(pca, bool) and pca >= 1:
        return int(pca)
    if isinstance(pca, Real) and not isinstance(pca, bool) and 0.0 < pca < 1.0:
        return float(pca)
    raise EvaluationError(
        f"pca={pca!r} is neither a number of components (an int >= 1) nor a fraction of "
        "variance to keep (a float between 0 and 1); use e.g. pca=64 or pca=0.95."
    )


class BlockScaler(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Standardise every column, then weight each block of columns so that blocks count equally.

    Column ``j`` of block ``b`` (``d_b`` columns of ``D`` in ``k`` blocks) becomes
    ``(x - mean_j) / std_j * sqrt(D / (k * d_b))``: every block carries the same total variance
    ``D / k`` (a weight proportional to ``1 / sqrt(d_b)``), so a 1,600-wide pooled stage does not
    drown a 320-wide one, and the whole keeps the total variance ``D`` of plain standardisation
    (the head's C and gamma grids, relative to ``D``, stay valid). With one block (``blocks=None``)
    it is :class:`~sklearn.preprocessing.StandardScaler`.

    Parameters
    ----------
    blocks : sequence of int or None, default=None
        Widths of the concatenated blocks, in order; they must add up to ``n_features``.

    Attributes
    ----------
    mean_, scale_ : ndarray of shape (n_features,)
        Per-column mean and standard deviation (1 where a column is constant).
    weights_ : ndarray of shape (n_features,)
        The block weight of every column.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = np.hstack([rng.normal(size=(50, 2)), 10 * rng.normal(size=(50, 8))])
    >>> Xt = BlockScaler(blocks=[2, 8]).fit_transform(X)
    >>> round(float(Xt[:, :2].var(axis=0).sum()), 3), round(float(Xt[:, 2:].var(axis=0).sum()), 3)
    (5.0, 5.0)
    """

    def __init__(self, blocks=None):
        self.blocks = blocks

    def fit(self, X, y=None):
        """Learn per-column means and scales and the block weights from ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self : BlockScaler
        """
        X = validate_data(self, X, dtype=(np.float64, np.float32))
        d = X.shape[1]
        blocks = [d] if self.blocks is None else [int(b) for b in self.blocks]
        if any(b < 1 for b in blocks) or sum(blocks) != d:
            raise FeatxError(
                f"BlockScaler blocks {blocks} add up to {sum(blocks)} columns, but X has {d}; give the widths of "
                f"the concatenated blocks in order (e.g. CNNFeatures.blocks_)."
            )
        self.mean_ = X.mean(axis=0)
        scale = X.std(axis=0)
        self.scale_ = np.where(scale > 0, scale, 1.0)
        self.weights_ = np.concatenate([np.full(b, np.sqrt(d / (len(blocks) * b))) for b in blocks])
        return self

    def transform(self, X):
        """Standardise and weight ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self, "weights_")
        X = validate_data(self, X, dtype=(np.float64, np.float32), reset=False)
        return ((X - self.mean_) / self.scale_ * self.weights_).astype(X.dtype, copy=False)


def make_head(
    head: str = "logreg",
    *,
    l2_normalize: bool = False,
    pca: int | float | None = None,
    class_weight: dict | str | None = None,
    random_state: int | None = 0,
    blocks=None,
) -> Pipeline:
    """Build an unfitted head: standardisation, optional L2 normalisation and PCA, classifier.

    Parameters
    ----------
    head : {"logreg", "linear-svm", "rbf-svm"}, default="logreg"
        The classifier: multinomial logistic regression (L-BFGS), a linear SVM
        (:class:`~sklearn.svm.LinearSVC`) or an RBF-kernel SVM (:class:`~sklearn.svm.SVC`).
    l2_normalize : bool, default=False
        Scale each standardised sample to unit L2 norm before the classifier.
    pca : int, float or None, default=None
        Reduce to this many principal components (int), or to the components that keep this
        fraction of the variance (float in (0, 1)); ``None`` keeps every feature.
    class_weight : dict, "balanced" or None, default=None
        Passed to the classifier; ``"balanced"`` weights classes inversely to their frequency.
    random_state : int or None, default=0
        Seeds the PCA solver and the LinearSVC coordinate descent.
    blocks : sequence of int or None, default=None
        Widths of concatenated feature blocks (a feature set such as ``stage4/spp+pre_logits/avg``):
        the ``standardize`` step is then a :class:`~featx.heads.BlockScaler`, which gives
        every block the same weight; ``None`` or one block is plain standardisation.

    Returns
    -------
    pipeline : sklearn.pipeline.Pipeline
        Steps ``standardize``, [``normalize``], [``pca``], ``classifier``, so that
        hyper-parameters are named ``classifier__C``, ``classifier__gamma``.

    Raises
    ------
    UnknownHeadError
        If ``head`` is not one of :data:`HEADS`; the message suggests the closest name.
    EvaluationError
        If ``pca`` is neither an int >= 1 nor a float in (0, 1).

    Examples
    --------
    >>> from featx.heads import make_head
    >>> pipeline = make_head("rbf-svm", pca=8)
    >>> [name for name, _ in pipeline.steps]
    ['standardize', 'pca', 'classifier']
    >>> make_head("svm")
    Traceback (most recent call last):
    ...
    featx.exceptions.UnknownHeadError: Unknown head 'svm'. Did you mean 'rbf-svm'? Choose one of logreg, linear-svm, rbf-svm.
    """
    _check_head(head)
    pca = _check_pca(pca)
    if blocks is not None and len(blocks) > 1:
        steps = [("standardize", BlockScaler(blocks=[int(b) for b in blocks]))]
    else:
        steps = [("standardize", StandardScaler())]
    if l2_normalize:
        steps.append(("normalize", Normalizer()))
    if pca is not None:
        steps.append(("pca", PCA(n_components=pca, random_state=random_state)))
    if head == "logreg":
        # lbfgs fits the multinomial loss for three or more classes (the default since 1.5).
        classifier = LogisticRegression(max_iter=_MAX_ITER["logreg"], class_weight=class_weight)
    elif head == "linear-svm":
        classifier = LinearSVC(
            dual="auto",
            max_iter=_MAX_ITER["linear-svm"],
            tol=_LINEAR_SVM_TOL,
            class_weight=class_weight,
            random_state=random_state,
        )
    else:
        # break_ties: predict is the arg-max of decision_function, as after calibration.
        classifier = SVC(kernel="rbf", class_weight=class_weight, break_ties=True)
    steps.append(("classifier", classifier))
    return Pipeline(steps)


def param_grid(head: str = "logreg", *, n_features: float | None = None) -> dict[str, list]:
    """Return the hyper-parameter grid that the inner cross-validation searches for a head.

    Parameters
    ----------
    head : {"logreg", "linear-svm", "rbf-svm"}, default="logreg"
        The head whose grid to return.
    n_features : float
        The number of standardised features entering the classifier, ``X.shape[1]`` when
        there is no L2 normalisation or PCA (:func:`evaluate` then passes the total variance
        of the transformed data, ``n_components * X.var()``). Keyword required: the grids are
        relative to it.

    Returns
    -------
    grid : dict of str to list
        Keys in pipeline step naming, values as python floats on a log scale (3 significant
        digits), ready for :class:`~sklearn.model_selection.GridSearchCV` on
        :func:`make_head`:

        - ``"logreg"``: ``classifier__C`` = (1e-3 … 1e2) / n_features, 6 values;
        - ``"linear-svm"``: ``classifier__C`` = (1e-3 … 1) / n_features, 4 values;
        - ``"rbf-svm"``: ``classifier__C`` = 1, 10 and ``classifier__gamma`` =
          (0.25, 1, 4) / n_features, where 1 / n_features is ``gamma="scale"`` on standardised
          features.

    Raises
    ------
    UnknownHeadError
        If ``head`` is not one of :data:`HEADS`.
    EvaluationError
        If ``n_features`` is missing or not positive.

    Examples
    --------
    >>> from featx.heads import param_grid
    >>> param_grid("logreg", n_features=1000)
    {'classifier__C': [1e-06, 1e-05, 0.0001, 0.001, 0.01, 0.1]}
    >>> param_grid("rbf-svm", n_features=4)["classifier__gamma"]
    [0.0625, 0.25, 1.0]
    """
    _check_head(head)
    if n_features is None or isinstance(n_features, bool) or not n_features > 0:
        raise EvaluationError(
            f"param_grid({head!r}) needs n_features > 0 (got {n_features!r}): C and gamma are "
            f"searched relative to it, e.g. param_grid({head!r}, n_features=X.shape[1])."
        )
    return {
        key: [
            float(f"{v / n_features:.3g}") if key in _RELATIVE[head] else float(v)
            for v in values
        ]
        for key, values in _GRID[head].items()
    }


# --------------------------------------------------------------------------- validation


def _check_X_y(X, y):
    """Return X as a float array and y as a 1-D array, or raise a clear EvaluationError."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise EvaluationError(
            f"X must be a 2-D array of shape (n_samples, n_features); got shape {X.shape}."
        )
    if X.dtype.kind not in "fiub":
        raise EvaluationError(f"X must hold numbers; got dtype {X.dtype}.")
    if X.dtype not in (np.float32, np.float64):  # float16 stores, integer arrays
        X = X.astype(np.float32 if X.dtype == np.float16 else np.float64)
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise EvaluationError(f"X is empty: shape {X.shape}.")
    y = np.asarray(y)
    if y.ndim != 1:
        raise EvaluationError(f"y must be a 1-D array of labels; got shape {y.shape}.")
    if len(y) != len(X):
        raise EvaluationError(
            f"X and y must have one row per sample; got {len(X)} rows in X "
            f"and {len(y)} labels in y."
        )
    finite = np.isfinite(X)
    if not finite.all():
        rows = np.flatnonzero(~finite.all(axis=1))
        shown = ", ".join(str(r) for r in rows[:5]) + (", …" if len(rows) > 5 else "")
        raise EvaluationError(
            f"X holds {int((~finite).sum())} non-finite values (NaN or inf) in {len(rows)} "
            f"rows ({shown}); drop those rows or extract their features again."
        )
    return X, y


def _check_classes(y, *, min_members: int = 2):
    """Return (classes, counts); raise on a single class or on a class with one member."""
    classes, counts = np.unique(y, return_counts=True)
    names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        raise EvaluationError(
            f"labels {names} are distinct values with the same name; use one label type."
        )
    if len(classes) < 2:
        which = f" y holds only {names[0]!r} ({int(counts[0])} samples)." if names else ""
        raise EvaluationError(f"A classifier needs at least two classes.{which}")
    small = [(n, int(c)) for n, c in zip(names, counts) if c < min_members]
    if small:
        listed = ", ".join(f"{n!r} ({c})" for n, c in small)
        raise EvaluationError(
            f"classes with fewer than {min_members} samples: {listed}; cross-validation needs "
            f"at least {min_members} per class: add images to these classes or drop them."
        )
    return classes, counts


def _check_class_weight(class_weight, classes) -> None:
    if isinstance(class_weight, dict):
        unknown = [k for k in class_weight if k not in set(classes.tolist())]
        if unknown:
            raise EvaluationError(
                f"class_weight names labels that are not in y: {unknown}; "
                f"the classes are {[str(c) for c in classes]}."
            )
    elif class_weight not in (None, "balanced"):
        raise EvaluationError(
            f"class_weight must be None, 'balanced' or a dict of label to weight; "
            f"got {class_weight!r}."
        )


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise EvaluationError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _python(value):
    """Numpy scalars to python ones, for a JSON-serialisable report."""
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- fitting


def _grid_reference(X, *, l2_normalize, pca, random_state, blocks=None) -> float:
    """The n_features of :func:`param_grid`: the total variance of the data the classifier sees.

    That is ``X.shape[1]`` for standardised features; after L2 normalisation or PCA it is
    measured, without labels, on all of X, so that every outer fold searches the same grid.
    """
    if not l2_normalize and pca is None:
        return float(X.shape[1])
    steps = make_head("logreg", l2_normalize=l2_normalize, pca=pca, random_state=random_state, blocks=blocks)
    with head_limits():
        Xt = steps[:-1].fit_transform(X)
    # Rounded so that it reads well in reports and does not vary in the last digits.
    return float(f"{Xt.shape[1] * Xt.var():.3g}")


def _grid_for(X, head, *, tune, l2_normalize, pca, random_state, blocks=None):
    """The grid searched on X, or None when ``tune`` is False."""
    if not tune:
        return None
    reference = _grid_reference(X, l2_normalize=l2_normalize, pca=pca, random_state=random_state, blocks=blocks)
    return param_grid(head, n_features=reference)


def _check_pca_size(pca, n_train: int, n_features: int, where: str = "X") -> None:
    if isinstance(pca, int) and pca > min(n_train, n_features):
        raise EvaluationError(
            f"pca={pca} components, but {where} has {n_train} samples and X has "
            f"{n_features} features; choose pca <= {min(n_train, n_features)} or a variance "
            "fraction such as pca=0.95."
        )


def _default_params(head: str) -> dict:
    """The scikit-learn defaults of the hyper-parameters that :func:`param_grid` searches."""
    keys = ["classifier__C"] + (["classifier__gamma"] if head == "rbf-svm" else [])
    defaults = make_head(head).get_params()
    return {key: _python(defaults[key]) for key in keys}


def _fit_one(X, y, *, head, grid, inner_cv, random_state, class_weight, l2_normalize, pca,
             calibrate, n_jobs=1, blocks=None):
    """Tune over ``grid`` (None: defaults) and fit one head: THE fit of evaluate and fit_head.

    Returns the fitted pipeline, the chosen parameters and facts for the report's notes.
    """
    pipeline = make_head(
        head, l2_normalize=l2_normalize, pca=pca, class_weight=class_weight,
        random_state=random_state, blocks=blocks,
    )
    classes, counts = np.unique(y, return_counts=True)
    smallest = int(counts.min())
    info = {"inner_cv": None, "cv_score": None, "small_class": (str(classes[counts.argmin()]), smallest),
            "n_fits": 0, "n_not_converged": 0}
    k = min(inner_cv, smallest)
    folds = StratifiedKFold(k, shuffle=True, random_state=random_state) if k >= 2 else None
    if pca is not None:
        n_train = len(y)
        if folds is not None and (grid is not None or calibrate):
            n_train = min(len(train) for train, _ in folds.split(X, y))
        _check_pca_size(pca, n_train, X.shape[1], where="a training fold")
    with warnings.catch_warnings(record=True) as caught, head_limits():
        warnings.simplefilter("always", ConvergenceWarning)
        if grid is not None and folds is not None:
            search = GridSearchCV(
                pipeline, grid, cv=folds, scoring="accuracy", n_jobs=n_jobs, refit=False,
                error_score="raise",
            )
            search.fit(X, y)
            params = {key: _python(v) for key, v in search.best_params_.items()}
            pipeline.set_params(**params)
            info["inner_cv"] = k
            info["cv_score"] = float(search.best_score_)
            info["n_fits"] += len(search.cv_results_["params"]) * k
        else:
            params = _default_params(head)
        if calibrate and head != "logreg":
            # The callers guarantee two samples per class, hence folds is not None.
            classifier = CalibratedClassifierCV(
                pipeline.named_steps["classifier"], method="temperature", ensemble=False,
                cv=folds,
            )
            pipeline.set_params(classifier=classifier)
            info["n_fits"] += k
        pipeline.fit(X, y)
        info["n_fits"] += 1
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            info["n_not_converged"] += 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return pipeline, params, info


def _evaluate_fold(X, y, train, test, **kwargs):
    """Fit on one outer training part, predict its test fold."""
    pipeline, params, info = _fit_one(X[train], y[train], calibrate=False, **kwargs)
    with head_limits():
        y_pred = pipeline.predict(X[test])
    return y_pred, params, info


def _convergence_note(head, n_not_converged, n_fits):
    return (
        f"{n_not_converged} of {n_fits} {head} fits stopped at their iteration limit "
        f"(max_iter={_MAX_ITER.get(head)}) before converging; this sums up their "
        "ConvergenceWarnings. These are mostly weakly regularised grid points; the scores may "
        "be slightly pessimistic."
    )


def _settings(class_weight, l2_normalize, pca, tune, random_state, inner_cv, blocks=None):
    if isinstance(class_weight, dict):
        class_weight = {str(k): float(v) for k, v in class_weight.items()}
    settings = {"class_weight": class_weight, "l2_normalize": bool(l2_normalize), "pca": pca,
                "tune": bool(tune), "inner_cv": inner_cv, "random_state": random_state}
    if blocks is not None:
        settings["blocks"] = [int(b) for b in blocks]
    return settings


def _check_blocks(blocks, n_features: int):
    """None, or the block widths as ints; they must add up to ``n_features``."""
    if blocks is None:
        return None
    blocks = [int(b) for b in blocks]
    if not blocks or min(blocks) < 1 or sum(blocks) != n_features:
        raise EvaluationError(
            f"blocks={blocks} must be positive widths adding up to the {n_features} columns of X; "
            "give the widths of the concatenated feature blocks in order."
        )
    return blocks


def _per_class(matrix: np.ndarray, names: list[str]) -> dict:
    per_class = {}
    for i, name in enumerate(names):
        predicted, actual, hits = matrix[:, i].sum(), matrix[i, :].sum(), matrix[i, i]
        precision = float(hits / predicted) if predicted else 0.0
        recall = float(hits / actual) if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": float(f1),
                           "support": int(actual)}
    return per_class


def score_predictions(y_true, y_pred, *, classes) -> dict:
    """Score predictions against true labels: the metrics every featx report uses.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
    classes : array-like of shape (n_classes,)
        Every class, in the order of the confusion matrix (classes absent from ``y_true``
        still get a row).

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``classes`` (str),
        ``per_class`` (precision, recall, f1, support) and ``confusion_matrix`` (rows true,
        columns predicted).

    Examples
    --------
    >>> report = score_predictions(["a", "b", "b"], ["a", "b", "a"], classes=["a", "b"])
    >>> round(report["accuracy"], 3), report["confusion_matrix"]
    (0.667, [[1, 0], [1, 1]])
    """
    classes = np.asarray(classes)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    matrix = confusion_matrix(y_true, y_pred, labels=classes)
    names = [str(c) for c in classes]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        "classes": names,
        "per_class": _per_class(matrix, names),
        "confusion_matrix": matrix.tolist(),
    }


def outer_splits(y, n_splits: int, *, repeats: int = 1, random_state: int = 0) -> list:
    """The outer folds of every featx cross-validation: ``(train, test)`` index pairs.

    Stratified and shuffled (:class:`~sklearn.model_selection.RepeatedStratifiedKFold` when
    ``repeats`` is above 1). They depend on ``y`` and the arguments only, so :func:`evaluate`,
    :func:`featx.selection.evaluate_auto` and fine-tuned comparison rows score the same folds.

    Examples
    --------
    >>> [test.tolist() for _, test in outer_splits(["a", "a", "b", "b"], 2)]
    [[1, 2], [0, 3]]
    """
    y = np.asarray(y)
    if repeats == 1:
        splitter = StratifiedKFold(n_splits, shuffle=True, random_state=random_state)
    else:
        splitter = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=repeats, random_state=random_state)
    return list(splitter.split(np.zeros(len(y)), y))


def fold_means(folds: list[dict]) -> dict:
    """Means over outer folds of :func:`score_predictions` reports, as every featx report gives them.

    Examples
    --------
    >>> fold_means([{"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0},
    ...             {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.4}])["accuracy_std"]
    0.25
    """
    accuracy = [fold["accuracy"] for fold in folds]
    return {
        "accuracy_mean": float(np.mean(accuracy)),
        "accuracy_std": float(np.std(accuracy)),
        "fold_accuracy": accuracy,
        "balanced_accuracy": float(np.mean([fold["balanced_accuracy"] for fold in folds])),
        "macro_f1": float(np.mean([fold["macro_f1"] for fold in folds])),
    }


def evaluate(
    X,
    y,
    *,
    head: str = "logreg",
    cv: int = 5,
    repeats: int = 1,
    inner_cv: int = 3,
    random_state: int = 0,
    class_weight: dict | str | None = None,
    l2_normalize: bool = False,
    pca: int | float | None = None,
    n_jobs: int | None = None,
    tune: bool = True,
    blocks=None,
) -> dict:
    """Score a head on features by nested, stratified cross-validation.

    The outer ``cv`` folds (``repeats`` times, reshuffled) hold out test samples; on each outer
    training part a grid search over :func:`param_grid` with ``inner_cv`` folds picks the
    hyper-parameters, the head is refitted on the whole training part and predicts the test
    fold. No test sample is ever seen by the scaler, the PCA or the tuning.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Features, finite.
    y : array-like of shape (n_samples,)
        Class labels, strings or integers.
    head : {"logreg", "linear-svm", "rbf-svm"}, default="logreg"
        The head to evaluate, see :func:`make_head`.
    cv : int, default=5
        Outer folds. Reduced, with a warning, to the size of the smallest class.
    repeats : int, default=1
        Repetitions of the outer cross-validation with other shuffles
        (:class:`~sklearn.model_selection.RepeatedStratifiedKFold` when above 1).
    inner_cv : int, default=3
        Folds of the inner grid search. Reduced to the smallest class of an outer training
        part; where that class has a single sample, the fold uses default hyper-parameters.
        Both are said in ``report["notes"]``.
    random_state : int, default=0
        Seeds the shuffles of the outer and inner folds, the PCA and the LinearSVC.
    class_weight : dict, "balanced" or None, default=None
        Passed to the classifier; ``"balanced"`` helps on imbalanced classes.
    l2_normalize, pca
        See :func:`make_head`.
    n_jobs : int or None, default=None
        Outer folds fitted in parallel (joblib); ``None`` means 1 unless in a
        :func:`joblib.parallel_config` context, ``-1`` all cores. Every fit uses one BLAS
        thread, which is both the fastest on small data and what keeps reports identical.
    tune : bool, default=True
        Search the grid; ``False`` fits the head with scikit-learn's default hyper-parameters.
    blocks : sequence of int, optional
        Widths of concatenated feature blocks, see :func:`make_head`: each block is standardised
        and weighted inside every training fold.

    Returns
    -------
    report : dict
        JSON-serialisable (python str, int, float, bool, None, lists and dicts):

        - ``head``, ``classes`` (class names as str, sorted labels), ``n_samples``,
          ``n_features``, ``n_classes``, ``cv`` (outer folds actually used), ``repeats``;
        - ``accuracy_mean`` and ``accuracy_std`` (population std over the
          ``cv * repeats`` outer folds), ``fold_accuracy`` (one per outer fold),
          ``balanced_accuracy`` and ``macro_f1`` (means over the outer folds);
        - ``per_class``: ``{class: {"precision", "recall", "f1", "support"}}`` and
          ``confusion_matrix`` (rows true, columns predicted, in ``classes`` order), both
          from all outer test predictions, so they sum to ``n_samples * repeats``;
        - ``param_grid`` (the grid searched, or None), ``best_params`` (one dict per outer
          fold), ``chosen_params`` (the setting chosen in most outer folds, the earliest on a
          tie);
        - ``fit_time`` (wall-clock seconds of the whole evaluation), ``settings`` (the options
          above) and ``notes`` (list of str: reduced folds, skipped tuning, fits that did not
          converge).

    Raises
    ------
    UnknownHeadError
        If ``head`` is not one of :data:`HEADS`.
    EvaluationError
        If X is not 2-D or holds NaN or inf, if X and y differ in length, if y holds a single
        class or a class with a single sample, or if ``cv``, ``repeats``, ``inner_cv`` or
        ``pca`` are out of range.

    Warns
    -----
    UserWarning
        When a class has fewer samples than ``cv``, naming it: the outer folds are reduced.

    Examples
    --------
    >>> import numpy as np
    >>> from featx.heads import evaluate
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat(["ant", "bee"], 10)
    >>> X = rng.normal(size=(20, 4)) + 3 * (y == "bee")[:, None]
    >>> report = evaluate(X, y, cv=2, inner_cv=2)
    >>> report["accuracy_mean"], report["confusion_matrix"]
    (1.0, [[10, 0], [0, 10]])
    >>> sorted(report["chosen_params"])
    ['classifier__C']
    """
    start = time.perf_counter()
    _check_head(head)
    pca = _check_pca(pca)
    cv = _check_int("cv", cv, 2)
    repeats = _check_int("repeats", repeats, 1)
    inner_cv = _check_int("inner_cv", inner_cv, 2)
    X, y = _check_X_y(X, y)
    classes, counts = _check_classes(y)
    _check_pca_size(pca, len(X), X.shape[1])
    _check_class_weight(class_weight, classes)
    blocks = _check_blocks(blocks, X.shape[1])
    names = [str(c) for c in classes]
    notes = []

    n_splits = min(cv, int(counts.min()))
    if n_splits < cv:
        small = ", ".join(f"{n!r} ({int(c)})" for n, c in zip(names, counts) if c < cv)
        message = (
            f"classes with fewer samples than cv={cv}: {small}; using {n_splits}-fold "
            "cross-validation. Add images to these classes for the requested folds."
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        notes.append(message)
    splits = outer_splits(y, n_splits, repeats=repeats, random_state=random_state)

    grid = _grid_for(X, head, tune=tune, l2_normalize=l2_normalize, pca=pca,
                     random_state=random_state, blocks=blocks)
    options = dict(
        head=head, grid=grid, inner_cv=inner_cv, random_state=random_state,
        class_weight=class_weight, l2_normalize=l2_normalize, pca=pca, blocks=blocks,
    )
    results = Parallel(n_jobs=n_jobs)(
        delayed(_evaluate_fold)(X, y, train, test, **options) for train, test in splits
    )

    folds, best_params = [], []
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    reduced, untuned, n_fits, n_not_converged = [], [], 0, 0
    for (train, test), (y_pred, params, info) in zip(splits, results):
        scores = score_predictions(y[test], y_pred, classes=classes)
        folds.append(scores)
        matrix += np.asarray(scores["confusion_matrix"], dtype=np.int64)
        best_params.append(params)
        n_fits += info["n_fits"]
        n_not_converged += info["n_not_converged"]
        if grid is not None and info["inner_cv"] is None:
            untuned.append(info["small_class"])
        elif grid is not None and info["inner_cv"] < inner_cv:
            reduced.append((info["inner_cv"], info["small_class"]))

    n_folds = len(splits)
    if reduced:
        k_min = min(k for k, _ in reduced)
        name, count = min(reduced)[1]
        notes.append(
            f"inner cross-validation used fewer than inner_cv={inner_cv} folds (down to "
            f"{k_min}) in {len(reduced)} of {n_folds} outer folds: class {name!r} has only "
            f"{count} samples in such a training part."
        )
    if untuned:
        name, count = untuned[0]
        defaults = ", ".join(f"{k}={v!r}" for k, v in _default_params(head).items())
        notes.append(
            f"tuning skipped in {len(untuned)} of {n_folds} outer folds: class {name!r} has "
            f"only {count} sample in such a training part; defaults used ({defaults})."
        )
    if n_not_converged:
        notes.append(_convergence_note(head, n_not_converged, n_fits))

    per_class = _per_class(matrix, names)
    counted = Counter(tuple(sorted(p.items())) for p in best_params)
    chosen = dict(counted.most_common(1)[0][0]) if best_params else {}

    return {
        "head": head,
        "classes": names,
        "n_samples": int(X.shape[0]),
        "n_features": int(X.shape[1]),
        "n_classes": len(names),
        "cv": n_splits,
        "repeats": repeats,
        **fold_means(folds),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "param_grid": grid,
        "best_params": best_params,
        "chosen_params": chosen,
        "fit_time": time.perf_counter() - start,
        "settings": _settings(class_weight, l2_normalize, pca, tune, random_state, inner_cv, blocks),
        "notes": notes,
    }


def fit_head(
    X,
    y,
    *,
    head: str = "logreg",
    inner_cv: int = 3,
    random_state: int = 0,
    class_weight: dict | str | None = None,
    l2_normalize: bool = False,
    pca: int | float | None = None,
    n_jobs: int | None = None,
    tune: bool = True,
    blocks=None,
    return_score: bool = False,
) -> tuple[Pipeline, dict] | tuple[Pipeline, dict, dict]:
    """Tune a head on all of X, y by cross-validation, fit it, and return it ready to predict.

    The tuning is the inner loop of :func:`evaluate` run on all the data. The SVMs are wrapped
    in ``CalibratedClassifierCV(method="temperature", ensemble=False)`` with ``inner_cv``
    folds: this adds ``predict_proba`` without changing any prediction.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Features, finite.
    y : array-like of shape (n_samples,)
        Class labels, strings or integers; ``pipeline.classes_`` holds them.
    head, inner_cv, random_state, class_weight, l2_normalize, pca, tune, blocks
        As in :func:`evaluate`.
    n_jobs : int or None, default=None
        Grid-search fits run in parallel (joblib). Their ConvergenceWarnings are counted
        only when they run in this process (``n_jobs`` None or 1).
    return_score : bool, default=False
        Also return the inner cross-validation score of the chosen parameters.

    Returns
    -------
    pipeline : sklearn.pipeline.Pipeline
        The fitted head, with ``predict`` and ``predict_proba``.
    params : dict
        The chosen hyper-parameters in :func:`param_grid` naming (python scalars); for an SVM,
        ``make_head(head).set_params(**params)`` is the uncalibrated classifier.
    score : dict
        Only with ``return_score=True``: ``cv_score``, the mean inner-CV accuracy of the chosen
        parameters (the grid search's best score), and ``inner_cv``, the folds it used; both
        ``None`` when nothing was cross-validated (``tune=False``, or a class of one sample).

    Raises
    ------
    UnknownHeadError
        If ``head`` is not one of :data:`HEADS`.
    EvaluationError
        As in :func:`evaluate`.

    Warns
    -----
    UserWarning
        When the smallest class has fewer samples than ``inner_cv``: fewer folds are used.
    ConvergenceWarning
        Once, counting the fits that stopped at the iteration limit, if any did.

    Examples
    --------
    >>> import numpy as np
    >>> from featx.heads import fit_head
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat(["ant", "bee"], 10)
    >>> X = rng.normal(size=(20, 4)) + 3 * (y == "bee")[:, None]
    >>> pipeline, params = fit_head(X, y, head="linear-svm", inner_cv=2)
    >>> pipeline.predict(X[:2]).tolist(), pipeline.predict_proba(X[:2]).shape
    (['ant', 'ant'], (2, 2))
    """
    _check_head(head)
    pca = _check_pca(pca)
    inner_cv = _check_int("inner_cv", inner_cv, 2)
    X, y = _check_X_y(X, y)
    classes, counts = _check_classes(y)
    _check_pca_size(pca, len(X), X.shape[1])
    _check_class_weight(class_weight, classes)
    blocks = _check_blocks(blocks, X.shape[1])
    if counts.min() < inner_cv:
        small = ", ".join(f"{str(n)!r} ({int(c)})" for n, c in zip(classes, counts) if c < inner_cv)
        warnings.warn(
            f"classes with fewer samples than inner_cv={inner_cv}: {small}; tuning and "
            f"calibrating with {int(counts.min())} folds.",
            UserWarning,
            stacklevel=2,
        )
    grid = _grid_for(X, head, tune=tune, l2_normalize=l2_normalize, pca=pca,
                     random_state=random_state, blocks=blocks)
    pipeline, params, info = _fit_one(
        X, y, head=head, grid=grid, inner_cv=inner_cv, random_state=random_state,
        class_weight=class_weight, l2_normalize=l2_normalize, pca=pca, calibrate=True,
        n_jobs=n_jobs, blocks=blocks,
    )
    if info["n_not_converged"]:
        warnings.warn(
            _convergence_note(head, info["n_not_converged"], info["n_fits"]),
            ConvergenceWarning,
            stacklevel=2,
        )
    if return_score:
        return pipeline, params, {"cv_score": info["cv_score"], "inner_cv": info["inner_cv"]}
    return pipeline, params
