"""Tests of featx.images: decoding, content keys and image sources.

Every image is built on the fly in ``tmp_path``; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile

from featx.exceptions import FeatxError, ImageDecodeError
from featx.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageSource,
    content_key,
    describe,
    load_image,
    open_source,
)

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# Image factory
# ---------------------------------------------------------------------------------------------


def _save(path, image: Image.Image, **options) -> str:
    """Save `image` at `path` (folders created) and return the path as str."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **options)
    return str(path)


def _halves(size=(40, 20), left=RED, right=BLUE) -> Image.Image:
    """An RGB image whose left half is `left` and right half `right`."""
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels)


def _near(pixel, expected, tolerance=12) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


def _png_header_only(path, width: int, height: int) -> str:
    """A PNG that declares `width` × `height` but holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return str(path)


def _write_idx(folder, prefix: str, images: np.ndarray, codes: np.ndarray, compress: bool) -> None:
    """Write Fashion-MNIST-style IDX files (optionally gzipped) into `folder`."""
    n, h, w = images.shape
    files = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x801, n) + codes.astype(np.uint8).tobytes(),
    }
    for name, payload in files.items():
        if compress:
            (folder / (name + ".gz")).write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)


@pytest.fixture
def class_folder(tmp_path):
    """A folder with classes 'cat' (3 images, one nested) and 'dog' (2), plus hidden files."""
    root = tmp_path / "pets"
    _save(root / "cat" / "b.png", Image.new("RGB", (4, 4), RED))
    _save(root / "cat" / "a.JPG", Image.new("RGB", (4, 4), RED))
    _save(root / "cat" / "nested" / "c.png", Image.new("RGB", (4, 4), RED))
    _save(root / "dog" / "x.jpeg", Image.new("RGB", (4, 4), BLUE))
    _save(root / "dog" / "y.bmp", Image.new("RGB", (4, 4), BLUE))
    _save(root / "dog" / ".hidden.png", Image.new("RGB", (4, 4), BLUE))
    _save(root / ".git" / "z.png", Image.new("RGB", (4, 4), BLUE))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def table_folder(tmp_path):
    """A folder with three PNGs under imgs/ and an image one level above the folder."""
    root = tmp_path / "data"
    for name, colour in (("a", RED), ("b", BLUE), ("c", RED)):
        _save(root / "imgs" / f"{name}.png", Image.new("RGB", (4, 4), colour))
    _save(tmp_path / "outside.png", Image.new("RGB", (4, 4), BLUE))
    return root


# ---------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------


def test_describe_names_paths_arrays_and_pil_images(tmp_path):
    """Check that describe gives the path for files and a numbered placeholder otherwise."""
    assert describe(tmp_path / "a.jpg") == str(tmp_path / "a.jpg")
    assert describe("x/y.png", 7) == "x/y.png"
    assert describe(np.zeros((2, 2)), 3) == "<array #3>"
    assert describe(Image.new("RGB", (2, 2)), 0) == "<PIL image #0>"
    assert describe(Image.new("RGB", (2, 2))) == "<PIL image>"


# ---------------------------------------------------------------------------------------------
# content_key
# ---------------------------------------------------------------------------------------------


def test_content_key_same_for_renamed_copy(tmp_path):
    """Check that a renamed copy of a file has the same key: the key is the file's bytes."""
    original = _save(tmp_path / "a.png", _halves())
    copy = tmp_path / "other" / "renamed.png"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    key = content_key(original)
    assert key == content_key(copy) == content_key(str(copy))
    assert len(key) == 32 and key == key.lower() and int(key, 16) >= 0


def test_content_key_changes_with_one_pixel(tmp_path):
    """Check that changing a single pixel changes the key of a file, an array and a PIL image."""
    pixels = np.asarray(_halves())
    changed = pixels.copy()
    changed[0, 0, 0] ^= 1
    a = _save(tmp_path / "a.png", Image.fromarray(pixels))
    b = _save(tmp_path / "b.png", Image.fromarray(changed))
    assert content_key(a) != content_key(b)
    assert content_key(pixels) != content_key(changed)
    assert content_key(Image.fromarray(pixels)) != content_key(Image.fromarray(changed))
    assert content_key(Image.fromarray(pixels)) == content_key(Image.fromarray(pixels.copy()))


def test_content_key_array_depends_on_dtype_and_shape():
    """Check that arrays with the same bytes but another dtype or shape get another key."""
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert content_key(a) != content_key(a.reshape(4, 3))
    assert content_key(a) != content_key(a.view(np.int8))
    assert content_key(a[:, ::2]) == content_key(np.ascontiguousarray(a[:, ::2]))


def test_content_key_pil_image_depends_on_mode_and_palette():
    """Check that PIL images with equal bytes but another mode or palette get another key."""
    gray = Image.new("L", (3, 3), 5)
    palette_a = Image.new("P", (3, 3), 5)
    palette_a.putpalette(list(range(256)) * 3)
    palette_b = palette_a.copy()
    palette_b.putpalette(list(range(255, -1, -1)) * 3)
    assert content_key(gray) != content_key(palette_a)
    assert content_key(palette_a) != content_key(palette_b)


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from([np.uint8, np.uint16, np.float32]), shape=hnp.array_shapes(max_side=6)))
def test_content_key_equal_arrays_equal_keys(array):
    """Check that an array and its copy (any dtype or shape) always share one 32-hex key."""
    key = content_key(array)
    assert key == content_key(array.copy())
    assert len(key) == 32 and set(key) <= set("0123456789abcdef")


