"""Opening a source: :func:`open_source` over whatever the caller holds.

It dispatches on the kind of data (an ImageSource, a built-in dataset name, a path to a folder,
a table or one image file, objects in memory), then draws the `per_class` subsample. Nothing is
decoded.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from featx.exceptions import FeatxError, suggest
from featx.images.datasets import BUILTIN_DATASETS, open_digits, open_fashion_mnist
from featx.images.folders import open_folder
from featx.images.items import IMAGE_EXTENSIONS, is_path_item
from featx.images.source import ArrayItems, ImageSource
from featx.images.tables import TABLE_DELIMITERS, open_table

__all__ = ["open_source"]


def open_source(
    data,
    *,
    labels=None,
    per_class: int | None = None,
    split: str = "train",
    random_state: int = 0,
    allow_outside_root: bool = False,
) -> ImageSource:
    """Build an :class:`ImageSource` from a folder, a table, a built-in dataset or objects.

    Nothing is decoded: folders are listed, tables parsed and built-in datasets read lazily.

    Parameters
    ----------
    data : str, os.PathLike, sequence, ndarray or ImageSource
        One of:

        - ``'digits'``: scikit-learn's 8×8 digits as uint8 grayscale (0..16 scaled to 0..255),
          labels ``'0'`` … ``'9'``. Built-in names win over a folder of the same name: write
          ``'./digits'`` for the folder.
        - ``'fashion-mnist'``: the IDX files of the Debian package ``dataset-fashion-mnist``
          (``/usr/share/datasets/fashion-mnist``, or the folder in the environment variable
          ``FEATX_FASHION_MNIST_DIR``, read at call time), 28×28 uint8, labels
          ``'T-shirt/top'``, ``'Trouser'`` …
        - a folder whose sub-folders are the classes. Files ending in :data:`IMAGE_EXTENSIONS`
          (any case) are collected recursively in sorted order; hidden files and folders
          (``.name``) are skipped; symbolic links are followed. A folder with images but no
          class sub-folders gives an unlabelled source.
        - a ``.csv`` or ``.tsv`` file with a header holding a ``path`` column and optionally a
          ``label`` column. Paths are relative to the table's folder.
        - a single image file (an unlabelled source of one image).
        - a sequence of paths, PIL images and arrays (each one image), or an ndarray of shape
          ``(n, H, W)`` / ``(n, H, W, C)`` with C in 1, 3, 4 (kept as one array, not copied).
          A 3-D array whose last axis is 1, 3 or 4 reads two ways: ONE ``(H, W, C)`` image, or
          a stack of ``n`` grayscale images of ``H×W`` pixels. The reading whose images are at
          least twice as close to square (aspect ratio, long side over short side, at most half
          the other reading's) wins: ``(64, 64, 3)`` is one 64×64 colour image (not
          64 strips of 64×3 pixels), ``(20, 3, 3)`` twenty 3×3 images (not one 20×3 strip).
          When the shape does not decide (``(5, 5, 3)``), `labels` of one entry or of ``n``
          entries do; otherwise, or when the labels contradict the shape, a FeatxError names
          both readings. Say which you mean with ``array[None]`` (one image) or
          ``array[..., None]`` (a stack of ``n``); a 2-D array (one grayscale image) also
          needs ``array[None]``.
        - an :class:`ImageSource` (returned as is, or subsampled by `per_class`).
    labels : array-like of shape (n_samples,), optional
        Class of every item, for sequence and array data only. Converted to ``str``.
    per_class : int, optional
        Keep a random subset of at most `per_class` items of every class, chosen
        deterministically from `random_state` and the class name (classes with fewer items keep
        them all). Kept items stay in their original order.
    split : {'train', 'test', 'all'}, default='train'
        Part of a built-in dataset: ``digits`` has a stratified 75 / 25 split drawn with
        `random_state` (and ``'all'``); ``fashion-mnist`` has its fixed ``'train'`` (60 000)
        and ``'test'`` (10 000) files. Other sources only accept ``'train'``.
    random_state : int, default=0
        Seed of the `per_class` subsample and of the ``digits`` split. A non-negative integer.
    allow_outside_root : bool, default=False
        Accept table paths that leave the table's folder (``../x.jpg``, absolute paths).

    Returns
    -------
    source : ImageSource

    Raises
    ------
    FeatxError
        Unknown name (with close built-in names), empty folder, table without a ``path``
        column, empty labels, paths outside the table's folder, missing Fashion-MNIST files,
        wrong shapes or lengths, a 3-D array that is not clearly one image or a stack of
        images, ``per_class`` on an unlabelled source.

    Examples
    --------
    >>> import numpy as np
    >>> src = open_source(np.zeros((6, 8, 8), dtype=np.uint8), labels=[0, 1, 0, 1, 0, 1])
    >>> len(src), src.classes, src[0].shape
    (6, ['0', '1'], (8, 8))
    >>> len(open_source(src, per_class=2))
    4
    >>> len(open_source(np.zeros((64, 64, 3), dtype=np.uint8)))  # one colour image
    1
    >>> len(open_source(np.zeros((5, 5, 3), dtype=np.uint8)[..., None]))  # five 5×3 grayscale images
    5
    >>> digits = open_source("digits", split="test")
    >>> len(digits), digits.classes[:3], digits[0].dtype
    (450, ['0', '1', '2'], dtype('uint8'))
    """
    _check_source_options(per_class, split, random_state)
    if isinstance(data, ImageSource):
        _refuse(labels is not None, "labels= does not apply to an ImageSource, which already has its labels")
        _refuse_split(split, data.name)
        source = data
    elif isinstance(data, str) and data in BUILTIN_DATASETS:
        _refuse(labels is not None, f"labels= does not apply to the built-in dataset {data!r}, which has its own")
        source = open_digits(split, random_state) if data == "digits" else open_fashion_mnist(split)
    elif is_path_item(data):
        _refuse(labels is not None, "labels= applies to sequences and arrays; folders and tables carry their labels")
        _refuse_split(split, os.fsdecode(data))
        source = _open_path(os.fsdecode(data), allow_outside_root=allow_outside_root)
    else:
        _refuse_split(split, "<memory>")
        source = _open_objects(data, labels)
    if per_class is not None:
        source = source.subset(_per_class_positions(source, per_class, random_state))
    return source


def _refuse(condition: bool, message: str) -> None:
    if condition:
        raise FeatxError(message)


def _refuse_split(split: str, name: str) -> None:
    _refuse(
        split != "train",
        f"split={split!r} applies to the built-in datasets {', '.join(map(repr, BUILTIN_DATASETS))} only, "
        f"not to {name!r}; leave split at its default and select images with per_class= or subset()",
    )


def _check_source_options(per_class, split, random_state) -> None:
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer))
                                  or per_class < 1):  # fmt: skip
        raise FeatxError(f"per_class must be a positive integer or None; got {per_class!r}")
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or random_state < 0:
        raise FeatxError(f"random_state must be a non-negative integer; got {random_state!r}")
    splits = ("train", "test", "all")
    if split not in splits:
        raise FeatxError(f"unknown split {split!r}; expected one of {', '.join(map(repr, splits))}."
                         f"{suggest(split, splits)}")  # fmt: skip


def _per_class_positions(source: ImageSource, per_class: int, random_state: int) -> np.ndarray:
    if source.labels is None:
        reason = f" {source.unlabelled_reason}" if source.unlabelled_reason else ""
        raise FeatxError(
            f"per_class={per_class} needs labels, but {source.name!r} is unlabelled; "
            f"pass labels= or use a folder of class sub-folders.{reason}"
        )
    keep = []
    for name in sorted(set(source.labels.tolist())):
        members = np.flatnonzero(source.labels == name)
        if len(members) > per_class:
            # Seeded by the class name too: adding a class does not change the others' draw.
            rng = np.random.default_rng([int(random_state), zlib.crc32(name.encode())])
            members = rng.choice(members, size=per_class, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


# Paths ---------------------------------------------------------------------------------------


def _open_path(path: str, *, allow_outside_root: bool) -> ImageSource:
    if os.path.isdir(path):
        return open_folder(path)
    if os.path.isfile(path):
        extension = os.path.splitext(path)[1].lower()
        if extension in TABLE_DELIMITERS:
            return open_table(path, TABLE_DELIMITERS[extension], allow_outside_root)
        if extension in IMAGE_EXTENSIONS:
            return ImageSource(items=[path], labels=None, classes=None, name=path, root=os.path.dirname(path) or ".")
        raise FeatxError(
            f"{path!r} is a file but neither a table (.csv, .tsv) nor an image "
            f"({', '.join(IMAGE_EXTENSIONS)}); pass a folder of class sub-folders, a table or an image"
        )
    if os.path.lexists(path):
        raise FeatxError(f"{path!r} exists but cannot be opened (broken symbolic link?); check the path")
    raise FeatxError(
        f"{path!r} is not a file, a folder or a built-in dataset name.{suggest(path, BUILTIN_DATASETS)} "
        f"open_source accepts a folder of class sub-folders, a .csv/.tsv file with 'path' and 'label' "
        f"columns, an image file, a built-in name ({', '.join(map(repr, BUILTIN_DATASETS))}), or a sequence "
        f"or array of images (relative paths start from {os.getcwd()!r})"
    )


# Objects in memory ----------------------------------------------------------------------------


def _aspect(height: int, width: int) -> float:
    return max(height, width) / max(min(height, width), 1)


def _one_image(shape: tuple[int, int, int], labels) -> bool:
    """Whether a 3-D array whose last axis is 1, 3 or 4 is ONE (H, W, C) image rather than a stack of (H, W) ones.

    The reading whose images are at least twice as close to square wins (64×64×3: one image, not
    64 strips of 64×3 pixels; 20×3×3: twenty 3×3 images, not one 20×3 strip); when neither is,
    labels of the length of only one reading decide; otherwise, or when the labels contradict the
    shape, the array is refused.
    """
    n, height, width = shape
    if shape == (1, 1, 1):
        return False  # one pixel either way
    one, stack = _aspect(n, height), _aspect(height, width)
    n_labels = None if labels is None else len(np.atleast_1d(np.asarray(labels, dtype=object)))
    by_labels = {1: True, n: False}.get(n_labels) if n_labels is not None and n != 1 else None
    by_shape = True if stack >= 2 * one else False if one >= 2 * stack else None
    if by_shape is not None and by_labels in (None, by_shape):
        return by_shape
    if by_shape is None and by_labels is not None:
        return by_labels
    why = (f"{n_labels} label(s) were given, which fit only the other reading" if by_shape is not None
           else "its shape fits both")  # fmt: skip
    raise FeatxError(
        f"an array of shape {shape} is ambiguous ({why}): ONE {n}×{height} image with {width} channel(s), or a "
        f"stack of {n} grayscale image(s) of {height}×{width} pixels. Pass array[None] (shape {(1, *shape)}) for "
        f"one image, or array[..., None] (shape {(*shape, 1)}) or another 4-D array (n, H, W, C) for a stack"
    )



def _open_objects(data, labels) -> ImageSource:
    if isinstance(data, np.ndarray):
        if data.ndim not in (3, 4) or (data.ndim == 4 and data.shape[-1] not in (1, 3, 4)):
            hint = " For one image pass array[None]." if data.ndim == 2 else ""
            raise FeatxError(
                f"expected an array of images of shape (n, H, W) or (n, H, W, C) with C in 1, 3, 4; "
                f"got shape {data.shape}.{hint}"
            )
        if data.ndim == 3 and data.shape[-1] in (1, 3, 4) and _one_image(data.shape, labels):
            data = data[None]  # a view: one image of shape (1, H, W, C)
        items: Any = ArrayItems(data)
    elif isinstance(data, Image.Image):
        items = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (bytes, Mapping)):
        items = []
        for index, item in enumerate(data):
            if is_path_item(item):
                items.append(os.fsdecode(item))
            elif isinstance(item, (Image.Image, np.ndarray)):
                items.append(item)
            else:
                raise FeatxError(
                    f"item #{index} is a {type(item).__name__}; expected file paths, PIL images or numpy arrays"
                )
    else:
        raise FeatxError(
            f"cannot open a {type(data).__name__} as images; expected a folder, a .csv/.tsv file, a built-in "
            f"name ({', '.join(map(repr, BUILTIN_DATASETS))}), a sequence of paths / PIL images / arrays, "
            "or an array of shape (n, H, W[, C])"
        )
    if len(items) == 0:
        raise FeatxError("no images given: the sequence or array is empty")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise FeatxError(f"labels must be one-dimensional (one per image); got shape {labels.shape}")
    return ImageSource(items=items, labels=labels, classes=None, name="<memory>")
