"""Content keys: the hash of what an image *is* (file bytes or pixels), not where it lives.

The feature store keys its rows by :func:`content_key`: its result must never change for the
same content, or every store already written would be recomputed.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from PIL import Image

from featx.images.decode import exif_orientation
from featx.images.items import (DECODE_ERRORS, ImageItem, decode_error, is_path_item, open_binary, read_error,
                                unsupported_item)  # fmt: skip

__all__ = ["content_key"]

_HASH_CHUNK = 1 << 20


def content_key(item: ImageItem) -> str:
    """Return a key that identifies an image by its content.

    The key is the 32-hex-digit BLAKE2b digest (16 bytes) of:

    - for a path: the file's bytes, so a renamed or copied file has the same key;
    - for an array: its dtype string, shape and C-ordered bytes (a strided view and its
      contiguous copy have the same key);
    - for a PIL image: its mode, size, pixel bytes, the palette of palette images and a
      non-default EXIF orientation (both change what :func:`load_image` returns).

    Parameters
    ----------
    item : str, os.PathLike, PIL.Image.Image or ndarray
        The image reference.

    Returns
    -------
    key : str
        32 lowercase hexadecimal characters.

    Raises
    ------
    ImageDecodeError
        If a file cannot be read (its message names the file), an array holds Python objects,
        or the item is not an image reference.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    >>> key = content_key(a)
    >>> len(key), key == content_key(a.copy()), key == content_key(a.reshape(3, 2))
    (32, True, False)
    """
    digest = hashlib.blake2b(digest_size=16)
    if is_path_item(item):
        path = os.fsdecode(item)
        with open_binary(path, item) as handle:
            try:
                for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
            except OSError as exc:
                raise read_error(item, exc, path) from exc
    elif isinstance(item, np.ndarray):
        if item.dtype.hasobject or item.dtype.kind in "USV":
            raise decode_error(
                item, f"unsupported array dtype {item.dtype}",
                "pass numeric pixel values (uint8, uint16, bool or float in [0, 1])",
            )  # fmt: skip
        digest.update(f"ndarray|{item.dtype.str}|{tuple(item.shape)}|".encode())
        digest.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, Image.Image):
        try:
            pixels = item.tobytes()
        except DECODE_ERRORS as exc:
            raise decode_error(item, f"corrupt image data: {exc}", "reopen or re-create the image") from exc
        digest.update(f"PIL|{item.mode}|{tuple(item.size)}|".encode())
        digest.update(pixels)
        if item.mode in ("P", "PA"):
            digest.update(f"|palette={_palette(item)}|transparency={item.info.get('transparency')!r}".encode())
        orientation = exif_orientation(item)
        if orientation != 1:
            digest.update(f"|orientation={orientation}".encode())
    else:
        raise unsupported_item(item)
    return digest.hexdigest()


def _palette(image: Image.Image) -> list[int] | None:
    try:
        return image.getpalette("RGBA")
    except ValueError:
        return image.getpalette()