def test_content_key_missing_file_raises_decode_error(tmp_path):
    """Check that a missing file raises ImageDecodeError naming it, not a raw OSError."""
    with pytest.raises(ImageDecodeError, match=r"cannot decode '.*nothere\.png' \(not found\)"):
        content_key(tmp_path / "nothere.png")


def test_content_key_unreadable_file_raises_decode_error(tmp_path, monkeypatch):
    """Check that a permission error while hashing becomes ImageDecodeError naming the file."""
    import featx.images.items as images

    path = _save(tmp_path / "a.png", _halves())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images, "open", refuse, raising=False)
    with pytest.raises(ImageDecodeError, match=r"a\.png' \(unreadable: permission denied\): .*chmod"):
        content_key(path)


def test_content_key_object_array_and_other_types_refused():
    """Check that object arrays and non-image objects raise ImageDecodeError saying what is expected."""
    with pytest.raises(ImageDecodeError, match=r"unsupported array dtype object"):
        content_key(np.array([None, 1], dtype=object))
    with pytest.raises(ImageDecodeError, match=r"\(unsupported type int\): pass a file path"):
        content_key(42)


# ---------------------------------------------------------------------------------------------
# load_image: damaged and refused files
# ---------------------------------------------------------------------------------------------


def test_load_image_truncated_jpeg_raises(tmp_path):
    """Check that a JPEG cut in half raises ImageDecodeError 'truncated image' naming the file."""
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    whole = _save(tmp_path / "whole.jpg", noisy)
    data = Path(whole).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"cannot decode '.*cut\.jpg' \(truncated image\)") as info:
        load_image(cut)
    assert info.value.reason == "truncated image"
    assert info.value.item == str(cut)
    assert isinstance(info.value.__cause__, OSError)


def test_load_image_corrupted_jpeg_header_raises(tmp_path):
    """Check that a JPEG whose first bytes are damaged raises 'not an image'."""
    whole = _save(tmp_path / "whole.jpg", _halves())
    data = bytearray(Path(whole).read_bytes())
    data[:4] = b"\x00\x00\x00\x00"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg' \(not an image \(unrecognised format\)\)"):
        load_image(broken)


def test_load_image_zero_byte_file_raises(tmp_path):
    """Check that an empty file raises 'empty file (0 bytes)'."""
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty\.png' \(empty file \(0 bytes\)\)"):
        load_image(empty)


def test_load_image_text_file_named_jpg_raises(tmp_path):
    """Check that a text file saved as .jpg raises 'not an image' with a hint about HTML/text."""
    fake = tmp_path / "page.jpg"
    fake.write_text("<html><body>404 Not Found</body></html>")
    with pytest.raises(ImageDecodeError, match=r"\(not an image \(unrecognised format\)\): .*text or HTML"):
        load_image(fake)


def test_load_image_missing_file_and_folder_raise(tmp_path):
    """Check that a missing path raises 'not found' and a folder raises 'is a folder'."""
    with pytest.raises(ImageDecodeError, match=r"gone\.png' \(not found\): check the path"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(ImageDecodeError, match=r"\(is a folder, not a file\)"):
        load_image(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_load_image_unreadable_file_raises_permission_denied(tmp_path):
    """Check that a file without read permission raises 'unreadable: permission denied'."""
    path = _save(tmp_path / "locked.png", _halves())
    os.chmod(path, 0)
    try:
        with pytest.raises(ImageDecodeError, match=r"locked\.png' \(unreadable: permission denied\)"):
            load_image(path)
    finally:
        os.chmod(path, 0o644)


def test_load_image_permission_error_simulated(tmp_path, monkeypatch):
    """Check that a PermissionError on open becomes 'unreadable: permission denied' (works as root)."""
    import featx.images.items as images

    path = _save(tmp_path / "locked.png", _halves())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images, "open", refuse, raising=False)
    with pytest.raises(ImageDecodeError, match=r"locked\.png' \(unreadable: permission denied\)") as info:
        load_image(path)
    assert isinstance(info.value.__cause__, PermissionError)


def test_load_image_decompression_bomb_with_small_limit(tmp_path):
    """Check that an image above max_pixels is refused before decoding, with its size in the message."""
    path = _save(tmp_path / "big.png", Image.new("RGB", (100, 50)))
    with pytest.raises(ImageDecodeError, match=r"decompression bomb: 100×50 = 5000 pixels exceeds the limit of 4999"):
        load_image(path, max_pixels=4999)
    assert load_image(path, max_pixels=5000).size == (100, 50)


def test_load_image_pil_decompression_bomb_error_converted(tmp_path):
    """Check that PIL's own DecompressionBombError (a huge declared size) becomes ImageDecodeError."""
    path = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageDecodeError, match=r"bomb\.png' \(decompression bomb: "):
        load_image(path, max_pixels=10**12)
    with pytest.raises(ImageDecodeError, match=r"decompression bomb: Image size \(10000000000 pixels\) exceeds limit"):
        load_image(path)


