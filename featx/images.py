"""Image sources, content keys and decoding.

An :class:`ImageSource` is an ordered list of image references (file paths, PIL images or rows of
one array) with optional class labels. :func:`open_source` builds one from a folder of class
sub-folders, a CSV/TSV file, a built-in dataset or objects in memory; it never decodes pixels.
:func:`load_image` decodes one reference to an RGB :class:`PIL.Image.Image` and turns every
failure into an :class:`~featx.exceptions.ImageDecodeError` that names the image;
:func:`content_key` hashes what an image *is* (file bytes or pixels), not where it lives.

This module must stay free of torch: DataLoader workers and torch-free code import it.
"""

from __future__ import annotations

import csv
import errno
import gzip
import hashlib
import operator
import os
import struct
import warnings
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featx.exceptions import FeatxError, ImageDecodeError, suggest

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageItem",
    "ImageSource",
    "content_key",
    "describe",
    "jpeg_bytes",
    "load_image",
    "open_source",
]

ImageItem = str | os.PathLike | Image.Image | np.ndarray
"""One image reference: a path, a PIL image or an array of pixels."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File name endings (compared case-insensitively) that folder sources collect."""

DEFAULT_MAX_PIXELS: int = 89_478_485
"""Largest width × height :func:`load_image` decodes by default (PIL's own default limit)."""

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "fashion-mnist")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "FEATX_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_HASH_CHUNK = 1 << 20
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_TRANSPARENCY_MODES = frozenset({"1", "L", "P", "RGB"})
# Exceptions PIL and its plugins raise for damaged data (besides OSError). TypeError: a damaged
# TIFF tag can hand PIL a rational where it seeks to an offset (found by tests/test_reliability.py).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  IndexError, KeyError, NotImplementedError, TypeError)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Names and errors
# --------------------------------------------------------------------------------------------


def _is_path(item: object) -> bool:
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
    if _is_path(item):
        return os.fsdecode(item)
    if isinstance(item, Image.Image):
        kind = "PIL image"
    elif isinstance(item, np.ndarray):
        kind = "array"
    else:
        kind = type(item).__name__
    return f"<{kind}>" if index is None else f"<{kind} #{index}>"


def _decode_error(item: object, reason: str, hint: str = "", index: int | None = None) -> ImageDecodeError:
    """Build the ImageDecodeError for `item`; ``.item`` and ``.reason`` hold the parts."""
    name = describe(item, index)  # type: ignore[arg-type]
    shown = repr(name) if _is_path(item) else name
    message = f"cannot decode {shown} ({reason})"
    if hint:
        message += f": {hint}"
    error = ImageDecodeError(message)
    error.item = name  # type: ignore[attr-defined]
    error.reason = reason  # type: ignore[attr-defined]
    return error


def _os_reason(exc: OSError) -> str:
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


