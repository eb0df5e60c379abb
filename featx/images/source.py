"""The ImageSource: an ordered list of image references with optional class labels.

A source holds references (paths, PIL images or the rows of ONE array), never decoded pixels;
:func:`~featx.images.open_source` builds one, :func:`~featx.images.load_image` decodes an item.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featx.exceptions import FeatxError
from featx.images.items import ImageItem

__all__ = ["ArrayItems", "ImageSource"]


class ArrayItems:
    """Rows of ONE array of images (ndarray or lazy IDX file), selected by `rows`.

    Indexing returns a view of a row; :meth:`take` composes selections without copying pixels.
    """

    def __init__(self, base, rows: np.ndarray | None = None) -> None:
        self.base = base
        self.rows = rows

    def __len__(self) -> int:
        return len(self.base) if self.rows is None else len(self.rows)

    def __getitem__(self, index):
        position = operator.index(index)
        size = len(self)
        if position < 0:
            position += size
        if not 0 <= position < size:
            raise IndexError(f"index {index} is out of range for {size} images")
        row = position if self.rows is None else int(self.rows[position])
        return self.base[row]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, positions: np.ndarray) -> ArrayItems:
        rows = positions if self.rows is None else self.rows[positions]
        return ArrayItems(self.base, np.asarray(rows, dtype=np.int64))

    def __repr__(self) -> str:
        shape = getattr(self.base, "shape", None)
        return f"<{len(self)} rows of an array of shape {shape}>"


@dataclass(eq=False)
class ImageSource:
    """What to extract: an ordered list of image references with optional labels.

    Build one with :func:`open_source`. A source holds references, never decoded pixels: paths
    as ``str``, PIL images, or the rows of ONE array (a view per item, read lazily for the
    built-in Fashion-MNIST files). Decode an item with :func:`load_image`.

    Parameters
    ----------
    items : list or array-like
        Image references (see :data:`ImageItem`); for array sources an internal sequence of the
        rows of one array.
    labels : ndarray of shape (n_samples,) of str, or None
        Class name of every item, or None for an unlabelled source.
    classes : list of str, or None
        Sorted class names; computed from `labels` when None.
    name : str
        What the source is: ``'digits'``, the folder or CSV path, ``'<memory>'`` …
    root : str, optional
        Folder the paths were found in (folder sources) or are relative to (CSV sources).
    problems : list of (str, str)
        ``(path, reason)`` for what was skipped while walking a folder: symlink loops,
        unreadable sub-folders, broken links, images outside the class sub-folders.
    unlabelled_reason : str, default=''
        Why a source that could have had labels has none, in a sentence: a table whose header
        lacks a ``label`` column names the columns it found and the one that looks like
        ``label``. :meth:`require_labels` adds it to its error.

    Attributes
    ----------
    n_classes : int
        Number of classes (0 when unlabelled).

    Examples
    --------
    >>> import numpy as np
    >>> src = ImageSource(items=["a.png", "b.png", "c.png"], labels=np.array(["x", "y", "x"]),
    ...                   classes=None, name="<memory>")
    >>> len(src), src.classes, src[1]
    (3, ['x', 'y'], 'b.png')
    >>> sub = src.subset([2, 0])
    >>> sub.items, sub.labels.tolist()
    (['c.png', 'a.png'], ['x', 'x'])
    """

    items: Any
    labels: np.ndarray | None
    classes: list[str] | None
    name: str
    root: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    unlabelled_reason: str = ""

    def __post_init__(self) -> None:
        if self.labels is not None:
            self.labels = np.asarray([str(label) for label in self.labels], dtype=str)
            if len(self.labels) != len(self.items):
                raise FeatxError(
                    f"{self.name}: got {len(self.items)} images but {len(self.labels)} labels; "
                    "pass one label per image"
                )
            if self.classes is None:
                self.classes = sorted(set(self.labels.tolist()))
        elif self.classes is not None:
            self.classes = list(self.classes)

    @property
    def n_classes(self) -> int:
        return 0 if self.classes is None else len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i) -> ImageItem:
        try:
            position = operator.index(i)
        except TypeError:
            raise TypeError(
                f"ImageSource indices must be integers, not {type(i).__name__}; "
                "use source.subset(indices) to select several images"
            ) from None
        return self.items[position]

    def __iter__(self):
        return (self.items[i] for i in range(len(self)))

    def __repr__(self) -> str:
        labelled = f"{self.n_classes} classes" if self.labels is not None else "unlabelled"
        problems = f", {len(self.problems)} problems" if self.problems else ""
        return f"ImageSource(name={self.name!r}, n={len(self)}, {labelled}{problems})"

    def require_labels(self, needs: str) -> np.ndarray:
        """Return the labels, or raise a FeatxError that says what `needs` them and why there are none.

        Parameters
        ----------
        needs : str
            What needs the labels and where they come from, e.g. ``"the advisor needs classes"``.

        Returns
        -------
        labels : ndarray of shape (n_samples,) of str

        Raises
        ------
        FeatxError
            When the source is unlabelled: ``"<name> has no labels: <needs>."`` and, for a
            table, its :attr:`unlabelled_reason`.

        Examples
        --------
        >>> ImageSource(items=["a.png"], labels=None, classes=None, name="a.csv",
        ...             unlabelled_reason="Its header has no 'label' column.").require_labels("cv needs classes")
        Traceback (most recent call last):
        ...
        featx.exceptions.FeatxError: a.csv has no labels: cv needs classes. Its header has no 'label' column.
        """
        if self.labels is None:
            reason = f" {self.unlabelled_reason}" if self.unlabelled_reason else ""
            raise FeatxError(f"{self.name} has no labels: {needs}.{reason}")
        return self.labels

    def require_classes(self, needs: str, *, cv: int | None = None) -> np.ndarray:
        """Return the labels, or raise before anything is extracted when they cannot be classified.

        The checks that need only the labels, run once here for every command and workflow: the
        labels exist (:meth:`require_labels`), there are at least two classes, and, with ``cv``,
        every class has at least ``cv`` images (one per cross-validation fold). Images that turn
        out unreadable at extraction are dropped later, and :func:`featx.heads.evaluate` checks
        what is left.

        Parameters
        ----------
        needs : str
            What needs the labels (the error when there are none, see :meth:`require_labels`).
        cv : int, optional
            The cross-validation folds every class must fill.

        Raises
        ------
        FeatxError
            Saying which class is alone or too small, and how to fix it.

        Examples
        --------
        >>> ImageSource(items=["a.png", "b.png"], labels=np.array(["cat", "cat"]), classes=["cat"],
        ...             name="pets").require_classes("cv needs classes")
        Traceback (most recent call last):
        ...
        featx.exceptions.FeatxError: pets holds one class only ('cat', 2 images): a classifier needs at least two \