def test_load_image_leaves_pil_globals_alone(tmp_path):
    """Check that decoding, failing included, does not change PIL's global settings."""
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    path = _save(tmp_path / "big.png", Image.new("RGB", (100, 50)))
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(path, max_pixels=10)
    load_image(path)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
    assert DEFAULT_MAX_PIXELS == 89_478_485


# ---------------------------------------------------------------------------------------------
# load_image: modes and formats
# ---------------------------------------------------------------------------------------------


def test_load_image_grayscale_and_bilevel_png_become_rgb(tmp_path):
    """Check that 'L' and '1' PNGs decode to RGB with equal channels."""
    gray = _save(tmp_path / "gray.png", Image.new("L", (5, 3), 77))
    bilevel = _save(tmp_path / "bw.png", Image.new("1", (5, 3), 1))
    image = load_image(gray)
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((2, 1)) == (77, 77, 77)
    assert load_image(bilevel).getpixel((0, 0)) == WHITE


def test_load_image_rgba_png_composited_on_white(tmp_path):
    """Check that transparent RGBA pixels become white and opaque ones keep their colour."""
    pixels = np.zeros((2, 3, 4), dtype=np.uint8)
    pixels[:, 0] = (255, 0, 0, 0)  # invisible red
    pixels[:, 1] = (0, 0, 255, 255)  # opaque blue
    pixels[:, 2] = (0, 0, 0, 128)  # half-transparent black
    path = _save(tmp_path / "rgba.png", Image.fromarray(pixels))
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == BLUE
    assert _near(image.getpixel((2, 0)), (127, 127, 127), tolerance=2)


def test_load_image_la_png_composited_on_white(tmp_path):
    """Check that a gray+alpha ('LA') PNG composites transparent pixels onto white."""
    image = Image.new("LA", (2, 1), (0, 255))
    image.putpixel((1, 0), (0, 0))
    decoded = load_image(_save(tmp_path / "la.png", image))
    assert decoded.getpixel((0, 0)) == (0, 0, 0) and decoded.getpixel((1, 0)) == WHITE


def test_load_image_palette_png_with_transparency(tmp_path):
    """Check that a palette PNG decodes its colours and turns its transparent index white."""
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    plain = load_image(_save(tmp_path / "p.png", image))
    assert plain.getpixel((0, 0)) == RED and plain.getpixel((1, 0)) == BLUE
    transparent = load_image(_save(tmp_path / "pt.png", image, transparency=1))
    assert transparent.getpixel((0, 0)) == RED and transparent.getpixel((1, 0)) == WHITE


def test_load_image_cmyk_jpeg(tmp_path):
    """Check that a CMYK JPEG decodes to RGB with the right colour."""
    path = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB" and _near(image.getpixel((8, 8)), RED, tolerance=20)


def test_load_image_exif_rotated_jpeg(tmp_path):
    """Check that EXIF orientation 6 (rotate 90° clockwise) swaps the size and moves the left half to the top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "rot.jpg", _halves((40, 20)), exif=exif, quality=95)
    with Image.open(path) as stored:
        assert stored.size == (40, 20)
    image = load_image(path)
    assert image.size == (20, 40)
    assert _near(image.getpixel((10, 5)), RED, tolerance=40)
    assert _near(image.getpixel((10, 34)), BLUE, tolerance=40)
    with Image.open(path) as opened:
        assert load_image(opened).size == (20, 40) and opened.size == (40, 20)


def test_load_image_16bit_png_scaled_not_clipped(tmp_path):
    """Check that a 16-bit PNG is scaled by 1/257 (32896 -> 128), not clipped to 255."""
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _save(tmp_path / "deep.png", Image.fromarray(values))
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")
    image = load_image(path)
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), WHITE]


def test_load_image_animated_gif_first_frame(tmp_path):
    """Check that an animated GIF decodes its first frame only."""
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    path = _save(tmp_path / "anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=50)
    with Image.open(path) as stored:
        assert stored.n_frames == 2
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((4, 4)) == RED


def test_load_image_draft_decodes_large_jpeg_smaller(tmp_path):
    """Check that draft_size decodes a 2000×1500 JPEG at reduced scale, never below draft_size."""
    path = _save(tmp_path / "large.jpg", Image.new("RGB", (2000, 1500), (10, 200, 30)))
    full = load_image(path)
    drafted = load_image(path, draft_size=(224, 224))
    assert full.size == (2000, 1500)
    assert drafted.mode == "RGB"
    assert min(drafted.size) >= 224 and max(drafted.size) <= 1000
    assert drafted.size[0] / drafted.size[1] == pytest.approx(2000 / 1500, rel=0.01)
    png = _save(tmp_path / "large.png", Image.new("RGB", (600, 400)))
    assert load_image(png, draft_size=(224, 224)).size == (600, 400)


def test_load_image_draft_size_applies_to_displayed_orientation(tmp_path):
    """Check that draft_size is (width, height) after EXIF rotation: the result never falls below it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "tall.jpg", Image.new("RGB", (2000, 1000), (10, 200, 30)), exif=exif)
    drafted = load_image(path, draft_size=(900, 250))
    assert drafted.size[0] >= 900 and drafted.size[1] >= 250
    assert load_image(path, draft_size=(250, 250)).size == (250, 500)


