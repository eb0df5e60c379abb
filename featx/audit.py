"""Audit a labelled image set: duplicates, near-duplicates, leaks between sets, likely label errors.

Everything comes from what the feature store already keeps for every image — its content key
(:func:`featx.images.content_key`) and its features — so an audit after a ``featx cv`` of the
same data computes no feature again:

- **exact duplicates**: images with the same content key (byte-identical files), with equal or
  conflicting labels;
- **near-duplicates**: pairs of distinct images whose features (one layer and pooling, by default
  ``pre_logits/avg``) have a cosine similarity of at least a threshold: resized, re-encoded or
  lightly edited copies (:data:`NEAR_DUPLICATE_THRESHOLD`, calibrated in docs/guide.md);
- **leaks**: the same between a data set and another (``against``: train against val);
- **likely label errors**: out-of-fold predicted probabilities of a fast head (standardised
  features, logistic regression, :func:`sklearn.model_selection.cross_val_predict`): the given
  label's probability low and another class's high, ranked by the difference;
- **class balance**: images per class.

:func:`audit` runs all of it and returns an :class:`AuditResult` of tables (lists of dicts); the
functions that compute each table from given arrays are public too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from featx.exceptions import FeatxError
from featx.extraction import extract, make_requests
from featx.images import ImageSource, describe, open_source
from featx.options import CACHED, ExtractOptions

__all__ = [
    "AuditResult",
    "LABEL_ISSUE_GIVEN_BELOW",
    "LABEL_ISSUE_OTHER_ABOVE",
    "NEAR_DUPLICATE_ALARM",
    "NEAR_DUPLICATE_THRESHOLD",
    "audit",
    "audit_page",
    "class_balance",
    "cosine_pairs",
    "exact_duplicates",
    "label_issues",
    "out_of_fold_probabilities",
    "relative_name",
    "write_audit_page",
]

NEAR_DUPLICATE_THRESHOLD: float = 0.95
"""Cosine similarity of ``pre_logits/avg`` features (of efficientnet_lite0) from which two distinct
images are near-duplicates. Calibrated on flowers5_128px and neu_steel (docs/guide.md, "Audit")."""

LABEL_ISSUE_GIVEN_BELOW: float = 0.2
"""A likely label error has an out-of-fold probability of its given label below this …"""

LABEL_ISSUE_OTHER_ABOVE: float = 0.5
"""… and another class's probability above this."""

NEAR_DUPLICATE_ALARM: float = 0.1
"""When more than this fraction of the distinct images has a near-duplicate, the audit adds a note that
the features do not separate the set's images (measured at 0.95: 0.4 % on flowers5_128px, 43 % on neu_steel)."""

_BLOCK = 2048  # rows of the similarity matrix computed at a time


# --------------------------------------------------------------------------- tables from arrays


def exact_duplicates(keys: Sequence[str | None], names: Sequence[str], labels=None) -> list[dict]:
    """Groups of images with the same content key.

    Parameters
    ----------
    keys : sequence of str or None
        Content key of every image (None: unreadable, left out).
    names : sequence of str
        What each image is called in the table (its path).
    labels : array-like of shape (n_samples,), optional

    Returns
    -------
    list of dict
        One row per group of two or more images, largest (then conflicting) first: ``group``
        (numbered from 1), ``key``, ``n_images``, ``positions``, ``images``, ``labels`` (None
        without labels) and ``conflicting`` (the copies carry more than one label).

    Examples
    --------
    >>> rows = exact_duplicates(["k1", "k2", "k1", None], ["a.png", "b.png", "c.png", "d.png"],
    ...                         ["cat", "dog", "dog", "cat"])
    >>> [(row["images"], row["labels"], row["conflicting"]) for row in rows]
    [(['a.png', 'c.png'], ['cat', 'dog'], True)]
    """
    groups: dict[str, list[int]] = {}
    for position, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(position)
    rows = []
    for key, positions in groups.items():
        if len(positions) < 2:
            continue
        group_labels = None if labels is None else [str(labels[p]) for p in positions]
        rows.append({"key": key, "n_images": len(positions), "positions": positions,
                     "images": [names[p] for p in positions], "labels": group_labels,
                     "conflicting": group_labels is not None and len(set(group_labels)) > 1})
    rows.sort(key=lambda row: (-row["n_images"], not row["conflicting"], row["positions"][0]))
    return [{"group": number, **row} for number, row in enumerate(rows, 1)]