classes to tell apart; add a sub-folder (or 'label' value) per class.
        """
        labels = self.require_labels(needs)
        names, counts = np.unique(np.asarray(labels).astype(str), return_counts=True)
        names = [str(name) for name in names]
        if len(names) < 2:
            alone = f" ({names[0]!r}, {int(counts[0])} images)" if len(names) else ""
            raise FeatxError(f"{self.name} holds {'one class' if len(names) else 'no image'} only{alone}: a classifier "
                             "needs at least two classes to tell apart; add a sub-folder (or 'label' value) per class.")
        if cv is not None:
            small = [(name, int(count)) for name, count in zip(names, counts) if count < cv]
            if small:
                listed = ", ".join(f"{name!r} ({count})" for name, count in small)
                fewest = min(count for _, count in small)
                lower = f"lower --cv to {fewest}, " if fewest >= 2 else ""
                raise FeatxError(
                    f"{self.name}: {len(small)} class{'es have' if len(small) > 1 else ' has'} fewer images than the "
                    f"{cv} cross-validation folds need (--cv {cv}): {listed}; add images, {lower}or drop "
                    f"{'these classes' if len(small) > 1 else 'that class'}."
                )
        return labels

    def subset(self, indices) -> ImageSource:
        """Return a source with the items at `indices` (integers or a boolean mask), in that order.

        The class list is kept, so labels mean the same in every subset. Array sources keep
        sharing the one array.
        """
        positions = _positions(indices, len(self))
        if isinstance(self.items, ArrayItems):
            items = self.items.take(positions)
        else:
            items = [self.items[int(p)] for p in positions]
        labels = None if self.labels is None else self.labels[positions]
        return ImageSource(
            items=items, labels=labels, classes=None if self.classes is None else list(self.classes),
            name=self.name, root=self.root, problems=list(self.problems),
            unlabelled_reason=self.unlabelled_reason,
        )  # fmt: skip


def _positions(indices, size: int) -> np.ndarray:
    positions = np.asarray(indices)
    if positions.dtype == bool:
        if positions.shape != (size,):
            raise IndexError(f"a boolean mask must have shape ({size},); got {positions.shape}")
        return np.flatnonzero(positions)
    if positions.size == 0:
        return np.zeros(0, dtype=np.int64)
    if positions.ndim != 1 or positions.dtype.kind not in "iu":
        raise IndexError(f"indices must be a 1-d sequence of integers or a boolean mask; got {positions!r}")
    positions = positions.astype(np.int64)
    out_of_range = (positions < -size) | (positions >= size)
    if out_of_range.any():
        raise IndexError(f"index {positions[out_of_range][0]} is out of range for {size} images")
    return np.where(positions < 0, positions + size, positions)
