from pathlib import Path

import numpy as np
import pytest

from featx import advise as advise_module
from featx.advise import QUADRANTS, SHIFT_THRESHOLD, advise, imagenet_shift
from featx.exceptions import FeatxError
from featx.images import open_source

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers5_128px" / "all"


@pytest.mark.parametrize(
    ("shift", "per_class", "quadrant"),
    [
        (0.1, 10, ("small", "similar")),
        (0.9, 10, ("small", "different")),
        (0.1, 1500, ("large", "similar")),
        (0.9, 1500, ("large", "different")),
    ],
)
def test_advise_places_data_in_quadrants(monkeypatch, shift, per_class, quadrant):
    """Check that size and measured shift pick the quadrant and its textbook recommendation."""
    monkeypatch.setattr(advise_module, "imagenet_shift", lambda *a, **k: shift)
    labels = np.repeat(["a", "b"], per_class)
    source = open_source(np.zeros((len(labels), 8, 8), np.uint8), labels=labels)
    report = advise(source)
    assert (report["size"], report["similarity"]) == quadrant
    assert report["recommendation"] == QUADRANTS[quadrant]
    assert report["images_per_class"] == per_class and report["similarity_score"] == shift
    for key in ["images_per_class", "similarity", "similarity_score", "quadrant", "recommendation"]:
        assert key in report
    # where the table says fine-tune, the advice is a runnable 'featx finetune' command
    assert ("featx finetune DATA --from stage" in report["recommendation"]) == (quadrant[0] == "large")
    # the layers fit --auto fine-tunes from are the ones the recommendation names
    assert bool(report["finetune_from"]) == (quadrant[0] == "large")
    assert all(f"--from {layer}" in report["recommendation"] for layer in report["finetune_from"])


def test_advise_reports_disagreement_with_measurement(monkeypatch):
    """Check that a measured best layer that contradicts the table is said plainly."""
    monkeypatch.setattr(advise_module, "imagenet_shift", lambda *a, **k: 0.9)
    source = open_source(np.zeros((4, 8, 8), np.uint8), labels=["a", "a", "b", "b"])
    rows = [{"model": "efficientnet_lite0", "layer": f"stage{d}", "pooling": "avg", "head": "logreg",
             "depth": d, "accuracy_mean": 0.5 + d / 20, "accuracy_std": 0.01} for d in range(6)]
    report = advise(source, comparison=rows)
    assert report["measured_best"]["layer"] == "stage5" and report["agrees"] is False
    assert "disagrees with the table" in report["measurement"]
    rows[3]["accuracy_mean"] = 0.745  # an earlier layer within one std of the best: no contradiction
    assert advise(source, comparison=rows)["agrees"] is True


def test_advise_needs_labels():
    """Check that unlabelled data is refused with the reason."""
    with pytest.raises(FeatxError, match="has no labels"):
        advise(np.zeros((4, 8, 8), np.uint8))


@pytest.mark.slow
@pytest.mark.weights
def test_imagenet_shift_calls_digits_and_fashion_different():
    """Check that digits (and Fashion-MNIST when installed) measure as different from ImageNet."""
    assert imagenet_shift(open_source("digits"), n_images=100) > SHIFT_THRESHOLD
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        assert imagenet_shift(open_source("fashion-mnist", per_class=10), n_images=100) > SHIFT_THRESHOLD


@pytest.mark.slow
@pytest.mark.weights
@pytest.mark.skipif(not FLOWERS.is_dir(), reason="the shared flowers photo set is not here")
def test_imagenet_shift_calls_flower_photos_similar():
    """Check that natural flower photos measure as similar to ImageNet."""
    assert imagenet_shift(open_source(str(FLOWERS)), n_images=100) < SHIFT_THRESHOLD