def test_load_image_bad_options_raise(tmp_path):
    """Check that invalid draft_size / max_pixels raise FeatxError (a caller error, not ImageDecodeError)."""
    path = _save(tmp_path / "a.jpg", _halves())
    with pytest.raises(FeatxError, match=r"draft_size must be None or \(width, height\) of positive integers; got 224"):
        load_image(path, draft_size=224)
    with pytest.raises(FeatxError, match=r"draft_size .* got \(0, 10\)") as info:
        load_image(path, draft_size=(0, 10))
    assert not isinstance(info.value, ImageDecodeError)
    with pytest.raises(FeatxError, match=r"max_pixels must be a positive integer; got 0"):
        load_image(path, max_pixels=0)


def test_load_image_pil_input_is_not_modified():
    """Check that a PIL image passed in is left as it was and a new RGB image is returned."""
    rgba = Image.new("RGBA", (3, 3), (255, 0, 0, 0))
    rgb = Image.new("RGB", (3, 3), RED)
    assert load_image(rgba).getpixel((0, 0)) == WHITE and rgba.mode == "RGBA"
    copy = load_image(rgb)
    assert copy is not rgb and copy.getpixel((0, 0)) == RED


# ---------------------------------------------------------------------------------------------
# load_image: arrays
# ---------------------------------------------------------------------------------------------


def test_load_image_array_dtypes_scaled():
    """Check that uint16 (÷257), bool (0/255), float [0, 1] and small ints decode to the right uint8."""
    assert load_image(np.full((2, 2), 32896, dtype=np.uint16)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.ones((2, 2), dtype=bool)).getpixel((1, 1)) == WHITE
    assert load_image(np.full((2, 2, 3), 0.5, dtype=np.float32)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.full((2, 2, 1), 9, dtype=np.int64)).getpixel((0, 0)) == (9, 9, 9)
    rgba = np.zeros((1, 1, 4), dtype=np.uint8)
    assert load_image(rgba).getpixel((0, 0)) == WHITE


@settings(max_examples=20, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.just(3))))
def test_load_image_uint8_rgb_array_round_trips(array):
    """Check that any uint8 (H, W, 3) array decodes to exactly its own pixels."""
    image = load_image(array)
    assert image.size == (array.shape[1], array.shape[0])
    np.testing.assert_array_equal(np.asarray(image), array)


def test_load_image_float_array_out_of_range_raises():
    """Check that a float array in 0..255 is refused with the advice to divide by 255."""
    expected = r"<array> \(float array values span 0\.\.255, outside \[0, 1\]\): .*divide by 255"
    with pytest.raises(ImageDecodeError, match=expected):
        load_image(np.linspace(0, 255, 16).reshape(4, 4))
    with pytest.raises(ImageDecodeError, match=r"float array holds NaN"):
        load_image(np.full((2, 2), np.nan))