def _open_binary(path: str, item: object):
    """Open `path` for reading bytes; OS errors become ImageDecodeError."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise _decode_error(item, _os_reason(exc), _os_hint(exc, path)) from exc


# --------------------------------------------------------------------------------------------
# Content keys
# --------------------------------------------------------------------------------------------


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
    if _is_path(item):
        path = os.fsdecode(item)
        with _open_binary(path, item) as handle:
            try:
                for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
            except OSError as exc:
                raise _decode_error(item, _os_reason(exc), _os_hint(exc, path)) from exc
    elif isinstance(item, np.ndarray):
        if item.dtype.hasobject or item.dtype.kind in "USV":
            raise _decode_error(
                item, f"unsupported array dtype {item.dtype}",
                "pass numeric pixel values (uint8, uint16, bool or float in [0, 1])",
            )  # fmt: skip
        digest.update(f"ndarray|{item.dtype.str}|{tuple(item.shape)}|".encode())
        digest.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, Image.Image):
        try:
            pixels = item.tobytes()
        except _DECODE_ERRORS as exc:
            raise _decode_error(item, f"corrupt image data: {exc}", "reopen or re-create the image") from exc
        digest.update(f"PIL|{item.mode}|{tuple(item.size)}|".encode())
        digest.update(pixels)
        if item.mode in ("P", "PA"):
            digest.update(f"|palette={_palette(item)}|transparency={item.info.get('transparency')!r}".encode())
        orientation = _orientation(item)
        if orientation != 1:
            digest.update(f"|orientation={orientation}".encode())
    else:
        raise _unsupported_item(item)
    return digest.hexdigest()


def _palette(image: Image.Image) -> list[int] | None:
    try:
        return image.getpalette("RGBA")
    except ValueError:
        return image.getpalette()


def _unsupported_item(item: object, index: int | None = None) -> ImageDecodeError:
    return _decode_error(
        item, f"unsupported type {type(item).__name__}",
        "pass a file path (str or os.PathLike), a PIL.Image.Image or a numpy array", index,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def load_image(
    item: ImageItem,
    *,
    draft_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode one image reference to a fully loaded RGB PIL image.

    - EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`); an EXIF block too
      damaged to read is ignored rather than failing a readable image.
    - Grayscale (``'1'``, ``'L'``), palette, CMYK and YCbCr images are converted to RGB.
    - Transparency (RGBA, LA, PA, palette or colour-key transparency) is **composited onto a
      white background**, so transparent pixels become white rather than whatever colour the
      hidden RGB values hold.
    - 16-bit images (``'I;16'``, and ``'I'`` with values in 0..65535) are scaled by 1/257 to
      0..255. Other ``'I'`` and ``'F'`` images (rare: scientific TIFFs) are rescaled linearly
      from their own minimum and maximum, except ``'F'`` values already in [0, 1] (× 255) or
      [0, 255] (kept).
    - Animated images decode their first frame.
    - Arrays: ``(H, W)`` grayscale or ``(H, W, C)`` with C in 1, 3, 4 (RGBA is composited onto
      white). uint8 is taken as is; uint16 is scaled by 1/257; bool maps to 0/255; other
      integer types must lie in 0..255; floats must lie in [0, 1].
    - A PIL image passed in is never modified; the result is always a new image.

    Parameters
    ----------
    item : str, os.PathLike, PIL.Image.Image or ndarray
        The image reference.
    draft_size : tuple of (int, int), optional
        ``(width, height)`` the caller will resize to. JPEG files then decode at a reduced
        scale (1/2, 1/4 or 1/8) that is never smaller than `draft_size` on either side, which
        makes large photographs several times faster to decode. Ignored for other formats and
        for PIL images (which are never modified).
    max_pixels : int, default=DEFAULT_MAX_PIXELS
        Largest width × height of a file, checked from its header before any pixel is decoded
        (decompression-bomb guard). PIL's own guard, ``2 * PIL.Image.MAX_IMAGE_PIXELS``, still
        applies above that; featx never changes PIL's global settings.

    Returns
    -------
    image : PIL.Image.Image
        Mode ``'RGB'``, pixels loaded, file closed.

    Raises
    ------
    ImageDecodeError
        For any failure. The message names the image (:func:`describe`), gives a short reason
        (``empty file (0 bytes)``, ``truncated image``, ``not an image (unrecognised format)``,
        ``decompression bomb: …``, ``unreadable: permission denied``, ``not found``, …) and how
        to fix it; ``error.item`` and ``error.reason`` hold those two parts.
    FeatxError
        If `draft_size` or `max_pixels` is not valid (a caller error, not an image error).

    Examples
    --------
    >>> import numpy as np
    >>> image = load_image(np.full((4, 6), 1.0))
    >>> image.mode, image.size, image.getpixel((0, 0))
    ('RGB', (6, 4), (255, 255, 255))
    """
    draft_size = _check_decode_options(draft_size, max_pixels)
    if _is_path(item):
        return _load_path(item, draft_size=draft_size, max_pixels=max_pixels)
    if isinstance(item, np.ndarray):
        return _array_to_rgb(item)
    if isinstance(item, Image.Image):
        try:
            oriented = _exif_transpose(item, in_place=False)
            return _to_rgb(oriented, item)
        except ImageDecodeError:
            raise
        except _DECODE_ERRORS as exc:
            raise _decode_error(item, _pil_reason(exc), "reopen or re-create the image") from exc
    raise _unsupported_item(item)