def cosine_pairs(X, Y=None, *, threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[tuple[int, int, float]]:
    """Pairs of rows whose cosine similarity is at least ``threshold``.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    Y : array-like of shape (n_other, n_features), optional
        Compare the rows of ``X`` with those of ``Y``; without it, the rows of ``X`` with each
        other (each pair once, ``i < j``).
    threshold : float, default=NEAR_DUPLICATE_THRESHOLD

    Returns
    -------
    list of (int, int, float)
        ``(i, j, similarity)``, most similar first; ``j`` indexes ``Y`` when given. An all-zero
        row has similarity 0 with everything.

    Examples
    --------
    >>> X = [[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]
    >>> [(i, j, round(s, 3)) for i, j, s in cosine_pairs(X, threshold=0.9)]
    [(0, 1, 0.995)]
    >>> cosine_pairs(X, [[0.0, 2.0]], threshold=0.9)
    [(2, 0, 1.0)]
    """
    A = _unit_rows(X)
    B = A if Y is None else _unit_rows(Y)
    if A.shape[1] != B.shape[1]:
        raise FeatxError(f"cosine_pairs: X has {A.shape[1]} features but Y has {B.shape[1]}; compare features of "
                         "the same layer and pooling.")
    found = []
    for start in range(0, len(A), _BLOCK):
        similarity = A[start:start + _BLOCK] @ B.T
        if Y is None:  # each pair once: only columns after the row
            similarity = np.triu(similarity, k=start + 1)
        rows, columns = np.nonzero(similarity >= threshold)
        found += [(int(start + i), int(j), float(similarity[i, j])) for i, j in zip(rows, columns)]
    found.sort(key=lambda pair: (-pair[2], pair[0], pair[1]))
    return found


def _unit_rows(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise FeatxError(f"expected a feature matrix of shape (n_samples, n_features), got shape {X.shape}.")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


def out_of_fold_probabilities(X, y, *, cv: int = 5, random_state: int = 0) -> tuple[np.ndarray, list[str]]:
    """Out-of-fold class probabilities of a fast head (standardised features, logistic regression).

    The logistic regression is strongly regularised (``C = 1 / n_features``): on flowers5_128px
    (1280 features) that gave the best-calibrated probabilities (out-of-fold log-loss 0.69,
    against 1.89 with scikit-learn's ``C=1``, which calls a quarter of the images label errors
    with probabilities of 0 and 1), and the fastest fits.

    Each image's probabilities come from a head that did not see it
    (:func:`~sklearn.model_selection.cross_val_predict` over a shuffled, stratified ``cv``-fold
    split; fewer folds when the smallest class is smaller). Classes of one image cannot be held
    out: their rows get NaN.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
    cv : int, default=5
    random_state : int, default=0

    Returns
    -------
    probabilities : ndarray of shape (n_samples, n_classes)
    classes : list of str
        The columns' classes, sorted.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict  # scikit-learn: only when fitting
    from threadpoolctl import threadpool_limits

    from featx.heads import make_head  # scikit-learn: kept out of a warm 'featx audit' that finds no labels

    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y).astype(str)
    classes = sorted(set(y.tolist()))
    probabilities = np.full((len(y), len(classes)), np.nan)
    names, counts = np.unique(y, return_counts=True)
    usable = np.isin(y, names[counts >= 2])
    if len(set(y[usable].tolist())) < 2:
        return probabilities, classes
    folds = int(min(cv, counts[counts >= 2].min()))
    used = sorted(set(y[usable].tolist()))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=random_state)
    with threadpool_limits(1):  # BLAS threads spin after torch's: one thread is faster on shared cores
        head = make_head("logreg", random_state=random_state).set_params(classifier__C=1.0 / X.shape[1])
        predicted = cross_val_predict(head, X[usable], y[usable], cv=split, method="predict_proba")
    columns = [classes.index(name) for name in used]
    probabilities[np.ix_(np.flatnonzero(usable), columns)] = predicted
    probabilities[np.ix_(np.flatnonzero(usable), [i for i in range(len(classes)) if i not in columns])] = 0.0
    return probabilities, classes


def label_issues(probabilities, y, classes: Sequence[str], names: Sequence[str] | None = None, *,
                 given_below: float = LABEL_ISSUE_GIVEN_BELOW, other_above: float = LABEL_ISSUE_OTHER_ABOVE,
                 positions: Sequence[int] | None = None) -> list[dict]:
    """Images whose given label looks wrong, most suspicious first.

    An image is listed when the (out-of-fold) probability of its given label is below
    ``given_below`` and another class's is above ``other_above``; the list is ranked by the
    difference of the two.

    Parameters
    ----------
    probabilities : array-like of shape (n_samples, n_classes)
        Out-of-fold probabilities (rows of NaN are left out), e.g. from :func:`out_of_fold_probabilities`.
    y : array-like of shape (n_samples,)
        The given labels.
    classes : sequence of str
        The class of each column.
    names : sequence of str, optional
        Image names (default: ``"#<position>"``).
    given_below, other_above : float
    positions : sequence of int, optional
        The image's position in its source, for each row (default: the row number).

    Returns
    -------
    list of dict
        ``rank``, ``position``, ``image``, ``label``, ``label_probability``, ``suggested`` (the
        likelier class), ``suggested_probability``.

    Examples
    --------
    >>> p = [[0.9, 0.1], [0.05, 0.95], [0.3, 0.7]]
    >>> [(row["image"], row["suggested"]) for row in label_issues(p, ["a", "a", "b"], ["a", "b"])]
    [('#1', 'b')]
    """
    P = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y).astype(str)
    index = {name: i for i, name in enumerate(classes)}
    rows = []
    for row, (p, label) in enumerate(zip(P, y)):
        if np.isnan(p).any():
            continue
        label = str(label)
        given = float(p[index[label]])
        others = p.copy()
        others[index[label]] = -1.0
        best = int(np.argmax(others))
        if given < given_below and others[best] > other_above:
            position = row if positions is None else int(positions[row])
            rows.append({"position": position, "image": names[row] if names is not None else f"#{position}",
                         "label": label, "label_probability": given, "suggested": classes[best],
                         "suggested_probability": float(others[best])})
    rows.sort(key=lambda r: (r["label_probability"] - r["suggested_probability"], r["position"]))
    return [{"rank": rank, **row} for rank, row in enumerate(rows, 1)]


def class_balance(labels, against=None, *, classes: Sequence[str] | None = None) -> list[dict]:
    """Images per class, and their share (also of the ``against`` set when given).

    Returns
    -------
    list of dict
        ``class``, ``n_images``, ``fraction``, ``ratio_to_largest``; with ``against`` also
        ``n_against`` and ``fraction_against``.

    Examples
    --------
    >>> class_balance(["a", "a", "a", "b"])
    [{'class': 'a', 'n_images': 3, 'fraction': 0.75, 'ratio_to_largest': 1.0}, \
{'class': 'b', 'n_images': 1, 'fraction': 0.25, 'ratio_to_largest': 0.333}]
    """
    labels = np.asarray(labels).astype(str)
    other = None if against is None else np.asarray(against).astype(str)
    names = list(classes) if classes is not None else sorted(set(labels.tolist()) | set([] if other is None
                                                                                          else other.tolist()))
    counts = {name: int(np.sum(labels == name)) for name in names}
    largest = max(counts.values(), default=0)
    rows = []
    for name in names:
        row = {"class": name, "n_images": counts[name], "fraction": round(counts[name] / max(len(labels), 1), 3),
               "ratio_to_largest": round(counts[name] / largest, 3) if largest else 0.0}
        if other is not None:
            n_other = int(np.sum(other == name))
            row.update(n_against=n_other, fraction_against=round(n_other / max(len(other), 1), 3))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the audit


@dataclass
class AuditResult:
    """The tables of an audit (lists of dicts) and what they were computed on.

    Attributes
    ----------
    exact_duplicates : list of dict
        See :func:`exact_duplicates`: groups of byte-identical images within the data.
    near_duplicates : list of dict
        Pairs of distinct images of the data at least :attr:`threshold` similar: ``position_a``,
        ``image_a``, ``label_a``, ``position_b``, ``image_b``, ``label_b``, ``similarity``,
        ``same_label``. An exact-duplicate group takes part through its first image.
    leaks : list of dict
        Images of the data also in ``against``: ``kind`` (``"exact"`` or ``"near"``),
        ``position``, ``image``, ``label``, ``other_position``, ``other_image``, ``other_label``,
        ``similarity`` (1.0 for exact), ``same_label``. Empty without ``against``.
    label_issues : list of dict
        See :func:`label_issues`, ranked.
    class_balance : list of dict
        See :func:`class_balance`.
    data, against : str or None
        The sources' names.
    features : str
        The feature set compared (``"pre_logits/avg"``), of :attr:`backbone`.
    backbone : str
    threshold : float
        Cosine similarity from which a pair is a near-duplicate.
    n_images, n_against : int
        Images of each source (``n_against`` is 0 without ``against``).
    n_computed : int
        Images whose features this audit had to compute (0 when the store held them all).
    skipped : list of (str, str)
        Images that could not be read or decoded, with the reason (left out of what needs features).
    notes : list of str
        What the audit could not do and why (no labels, a class of one image …).
    source, against_source : ImageSource or None
        The sources audited (for thumbnails); not part of :meth:`to_dict`.
    """

    exact_duplicates: list = field(default_factory=list)
    near_duplicates: list = field(default_factory=list)
    leaks: list = field(default_factory=list)
    label_issues: list = field(default_factory=list)
    class_balance: list = field(default_factory=list)
    data: str | None = None
    against: str | None = None
    features: str = ""
    backbone: str = ""
    threshold: float = NEAR_DUPLICATE_THRESHOLD
    n_images: int = 0
    n_against: int = 0
    n_computed: int = 0
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    source: ImageSource | None = field(default=None, repr=False)
    against_source: ImageSource | None = field(default=None, repr=False)

    TABLES = ("exact_duplicates", "near_duplicates", "leaks", "label_issues", "class_balance")

    @property
    def conflicting_duplicates(self) -> list[dict]:
        """The exact-duplicate groups whose copies carry different labels."""
        return [row for row in self.exact_duplicates if row["conflicting"]]

    def to_dict(self) -> dict:
        """Everything but the sources, as JSON-ready Python values."""
        return {"data": self.data, "against": self.against, "backbone": self.backbone, "features": self.features,
                "threshold": self.threshold, "n_images": self.n_images, "n_against": self.n_against,
                "n_computed": self.n_computed, "skipped": [list(pair) for pair in self.skipped], "notes": self.notes,
                **{name: getattr(self, name) for name in self.TABLES}}

    def to_pandas(self, table: str):
        """One table as a :class:`pandas.DataFrame` (needs pandas)."""
        if table not in self.TABLES:
            raise FeatxError(f"Unknown audit table {table!r}: expected one of {', '.join(self.TABLES)}.")
        import pandas as pd  # optional: only for this method

        return pd.DataFrame(getattr(self, table))


def audit(data, options: ExtractOptions | None = None, *, against=None, threshold: float = NEAR_DUPLICATE_THRESHOLD,
          cv: int = 5, random_state: int = 0, given_below: float = LABEL_ISSUE_GIVEN_BELOW,
          other_above: float = LABEL_ISSUE_OTHER_ABOVE, stop=None, **settings) -> AuditResult:
    """Audit an image set for duplicates, near-duplicates, leaks into another set and likely label errors.

    Parameters
    ----------
    data : ImageSource or anything :func:`featx.images.open_source` accepts
        The images (labelled or not: without labels there are no label issues nor balance).
    options : ExtractOptions, optional
        Which features and store (default :data:`featx.options.CACHED`: ``pre_logits/avg`` of
        efficientnet_lite0 in the cache folder). Exactly one layer and one pooling; a store is
        needed, since that is where the content keys and features are kept. Features the store
        holds (from an earlier ``extract``, ``cv``, ``fit`` …) are not computed again.
    against : ImageSource or path, optional
        Another set (e.g. the validation split): its images found in ``data`` are leaks.
    threshold : float, default=NEAR_DUPLICATE_THRESHOLD
        Cosine similarity from which two distinct images are near-duplicates. Calibrated for
        ``pre_logits/avg``; another layer or backbone needs its own (docs/guide.md).
    cv : int, default=5
        Folds of the out-of-fold probabilities.
    random_state : int, default=0
    given_below, other_above : float
        The label-issue rule of :func:`label_issues`.
    stop : callable, optional
        Checked after every batch extracted (see :func:`featx.extract`).
    **settings
        :class:`~featx.options.ExtractOptions` fields by name (``backbone=``, ``layers=``, ``store=`` …).

    Returns
    -------
    AuditResult

    Raises
    ------
    FeatxError
        For several layers or poolings, ``store=None``, a threshold outside (0, 1] or fewer than 2 folds.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    >>> images[6:] //= 4  # the second class is darker
    >>> images[5] = images[4]  # a copy
    >>> result = audit(open_source(images, labels=[0] * 6 + [1] * 6), backbone="featx_tiny_cnn", cv=3,
    ...                device="cpu", store=tempfile.mkdtemp())
    >>> [row["positions"] for row in result.exact_duplicates], result.n_computed
    ([[4, 5]], 11)
    """
    options = ExtractOptions.merge(options or CACHED, settings, where="featx.audit")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise FeatxError(f"threshold must be a cosine similarity in (0, 1], got {threshold!r}; the calibrated "
                         f"default is {NEAR_DUPLICATE_THRESHOLD}.")
    if isinstance(cv, bool) or not isinstance(cv, int) or cv < 2:
        raise FeatxError(f"cv must be a whole number of folds >= 2, got {cv!r}.")
    if options.store is None:
        raise FeatxError("featx.audit reads content keys and features from a feature store, but store=None was "
                         "given: pass store=True (the cache folder), a folder or a .h5 path.")
    backbone_name = options.backbone if isinstance(options.backbone, str) else options.backbone.name
    requests = make_requests(backbone_name, options.layers, options.pooling)
    if len(requests) != 1:
        raise FeatxError(f"featx.audit compares images on one feature set, but {len(requests)} were asked for "
                         f"({', '.join(r.key for r in requests)}): pass one layer and one pooling, e.g. "
                         "layers='pre_logits', pooling='avg'.")
    feature_set = requests[0].key
    source = data if isinstance(data, ImageSource) else open_source(data)
    other = None if against is None else (against if isinstance(against, ImageSource) else open_source(against))
    result = extract(source, options, stop=stop)
    names = [describe(item, i) for i, item in enumerate(source)]
    labels = source.labels
    out = AuditResult(data=source.name, against=None if other is None else other.name, features=feature_set,
                      backbone=backbone_name, threshold=float(threshold), n_images=len(source),
                      n_computed=result.n_computed, skipped=list(result.skipped), source=source,
                      against_source=other)
    out.exact_duplicates = exact_duplicates(result.keys, names, labels)
    kept = result.kept
    X = np.asarray(result[feature_set], dtype=np.float32)
    # one row per content key: copies are the exact duplicates already listed
    firsts = _first_of_each_key(result.keys, kept)
    rows = np.searchsorted(kept, firsts)
    out.near_duplicates = [_pair_row(firsts[i], firsts[j], s, names, labels)
                           for i, j, s in cosine_pairs(X[rows], threshold=threshold)]
    involved = {row[side] for row in out.near_duplicates for side in ("position_a", "position_b")}
    if len(involved) > NEAR_DUPLICATE_ALARM * max(len(firsts), 1):
        out.notes.append(
            f"{len(involved)} of {len(firsts)} distinct images have a near-duplicate at similarity {threshold:g}: "
            f"these features do not tell distinct images of this set apart (textures or close-ups of one kind, "
            "as on neu_steel); trust the exact duplicates, and raise the threshold or look at the pairs yourself "
            "(the near leaks too).")
    if other is not None:
        other_result = extract(other, options, stop=stop)
        out.n_against = len(other)
        out.n_computed += other_result.n_computed
        out.skipped += list(other_result.skipped)
        out.leaks = _leaks(result, other_result, names, labels, feature_set, threshold, X, firsts, rows)
    if labels is None:
        out.notes.append(f"{source.name} has no labels: no label issues nor class balance.")
    else:
        y = np.asarray(labels)[kept]
        probabilities, classes = out_of_fold_probabilities(X, y, cv=cv, random_state=random_state)
        alone = sorted({str(label) for label, row in zip(y, probabilities) if np.isnan(row).any()})
        if alone:
            out.notes.append(f"class{'es' if len(alone) > 1 else ''} {', '.join(map(repr, alone))} "
                             f"{'have' if len(alone) > 1 else 'has'} one image only: not checked for label issues.")
        out.label_issues = label_issues(probabilities, y, classes, [names[p] for p in kept], given_below=given_below,
                                        other_above=other_above, positions=kept)
        out.class_balance = class_balance(labels, None if other is None else other.labels, classes=None)
    return out


def _first_of_each_key(keys, kept) -> np.ndarray:
    seen, firsts = set(), []
    for position in kept:
        if keys[position] not in seen:
            seen.add(keys[position])
            firsts.append(int(position))
    return np.asarray(firsts, dtype=np.int64)


def _label(labels, position):
    return None if labels is None else str(labels[position])


def _pair_row(a: int, b: int, similarity: float, names, labels) -> dict:
    label_a, label_b = _label(labels, a), _label(labels, b)
    return {"position_a": int(a), "image_a": names[a], "label_a": label_a, "position_b": int(b),
            "image_b": names[b], "label_b": label_b, "similarity": round(similarity, 4),
            "same_label": None if labels is None else label_a == label_b}


def _leaks(result, other_result, names, labels, feature_set, threshold, X, firsts, rows) -> list[dict]:
    other = other_result.source
    other_names = [describe(item, i) for i, item in enumerate(other)]
    other_labels = other.labels

    def row(kind, a, b, similarity):
        label, other_label = _label(labels, a), _label(other_labels, b)
        return {"kind": kind, "position": int(a), "image": names[a], "label": label, "other_position": int(b),
                "other_image": other_names[b], "other_label": other_label, "similarity": round(similarity, 4),
                "same_label": None if label is None or other_label is None else label == other_label}

    where: dict[str, list[int]] = {}
    for b, key in enumerate(other_result.keys):
        if key is not None:
            where.setdefault(key, []).append(b)
    leaks = [row("exact", a, b, 1.0) for a, key in enumerate(result.keys) if key in where for b in where[key]]
    other_firsts = _first_of_each_key(other_result.keys, other_result.kept)
    if len(firsts) and len(other_firsts):
        Y = np.asarray(other_result[feature_set], dtype=np.float32)[np.searchsorted(other_result.kept, other_firsts)]
        for i, j, similarity in cosine_pairs(X[rows], Y, threshold=threshold):
            a, b = firsts[i], other_firsts[j]
            if result.keys[a] != other_result.keys[b]:  # the same key is an exact leak, listed above
                leaks.append(row("near", a, b, similarity))
    return leaks


#: How many groups, pairs or images each section of the audit page shows with thumbnails.
PAGE_LIMIT = 60


def _caption(label, name: str, root, *extra: str) -> str:
    """A thumbnail's caption: the label, what else is said, the name relative to the source's folder."""
    return "\n".join(([] if label is None else [str(label)]) + list(extra) + [relative_name(name, root)])


def relative_name(name, root):
    """``name`` relative to ``root`` when it is a path inside that folder (a folder source's images), else as it is.

    Examples
    --------
    >>> relative_name("data/train/cat/1.jpg", "data/train"), relative_name("other/1.jpg", "data/train")
    ('cat/1.jpg', 'other/1.jpg')
    """
    if root and isinstance(name, str):
        try:
            relative = os.path.relpath(name, root)
        except ValueError:  # another drive
            return name
        if not relative.startswith(".."):
            return relative
    return name


def _shown(page, rows, what: str) -> list:
    if len(rows) > PAGE_LIMIT:
        page.paragraph(f"The first {PAGE_LIMIT} of {len(rows)} {what} (all of them: --json, or the AuditResult).")
    return rows[:PAGE_LIMIT]


def audit_page(result: AuditResult, *, size: int = 96):
    """The audit as a :class:`featx.html.Page`: each finding with the thumbnails of its images.

    Parameters
    ----------
    result : AuditResult
        From :func:`audit` (it keeps the sources, whose images become the thumbnails).
    size : int, default=96
        Side of a thumbnail, in pixels.

    Returns
    -------
    featx.html.Page
        Write it with ``.write(path)``; :func:`write_audit_page` does both.
    """
    from featx.html import Page  # the page: only when one is asked for

    source, other = result.source, result.against_source
    if source is None:
        raise FeatxError("this AuditResult holds no source (it was rebuilt from a dict?): the page needs the images; "
                         "run featx.audit again.")
    root = source.root
    other_root = None if other is None else other.root
    page = Page(f"Audit of {result.data}")
    computed = f"{result.n_computed} computed" if result.n_computed else "all from the feature store"
    page.paragraph(f"{result.n_images} images" + (f", against {result.against} ({result.n_against} images)"
                                                  if result.against else "")
                   + f". Features {result.features} of {result.backbone} ({computed}); near-duplicates from a cosine "
                   f"similarity of {result.threshold:g}.")
    for note in result.notes:
        page.paragraph(note)

    groups = result.exact_duplicates
    with page.section(f"Exact duplicates: {len(groups)} groups, "
                      f"{sum(row['conflicting'] for row in groups)} with conflicting labels"):
        if not groups:
            page.paragraph("No two images have the same content.")
        for row in _shown(page, groups, "groups"):
            labels = row["labels"] or [None] * row["n_images"]
            page.heading(f"group {row['group']}: {'conflicting' if row['conflicting'] else 'equal'} labels", level=3)
            page.gallery([(source[p], _caption(label, name, root))
                          for p, label, name in zip(row["positions"], labels, row["images"])], size=size)

    pairs = result.near_duplicates
    with page.section(f"Near-duplicates: {len(pairs)} pairs (cosine similarity >= {result.threshold:g})"):
        if not pairs:
            page.paragraph("No two distinct images are that similar.")
        for row in _shown(page, pairs, "pairs"):
            similarity = f"similarity {row['similarity']:.4f}"
            page.gallery([(source[row["position_a"]], _caption(row["label_a"], row["image_a"], root, similarity)),
                          (source[row["position_b"]], _caption(row["label_b"], row["image_b"], root))], size=size)

    if other is not None:
        leaks = result.leaks
        with page.section(f"Leaks into {result.against}: {len(leaks)} "
                          f"({sum(row['kind'] == 'exact' for row in leaks)} exact)"):
            if not leaks:
                page.paragraph(f"No image of {result.data} is in {result.against}.")
            where = f"in {os.path.basename(str(result.against))}"
            for row in _shown(page, leaks, "leaks"):
                kind = f"{row['kind']}, similarity {row['similarity']:.4f}"
                page.gallery([(source[row["position"]], _caption(row["label"], row["image"], root, kind)),
                              (other[row["other_position"]],
                               _caption(row["other_label"], row["other_image"], other_root, where))], size=size)

    if result.class_balance:
        issues = result.label_issues
        with page.section(f"Likely label errors: {len(issues)}"):
            page.paragraph("Out-of-fold probabilities of a logistic regression on the features: the given label's "
                           "is low and another class's high. Most suspicious first.")
            if not issues:
                page.paragraph("None.")
            page.gallery([(source[row["position"]], f"#{row['rank']} {row['label']} {row['label_probability']:.2f}"
                           f" → {row['suggested']} {row['suggested_probability']:.2f}\n"
                           + relative_name(row["image"], root))
                          for row in _shown(page, issues, "images")], size=size)
        with page.section("Class balance"):
            columns = ["class", "n_images", "fraction", "ratio_to_largest"]
            if result.against:
                columns += ["n_against", "fraction_against"]
            page.table(result.class_balance, columns)
    return page


def write_audit_page(result: AuditResult, path, *, size: int = 96) -> str:
    """Write :func:`audit_page` to ``path`` as one self-contained HTML file; return the path."""
    return audit_page(result, size=size).write(path)