def test_load_image_bad_array_shapes_and_values_raise():
    """Check that channels-first, wrong-rank, empty and out-of-range integer arrays are refused with a fix."""
    with pytest.raises(ImageDecodeError, match=r"looks channels-first\): .*transpose\(1, 2, 0\)"):
        load_image(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match=r"shape \(2, 2, 2, 2\) is not an image\): expected \(H, W\)"):
        load_image(np.zeros((2, 2, 2, 2), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match=r"empty array of shape \(0, 4\)"):
        load_image(np.zeros((0, 4), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match=r"int32 values span -1\.\.300, outside 0\.\.255"):
        load_image(np.array([[-1, 300]], dtype=np.int32))
    with pytest.raises(ImageDecodeError, match=r"unsupported array dtype complex128"):
        load_image(np.zeros((2, 2), dtype=complex))


def test_load_image_unsupported_type_raises():
    """Check that an object that is no image reference raises ImageDecodeError saying what is accepted."""
    with pytest.raises(ImageDecodeError, match=r"<dict> \(unsupported type dict\): pass a file path"):
        load_image({})


# ---------------------------------------------------------------------------------------------
# ImageSource
# ---------------------------------------------------------------------------------------------


def test_image_source_subset_keeps_classes_and_order():
    """Check that subset keeps the requested order, the labels and the full class list."""
    src = ImageSource(items=["a", "b", "c", "d"], labels=np.array(["x", "y", "x", "z"]), classes=None, name="t")
    sub = src.subset([3, 0])
    assert sub.items == ["d", "a"] and sub.labels.tolist() == ["z", "x"]
    assert sub.classes == ["x", "y", "z"] and sub.name == "t"
    masked = src.subset(np.array([True, False, True, False]))
    assert masked.items == ["a", "c"]
    assert src.subset([-1]).items == ["d"]
    assert "n=4" in repr(src) and "3 classes" in repr(src)


def test_image_source_bad_indices_and_labels_raise():
    """Check that wrong label counts, non-integer indices and out-of-range subsets raise clear errors."""
    with pytest.raises(FeatxError, match=r"got 2 images but 3 labels"):
        ImageSource(items=["a", "b"], labels=["x", "y", "z"], classes=None, name="t")
    src = ImageSource(items=["a", "b"], labels=None, classes=None, name="t")
    with pytest.raises(TypeError, match=r"indices must be integers.*subset"):
        src[0:1]
    with pytest.raises(IndexError, match=r"index 5 is out of range for 2 images"):
        src.subset([5])
    with pytest.raises(IndexError, match=r"boolean mask must have shape \(2,\)"):
        src.subset([True])


# ---------------------------------------------------------------------------------------------
# open_source: folders
# ---------------------------------------------------------------------------------------------


def test_open_source_folder_classes_sorted_nested_hidden_ignored(class_folder):
    """Check that class sub-folders give sorted classes and recursive, sorted, any-case, non-hidden files."""
    src = open_source(class_folder)
    names = [os.path.relpath(p, class_folder) for p in src.items]
    assert names == ["cat/a.JPG", "cat/b.png", "cat/nested/c.png", "dog/x.jpeg", "dog/y.bmp"]
    assert src.labels.tolist() == ["cat"] * 3 + ["dog"] * 2
    assert src.classes == ["cat", "dog"] and src.name == str(class_folder) and src.root == str(class_folder)
    assert src.problems == []
    assert all(isinstance(p, str) for p in src.items)
    assert ".tiff" in IMAGE_EXTENSIONS


def test_open_source_folder_without_class_subfolders_is_unlabelled(tmp_path):
    """Check that a folder of images without class sub-folders gives an unlabelled source."""
    for name in ("b.png", "a.png"):
        _save(tmp_path / "flat" / name, Image.new("RGB", (2, 2)))
    (tmp_path / "flat" / "empty").mkdir()
    src = open_source(tmp_path / "flat")
    assert [os.path.basename(p) for p in src.items] == ["a.png", "b.png"]
    assert src.labels is None and src.classes is None


def test_open_source_folder_reports_loose_images_and_empty_classes(class_folder):
    """Check that images beside class folders and image-less sub-folders are listed in problems."""
    _save(class_folder / "loose.png", Image.new("RGB", (2, 2)))
    (class_folder / "empty_class").mkdir()
    src = open_source(class_folder)
    reasons = dict(src.problems)
    assert "outside the class sub-folders" in reasons[str(class_folder / "loose.png")]
    assert "no images" in reasons[str(class_folder / "empty_class")]
    assert src.classes == ["cat", "dog"]


def test_open_source_empty_folder_raises(tmp_path):
    """Check that a folder without images raises FeatxError naming it and what was expected."""
    (tmp_path / "nothing" / "sub").mkdir(parents=True)
    (tmp_path / "nothing" / "readme.txt").write_text("hi")
    with pytest.raises(FeatxError, match=r"the folder '.*nothing' holds no images\. Expected class sub-folders"):
        open_source(tmp_path / "nothing")


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links need privileges on Windows")
def test_open_source_folder_symlink_loop_reported(class_folder):
    """Check that a symlink loop and a self-referencing link are reported in problems, not followed forever."""
    os.symlink(class_folder, class_folder / "cat" / "loop")
    os.symlink(class_folder / "dog" / "self.png", class_folder / "dog" / "self.png")
    src = open_source(class_folder)
    assert len(src) == 5
    reasons = dict(src.problems)
    assert "symlink loop" in reasons[str(class_folder / "cat" / "loop")]
    assert "symlink loop" in reasons[str(class_folder / "dog" / "self.png")]


def test_open_source_folder_unreadable_subfolder_reported(class_folder, monkeypatch):
    """Check that a sub-folder that cannot be listed is reported in problems and the walk goes on."""
    real_scandir = os.scandir
    locked = str(class_folder / "cat" / "nested")

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    src = open_source(class_folder)
    assert (locked, "unreadable: permission denied") in src.problems
    assert len(src) == 4


# ---------------------------------------------------------------------------------------------
# open_source: tables
# ---------------------------------------------------------------------------------------------


def test_open_source_csv_paths_relative_to_table(table_folder, monkeypatch, tmp_path):
    """Check that CSV paths are read relative to the CSV's folder, whatever the current folder."""
    table = table_folder / "list.csv"
    table.write_text("path,label,extra\nimgs/a.png,red,1\nimgs/b.png,blue,2\n\nimgs/c.png,red,3\n")
    monkeypatch.chdir(tmp_path)
    src = open_source(table)
    assert src.items == [str(table_folder / "imgs" / f"{n}.png") for n in "abc"]
    assert src.labels.tolist() == ["red", "blue", "red"] and src.classes == ["blue", "red"]
    assert src.name == str(table) and src.root == str(table_folder)
    assert load_image(src[1]).getpixel((0, 0)) == BLUE


def test_open_source_tsv_and_unlabelled_csv(table_folder):
    """Check that a TSV is split on tabs and a CSV without a label column is unlabelled."""
    (table_folder / "list.tsv").write_text("Label\tPath\nred\timgs/a.png\nblue\timgs/b.png\n")
    (table_folder / "nolabel.csv").write_text("path\nimgs/c.png\n")
    tsv = open_source(table_folder / "list.tsv")
    assert tsv.labels.tolist() == ["red", "blue"] and tsv.items[1].endswith("b.png")
    plain = open_source(table_folder / "nolabel.csv")
    assert plain.labels is None and len(plain) == 1


@pytest.mark.parametrize("escape", ["../outside.png", "imgs/../../outside.png", "ABSOLUTE"])
def test_open_source_csv_escape_refused_unless_allowed(table_folder, escape):
    """Check that paths leaving the CSV's folder are refused, and accepted with allow_outside_root=True."""
    outside = str(table_folder.parent / "outside.png")
    entry = outside if escape == "ABSOLUTE" else escape
    table = table_folder / "list.csv"
    table.write_text(f"path,label\nimgs/a.png,red\n{entry},blue\n")
    with pytest.raises(FeatxError, match=r"lists 1 path\(s\) outside its folder .*allow_outside_root=True"):
        open_source(table)
    src = open_source(table, allow_outside_root=True)
    assert os.path.samefile(src.items[1], outside)


def test_open_source_csv_bad_tables_raise(table_folder):
    """Check that a missing path column, an empty label and paths that all miss raise clear errors."""
    bad_header = table_folder / "a.csv"
    bad_header.write_text("file,label\nimgs/a.png,red\n")
    expected = r"has no 'path' column: expected a header with 'path'.*found \['file', 'label'\]"
    with pytest.raises(FeatxError, match=expected):
        open_source(bad_header)
    empty_label = table_folder / "b.csv"
    empty_label.write_text("path,label\nimgs/a.png,red\nimgs/b.png,\n")
    with pytest.raises(FeatxError, match=r"empty path or label on line\(s\) \[3\]"):
        open_source(empty_label)
    missing = table_folder / "c.csv"
    missing.write_text("path,label\nelsewhere/a.png,red\n")
    with pytest.raises(FeatxError, match=r"none of the paths .* exists .*relative to the table's folder"):
        open_source(missing)
    header_only = table_folder / "d.csv"
    header_only.write_text("path,label\n")
    with pytest.raises(FeatxError, match=r"has a header but no rows"):
        open_source(header_only)


@pytest.mark.parametrize(
    ("header", "hint"),
    [
        ("paht,lable", "Column 'paht' looks like 'path' and column 'lable' looks like 'label': rename them"),
        ("lable,paht", "Column 'paht' looks like 'path' and column 'lable' looks like 'label': rename them"),
        ("PAHT,Label", "Column 'paht' looks like 'path': rename it in the header"),
        ("filename,class", "Column 'filename' looks like 'path' and column 'class' looks like 'label'"),
        ("name,label", "Name the column of image paths 'path' in the header"),
    ],
)
def test_open_source_csv_without_path_column_names_the_lookalike(table_folder, header, hint):
    """Check that a header without 'path' names the columns found, the expected ones and the found column to rename."""
    table = table_folder / "list.csv"
    table.write_text(f"{header}\nimgs/a.png,red\n")
    found = str([cell.lower() for cell in header.split(",")]).replace("[", r"\[").replace("]", r"\]")
    expected = rf"has no 'path' column: expected a header with 'path' and, for labelled data, 'label'; found {found}"
    with pytest.raises(FeatxError, match=expected) as caught:
        open_source(table)
    assert hint in str(caught.value) and "Did you mean" not in str(caught.value)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("path,labl", "Its header has the columns ['path', 'labl'] and no 'label' column; column 'labl' looks like "
                      "'label': rename it in the header."),
        ("path,labels", "column 'labels' looks like 'label'"),
        ("path,extra", "Its header has the columns ['path', 'extra'] and no 'label' column: add one with the class"),
    ],
)
def test_open_source_csv_without_label_column_says_why_it_is_unlabelled(table_folder, header, reason):
    """Check that a table without 'label' opens unlabelled, and what needs labels names its columns and the look-alike."""
    table = table_folder / "list.csv"
    table.write_text(f"{header}\nimgs/a.png,red\nimgs/b.png,blue\n")
    source = open_source(table)
    assert source.labels is None and reason in source.unlabelled_reason
    assert source.subset([1]).unlabelled_reason == source.unlabelled_reason
    with pytest.raises(FeatxError, match=r"list\.csv has no labels: cv needs classes\. Its header has") as caught:
        source.require_labels("cv needs classes")
    assert reason in str(caught.value)
    with pytest.raises(FeatxError, match=r"per_class=1 needs labels, but .* is unlabelled; .*Its header has"):
        open_source(table, per_class=1)