def _load_path(item: str | os.PathLike, *, draft_size, max_pixels: int) -> Image.Image:
    path = os.fsdecode(item)
    with _open_binary(path, item) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
        except OSError as exc:
            raise _decode_error(item, _os_reason(exc), _os_hint(exc, path)) from exc
        if size == 0:
            raise _decode_error(item, "empty file (0 bytes)", "re-download or re-export it, or remove it")
        try:
            with warnings.catch_warnings():
                # The pixel limit is checked below against max_pixels; PIL's warning is redundant.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(handle)
                width, height = image.size
                if width * height > max_pixels:
                    raise _decode_error(
                        item,
                        f"decompression bomb: {width}×{height} = {width * height} pixels exceeds "
                        f"the limit of {max_pixels}",
                        "pass a larger max_pixels= if you trust this file",
                    )
                if draft_size is not None:
                    image.draft("RGB", _draft_box(image, draft_size))
                image.load()
                image = _exif_transpose(image, in_place=True)
                return _to_rgb(image, item)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise _decode_error(
                item, f"decompression bomb: {str(exc).split(', could be')[0]}",
                "PIL refuses images above 2 * PIL.Image.MAX_IMAGE_PIXELS; resize the file",
            ) from exc  # fmt: skip
        except UnidentifiedImageError as exc:
            raise _decode_error(
                item, "not an image (unrecognised format)",
                f"expected a file in a format PIL reads ({', '.join(IMAGE_EXTENSIONS)}); it may be "
                "text or HTML saved under an image name: re-download or remove it",
            ) from exc
        except _DECODE_ERRORS as exc:
            raise _decode_error(item, _pil_reason(exc), "re-download or re-export it, or remove it") from exc


