"""Shared fixtures: a tiny seeded backbone and small synthetic images a head can separate."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

TINY = "featx_tiny_cnn"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's feature stores out of the project's cache folder."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def tiny() -> str:
    return TINY


def make_images(n_per_class: int = 4, n_classes: int = 3, size: int = 40, seed: int = 0):
    """Images of ``n_classes`` colours with noise: uint8 (n, size, size, 3) and string labels."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 220, 50]])[:n_classes]
    images, labels = [], []
    for label, colour in enumerate(colours):
        for _ in range(n_per_class):
            noise = rng.integers(-40, 40, size=(size, size, 3))
            images.append(np.clip(colour + noise, 0, 255).astype(np.uint8))
            labels.append(f"class{label}")
    return np.stack(images), np.array(labels)


@pytest.fixture
def images():
    """A dozen 40×40 RGB images in three classes."""
    return make_images()


@pytest.fixture
def image_folder(tmp_path, images):
    """The dozen images as PNG and JPEG files in class sub-folders."""
    arrays, labels = images
    root = tmp_path / "data"
    for i, (array, label) in enumerate(zip(arrays, labels)):
        (root / label).mkdir(parents=True, exist_ok=True)
        suffix = ".png" if i % 2 else ".jpg"
        Image.fromarray(array).save(root / label / f"img{i:02d}{suffix}")
    return root