def test_open_source_csv_accepted_headers_keep_working(table_folder):
    """Check that 'path' and 'label' are found in any case and order, after a BOM and among other columns."""
    for header in ("path,label", "Label,Path", " PATH , LABEL ,extra", "\ufeffpath,label"):
        table = table_folder / "list.csv"
        cells = {"path": "imgs/a.png", "label": "red", "extra": "1"}
        row = ",".join(cells[cell.strip().lower().lstrip("\ufeff")] for cell in header.split(","))
        table.write_text(f"{header}\n{row}\n", encoding="utf-8")
        source = open_source(table)
        assert source.labels.tolist() == ["red"] and source.items[0].endswith("a.png"), header
        assert source.unlabelled_reason == ""


# ---------------------------------------------------------------------------------------------
# open_source: objects, names, options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "labels", "n", "item_shape"),
    [
        ((64, 64, 3), None, 1, (64, 64, 3)),  # one colour image, not 64 strips of 64×3
        ((48, 64, 1), None, 1, (48, 64, 1)),
        ((32, 32, 4), ["a"], 1, (32, 32, 4)),
        ((20, 3, 3), None, 20, (3, 3)),  # twenty 3×3 images, not one 20×3 strip
        ((1, 4, 4), None, 1, (4, 4)),
        ((6, 8, 8), None, 6, (8, 8)),  # last axis not 1, 3, 4: a stack, as always
        ((5, 5, 3), ["a"] * 5, 5, (5, 3)),  # the shape does not decide; five labels do
        ((5, 5, 3), ["a"], 1, (5, 5, 3)),
    ],
)
def test_open_source_3d_array_reading(shape, labels, n, item_shape):
    """Check that a 3-D array is read as one image or as a stack by the rule of open_source's docstring."""
    pixels = np.arange(np.prod(shape)).reshape(shape).astype(np.uint8)
    source = open_source(pixels, labels=labels)
    assert len(source) == n and source[0].shape == item_shape
    assert np.shares_memory(source[0], pixels)  # still a view, not a copy


