"""Choosing among cross-validated candidates without fooling ourselves: the one-standard-error rule.

With a few hundred images, the best of many cross-validation scores is mostly luck: its fold
scores are a sample, and the maximum of many noisy means is biased upwards (the winner's
curse). featx therefore chooses in two steps, both on the *same* folds for every candidate:

1. The best candidate by mean fold score is found.
2. Every candidate whose paired difference to the best (``best[k] - candidate[k]`` over the
   folds ``k``) is within one standard error of that difference is *as good as the best*
   given the noise; among those, the first in ``preference`` order wins. featx lists the
   simplest candidate first (the classic default ``pre_logits/avg``, then the smaller feature
   sets), so a more complex candidate has to beat it by more than the noise.

The chosen candidate's own mean is still optimistic when it was chosen because it looked good
on these folds. :func:`bootstrap_estimate` scores the *procedure* instead of its winner
(a bootstrap bias correction over folds, after Tsamardinos et al., 2018, "BBC-CV"): many times,
resample the folds with replacement, choose by the same rule on the resampled folds, and score
the chosen candidate on the folds left out; the mean is the estimate. It needs no refit, so it
is affordable after any search whose candidates were scored on the same folds. The folds of a
repeated cross-validation are not independent, so with few images the estimate is rough: it
corrects the direction of the winner's curse, not its every point.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from featx.exceptions import FeatxError
from featx.paths import split_names
from featx.progress import Progress

__all__ = ["AUTO_POOLINGS", "SIMPLEST", "Selection", "auto_poolings", "bootstrap_estimate", "evaluate_auto",
           "feature_sets", "layer_preference", "one_standard_error", "select_layer"]

#: The poolings ``layers="auto"`` weighs when none is named: the whole map's average and the
#: spatial pyramid (1x1 + 2x2). Held out (pipelines/accuracy.py, docs/benchmarks.md), adding spp
#: lifted digits from 0.967 to 0.996 (stage4/spp) and clothing_small@10 from 0.783 to 0.789, and
#: left the other six small rows unchanged; max, avgmax and concatenations won nowhere there.
AUTO_POOLINGS = ("avg", "spp")

#: :func:`select_layer` repeats its cross-validation REPEATS times below REPEAT_BELOW images, so that small
#: data gives enough folds to measure its noise.
REPEATS, REPEAT_BELOW = 3, 500
RULE = ("the simplest candidate within one standard error of the best (paired over the same folds); "
        "the estimate scores the rule itself by a bootstrap over the folds")


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`one_standard_error`.

    Attributes
    ----------
    chosen : str
        The candidate chosen.
    best : str
        The candidate with the highest mean fold score.
    estimate : float
        :func:`bootstrap_estimate` of the rule: the score of choosing, not of the chosen.
    bias : float
        The chosen candidate's mean minus ``estimate`` (how optimistic its own score is).
    table : list of dict
        One row per candidate, in ``preference`` order: ``name``, ``mean``, ``std``, ``n_folds``,
        ``gap`` (the best's mean minus this one's), ``se`` (the standard error of that gap),
        ``within`` (whether the gap is within one standard error) and ``chosen``.
    rule : str
        The rule, in words.
    head, cv, repeats : str, int, int or None
        How :func:`select_layer` scored the candidates (the head with its default parameters,
        ``cv``-fold stratified CV repeated ``repeats`` times); None from :func:`one_standard_error`.
    """

    chosen: str
    best: str
    estimate: float
    bias: float
    table: list = field(default_factory=list)
    rule: str = RULE
    head: str | None = None
    cv: int | None = None
    repeats: int | None = None

    def to_dict(self) -> dict:
        """The fields as a plain dict (what a model's ``info`` and ``--json`` keep); ``Selection(**d)`` reads it back."""
        return asdict(self)

    def scored_by(self) -> str:
        """How the candidates were scored, in words.

        Examples
        --------
        >>> Selection("a", "a", 0.9, 0.0, [{"n_folds": 9}] * 7, head="logreg", cv=3, repeats=3).scored_by()
        '7 feature sets scored by logreg with its default parameters on 9 stratified folds (3-fold CV repeated 3 times, as below 500 images)'
        """
        folds = self.table[0]["n_folds"] if self.table else 0
        how = f" by {self.head} with its default parameters" if self.head else ""
        sets = f"{len(self.table)} feature set{'' if len(self.table) == 1 else 's'}"
        if self.cv is None:
            return f"{sets} scored{how} on {folds} folds"
        repeated = (f"repeated {self.repeats} times, as below {REPEAT_BELOW} images" if (self.repeats or 1) > 1 else
                    f"not repeated, as from {REPEAT_BELOW} images")
        return f"{sets} scored{how} on {folds} stratified folds ({self.cv}-fold CV {repeated})"


