import re

import numpy as np
import pytest
from PIL import Image

from featx.exceptions import FeatxError
from featx.html import Page
from featx.images import open_source
from featx.models import fit_model, predict
from featx.report import accuracy_line, comparison_section, confusion_figure, model_report

from conftest import TINY, colour_pixels, make_images

COLOURS = {"class0": (220, 40, 40), "class1": (40, 200, 60), "class2": (50, 60, 230)}
#: The label each planted wrong label says, by the image's true colour class.
FLIP = {"class0": "class1", "class1": "class2", "class2": "class0"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A model fitted on 18 clean colour images, and 6 held-out images of which 3 carry a wrong label."""
    root = tmp_path_factory.mktemp("planted")
    arrays, labels = make_images(n_per_class=8, n_classes=3, seed=2)
    flipped = {}
    for i, (array, label) in enumerate(zip(arrays, labels)):
        split = "val" if i % 4 == 0 else "train"
        if split == "val" and i % 8 == 0:
            flipped[f"{i:02d}.png"] = (FLIP[label], str(label))  # (the label given, the colour's class)
            label = FLIP[label]
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i:02d}.png")
    store = root / "cache"
    model, _ = fit_model(str(root / "train"), backbone=TINY, layer="stage2", device="cpu", store=store)
    return {"model": model, "val": root / "val", "store": store, "flipped": flipped}


def test_model_report_finds_every_planted_confusion(planted):
    """Check that every image with a planted wrong label is listed under its confusion, and nothing else."""
    report = model_report(planted["model"], str(planted["val"]), store=planted["store"])
    wrong = {row["image"].rsplit("/", 1)[-1]: (row["true"], row["predicted"]) for row in report.misclassified}
    assert wrong == planted["flipped"]
    assert sorted((c["true"], c["predicted"], c["count"]) for c in report.confusions) == sorted(
        (given, colour, 1) for given, colour in planted["flipped"].values())
    assert report.evaluation["accuracy"] == 0.5 and [row["support"] for row in report.per_class] == [2, 2, 2]
    assert {row["measure"]: row["value"] for row in report.summary}["of them training images"] == 0


def test_model_report_probabilities_are_the_models(planted):
    """Check that the probabilities shown are those featx.models.predict gives the same images."""
    report = model_report(planted["model"], str(planted["val"]), store=planted["store"])
    rows = {row["image"]: row for row in predict(planted["model"], str(planted["val"]), store=planted["store"])}
    for wrong in report.misclassified:
        expected = rows[wrong["image"]]
        assert wrong["p_predicted"] == pytest.approx(expected[f"p_{wrong['predicted']}"])
        assert wrong["p_true"] == pytest.approx(expected[f"p_{wrong['true']}"])
        assert expected["label"] == wrong["predicted"]


def test_model_report_page_holds_scores_matrix_and_thumbnails(planted):
    """Check that the page shows the scores, the matrix picture and one captioned thumbnail per mistake."""
    report = model_report(planted["model"], str(planted["val"]), store=planted["store"], thumbnail_size=64)
    text = report.page.render()
    assert text.count('src="data:image/png;base64,') == 1 and text.count('src="data:image/jpeg;base64,') == 3
    assert "held-out accuracy 0.5000" in text and "Precision and recall per class" in text
    for given, colour in planted["flipped"].values():
        assert f"{given} → {colour}: 1 image" in text
    assert re.search(r"\d\d\.png<br>true class\d · p=0\.\d\d<br>predicted class\d · p=0\.\d\d", text)


def test_model_report_caps_thumbnails_per_confusion(planted):
    """Check that per_confusion caps the thumbnails (the tables keep every mistake) and says so."""
    report = model_report(planted["model"], str(planted["val"]), store=planted["store"], per_confusion=0)
    text = report.page.render()
    assert text.count("data:image/jpeg") == 0 and len(report.misclassified) == 3
    assert "The 0 most confident of 1 mistakes" in text
    with pytest.raises(FeatxError, match="per_confusion must be a whole number"):
        model_report(planted["model"], str(planted["val"]), per_confusion=-1)


def test_model_report_caps_the_confusions_shown(planted):
    """Check that max_confusions shows the images of the most frequent confusions only and says so."""
    report = model_report(planted["model"], str(planted["val"]), store=planted["store"], max_confusions=1)
    text = report.page.render()
    assert text.count("data:image/jpeg") == 1 and text.count(": 1 image</h3>") == 1
    assert "The images of the 1 most frequent of 3 confusions follow" in text and len(report.confusions) == 3
    with pytest.raises(FeatxError, match="max_confusions must be a whole number >= 0, got 1.5"):
        model_report(planted["model"], str(planted["val"]), max_confusions=1.5)


def test_model_report_without_mistakes_says_so(planted, tmp_path):
    """Check that data the model gets all right gives no confusion and says so on the page."""
    arrays, labels = make_images(n_per_class=2, n_classes=3, seed=5)
    report = model_report(planted["model"], open_source(arrays, labels=labels), store=planted["store"])
    assert report.evaluation["accuracy"] == 1.0 and report.confusions == [] and report.misclassified == []
    assert "None: every scored image was predicted correctly." in report.page.render()


def test_model_report_frames_are_the_tables(planted):
    """Check that frames() gives the same tables as DataFrames."""
    pytest.importorskip("pandas")
    report = model_report(planted["model"], str(planted["val"]), store=planted["store"])
    frames = report.frames()
    assert list(frames["per_class"]["class"]) == ["class0", "class1", "class2"]
    assert len(frames["misclassified"]) == 3 and set(frames) == {"summary", "per_class", "confusions", "misclassified"}


def test_model_report_page_renders_in_chromium(planted, chromium, tmp_path):
    """Check in headless Chromium that the report's matrix and thumbnails load and its tables show, and that
    the screenshot holds each misclassified image's colour."""
    report = model_report(planted["model"], str(planted["val"]), store=planted["store"])
    page = tmp_path / "report.html"
    report.write(page)
    seen = chromium.check(page)
    assert seen["images"] == seen["loaded"] == 4 and seen["broken"] == []
    assert seen["tables"] == 3 and seen["table_rows"] == 6 + 3 + 3  # summary, per class, confusions
    assert "Misclassified images" in seen["headings"]
    shot = chromium.screenshot(page, tmp_path / "report.png", width=1200, height=seen["height"] + 50)
    for _, colour in planted["flipped"].values():  # a 40×40 image shown in a 96×96 box
        assert colour_pixels(shot, COLOURS[colour]) > 0.8 * 96 * 96


def test_confusion_figure_writes_counts_and_refuses_a_wrong_shape():
    """Check that the matrix picture writes every count and refuses a matrix of another size."""
    fig = confusion_figure(np.array([[5, 0, 1], [2, 3, 0], [0, 0, 4]]), ["a", "b", "c"], title="t")
    assert [t.get_text() for t in fig.axes[0].texts] == ["5", "0", "1", "2", "3", "0", "0", "0", "4"]
    with pytest.raises(FeatxError, match=r"3 classes must be 3×3, got shape \(2, 2\)"):
        confusion_figure([[1, 0], [0, 1]], ["a", "b", "c"])


def test_accuracy_line_says_held_out_only_without_training_images():
    """Check the wording for held-out, training, mixed and unknown images."""
    scores = {"accuracy": 0.75, "balanced_accuracy": 0.5, "macro_f1": 0.25, "n_images": 4}
    assert accuracy_line({**scores, "n_training_images": 0}).startswith("held-out accuracy 0.7500")
    assert accuracy_line({**scores, "n_training_images": 4}).endswith("all 4 were used to train this model, "
                                                                      "not a held-out score")
    assert "1 of 4 images were used" in accuracy_line({**scores, "n_training_images": 1})
    assert "unknown" in accuracy_line({**scores, "n_training_images": None})


def _comparison_rows():
    common = {"model": TINY, "pooling": "avg", "head": "logreg", "dim": 8, "n_images": 18, "cv": 3,
              "accuracy_std": 0.05, "balanced_accuracy": 0.8, "fit_time": 0.1}
    return [{**common, "layer": "stage1", "depth": 1, "accuracy_mean": 0.8},
            {**common, "layer": "stage2", "depth": 2, "accuracy_mean": 0.9}]


def test_comparison_section_adds_plot_table_and_best():
    """Check that a comparison adds its plot, its table (shown columns only) and the best row to a page."""
    text = comparison_section(Page("c"), _comparison_rows(), title="colours").render()
    assert "<h2>Layer comparison: colours</h2>" in text and text.count("data:image/png;base64,") == 1
    assert "Best: featx_tiny_cnn stage2 / avg / logreg: accuracy 0.900 ± 0.050" in text
    assert "<th>balanced_accuracy</th><th>fit_time</th></tr>" in text and "<th>extraction_time</th>" not in text
    with pytest.raises(FeatxError, match="No comparison rows"):
        comparison_section(Page("c"), [])