def jpeg_bytes(item: ImageItem, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes | None:
    """The bytes of a JPEG file that a tensor decoder can take as they are, else ``None``.

    Only the header is parsed (no pixel is decoded). ``None`` means "decode it with
    :func:`load_image`": the item is not a path, not a JPEG, a CMYK or YCCK JPEG, carries an
    EXIF orientation other than upright (GPU decoders ignore it), exceeds `max_pixels`, or
    cannot be read at all -- :func:`load_image` then gives the precise error.

    Examples
    --------
    >>> import numpy as np
    >>> jpeg_bytes(np.zeros((4, 4), dtype=np.uint8)) is None
    True
    """
    if not _is_path(item):
        return None
    try:
        with open(os.fsdecode(item), "rb") as handle:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    width, height = image.size
                    if (
                        image.format != "JPEG"
                        or image.mode not in ("RGB", "L")
                        or width * height > max_pixels
                        or _orientation(image) != 1
                    ):
                        return None
            handle.seek(0)
            return handle.read()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        # Not decodable here; load_image raises the error that names the file and the fix.
        return None


def _pil_reason(exc: BaseException) -> str:
    text = str(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return "truncated image"
    return f"corrupt image data: {text or type(exc).__name__}"


def _check_decode_options(draft_size, max_pixels) -> tuple[int, int] | None:
    """Validate the decoding options (caller errors, not image errors)."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise FeatxError(f"max_pixels must be a positive integer; got {max_pixels!r}")
    if draft_size is None:
        return None
    try:
        width, height = (operator.index(v) for v in draft_size)
    except (TypeError, ValueError):
        width = height = 0
    if width < 1 or height < 1:
        raise FeatxError(f"draft_size must be None or (width, height) of positive integers; got {draft_size!r}")
    return width, height


def _draft_box(image: Image.Image, draft_size: tuple[int, int]) -> tuple[int, int]:
    """`draft_size` in stored (pre-EXIF-rotation) orientation."""
    width, height = draft_size
    if _orientation(image) in (5, 6, 7, 8):  # stored sideways: the displayed width is the height
        return height, width
    return width, height


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block must not fail a readable image
        return 1


def _exif_transpose(image: Image.Image, *, in_place: bool) -> Image.Image:
    """Apply the EXIF orientation; on damaged EXIF keep the image as stored."""
    if _orientation(image) == 1:
        return image
    try:
        if in_place:
            ImageOps.exif_transpose(image, in_place=True)
            return image
        return ImageOps.exif_transpose(image)
    except Exception:  # damaged EXIF: the pixels are still good
        return image


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(image: Image.Image, item: object) -> Image.Image:
    """Return an RGB copy of `image` (or `image` itself when it is RGB and not the caller's)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy() if image is item else image
    if mode in _ALPHA_MODES or (mode in _TRANSPARENCY_MODES and "transparency" in image.info):
        return _composite_on_white(image.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return _array_to_rgb(_wide_to_uint8(np.asarray(image), mode), item)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise _decode_error(
            item, f"unsupported colour mode {mode!r}", "convert the file to RGB (e.g. PNG or JPEG)"
        ) from exc


def _wide_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer and float pixels -> uint8 without clipping."""
    values = values.astype(np.float64)
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif mode == "F" and low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.rint(np.nan_to_num(scaled)).clip(0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray, item: object | None = None, index: int | None = None) -> Image.Image:
    """Validate and convert an array of pixels to an RGB image."""
    item = array if item is None else item
    shape = array.shape
    if array.ndim == 3 and shape[-1] not in (1, 3, 4) and shape[0] in (1, 3, 4):
        raise _decode_error(
            item, f"array of shape {shape} looks channels-first",
            "expected (H, W) or (H, W, C) with C in 1, 3, 4: pass array.transpose(1, 2, 0)", index,
        )  # fmt: skip
    if array.ndim not in (2, 3) or (array.ndim == 3 and shape[-1] not in (1, 3, 4)):
        raise _decode_error(
            item, f"array of shape {shape} is not an image",
            "expected (H, W) grayscale or (H, W, C) with C in 1, 3, 4", index,
        )  # fmt: skip
    if array.size == 0:
        raise _decode_error(item, f"empty array of shape {shape}", "pass an image with at least one pixel", index)
    pixels = _pixels_to_uint8(array, item, index)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if image.mode == "RGBA":
        return _composite_on_white(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _pixels_to_uint8(array: np.ndarray, item: object, index: int | None) -> np.ndarray:
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint16:
        return np.rint(array / 257.0).astype(np.uint8)
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise _decode_error(
                item, f"{array.dtype} values span {low}..{high}, outside 0..255",
                "pass uint8 values in 0..255, uint16 values in 0..65535, or floats in [0, 1]", index,
            )  # fmt: skip
        return array.astype(np.uint8)
    if kind == "f":
        if np.isnan(array).any():
            raise _decode_error(item, "float array holds NaN", "replace NaN values (e.g. np.nan_to_num)", index)
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise _decode_error(
                item, f"float array values span {low:g}..{high:g}, outside [0, 1]",
                "float pixels must lie in [0, 1]: divide by 255 if they hold 0..255 values "
                "(array / 255), or cast to uint8", index,
            )  # fmt: skip
        return np.rint(array * 255.0).astype(np.uint8)
    raise _decode_error(
        item, f"unsupported array dtype {array.dtype}",
        "pass uint8, uint16, bool, integers in 0..255 or floats in [0, 1]", index,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class _IdxImages:
    """The images of one IDX file (``idx3-ubyte``, optionally gzipped), read on first access.

    Opening reads only the 16-byte header. The pixels are memory-mapped (plain file) or
    decompressed once per process (``.gz``); pickling (DataLoader workers) carries the path only.
    """

    def __init__(self, path: str, shape: tuple[int, int, int], offset: int, compressed: bool) -> None:
        self.path = path
        self.shape = shape
        self.offset = offset
        self.compressed = compressed
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        return self._array()[index]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    def __repr__(self) -> str:
        return f"_IdxImages({self.path!r}, shape={self.shape})"

    def _array(self) -> np.ndarray:
        if self._data is None:
            count = int(np.prod(self.shape))
            try:
                if self.compressed:
                    with gzip.open(self.path, "rb") as handle:
                        raw = handle.read(self.offset + count)
                    if len(raw) < self.offset + count:
                        raise EOFError(f"{len(raw) - self.offset} of {count} pixel bytes present")
                    data = np.frombuffer(raw, np.uint8, count=count, offset=self.offset)
                else:
                    data = np.memmap(self.path, np.uint8, "r", offset=self.offset, shape=(count,))
            except (OSError, EOFError, zlib.error) as exc:
                raise FeatxError(
                    f"cannot read the IDX images {self.path!r}: {exc}. Reinstall the dataset "
                    "(apt-get install --reinstall dataset-fashion-mnist)."
                ) from exc
            self._data = data.reshape(self.shape)
        return self._data


class _ArrayItems:
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

    def take(self, positions: np.ndarray) -> _ArrayItems:
        rows = positions if self.rows is None else self.rows[positions]
        return _ArrayItems(self.base, np.asarray(rows, dtype=np.int64))

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

    def subset(self, indices) -> ImageSource:
        """Return a source with the items at `indices` (integers or a boolean mask), in that order.

        The class list is kept, so labels mean the same in every subset. Array sources keep
        sharing the one array.
        """
        positions = _positions(indices, len(self))
        if isinstance(self.items, _ArrayItems):
            items = self.items.take(positions)
        else:
            items = [self.items[int(p)] for p in positions]
        labels = None if self.labels is None else self.labels[positions]
        return ImageSource(
            items=items, labels=labels, classes=None if self.classes is None else list(self.classes),
            name=self.name, root=self.root, problems=list(self.problems),
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
        - a sequence of paths, PIL images and arrays, or an ndarray of shape
          ``(n, H, W)`` / ``(n, H, W, C)`` (kept as one array, not copied).
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
        wrong shapes or lengths, ``per_class`` on an unlabelled source.

    Examples
    --------
    >>> import numpy as np
    >>> src = open_source(np.zeros((6, 8, 8), dtype=np.uint8), labels=[0, 1, 0, 1, 0, 1])
    >>> len(src), src.classes, src[0].shape
    (6, ['0', '1'], (8, 8))
    >>> len(open_source(src, per_class=2))
    4
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
        source = _digits(split, random_state) if data == "digits" else _fashion_mnist(split)
    elif _is_path(data):
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
        raise FeatxError(
            f"per_class={per_class} needs labels, but {source.name!r} is unlabelled; "
            "pass labels= or use a folder of class sub-folders"
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
        return _open_folder(path)
    if os.path.isfile(path):
        extension = os.path.splitext(path)[1].lower()
        if extension in _TABLE_DELIMITERS:
            return _open_table(path, _TABLE_DELIMITERS[extension], allow_outside_root)
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


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_images(top: str, problems: list[tuple[str, str]], visited: dict[tuple[int, int], str]) -> list[str]:
    """Image files under `top`, recursively, following links once; problems are collected."""
    found: list[str] = []
    pending = [top]
    while pending:
        folder = pending.pop()
        try:
            info = os.stat(folder)
        except OSError as exc:
            problems.append((folder, _os_reason(exc)))
            continue
        identity = (info.st_dev, info.st_ino)
        if identity in visited:
            earlier = visited[identity]
            if _inside(folder, earlier):
                problems.append((folder, f"symlink loop: leads back to {earlier!r}; skipped"))
            else:
                problems.append((folder, f"same folder as {earlier!r} (linked twice); skipped"))
            continue
        visited[identity] = folder
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            problems.append((folder, _os_reason(exc)))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    pending.append(entry.path)
                elif entry.is_file():
                    if _is_image_name(entry.name):
                        found.append(entry.path)
                elif entry.is_symlink() and _is_image_name(entry.name):
                    problems.append((entry.path, "broken symbolic link (or a link loop)"))
            except OSError as exc:
                problems.append((entry.path, _os_reason(exc)))
    found.sort(key=lambda p: os.path.relpath(p, top).split(os.sep))
    return found


def _open_folder(folder: str) -> ImageSource:
    problems: list[tuple[str, str]] = []
    try:
        with os.scandir(folder) as listing:
            entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise FeatxError(f"cannot list the folder {folder!r} ({_os_reason(exc)}); check its permissions") from exc
    root_info = os.stat(folder)
    visited = {(root_info.st_dev, root_info.st_ino): folder}
    top_images: list[str] = []
    class_files: dict[str, list[str]] = {}
    empty_folders: list[str] = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
            is_file = not is_dir and entry.is_file()
        except OSError as exc:
            problems.append((entry.path, _os_reason(exc)))
            continue
        if is_dir:
            files = _walk_images(entry.path, problems, visited)
            if files:
                class_files[entry.name] = files
            else:
                empty_folders.append(entry.path)
        elif is_file and _is_image_name(entry.name):
            top_images.append(entry.path)
        elif not is_file and entry.is_symlink() and _is_image_name(entry.name):
            problems.append((entry.path, "broken symbolic link (or a link loop)"))
    if class_files:
        problems += [(path, "image outside the class sub-folders: ignored") for path in top_images]
        problems += [(path, "no images: not used as a class") for path in empty_folders]
        classes = sorted(class_files)
        items = [path for name in classes for path in class_files[name]]
        labels = np.asarray([name for name in classes for _ in class_files[name]], dtype=str)
        return ImageSource(items=items, labels=labels, classes=classes, name=folder, root=folder, problems=problems)
    if top_images:
        return ImageSource(items=top_images, labels=None, classes=None, name=folder, root=folder, problems=problems)
    detail = f" Problems met: {problems[:3]}." if problems else ""
    raise FeatxError(
        f"the folder {folder!r} holds no images. Expected class sub-folders of image files "
        f"({', '.join(IMAGE_EXTENSIONS)}), or image files directly for an unlabelled source.{detail}"
    )


def _escapes(path: str) -> bool:
    if os.path.isabs(path) or os.path.splitdrive(path)[0]:
        return True
    return os.path.normpath(path).split(os.sep)[0] == os.pardir


def _open_table(table: str, delimiter: str, allow_outside_root: bool) -> ImageSource:
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle:
            rows = [(number, row) for number, row in enumerate(csv.reader(handle, delimiter=delimiter), 1)
                    if any(cell.strip() for cell in row)]  # fmt: skip
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FeatxError(f"cannot read the {kind} file {table!r}: {exc}; save it as UTF-8 text") from exc
    if not rows:
        raise FeatxError(f"the {kind} file {table!r} is empty; expected a header with 'path' and 'label' columns")
    header = [cell.strip().lower() for cell in rows[0][1]]
    if "path" not in header:
        separator = "tab" if delimiter == "\t" else "comma"
        raise FeatxError(
            f"the {kind} file {table!r} has no 'path' column: expected a header with 'path' and optionally "
            f"'label'; found {header} (read as {separator}-separated).{suggest('path', header)}"
        )
    path_col = header.index("path")
    label_col = header.index("label") if "label" in header else None
    base = os.path.dirname(table) or "."
    items: list[str] = []
    labels: list[str] = []
    outside: list[str] = []
    blank: list[int] = []
    for number, row in rows[1:]:
        cells = row + [""] * (len(header) - len(row))
        relative = cells[path_col].strip()
        if not relative:
            blank.append(number)
            continue
        if _escapes(relative):
            outside.append(relative)
        items.append(os.path.normpath(os.path.join(base, relative)))
        if label_col is not None:
            label = cells[label_col].strip()
            if not label:
                blank.append(number)
            labels.append(label)
    if blank:
        raise FeatxError(
            f"the {kind} file {table!r} has an empty path or label on line(s) {blank[:10]}; "
            "fill them in or delete those lines"
        )
    if not items:
        raise FeatxError(f"the {kind} file {table!r} has a header but no rows; add one line per image")
    if outside and not allow_outside_root:
        raise FeatxError(
            f"the {kind} file {table!r} lists {len(outside)} path(s) outside its folder {base!r}, "
            f"e.g. {outside[0]!r}: paths must be relative to the table's folder and stay inside it. "
            "Move the images, or pass allow_outside_root=True (--allow-outside-root on the command line) if "
            "you trust the table"
        )
    if not any(os.path.exists(path) for path in items[:1000]):
        raise FeatxError(
            f"none of the paths in the {kind} file {table!r} exists (e.g. {items[0]!r}); "
            f"paths are read relative to the table's folder {base!r}"
        )
    return ImageSource(
        items=items, labels=np.asarray(labels, dtype=str) if label_col is not None else None,
        classes=None, name=table, root=base,
    )  # fmt: skip


# Objects in memory ----------------------------------------------------------------------------


def _open_objects(data, labels) -> ImageSource:
    if isinstance(data, np.ndarray):
        if data.ndim not in (3, 4) or (data.ndim == 4 and data.shape[-1] not in (1, 3, 4)):
            hint = " For one image pass array[None]." if data.ndim == 2 else ""
            raise FeatxError(
                f"expected an array of images of shape (n, H, W) or (n, H, W, C) with C in 1, 3, 4; "
                f"got shape {data.shape}.{hint}"
            )
        items: Any = _ArrayItems(data)
    elif isinstance(data, Image.Image):
        items = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (bytes, Mapping)):
        items = []
        for index, item in enumerate(data):
            if _is_path(item):
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


# Built-in datasets ----------------------------------------------------------------------------


def _digits(split: str, random_state: int) -> ImageSource:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(str)
    positions = np.arange(len(labels))
    if split != "all":
        train, test = train_test_split(positions, test_size=0.25, stratify=labels, random_state=int(random_state))
        positions = np.sort(train if split == "train" else test)
    classes = [str(d) for d in range(10)]
    return ImageSource(items=_ArrayItems(pixels, positions), labels=labels[positions], classes=classes, name="digits")


def _find_idx(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _read_idx_header(path: str, expected_magic: int, ndim: int) -> tuple[tuple[int, ...], int]:
    size = 4 + 4 * ndim
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            header = handle.read(size)
    except (OSError, EOFError) as exc:
        raise FeatxError(f"cannot read the IDX file {path!r}: {exc}; reinstall the dataset") from exc
    if len(header) < size:
        raise FeatxError(f"the IDX file {path!r} is truncated ({len(header)} header bytes); reinstall the dataset")
    magic, *shape = struct.unpack(f">{1 + ndim}I", header)
    if magic != expected_magic:
        raise FeatxError(
            f"{path!r} is not an IDX file of {ndim}-d unsigned bytes (magic {magic:#010x}, expected "
            f"{expected_magic:#010x}); reinstall the dataset"
        )
    return tuple(shape), size


def _fashion_mnist(split: str) -> ImageSource:
    folder = os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
    if split == "all":
        raise FeatxError("fashion-mnist has split='train' (60 000 images) or split='test' (10 000); got 'all'")
    prefix = "train" if split == "train" else "t10k"
    image_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if image_path is None or label_path is None:
        raise FeatxError(
            f"Fashion-MNIST files not found in {folder!r}: expected {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz]. Install them with `apt-get install dataset-fashion-mnist` "
            f"(Debian/Ubuntu), or set {FASHION_MNIST_ENV} to a folder holding the IDX files"
        )
    shape, offset = _read_idx_header(image_path, 0x00000803, 3)
    (count,), label_offset = _read_idx_header(label_path, 0x00000801, 1)
    try:
        opener = gzip.open if label_path.endswith(".gz") else open
        with opener(label_path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise FeatxError(f"cannot read the IDX labels {label_path!r}: {exc}; reinstall the dataset") from exc
    codes = np.frombuffer(raw, np.uint8, offset=label_offset)
    if len(codes) != count or count != shape[0] or (codes.size and codes.max() >= len(FASHION_MNIST_CLASSES)):
        raise FeatxError(
            f"Fashion-MNIST files in {folder!r} disagree: {shape[0]} images, {count} labels declared, "
            f"{len(codes)} label bytes (codes must be 0..9); reinstall the dataset"
        )
    if not image_path.endswith(".gz"):
        expected = offset + int(np.prod(shape))
        if os.path.getsize(image_path) < expected:
            raise FeatxError(f"the IDX file {image_path!r} is truncated; reinstall the dataset")
    images = _IdxImages(image_path, shape, offset, compressed=image_path.endswith(".gz"))
    labels = np.asarray(FASHION_MNIST_CLASSES)[codes]
    return ImageSource(
        items=_ArrayItems(images), labels=labels, classes=sorted(FASHION_MNIST_CLASSES),
        name="fashion-mnist", root=folder,
    )  # fmt: skip
