"""Decoding: one image reference to a fully loaded RGB PIL image.

:func:`load_image` applies the EXIF orientation, converts every colour mode to RGB (transparency
composited onto white), guards against decompression bombs (`max_pixels`, checked from the
header) and can decode JPEG files at a reduced scale (PIL's draft mode). Every failure becomes an
:class:`~featx.exceptions.ImageDecodeError` that names the image. :func:`jpeg_bytes` hands the
bytes of a plain JPEG file to a tensor decoder without decoding a pixel.

This module must stay free of torch: DataLoader workers decode with it.
"""

from __future__ import annotations

import operator
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featx.exceptions import FeatxError, ImageDecodeError
from featx.images.items import (DECODE_ERRORS, IMAGE_EXTENSIONS, ImageItem, decode_error, is_path_item, open_binary,
                                read_error, unsupported_item)  # fmt: skip
from featx.options import DEFAULT_MAX_PIXELS

__all__ = ["DEFAULT_MAX_PIXELS", "jpeg_bytes", "load_image"]

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_TRANSPARENCY_MODES = frozenset({"1", "L", "P", "RGB"})


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
    if is_path_item(item):
        return _load_path(item, draft_size=draft_size, max_pixels=max_pixels)
    if isinstance(item, np.ndarray):
        return _array_to_rgb(item)
    if isinstance(item, Image.Image):
        try:
            oriented = _exif_transpose(item, in_place=False)
            return _to_rgb(oriented, item)
        except ImageDecodeError:
            raise
        except DECODE_ERRORS as exc:
            raise decode_error(item, _pil_reason(exc), "reopen or re-create the image") from exc
    raise unsupported_item(item)


def _load_path(item: str | os.PathLike, *, draft_size, max_pixels: int) -> Image.Image:
    path = os.fsdecode(item)
    with open_binary(path, item) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
        except OSError as exc:
            raise read_error(item, exc, path) from exc
        if size == 0:
            raise decode_error(item, "empty file (0 bytes)", "re-download or re-export it, or remove it")
        try:
            with warnings.catch_warnings():
                # The pixel limit is checked below against max_pixels; PIL's warning is redundant.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(handle)
                width, height = image.size
                if width * height > max_pixels:
                    raise decode_error(
                        item,
                        f"decompression bomb: {width}×{height} = {width * height} pixels exceeds "
                        f"the limit of {max_pixels}",
                        f"pass --max-pixels {width * height} (CLI) or max_pixels={width * height} (Python), or "
                        "more, if you trust this file",
                    )
                if draft_size is not None:
                    image.draft("RGB", _draft_box(image, draft_size))
                image.load()
                image = _exif_transpose(image, in_place=True)
                return _to_rgb(image, item)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise decode_error(
                item, f"decompression bomb: {str(exc).split(', could be')[0]}",
                "PIL refuses images above 2 * PIL.Image.MAX_IMAGE_PIXELS; resize the file",
            ) from exc  # fmt: skip
        except UnidentifiedImageError as exc:
            raise decode_error(
                item, "not an image (unrecognised format)",
                f"expected a file in a format PIL reads ({', '.join(IMAGE_EXTENSIONS)}); it may be "
                "text or HTML saved under an image name: re-download or remove it",
            ) from exc
        except DECODE_ERRORS as exc:
            raise decode_error(item, _pil_reason(exc), "re-download or re-export it, or remove it") from exc


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
    if not is_path_item(item):
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
                        or exif_orientation(image) != 1
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
    if exif_orientation(image) in (5, 6, 7, 8):  # stored sideways: the displayed width is the height
        return height, width
    return width, height


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of `image` (1, upright, when absent or unreadable).

    Examples
    --------
    >>> from PIL import Image
    >>> exif_orientation(Image.new("RGB", (2, 2)))
    1
    """
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block must not fail a readable image
        return 1


def _exif_transpose(image: Image.Image, *, in_place: bool) -> Image.Image:
    """Apply the EXIF orientation; on damaged EXIF keep the image as stored."""
    if exif_orientation(image) == 1:
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
        raise decode_error(
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
        raise decode_error(
            item, f"array of shape {shape} looks channels-first",
            "expected (H, W) or (H, W, C) with C in 1, 3, 4: pass array.transpose(1, 2, 0)", index,
        )  # fmt: skip
    if array.ndim not in (2, 3) or (array.ndim == 3 and shape[-1] not in (1, 3, 4)):
        raise decode_error(
            item, f"array of shape {shape} is not an image",
            "expected (H, W) grayscale or (H, W, C) with C in 1, 3, 4", index,
        )  # fmt: skip
    if array.size == 0:
        raise decode_error(item, f"empty array of shape {shape}", "pass an image with at least one pixel", index)
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
            raise decode_error(
                item, f"{array.dtype} values span {low}..{high}, outside 0..255",
                "pass uint8 values in 0..255, uint16 values in 0..65535, or floats in [0, 1]", index,
            )  # fmt: skip
        return array.astype(np.uint8)
    if kind == "f":
        if np.isnan(array).any():
            raise decode_error(item, "float array holds NaN", "replace NaN values (e.g. np.nan_to_num)", index)
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise decode_error(
                item, f"float array values span {low:g}..{high:g}, outside [0, 1]",
                "float pixels must lie in [0, 1]: divide by 255 if they hold 0..255 values "
                "(array / 255), or cast to uint8", index,
            )  # fmt: skip
        return np.rint(array * 255.0).astype(np.uint8)
    raise decode_error(
        item, f"unsupported array dtype {array.dtype}",
        "pass uint8, uint16, bool, integers in 0..255 or floats in [0, 1]", index,
    )  # fmt: skip