@pytest.mark.parametrize(
    ("shape", "labels", "why"),
    [
        ((5, 5, 3), None, r"its shape fits both"),
        ((3, 3, 3), None, r"its shape fits both"),
        ((64, 64, 3), ["a"] * 64, r"64 label\(s\) were given, which fit only the other reading"),
        ((64, 3, 3), ["a"], r"1 label\(s\) were given, which fit only the other reading"),
    ],
)
def test_open_source_3d_array_ambiguous_raises(shape, labels, why):
    """Check that a 3-D array the rule cannot decide is refused, naming both readings and both fixes."""
    n, height, width = shape
    with pytest.raises(FeatxError, match=rf"an array of shape .* is ambiguous \({why}\)") as caught:
        open_source(np.zeros(shape, dtype=np.uint8), labels=labels)
    message = str(caught.value)
    assert f"ONE {n}×{height} image with {width} channel(s)" in message
    assert f"a stack of {n} grayscale image(s) of {height}×{width} pixels" in message
    assert f"Pass array[None] (shape {(1, *shape)}) for one image" in message
    assert f"array[..., None] (shape {(*shape, 1)}) or another 4-D array (n, H, W, C) for a stack" in message
    assert len(open_source(np.zeros(shape, dtype=np.uint8)[None])) == 1
    assert len(open_source(np.zeros(shape, dtype=np.uint8)[..., None])) == n


def test_open_source_sequence_with_labels(tmp_path):
    """Check that a mixed sequence of paths, PIL images and arrays keeps order and string labels."""
    path = _save(tmp_path / "a.png", Image.new("RGB", (2, 2)))
    array = np.zeros((2, 2), dtype=np.uint8)
    src = open_source([tmp_path / "a.png", Image.new("L", (2, 2)), array], labels=[1, 2, 1])
    assert src[0] == path and isinstance(src[1], Image.Image) and src[2] is array
    assert src.labels.tolist() == ["1", "2", "1"] and src.classes == ["1", "2"] and src.name == "<memory>"


def test_open_source_array_keeps_one_array():
    """Check that an (n, H, W, C) array is not copied: items are views of its rows."""
    array = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    src = open_source(array, labels=list("aabbb"))
    assert np.shares_memory(src[3], array) and np.array_equal(src[-1], array[4])
    sub = src.subset([4, 1])
    assert np.shares_memory(sub[0], array) and np.array_equal(sub[0], array[4])
    assert [x.shape for x in sub] == [(4, 4, 3), (4, 4, 3)]
    assert content_key(sub[1]) == content_key(array[1])


def test_open_source_bad_objects_raise(tmp_path):
    """Check that wrong shapes, label counts, item types and empty inputs raise FeatxError with a fix."""
    expected = r"shape \(n, H, W\) or \(n, H, W, C\).*got shape \(8, 8\)\. For one image pass array\[None\]"
    with pytest.raises(FeatxError, match=expected):
        open_source(np.zeros((8, 8)))
    with pytest.raises(FeatxError, match=r"got 2 images but 1 labels"):
        open_source([np.zeros((2, 2)), np.zeros((2, 2))], labels=["a"])
    with pytest.raises(FeatxError, match=r"item #1 is a int; expected file paths"):
        open_source(["a.png", 3])
    with pytest.raises(FeatxError, match=r"no images given"):
        open_source([])
    with pytest.raises(FeatxError, match=r"cannot open a int as images; expected a folder"):
        open_source(5)


def test_open_source_unknown_name_suggests_builtins(tmp_path):
    """Check that an unknown string suggests a close built-in name and lists what is accepted."""
    expected = r"'digts' is not a file, a folder or a built-in dataset name\. Did you mean 'digits'\?.*accepts a folder"
    with pytest.raises(FeatxError, match=expected):
        open_source("digts")
    with pytest.raises(FeatxError, match=r"Did you mean 'fashion-mnist'\?"):
        open_source("fashion_mnist")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(FeatxError, match=r"neither a table \(\.csv, \.tsv\) nor an image"):
        open_source(notes)


def test_open_source_single_image_file(tmp_path):
    """Check that a path to one image gives an unlabelled source of that image."""
    path = _save(tmp_path / "one.png", Image.new("RGB", (2, 2)))
    src = open_source(path)
    assert src.items == [path] and src.labels is None


def test_open_source_option_conflicts_raise(class_folder):
    """Check that labels= and split= are refused where they do not apply, and bad options are named."""
    with pytest.raises(FeatxError, match=r"labels= applies to sequences and arrays"):
        open_source(class_folder, labels=["a"])
    with pytest.raises(FeatxError, match=r"split='test' applies to the built-in datasets"):
        open_source(class_folder, split="test")
    with pytest.raises(FeatxError, match=r"unknown split 'tset'.*Did you mean 'test'\?"):
        open_source("digits", split="tset")
    with pytest.raises(FeatxError, match=r"per_class must be a positive integer or None; got 0"):
        open_source(class_folder, per_class=0)
    with pytest.raises(FeatxError, match=r"random_state must be a non-negative integer; got -1"):
        open_source(class_folder, random_state=-1)


