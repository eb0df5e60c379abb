"""Built-in datasets: scikit-learn's digits and Debian's Fashion-MNIST IDX files.

``'digits'`` needs scikit-learn, imported when the dataset is opened (``import featx.images``
stays free of it). ``'fashion-mnist'`` reads the IDX files of the Debian package
``dataset-fashion-mnist`` (or the folder in ``FEATX_FASHION_MNIST_DIR``, read at call time):
only their headers when opened, the pixels on first access.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from featx.exceptions import FeatxError
from featx.images.source import ArrayItems, ImageSource

__all__ = ["BUILTIN_DATASETS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_ENV",
           "open_digits", "open_fashion_mnist"]  # fmt: skip

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "fashion-mnist")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "FEATX_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


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


def open_digits(split: str, random_state: int) -> ImageSource:
    """scikit-learn's 8×8 digits as uint8 grayscale; `split` is a stratified 75 / 25 split or ``'all'``."""
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
    return ImageSource(items=ArrayItems(pixels, positions), labels=labels[positions], classes=classes, name="digits")


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


def open_fashion_mnist(split: str) -> ImageSource:
    """Fashion-MNIST's ``'train'`` or ``'test'`` IDX files: the headers now, the pixels on first access."""
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
        items=ArrayItems(images), labels=labels, classes=sorted(FASHION_MNIST_CLASSES),
        name="fashion-mnist", root=folder,
    )  # fmt: skip
