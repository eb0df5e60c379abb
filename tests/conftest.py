"""Shared fixtures: a tiny seeded backbone and small synthetic images a head can separate."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

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


# --------------------------------------------------------------------------- headless Chromium

#: Names headless Chromium goes by; ``$FEATX_CHROMIUM`` (a path) wins over them.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: Added to a test copy of a page: once every image has loaded or failed, it writes what rendered
#: into the DOM, which ``--dump-dom`` prints. An image counts as loaded when it decoded
#: (``naturalWidth > 0``) and takes room on the page.
_CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
  const out = document.createElement("pre");
  out.id = "featx-render-check";
  out.textContent = JSON.stringify({
    images: images.length,
    loaded: loaded.length,
    broken: images.filter(i => !loaded.includes(i)).map(i => i.alt),
    tables: document.querySelectorAll("table").length,
    table_rows: document.querySelectorAll("tbody tr").length,
    headings: [...document.querySelectorAll("h1, h2, h3")].map(h => h.textContent),
    height: document.documentElement.scrollHeight,
  });
  document.body.appendChild(out);
});
</script>"""


class HeadlessChromium:
    """Opens HTML files in headless Chromium: what rendered (:meth:`check`) and a screenshot."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir

    def _run(self, *args: str) -> str:
        command = [self.executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={self.workdir / 'profile'}",
                   *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{command} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    def check(self, page: Path) -> dict:
        """Open a copy of ``page`` with the check script; return its counts (images, loaded, broken, tables, …).

        ``height`` is the page's height in a window 1200 pixels wide (at least the window's 800).
        """
        text = Path(page).read_text(encoding="utf-8")
        if "</body>" not in text:
            raise ValueError(f"{page} has no </body> to add the check script before")
        copy = self.workdir / f"check-{Path(page).name}"
        copy.write_text(text.replace("</body>", _CHECK_SCRIPT + "</body>", 1), encoding="utf-8")
        dom = self._run("--dump-dom", "--window-size=1200,800", copy.resolve().as_uri())
        found = re.search(r'<pre id="featx-render-check">(.*?)</pre>', dom, re.DOTALL)
        if found is None:
            raise AssertionError(f"the check script did not run in {copy}: {dom[-500:]}")
        return json.loads(html.unescape(found.group(1)))

    def screenshot(self, page: Path, png: Path, *, width: int = 1200, height: int = 2400) -> Image.Image:
        """A ``width × height`` screenshot of ``page`` saved in ``png``, returned as an RGB image."""
        self._run(f"--screenshot={png}", f"--window-size={width},{height}", Path(page).resolve().as_uri())
        return Image.open(png).convert("RGB")


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """The path of headless Chromium, or a skip saying how to install it."""
    candidates = [os.environ["FEATX_CHROMIUM"]] if os.environ.get("FEATX_CHROMIUM") else []
    candidates += [found for name in CHROMIUM_NAMES if (found := shutil.which(name))]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("headless Chromium not found (chromium, chromium-browser, google-chrome or $FEATX_CHROMIUM): "
                "install Debian's package with 'apt-get install chromium' (.ci/run does it when apt-get is there)")


@pytest.fixture
def chromium(chromium_executable, tmp_path) -> HeadlessChromium:
    """Headless Chromium with a fresh profile in this test's tmp_path."""
    workdir = tmp_path / "chromium"
    workdir.mkdir()
    return HeadlessChromium(chromium_executable, workdir)


def colour_pixels(image: Image.Image, colour, tolerance: int = 60) -> int:
    """How many pixels of ``image`` lie within ``tolerance`` of ``colour`` in every channel."""
    pixels = np.asarray(image.convert("RGB"), dtype=int)
    return int((np.abs(pixels - np.asarray(colour)).max(axis=-1) <= tolerance).sum())
