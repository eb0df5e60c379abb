"""Image sources, content keys and decoding.

An :class:`ImageSource` is an ordered list of image references (file paths, PIL images or rows of
one array) with optional class labels. :func:`open_source` builds one from a folder of class
sub-folders, a CSV/TSV file, a built-in dataset or objects in memory; it never decodes pixels.
:func:`load_image` decodes one reference to an RGB :class:`PIL.Image.Image` and turns every
failure into an :class:`~featx.exceptions.ImageDecodeError` that names the image;
:func:`content_key` hashes what an image *is* (file bytes or pixels), not where it lives.

One concept per module:

- :mod:`featx.images.items`: what an image reference is, its name in messages, the error that names it;
- :mod:`featx.images.decode`: :func:`load_image` and :func:`jpeg_bytes`;
- :mod:`featx.images.keys`: :func:`content_key`;
- :mod:`featx.images.source`: the :class:`ImageSource` type;
- :mod:`featx.images.opening`: :func:`open_source`, with the readers
  :mod:`~featx.images.folders`, :mod:`~featx.images.tables` and :mod:`~featx.images.datasets`.

This package must stay free of torch: DataLoader workers and torch-free code import it.
"""

from featx.images.datasets import BUILTIN_DATASETS, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_ENV
from featx.images.decode import DEFAULT_MAX_PIXELS, jpeg_bytes, load_image
from featx.images.items import IMAGE_EXTENSIONS, ImageItem, describe
from featx.images.keys import content_key
from featx.images.opening import open_source
from featx.images.source import ImageSource

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