def _scores(fold_scores: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    scores = {name: np.asarray(values, dtype=np.float64) for name, values in fold_scores.items()}
    if not scores:
        raise ValueError("one_standard_error needs at least one candidate, got none.")
    for name, values in scores.items():
        if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
            raise ValueError(f"candidate {name!r}: expected a non-empty list of finite fold scores, got {values!r}.")
    return scores


def _choose(rows: Sequence[np.ndarray]) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """The rule on the candidates' fold scores ``rows``, in preference order: the one place it is written.

    Returns ``(chosen, best, gaps, standard errors, within)``. A candidate scored on as many folds
    as the best is compared pair by pair (the standard error of the paired differences); one
    scored on another count of folds, with the best's own standard error.
    """
    means = np.array([row.mean() for row in rows])
    best = int(np.argmax(means))  # the first of equal means: the preferred
    top = rows[best]
    se = np.zeros(len(rows))
    for i, row in enumerate(rows):
        if row.size == top.size and row.size > 1:
            se[i] = np.std(top - row, ddof=1) / math.sqrt(row.size)
        elif top.size > 1:
            se[i] = np.std(top, ddof=1) / math.sqrt(top.size)
    gaps = means[best] - means
    within = gaps <= se + 1e-12
    return int(np.argmax(within)), best, gaps, se, within


def bootstrap_estimate(fold_scores: Mapping[str, Sequence[float]], preference: Sequence[str] | None = None, *,
                       n_boot: int = 500, random_state: int = 0) -> float:
    """The score of choosing by :func:`one_standard_error`, estimated by a bootstrap over the folds.

    Each of ``n_boot`` times: draw the folds with replacement, choose by the rule on the drawn
    folds, and average the chosen candidate's scores on the folds not drawn; return the mean of
    those averages. Only candidates scored on as many folds as the most common count take part
    (the same folds); with fewer than three folds, the chosen candidate's own mean is returned.

    Parameters
    ----------
    fold_scores : mapping of str to sequence of float
        Each candidate's score on every fold, higher is better.
    preference : sequence of str, optional
        As in :func:`one_standard_error`.
    n_boot : int, default=500
        Bootstrap draws.
    random_state : int, default=0
        Seed of the draws.

    Returns
    -------
    float

    Examples
    --------
    Thirty candidates equal in truth (0.8), one chosen by preference: the estimate stays near
    its own mean, far below the luckiest candidate's.

    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> folds = {f"c{i}": 0.8 + rng.normal(0, 0.06, size=10) for i in range(30)}
    >>> round(float(np.mean(folds["c0"])), 3), round(float(max(np.mean(v) for v in folds.values())), 3)
    (0.813, 0.819)
    >>> round(bootstrap_estimate(folds, ["c0"]), 3)
    0.792
    """
    scores = _scores(fold_scores)
    order = _order(scores, preference)
    sizes = [scores[name].size for name in order]
    k = max(set(sizes), key=sizes.count)
    order = [name for name in order if scores[name].size == k]
    matrix = np.array([scores[name] for name in order])
    if k < 3:
        return float(matrix[_choose(list(matrix))[0]].mean())
    rng = np.random.default_rng(random_state)
    values = []
    for _ in range(n_boot):
        drawn = rng.integers(0, k, size=k)
        left = np.setdiff1d(np.arange(k), drawn)
        if left.size == 0:
            continue
        chosen = _choose(list(matrix[:, drawn]))[0]
        values.append(matrix[chosen, left].mean())
    return float(np.mean(values))


def _order(scores: Mapping[str, np.ndarray], preference: Sequence[str] | None) -> list[str]:
    order = [name for name in dict.fromkeys(preference or ()) if name in scores]
    return order + [name for name in scores if name not in order]


def one_standard_error(fold_scores: Mapping[str, Sequence[float]],
                       preference: Sequence[str] | None = None, *, random_state: int = 0) -> Selection:
    """Choose the first candidate in ``preference`` within one standard error of the best.

    Parameters
    ----------
    fold_scores : mapping of str to sequence of float
        Each candidate's score on every fold (accuracy: higher is better). Candidates scored on
        the same folds are compared pair by pair; one scored on other folds (another count) is
        compared with the best's own standard error instead.
    preference : sequence of str, optional
        The candidates from simplest to most complex (default: the mapping's order). Names not
        in ``fold_scores`` are ignored; candidates missing from it come last, in mapping order.

    Returns
    -------
    Selection

    Examples
    --------
    Two feature sets whose scores differ by less than their noise: the simpler one is kept.

    >>> choice = one_standard_error({"pre_logits/avg": [0.90, 0.85, 0.95],
    ...                              "stage4/spp": [0.95, 0.85, 0.93]})
    >>> choice.best, choice.chosen
    ('stage4/spp', 'pre_logits/avg')
    >>> round(choice.estimate, 3)
    0.895
    """
    scores = _scores(fold_scores)
    order = _order(scores, preference)
    chosen, best, gaps, se, within = _choose([scores[name] for name in order])
    rows = [{"name": name, "mean": float(np.mean(scores[name])), "std": float(np.std(scores[name])),
             "n_folds": int(scores[name].size), "gap": float(gaps[i]), "se": float(se[i]), "within": bool(within[i]),
             "chosen": i == chosen} for i, name in enumerate(order)]
    chosen, best = order[chosen], order[best]
    means = {row["name"]: row["mean"] for row in rows}
    estimate = bootstrap_estimate(scores, order, random_state=random_state)
    return Selection(chosen=chosen, best=best, estimate=estimate, bias=means[chosen] - estimate, table=rows)


def auto_poolings(pooling) -> tuple[str, ...]:
    """The poolings ``layers="auto"`` chooses among: :data:`AUTO_POOLINGS` for the default pooling, else those named.

    Examples
    --------
    >>> auto_poolings("avg"), auto_poolings(("max", "spp"))
    (('avg', 'spp'), ('max', 'spp'))
    """
    from featx.options import ExtractOptions

    names = tuple(split_names(pooling))
    return AUTO_POOLINGS if names == tuple(split_names(ExtractOptions().pooling)) else names


def feature_sets(result, backbone: str) -> dict[str, np.ndarray]:
    """The candidates of ``layers="auto"``: every ``"<layer>/<pooling>"`` block of ``result``, in its order.

    A layer that is a vector already (``pre_logits``) has the same values under every pooling, so
    only its first pooling is a candidate (``pre_logits/spp`` would be ``pre_logits/avg`` again).
    """
    from featx.backbones import layer_shape

    candidates, vectors = {}, set()
    for request in result.requests:
        if len(layer_shape(backbone, request.tap)) == 1:
            if request.layer in vectors:
                continue
            vectors.add(request.layer)
        candidates[request.key] = result[request.key]
    return candidates


#: The feature set a choice prefers when others are no better than the noise: the classic default.
SIMPLEST = "pre_logits/avg"


def select_layer(candidates: dict[str, np.ndarray], y, *, head: str = "logreg", cv: int = 3,
                 random_state: int = 0) -> Selection:
    """Choose among feature sets by cross-validation on ``(X, y)`` only, resisting the winner's curse.

    Each candidate is scored by :func:`featx.heads.evaluate` with the head's default
    hyper-parameters (the choice of layer comes first; C is tuned afterwards on the chosen one),
    on the same stratified folds, repeated three times below 500 images so that small data gives
    enough folds to measure its noise. The choice is :func:`featx.selection.one_standard_error`:
    the first candidate within one standard error of the best in :func:`layer_preference`
    order, the least departure from the default first: ``pre_logits/avg``, then the deepest
    layers (a shallower layer must beat them by more than the noise).

    Returns
    -------
    Selection
        ``chosen``, ``best``, the ``estimate`` of the choice and the ``table`` it chose from.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat(["a", "b"], 15)
    >>> informative = rng.normal(size=(30, 4)) + 3 * (y == "a")[:, None]
    >>> choice = select_layer({"stage2/avg": informative, "pre_logits/avg": rng.normal(size=(30, 4))}, y)
    >>> choice.chosen
    'stage2/avg'
    """
    from featx.heads import evaluate  # scikit-learn: this module stays light for warm runs

    y = np.asarray(y)
    repeats = REPEATS if len(y) < REPEAT_BELOW else 1
    folds = {
        name: evaluate(X, y, head=head, cv=cv, repeats=repeats, tune=False, random_state=random_state)["fold_accuracy"]
        for name, X in candidates.items()
    }
    selection = one_standard_error(folds, layer_preference(candidates), random_state=random_state)
    return replace(selection, head=head, cv=cv, repeats=repeats)


def layer_preference(candidates: dict[str, np.ndarray]) -> list[str]:
    """Feature sets from the least to the most departure from the default: ``pre_logits/avg``, then deepest first.

    ``candidates`` lists its ``"<layer>/<pooling>"`` names shallow to deep (as ``layers="all"``
    extracts them); within a layer the narrower pooling comes first.

    Examples
    --------
    >>> import numpy as np
    >>> names = ["stage3/avg", "stage3/spp", "stage4/avg", "pre_logits/avg"]
    >>> layer_preference({n: np.zeros((1, 5 if n.endswith("spp") else 1)) for n in names})
    ['pre_logits/avg', 'stage4/avg', 'stage3/avg', 'stage3/spp']
    """
    names = list(candidates)
    layers = list(dict.fromkeys(name.split("/")[0] for name in names))
    return sorted(names, key=lambda n: (n != SIMPLEST, -layers.index(n.split("/")[0]), np.shape(candidates[n])[1],
                                        names.index(n)))


def evaluate_auto(candidates: dict[str, np.ndarray], y, *, head: str = "logreg", cv: int = 5, inner_cv: int = 3,
                  random_state: int = 0, progress: bool | None = False) -> dict:
    """Nested cross-validation of 'choose the layer, then tune and fit the head'.

    In every outer fold, :func:`select_layer` picks a candidate on the training part only (the
    one-standard-error rule), the head is tuned and fitted there (:func:`featx.heads.fit_head`)
    and scored on the held-out part; the accuracy therefore includes the cost of choosing the
    layer: it is the honest estimate of the whole procedure. ``progress`` (as in
    :func:`featx.heads.evaluate`) shows a bar over the outer folds.

    Returns
    -------
    dict
        ``accuracy_mean``, ``accuracy_std``, ``balanced_accuracy``, ``macro_f1``,
        ``chosen_per_fold``, ``chosen`` (the most frequent), ``cv``, ``n_samples``.
    """
    from collections import Counter

    from featx.heads import fit_head, fold_means, outer_splits, score_predictions  # scikit-learn

    y = np.asarray(y)
    names = list(candidates)
    _, counts = np.unique(y, return_counts=True)
    n_splits = int(min(cv, counts.min()))
    if n_splits < 2:
        raise FeatxError("--layers auto needs at least two images in every class.")
    folds, chosen_per_fold = [], []
    start = time.perf_counter()
    classes = np.unique(y)
    with Progress(n_splits, enabled=progress, desc=f"cv auto {head} (a layer chosen in each fold)") as bar:
        for train, test in outer_splits(y, n_splits, random_state=random_state):
            chosen = select_layer({n: candidates[n][train] for n in names}, y[train], head=head, cv=inner_cv,
                                  random_state=random_state).chosen
            model, _ = fit_head(candidates[chosen][train], y[train], head=head, inner_cv=inner_cv,
                                random_state=random_state)
            folds.append(score_predictions(y[test], model.predict(candidates[chosen][test]), classes=classes))
            chosen_per_fold.append(chosen)
            bar.advance()
    return {
        **fold_means(folds),
        "chosen_per_fold": chosen_per_fold,
        "chosen": Counter(chosen_per_fold).most_common(1)[0][0],
        "cv": n_splits,
        "n_samples": int(len(y)),
        "fit_time": time.perf_counter() - start,
    }