def test_open_source_per_class_deterministic():
    """Check that per_class gives the same subsample every call, N per class, in original order."""
    labels = np.repeat(["a", "b", "c"], [10, 8, 2])
    array = np.zeros((20, 2, 2), dtype=np.uint8)
    first = open_source(array, labels=labels, per_class=3, random_state=7)
    again = open_source(array, labels=labels, per_class=3, random_state=7)
    np.testing.assert_array_equal(first.items.rows, again.items.rows)
    assert np.all(np.diff(first.items.rows) > 0)
    assert sorted(first.labels.tolist()) == ["a"] * 3 + ["b"] * 3 + ["c"] * 2
    others = {tuple(open_source(array, labels=labels, per_class=3, random_state=s).items.rows) for s in range(5)}
    assert len(others) > 1
    paths = open_source([f"{i}.png" for i in range(20)], labels=labels)
    kept = open_source(paths, per_class=3, random_state=7)
    assert kept.items == [f"{i}.png" for i in first.items.rows]


def test_open_source_per_class_needs_labels():
    """Check that per_class on an unlabelled source raises a FeatxError that says labels are needed."""
    with pytest.raises(FeatxError, match=r"per_class=2 needs labels, but '<memory>' is unlabelled"):
        open_source(np.zeros((4, 2, 2), dtype=np.uint8), per_class=2)


# ---------------------------------------------------------------------------------------------
# Built-in datasets
# ---------------------------------------------------------------------------------------------


def test_open_source_digits_stratified_split():
    """Check that digits gives uint8 8×8 images, labels '0'..'9' and a disjoint, stratified 75/25 split."""
    train, test, whole = (open_source("digits", split=s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(whole)) == (1347, 450, 1797)
    assert not set(train.items.rows) & set(test.items.rows)
    assert train.classes == [str(d) for d in range(10)] and train.name == "digits"
    image = test[0]
    assert image.shape == (8, 8) and image.dtype == np.uint8 and whole.items.base.max() == 255
    counts = np.unique(test.labels, return_counts=True)[1]
    assert counts.min() >= 43 and counts.max() <= 47
    np.testing.assert_array_equal(open_source("digits", split="test").items.rows, test.items.rows)
    assert load_image(image).size == (8, 8)


@pytest.mark.parametrize("compress", [False, True])
def test_open_source_fashion_mnist_reads_idx_lazily(tmp_path, monkeypatch, compress):
    """Check that fashion-mnist reads (gzipped) IDX files from FEATX_FASHION_MNIST_DIR lazily and pickles small."""
    images = np.arange(4 * 28 * 28, dtype=np.uint32).reshape(4, 28, 28) % 251
    _write_idx(tmp_path, "t10k", images, np.array([0, 9, 1, 0]), compress)
    monkeypatch.setenv("FEATX_FASHION_MNIST_DIR", str(tmp_path))
    src = open_source("fashion-mnist", split="test")
    assert src.labels.tolist() == ["T-shirt/top", "Ankle boot", "Trouser", "T-shirt/top"]
    assert src.items.base._data is None  # nothing read yet
    blob = pickle.dumps(src)
    np.testing.assert_array_equal(src[2], images[2])
    assert src[2].dtype == np.uint8
    restored = pickle.loads(blob)
    assert restored.items.base._data is None and np.array_equal(restored[1], images[1])
    assert len(open_source("fashion-mnist", split="test", per_class=1)) == 3


def test_open_source_fashion_mnist_missing_files_raise(tmp_path, monkeypatch):
    """Check that missing Fashion-MNIST files raise FeatxError giving the apt-get command."""
    monkeypatch.setenv("FEATX_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FeatxError, match=r"not found in '.*'.*`apt-get install dataset-fashion-mnist`"):
        open_source("fashion-mnist")
    with pytest.raises(FeatxError, match=r"split='train' \(60 000 images\) or split='test'"):
        open_source("fashion-mnist", split="all")


def test_open_source_fashion_mnist_corrupt_header_raises(tmp_path, monkeypatch):
    """Check that an IDX file with a wrong magic number raises FeatxError saying to reinstall."""
    _write_idx(tmp_path, "train", np.zeros((2, 28, 28)), np.array([0, 1]), compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x803, 2) + b"\x00\x01")
    monkeypatch.setenv("FEATX_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FeatxError, match=r"not an IDX file of 1-d unsigned bytes.*reinstall"):
        open_source("fashion-mnist")


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist is not installed")
def test_open_source_fashion_mnist_installed(monkeypatch):
    """Check that the installed Fashion-MNIST gives 60 000 / 10 000 28×28 uint8 images and 10 named classes."""
    monkeypatch.delenv("FEATX_FASHION_MNIST_DIR", raising=False)
    test = open_source("fashion-mnist", split="test")
    train = open_source("fashion-mnist")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert test.classes == sorted(["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"])  # fmt: skip
    image = test[0]
    assert image.shape == (28, 28) and image.dtype == np.uint8
    assert test.labels[0] == "Ankle boot"  # the first test image of Fashion-MNIST is an ankle boot
    assert load_image(image).size == (28, 28)
