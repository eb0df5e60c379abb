"""The model report: one HTML file that shows how a model scores and which images it gets wrong.

:func:`model_report` scores a model on labelled images (:func:`featx.models.evaluate_model`,
through the feature store: images seen before cost no forward pass) and lays the result out on a
:class:`featx.html.Page`: the accuracy figures, the confusion matrix as a picture, precision and
recall per class, and for each confusion (true → predicted) the misclassified images as
thumbnails with their true and predicted labels and probabilities. :func:`comparison_section`
adds the plot and table of :func:`featx.compare.compare_layers` to any page.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from featx.compare import best_row, plot_comparison
from featx.exceptions import FeatxError
from featx.html import Page
from featx.images import ImageSource, open_source
from featx.models import FeatxModel, evaluate_model, load_model
from featx.options import DEFAULT_MAX_PIXELS

__all__ = ["COMPARE_COLUMNS", "ModelReport", "accuracy_line", "comparison_section", "confusion_figure",
           "model_report"]

#: The columns of the comparison table a report shows.
COMPARE_COLUMNS = ["model", "layer", "pooling", "head", "dim", "accuracy_mean", "accuracy_std", "balanced_accuracy",
                   "extraction_time", "fit_time"]


@dataclass
class ModelReport:
    """What :func:`model_report` found, as tables, and the page that shows it.

    Attributes
    ----------
    evaluation : dict
        :func:`featx.models.evaluate_model`'s report, ``predictions`` included.
    summary : list of dict
        ``measure``, ``value``: accuracy, balanced accuracy, macro-F1, images scored, images
        that trained the model, images skipped.
    per_class : list of dict
        ``class``, ``precision``, ``recall``, ``f1``, ``support``.
    confusions : list of dict
        ``true``, ``predicted``, ``count``, ``share`` (of the true class's images), most
        frequent first; correct predictions are not confusions.
    misclassified : list of dict
        ``image``, ``position`` (in the data), ``true``, ``predicted``, ``p_predicted``,
        ``p_true``: every misclassified image, by confusion, the most confident mistake first.
    page : featx.html.Page
        The report's page; :meth:`write` writes it.
    """

    evaluation: dict
    summary: list[dict]
    per_class: list[dict]
    confusions: list[dict]
    misclassified: list[dict]
    page: Page = field(repr=False)

    def write(self, path: str | os.PathLike) -> str:
        """Write the page as one self-contained HTML file (atomically); return its path."""
        return self.page.write(path)

    def frames(self) -> dict:
        """The tables as pandas DataFrames (``summary``, ``per_class``, ``confusions``, ``misclassified``).

        Raises
        ------
        FeatxError
            If pandas is not installed (the tables are also plain lists of dicts).
        """
        try:
            import pandas as pd  # optional: only for this method
        except ImportError as exc:
            raise FeatxError("ModelReport.frames() needs pandas, which is not installed: pip install pandas, "
                             "or use the lists of dicts (report.per_class, …) as they are") from exc
        return {name: pd.DataFrame(getattr(self, name))
                for name in ("summary", "per_class", "confusions", "misclassified")}


def accuracy_line(evaluation: dict) -> str:
    """One line of scores, called held-out only when none of the images trained the model.

    Examples
    --------
    >>> accuracy_line({"accuracy": 0.9, "balanced_accuracy": 0.85, "macro_f1": 0.8, "n_images": 20,
    ...                "n_training_images": 0})
    'held-out accuracy 0.9000, balanced accuracy 0.8500, macro-F1 0.8000 on 20 images'
    """
    n, trained = evaluation["n_images"], evaluation["n_training_images"]
    scores = (f"accuracy {evaluation['accuracy']:.4f}, balanced accuracy {evaluation['balanced_accuracy']:.4f}, "
              f"macro-F1 {evaluation['macro_f1']:.4f} on {n} images")
    if trained is None:
        return (f"{scores} (this model file does not record its training images, so whether this is a held-out "
                "score is unknown)")
    if trained == 0:
        return f"held-out {scores}"
    if trained == n:
        return f"{scores.replace('accuracy', 'accuracy on the training images', 1)}: all {n} were used to train " \
               "this model, not a held-out score"
    return f"{scores}: {trained} of {n} images were used to train this model, not a held-out score"


def confusion_figure(matrix, classes: Sequence[str], *, title: str | None = None):
    """The confusion matrix as a matplotlib Figure: counts written in the cells, colour by row share.

    Rows are the true classes, columns the predicted ones; a cell's colour is its share of the
    row (the true class's images), so a small class's mistakes show as clearly as a large one's.
    Counts are written in the cells up to 40 classes. Drawn on a bare Figure (no pyplot state).

    Examples
    --------
    >>> fig = confusion_figure([[3, 1], [0, 4]], ["cat", "dog"])
    >>> [t.get_text() for t in fig.axes[0].texts]
    ['3', '1', '0', '4']
    """
    from matplotlib.figure import Figure  # matplotlib only when a report is drawn

    counts = np.asarray(matrix, dtype=int)
    n = len(classes)
    if counts.shape != (n, n):
        raise FeatxError(f"a confusion matrix of {n} classes must be {n}×{n}, got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = min(max(3.5, 0.5 * n + 2.0), 16.0)
    figure = Figure(figsize=(side + 1.2, side), dpi=100)
    axes = figure.subplots()
    image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    labels = [str(c) for c in classes]
    axes.set_xticks(range(n), labels, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    axes.set_yticks(range(n), labels)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if n <= 40:
        for i in range(n):
            for j in range(n):
                axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=9 if n <= 15 else 7,
                          color="white" if share[i, j] > 0.5 else "black")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return figure


def model_report(
    model: FeatxModel | str | os.PathLike,
    data,
    *,
    title: str | None = None,
    per_confusion: int = 48,
    max_confusions: int = 50,
    thumbnail_size: int = 96,
    on_error: str = "skip",
    progress: bool | None = None,
    store=None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ModelReport:
    """Score `model` on labelled `data` and build the report page: scores, confusions, wrong images.

    Parameters
    ----------
    model : FeatxModel, or the path of a model file
    data : ImageSource, or anything :func:`featx.images.open_source` opens
        Labelled images, ideally held out (the page says whether any trained the model).
    title : str, optional
        The page's title; default ``featx report: <data name>``.
    per_confusion : int, default=48
        Most thumbnails shown per confusion (the most confident mistakes); the tables hold all.
    max_confusions : int, default=50
        Most confusions shown with their images, the most frequent first (a page of 100 classes
        could otherwise hold thousands); the confusion table lists them all.
    thumbnail_size : int, default=96
        Side of a thumbnail, in pixels.
    on_error, progress, store, max_pixels
        As in :func:`featx.models.evaluate_model`.

    Returns
    -------
    ModelReport
        The tables and the page; ``report.write("report.html")`` writes the page.

    Raises
    ------
    FeatxError
        If the data holds a class the model was not trained on, or `per_confusion` or
        `max_confusions` is not a whole number >= 0.
    ImageDecodeError
        If a misclassified image can no longer be decoded for its thumbnail.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from featx.models import fit_model
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    >>> images[6:] //= 4
    >>> labels = ["light"] * 6 + ["dark"] * 6
    >>> store = tempfile.mkdtemp()
    >>> model, _ = fit_model(open_source(images, labels=labels), backbone="featx_tiny_cnn", layer="stage1",
    ...                      device="cpu", store=store)
    >>> labels[0] = "dark"  # one planted wrong label
    >>> report = model_report(model, open_source(images, labels=labels), store=store)
    >>> [(c["true"], c["predicted"], c["count"]) for c in report.confusions]
    [('dark', 'light', 1)]
    >>> report.page.render().count("<img")  # the confusion matrix and one thumbnail
    2
    """
    for name, value in (("per_confusion", per_confusion), ("max_confusions", max_confusions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FeatxError(f"{name} must be a whole number >= 0, got {value!r}")
    if not isinstance(model, FeatxModel):
        model = load_model(model)
    source = data if isinstance(data, ImageSource) else open_source(data)
    evaluation = evaluate_model(model, source, on_error=on_error, progress=progress, store=store,
                                max_pixels=max_pixels, predictions=True)
    classes = evaluation["classes"]
    summary = [
        {"measure": "accuracy", "value": evaluation["accuracy"]},
        {"measure": "balanced accuracy", "value": evaluation["balanced_accuracy"]},
        {"measure": "macro-F1", "value": evaluation["macro_f1"]},
        {"measure": "images scored", "value": evaluation["n_images"]},
        {"measure": "of them training images", "value": evaluation["n_training_images"]
         if evaluation["n_training_images"] is not None else "unknown (not recorded in the model file)"},
        {"measure": "images skipped", "value": len(evaluation["skipped"])},
    ]
    per_class = [{"class": name, **{k: scores[k] for k in ("precision", "recall", "f1", "support")}}
                 for name, scores in evaluation["per_class"].items()]
    confusions, misclassified = _confusions(evaluation, classes)
    report = ModelReport(evaluation, summary, per_class, confusions, misclassified, Page(title or
                                                                                       f"featx report: {source.name}"))
    _fill_page(report, source, per_confusion=per_confusion, max_confusions=max_confusions, size=thumbnail_size)
    return report


def _confusions(evaluation: dict, classes: list[str]) -> tuple[list[dict], list[dict]]:
    index = {name: i for i, name in enumerate(classes)}
    wrong = [
        {"image": p["image"], "position": p["position"], "true": p["label"], "predicted": p["predicted"],
         "p_predicted": p["proba"][index[p["predicted"]]], "p_true": p["proba"][index[p["label"]]]}
        for p in evaluation["predictions"] if p["predicted"] != p["label"]
    ]
    matrix = np.asarray(evaluation["confusion_matrix"])
    confusions = [
        {"true": classes[i], "predicted": classes[j], "count": int(matrix[i, j]),
         "share": float(matrix[i, j] / matrix[i].sum())}
        for i in range(len(classes)) for j in range(len(classes)) if i != j and matrix[i, j]
    ]
    confusions.sort(key=lambda c: (-c["count"], index[c["true"]], index[c["predicted"]]))
    rank = {(c["true"], c["predicted"]): k for k, c in enumerate(confusions)}
    wrong.sort(key=lambda w: (rank[w["true"], w["predicted"]], -w["p_predicted"], w["position"]))
    return confusions, wrong


def _caption(row: dict) -> str:
    name = os.path.basename(row["image"]) or row["image"]
    return f"{name}\ntrue {row['true']} · p={row['p_true']:.2f}\npredicted {row['predicted']} · p={row['p_predicted']:.2f}"


def _fill_page(report: ModelReport, source: ImageSource, *, per_confusion: int, max_confusions: int,
               size: int) -> None:
    page, evaluation = report.page, report.evaluation
    page.paragraph(f"Model: {evaluation['model']}.\nData: {source.name}.\n{accuracy_line(evaluation)}.")
    with page.section("Accuracy"):
        page.table(report.summary)
    with page.section("Confusion matrix"):
        page.figure(confusion_figure(evaluation["confusion_matrix"], evaluation["classes"]),
                    alt="confusion matrix: true classes in rows, predicted classes in columns",
                    caption="Rows: true class; columns: predicted class; colour: share of the true class's images.")
    with page.section("Precision and recall per class"):
        page.table(report.per_class)
    with page.section("Misclassified images"):
        if not report.confusions:
            page.paragraph("None: every scored image was predicted correctly.")
        else:
            page.paragraph(f"{len(report.misclassified)} of {evaluation['n_images']} images, in "
                           f"{len(report.confusions)} confusions, the most frequent first. Under each image: "
                           "its true and predicted classes with the model's probability of each, the most "
                           "confident mistake first.")
            page.table(report.confusions, caption="confusions (share: of the true class's images)")
        if len(report.confusions) > max_confusions:
            page.paragraph(f"The images of the {max_confusions} most frequent of {len(report.confusions)} "
                           "confusions follow; the table above lists them all.")
        for confusion in report.confusions[:max_confusions]:
            rows = [w for w in report.misclassified
                    if (w["true"], w["predicted"]) == (confusion["true"], confusion["predicted"])]
            with page.section(f"{confusion['true']} → {confusion['predicted']}: {confusion['count']} "
                              f"image{'s' if confusion['count'] != 1 else ''}"):
                if len(rows) > per_confusion:
                    page.paragraph(f"The {per_confusion} most confident of {len(rows)} mistakes; "
                                   "the misclassified table of the report holds them all.")
                page.gallery([(source[w["position"]], _caption(w)) for w in rows[:per_confusion]], size=size)
    if evaluation["skipped"]:
        with page.section("Skipped images"):
            page.table(evaluation["skipped"], caption="images that could not be decoded, not scored")


def comparison_section(page: Page, rows: Sequence[dict], *, title: str | None = None) -> Page:
    """Add a comparison of :func:`featx.compare.compare_layers` to `page`: its plot and table.

    Parameters
    ----------
    page : featx.html.Page
    rows : sequence of dict
        The rows of :func:`featx.compare.compare_layers` (or ``compare.json``).
    title : str, optional
        The data set's name, for the plot's title and the section's heading.

    Returns
    -------
    Page
        `page`, with a section "Layer comparison" added.
    """
    if not rows:
        raise FeatxError("No comparison rows to show: compare_layers evaluated nothing.")
    png = io.BytesIO()
    plot_comparison(rows, png, title=title)
    best = best_row(rows)
    with page.section(f"Layer comparison{f': {title}' if title else ''}"):
        page.paragraph(f"Best: {best['model']} {best['layer']} / {best['pooling']} / {best['head']}: accuracy "
                       f"{best['accuracy_mean']:.3f} ± {best['accuracy_std']:.3f} ({best['n_images']} images, "
                       f"{best['cv']}-fold cross-validation).")
        page.figure(png.getvalue(), alt="accuracy against layer depth")
        columns = [c for c in COMPARE_COLUMNS if any(c in row for row in rows)]
        page.table(rows, columns=columns)
    return page
