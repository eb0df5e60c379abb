"""Image references: what one is, its name in messages, and the error that names it.

An image reference (:data:`ImageItem`) is a file path, a PIL image or an array of pixels.
:func:`describe` names one for messages and reports; :func:`decode_error` builds the
:class:`~featx.exceptions.ImageDecodeError` that says which image failed, why and how to fix it,
for decoding (:mod:`featx.images.decode`), hashing (:mod:`featx.images.keys`) and folder walks
alike.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib

import numpy as np
from PIL import Image

from featx.exceptions import ImageDecodeError

__all__ = ["IMAGE_EXTENSIONS", "ImageItem", "describe"]

ImageItem = str | os.PathLike | Image.Image | np.ndarray
"""One image reference: a path, a PIL image or an array of pixels."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File name endings (compared case-insensitively) that folder sources collect."""

# Exceptions PIL and its plugins raise for damaged data (besides OSError). TypeError: a damaged
# TIFF tag can hand PIL a rational where it seeks to an offset (found by tests/test_reliability.py).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                 IndexError, KeyError, NotImplementedError, TypeError)  # fmt: skip
"""Exceptions PIL and its plugins raise for damaged data: each one becomes an ImageDecodeError."""


def is_path_item(item: object) -> bool:
    """Tell whether an image reference is a file path (``str`` or ``os.PathLike``).

    Examples
    --------
    >>> import pathlib
    >>> is_path_item("a.png"), is_path_item(pathlib.Path("a.png")), is_path_item(b"a.png")
    (True, True, False)
    """
    return isinstance(item, (str, os.PathLike))


def describe(item: ImageItem, index: int | None = None) -> str:
    """Return a human name for an image reference, for messages and reports.

    Parameters
    ----------
    item : str, os.PathLike, PIL.Image.Image or ndarray
        The image reference.
    index : int, optional
        Position of the item in its source, shown for objects without a path.

    Returns
    -------
    name : str
        The path for files; ``'<array #3>'``, ``'<PIL image #3>'`` (or without the number when
        `index` is None) otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> describe("data/ants/x.jpg")
    'data/ants/x.jpg'
    >>> describe(np.zeros((2, 2)), 3)
    '<array #3>'
    >>> describe(np.zeros((2, 2)))
    '<array>'
    """
    if is_path_item(item):
        return os.fsdecode(item)
    if isinstance(item, Image.Image):
        kind = "PIL image"
    elif isinstance(item, np.ndarray):
        kind = "array"
    else:
        kind = type(item).__name__
    return f"<{kind}>" if index is None else f"<{kind} #{index}>"


def decode_error(item: object, reason: str, hint: str = "", index: int | None = None) -> ImageDecodeError:
    """Build the ImageDecodeError for `item`; ``.item`` and ``.reason`` hold the parts."""
    name = describe(item, index)  # type: ignore[arg-type]
    shown = repr(name) if is_path_item(item) else name
    message = f"cannot decode {shown} ({reason})"
    if hint:
        message += f": {hint}"
    error = ImageDecodeError(message)
    error.item = name  # type: ignore[attr-defined]
    error.reason = reason  # type: ignore[attr-defined]
    return error


def os_reason(exc: OSError) -> str:
    """Short reason for an OSError met while reading a path."""
    if exc.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    return f"unreadable: {exc.strerror or exc}"


def _os_hint(exc: OSError, path: str) -> str:
    if isinstance(exc, FileNotFoundError):
        where = "" if os.path.isabs(path) else f" (relative paths start from {os.getcwd()!r})"
        return f"check the path{where}"
    if isinstance(exc, PermissionError):
        return "give the current user read access (chmod +r) or remove the file from the source"
    return "check the file, or remove it from the source"


def read_error(item: object, exc: OSError, path: str) -> ImageDecodeError:
    """The ImageDecodeError for the OSError `exc` met while reading `path`: reason and fix."""
    return decode_error(item, os_reason(exc), _os_hint(exc, path))


def open_binary(path: str, item: object):
    """Open `path` for reading bytes; OS errors become ImageDecodeError."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise read_error(item, exc, path) from exc


def unsupported_item(item: object, index: int | None = None) -> ImageDecodeError:
    """The ImageDecodeError for an item that is not an image reference at all."""
    return decode_error(
        item, f"unsupported type {type(item).__name__}",
        "pass a file path (str or os.PathLike), a PIL.Image.Image or a numpy array", index,
    )  # fmt: skip
