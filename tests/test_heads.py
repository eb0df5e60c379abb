"""Tests of featx.heads: the pipelines, their grids, evaluate() and fit_head()."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.validation import check_is_fitted

from featx import heads
from featx.exceptions import FeatxError
from featx.heads import (
    HEADS,
    EvaluationError,
    UnknownHeadError,
    evaluate,
    fit_head,
    make_head,
    param_grid,
)

# Small settings keep every evaluate() in this file well under a second.
FAST = {"cv": 3, "inner_cv": 2}


def blobs(n_per_class=12, n_classes=3, n_features=6, spread=4.0, seed=0, labels=None):
    """Features of ``n_classes`` well separated Gaussian clusters, with string labels."""
    rng = np.random.default_rng(seed)
    sizes = [n_per_class] * n_classes if np.isscalar(n_per_class) else list(n_per_class)
    names = labels or [f"class{i}" for i in range(len(sizes))]
    centres = rng.normal(scale=spread, size=(len(sizes), n_features))
    X = np.concatenate([c + rng.normal(size=(k, n_features)) for c, k in zip(centres, sizes)])
    y = np.concatenate([[name] * k for name, k in zip(names, sizes)])
    return X.astype(np.float32), y


def test_make_head_builds_the_documented_steps():
    """Check that each head is scaler -> [normalizer] -> [pca] -> the right classifier."""
    kinds = {"logreg": LogisticRegression, "linear-svm": LinearSVC, "rbf-svm": SVC}
    for head in HEADS:
        pipeline = make_head(head)
        assert [name for name, _ in pipeline.steps] == ["standardize", "classifier"]
        assert isinstance(pipeline.named_steps["classifier"], kinds[head])
    full = make_head("logreg", l2_normalize=True, pca=0.9, class_weight="balanced")
    assert [name for name, _ in full.steps] == ["standardize", "normalize", "pca", "classifier"]
    assert full.named_steps["pca"].n_components == 0.9
    assert full.named_steps["classifier"].solver == "lbfgs"
    assert full.named_steps["classifier"].class_weight == "balanced"


def test_make_head_unknown_name_suggests_closest():
    """Check that an unknown head raises a FeatxError and ValueError naming the closest head."""
    with pytest.raises(UnknownHeadError, match="Unknown head 'logreg2'. Did you mean 'logreg'?"):
        make_head("logreg2")
    with pytest.raises(FeatxError, match="Choose one of logreg, linear-svm, rbf-svm"):
        evaluate(*blobs(), head="svm")
    assert issubclass(UnknownHeadError, ValueError)


@pytest.mark.parametrize("pca", [0, 1.5, -3, "half", True])
def test_make_head_rejects_bad_pca(pca):
    """Check that pca must be a component count or a variance fraction."""
    with pytest.raises(EvaluationError, match=r"pca=.* is neither a number of components"):
        make_head("logreg", pca=pca)


def test_param_grid_is_relative_to_n_features():
    """Check that C of the linear heads and gamma of the RBF SVM scale as 1 / n_features."""
    assert param_grid("logreg", n_features=100) == {
        "classifier__C": [1e-05, 0.0001, 0.001, 0.01, 0.1, 1.0]
    }
    assert param_grid("linear-svm", n_features=10)["classifier__C"] == [0.0001, 0.001, 0.01, 0.1]
    rbf = param_grid("rbf-svm", n_features=1000)
    assert rbf["classifier__C"] == [1.0, 10.0]
    assert rbf["classifier__gamma"] == [0.00025, 0.001, 0.004]
    for head in HEADS:  # every key is a parameter of the head, every value a python float
        grid = param_grid(head, n_features=8)
        make_head(head).set_params(**{key: values[0] for key, values in grid.items()})
        assert all(type(v) is float for values in grid.values() for v in values)


@pytest.mark.parametrize("n_features", [None, 0, -2.0])
def test_param_grid_needs_positive_n_features(n_features):
    """Check that a missing or non-positive n_features is a clear error."""
    with pytest.raises(EvaluationError, match=r"needs n_features > 0.*n_features=X.shape\[1\]"):
        param_grid("rbf-svm", n_features=n_features)


@pytest.mark.parametrize("head", HEADS)
def test_evaluate_learns_separable_data(head):
    """Check that every head scores near 1 on well separated classes."""
    X, y = blobs()
    report = evaluate(X, y, head=head, **FAST)
    assert report["accuracy_mean"] >= 0.95
    assert report["balanced_accuracy"] >= 0.95
    assert report["macro_f1"] >= 0.95


@pytest.mark.parametrize("head", HEADS)
def test_evaluate_shuffled_labels_score_near_chance(head):
    """Check that every head falls to chance (1/4) when labels do not follow the features."""
    X, y = blobs(n_per_class=20, n_classes=4)
    y = np.random.default_rng(1).permutation(y)
    report = evaluate(X, y, head=head, **FAST)
    assert report["accuracy_mean"] < 0.5


def test_evaluate_report_keys_types_and_json():
    """Check that the report has the documented keys, python types only, and is JSON."""
    X, y = blobs()
    report = evaluate(X, y, **FAST)
    assert set(report) == {
        "head", "classes", "n_samples", "n_features", "n_classes", "cv", "repeats",
        "accuracy_mean", "accuracy_std", "fold_accuracy", "balanced_accuracy", "macro_f1",
        "per_class", "confusion_matrix", "param_grid", "best_params", "chosen_params",
        "fit_time", "settings", "notes",
    }
    assert json.loads(json.dumps(report)) == report
    assert (report["n_samples"], report["n_features"], report["n_classes"]) == (36, 6, 3)
    assert report["classes"] == ["class0", "class1", "class2"]
    assert set(report["per_class"]) == set(report["classes"])
    for scores in report["per_class"].values():
        assert set(scores) == {"precision", "recall", "f1", "support"}
        assert type(scores["support"]) is int and type(scores["precision"]) is float
    assert all(type(v) is float for v in report["fold_accuracy"])
    assert type(report["fit_time"]) is float and report["fit_time"] > 0
    assert report["notes"] == []


def test_evaluate_integer_labels_become_string_keys():
    """Check that integer labels are reported as strings, in sorted label order."""
    X, y = blobs(labels=[10, 2, 7])
    report = evaluate(X, y.astype(int), tune=False, **FAST)
    assert report["classes"] == ["2", "7", "10"]
    assert list(report["per_class"]) == ["2", "7", "10"]
    json.dumps(report)


def test_evaluate_confusion_matrix_sums_to_samples_times_repeats():
    """Check that every outer test prediction lands once per repeat in the confusion matrix."""
    X, y = blobs(n_per_class=[10, 8, 6])
    report = evaluate(X, y, repeats=2, tune=False, **FAST)
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (3, 3)
    assert matrix.sum() == len(y) * 2
    assert matrix.sum(axis=1).tolist() == [20, 16, 12]
    assert [report["per_class"][c]["support"] for c in report["classes"]] == [20, 16, 12]


def test_evaluate_std_is_over_outer_folds():
    """Check that accuracy mean and std are taken over the cv * repeats outer folds."""
    X, y = blobs(spread=0.8, n_per_class=15)  # overlapping: fold accuracies differ
    report = evaluate(X, y, repeats=2, tune=False, **FAST)
    folds = report["fold_accuracy"]
    assert len(folds) == 3 * 2 and len(report["best_params"]) == 6
    assert len(set(folds)) > 1
    assert report["accuracy_mean"] == pytest.approx(np.mean(folds))
    assert report["accuracy_std"] == pytest.approx(np.std(folds))
    assert 0 < report["accuracy_std"]


@pytest.mark.parametrize("head", HEADS)
def test_evaluate_chosen_params_come_from_the_grid(head):
    """Check that every fold's parameters, and the most frequent one, are grid points."""
    X, y = blobs(spread=1.0)
    report = evaluate(X, y, head=head, **FAST)
    grid = report["param_grid"]
    assert grid == param_grid(head, n_features=X.shape[1])
    for params in [*report["best_params"], report["chosen_params"]]:
        assert set(params) == set(grid)
        assert all(value in grid[key] for key, value in params.items())
    assert report["chosen_params"] in report["best_params"]


def test_evaluate_without_tuning_reports_defaults():
    """Check that tune=False fits scikit-learn's defaults and reports them."""
    report = evaluate(*blobs(), head="rbf-svm", tune=False, **FAST)
    assert report["param_grid"] is None
    assert report["chosen_params"] == {"classifier__C": 1.0, "classifier__gamma": "scale"}


def test_evaluate_reduces_folds_for_small_class_with_warning():
    """Check that a class smaller than cv reduces the folds, with a warning naming it."""
    X, y = blobs(n_per_class=[10, 10, 3])
    with pytest.warns(UserWarning, match=r"fewer samples than cv=5: 'class2' \(3\); using 3-fold"):
        report = evaluate(X, y, cv=5, tune=False)
    assert report["cv"] == 3
    assert len(report["fold_accuracy"]) == 3
    assert any("'class2' (3)" in note for note in report["notes"])


def test_evaluate_notes_reduced_and_skipped_inner_tuning():
    """Check that small classes in outer training parts reduce or skip the inner search."""
    X, y = blobs(n_per_class=[12, 12, 3])  # cv=3: 'class2' has 2 training samples per fold
    report = evaluate(X, y, cv=3, inner_cv=3)
    assert any("inner cross-validation used fewer than inner_cv=3" in n for n in report["notes"])
    X, y = blobs(n_per_class=[12, 12, 2])  # cv=2: 'class2' has 1 training sample per fold
    report = evaluate(X, y, cv=2, inner_cv=2)
    note = "tuning skipped in 2 of 2 outer folds: class 'class2' has only 1 sample"
    assert any(note in n for n in report["notes"])
    assert report["chosen_params"] == {"classifier__C": 1.0}


def test_evaluate_one_member_class_is_an_error():
    """Check that a class with one sample is refused, naming it and what to do."""
    X, y = blobs(n_per_class=[6, 6, 1])
    with pytest.raises(EvaluationError, match=r"'class2' \(1\).*add images to these classes"):
        evaluate(X, y)


def test_evaluate_single_class_is_an_error():
    """Check that a single class is refused with a clear message."""
    X, y = blobs(n_classes=1)
    with pytest.raises(EvaluationError, match="needs at least two classes. y holds only 'class0'"):
        evaluate(X, y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_evaluate_non_finite_X_is_an_error(bad):
    """Check that NaN or inf in X is refused, naming the rows."""
    X, y = blobs()
    X[[3, 7], 1] = bad
    with pytest.raises(EvaluationError, match=r"2 non-finite values \(NaN or inf\) in 2 rows \(3, 7\)"):
        evaluate(X, y)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"X": np.zeros(36)}, r"X must be a 2-D array .* got shape \(36,\)"),
        ({"y": np.array(["a", "b"] * 10)}, "got 36 rows in X and 20 labels in y"),
        ({"X": np.full((36, 2), "a")}, "X must hold numbers"),
        ({"cv": 1}, "cv must be an integer >= 2; got 1"),
        ({"inner_cv": 2.5}, "inner_cv must be an integer >= 2"),
        ({"repeats": 0}, "repeats must be an integer >= 1"),
        ({"pca": 50}, "pca=50 components, but X has 36 samples and X has 6 features"),
        ({"class_weight": {"class9": 2.0}}, r"class_weight names labels that are not in y: \['class9'\]"),
        ({"class_weight": "balance"}, "class_weight must be None, 'balanced' or a dict"),
    ],
)
def test_evaluate_invalid_input_is_an_error(change, message):
    """Check that malformed X, y or settings raise an EvaluationError saying what came."""
    X, y = blobs()
    kwargs = {"X": X, "y": y, **change}
    with pytest.raises(EvaluationError, match=message):
        evaluate(kwargs.pop("X"), kwargs.pop("y"), **kwargs)


def test_evaluate_pca_larger_than_a_training_fold_is_an_error():
    """Check that too many PCA components for a training fold are refused before fitting."""
    X, y = blobs(n_features=30)
    with pytest.raises(EvaluationError, match=r"pca=30 components, but a training fold has"):
        evaluate(X, y, pca=30, **FAST)


def test_evaluate_l2_normalize_and_pca_learn():
    """Check that the optional steps run and the grid follows the transformed data's variance."""
    X, y = blobs(n_features=10)
    report = evaluate(X, y, head="rbf-svm", l2_normalize=True, pca=3, **FAST)
    assert report["accuracy_mean"] >= 0.95
    assert report["settings"]["pca"] == 3 and report["settings"]["l2_normalize"] is True
    gamma = report["param_grid"]["classifier__gamma"]
    assert gamma[1] > 1 / 3  # unit-norm rows: total variance below 1, not 3 components' worth


def test_evaluate_balanced_class_weight_raises_minority_recall():
    """Check that class_weight='balanced' changes predictions in favour of a rare class."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0.0, 1.0, (60, 2)), rng.normal(1.0, 1.0, (12, 2))])
    y = np.array(["class0"] * 60 + ["class1"] * 12)  # overlapping, 5 to 1
    plain = evaluate(X, y, tune=False, **FAST)
    balanced = evaluate(X, y, tune=False, class_weight="balanced", **FAST)
    assert plain["confusion_matrix"] != balanced["confusion_matrix"]
    recall = [r["per_class"]["class1"]["recall"] for r in (plain, balanced)]
    assert recall[1] > recall[0]
    assert balanced["settings"]["class_weight"] == "balanced"
    weighted = evaluate(X, y, tune=False, class_weight={"class1": 5.0}, **FAST)
    assert weighted["per_class"]["class1"]["recall"] > recall[0]
    assert weighted["settings"]["class_weight"] == {"class1": 5.0}


def test_evaluate_is_deterministic_sequential_and_parallel():
    """Check that the same inputs give the same report, whatever n_jobs, and seeds matter."""
    X, y = blobs(spread=0.8)

    def run(**kwargs):
        report = evaluate(X, y, head="linear-svm", repeats=2, **FAST, **kwargs)
        report.pop("fit_time")
        return report

    first = run()
    assert run() == first
    assert run(n_jobs=2) == first
    assert run(random_state=1)["fold_accuracy"] != first["fold_accuracy"]


def test_evaluate_counts_unconverged_fits_in_notes(monkeypatch):
    """Check that fits stopped at max_iter are counted in the notes, not shown one by one."""
    monkeypatch.setitem(heads._MAX_ITER, "logreg", 1)
    X, y = blobs(spread=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate(X, y, **FAST)
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    # 3 outer folds x (6 grid points x 2 inner folds + 1 refit)
    assert any("of 39 logreg fits stopped at their iteration limit" in n for n in report["notes"])


@pytest.mark.parametrize("head", HEADS)
def test_fit_head_returns_fitted_pipeline_with_probabilities(head):
    """Check that fit_head returns a fitted, picklable head with predict_proba and grid params."""
    X, y = blobs()
    pipeline, params = fit_head(X, y, head=head, inner_cv=2)
    check_is_fitted(pipeline)
    assert pipeline.classes_.tolist() == ["class0", "class1", "class2"]
    proba = pipeline.predict_proba(X)
    assert proba.shape == (len(X), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert (pipeline.predict(X) == y).mean() >= 0.95
    grid = param_grid(head, n_features=X.shape[1])
    assert all(value in grid[key] for key, value in params.items())
    json.dumps(params)
    restored = pickle.loads(pickle.dumps(pipeline))
    np.testing.assert_array_equal(restored.predict_proba(X), proba)


@pytest.mark.parametrize("head", ["linear-svm", "rbf-svm"])
def test_fit_head_calibration_keeps_the_svm_predictions(head):
    """Check that the probabilities added to an SVM change none of its predictions."""
    X, y = blobs(spread=0.7, n_per_class=15)  # overlapping classes: many borderline points
    pipeline, params = fit_head(X, y, head=head, inner_cv=2)
    assert isinstance(pipeline.named_steps["classifier"], CalibratedClassifierCV)
    plain = make_head(head).set_params(**params).fit(X, y)
    X_new = np.random.default_rng(5).normal(scale=2.0, size=(200, X.shape[1]))
    np.testing.assert_array_equal(pipeline.predict(X_new), plain.predict(X_new))
    proba = pipeline.predict_proba(X_new)
    np.testing.assert_array_equal(pipeline.classes_[proba.argmax(axis=1)], plain.predict(X_new))


def test_fit_head_validates_like_evaluate():
    """Check that fit_head refuses single classes, one-member classes and unknown heads."""
    with pytest.raises(EvaluationError, match="needs at least two classes"):
        fit_head(*blobs(n_classes=1))
    with pytest.raises(EvaluationError, match=r"'class1' \(1\)"):
        fit_head(*blobs(n_per_class=[5, 1], n_classes=2))
    with pytest.raises(UnknownHeadError, match="Did you mean 'linear-svm'"):
        fit_head(*blobs(), head="linear_svm")


def test_fit_head_warns_when_a_class_is_smaller_than_inner_cv():
    """Check that fit_head uses fewer folds, with a warning, for a class below inner_cv."""
    X, y = blobs(n_per_class=[8, 8, 2])
    with pytest.warns(UserWarning, match=r"fewer samples than inner_cv=3: 'class2' \(2\)"):
        pipeline, _ = fit_head(X, y, head="rbf-svm")
    assert pipeline.predict_proba(X).shape == (len(X), 3)


def test_fit_head_warns_once_for_unconverged_fits(monkeypatch):
    """Check that fit_head sums non-converged fits into one ConvergenceWarning."""
    monkeypatch.setitem(heads._MAX_ITER, "logreg", 1)
    with pytest.warns(ConvergenceWarning) as record:
        fit_head(*blobs(spread=1.0), inner_cv=2)
    convergence = [w for w in record if issubclass(w.category, ConvergenceWarning)]
    assert len(convergence) == 1
    assert "of 13 logreg fits stopped" in str(convergence[0].message)


def test_heads_module_does_not_import_torch():
    """Check that importing featx.heads loads neither torch nor a featx module that does."""
    code = "import sys, featx.heads; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_evaluate_blocks_standardise_each_block_inside_the_folds():
    """Check that blocks= puts a BlockScaler in the head, is recorded in the settings, and must add up to X's width."""
    from featx.heads import fit_head, make_head

    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 15)
    X = np.hstack([rng.normal(size=(30, 2)) + 2 * (y == "b")[:, None], rng.normal(size=(30, 40))])
    assert type(make_head("logreg", blocks=[2, 40]).named_steps["standardize"]).__name__ == "BlockScaler"
    assert type(make_head("logreg", blocks=[42]).named_steps["standardize"]).__name__ == "StandardScaler"
    report = evaluate(X, y, cv=3, blocks=[2, 40])
    assert report["settings"]["blocks"] == [2, 40] and report["accuracy_mean"] > 0.8
    assert "blocks" not in evaluate(X, y, cv=3)["settings"]
    pipeline, _ = fit_head(X, y, head="rbf-svm", blocks=[2, 40])
    assert pipeline.named_steps["standardize"].blocks == [2, 40]
    with pytest.raises(EvaluationError, match="adding up to the 42 columns"):
        evaluate(X, y, blocks=[2, 30])


def test_evaluate_progress_counts_outer_folds_and_changes_no_figure(capsys):
    """Check that evaluate(progress=True) draws a bar of its outer folds, a Progress is advanced once per fold,
    the default draws nothing, and the report is the same either way."""
    from featx.progress import Progress

    X, y = blobs()
    quiet = evaluate(X, y, repeats=2, **FAST)
    assert capsys.readouterr().err == ""
    shown = evaluate(X, y, repeats=2, progress=True, **FAST)
    err = capsys.readouterr().err
    assert "cv logreg" in err and "| 0/6 " in err
    bar = Progress(10, enabled=False)
    evaluate(X, y, progress=bar, **FAST)
    assert bar.n == 3 and bar.total == 10  # advanced by its folds; the caller's total kept
    for report in (quiet, shown):
        report.pop("fit_time")
    assert shown == quiet


def test_fit_head_progress_counts_every_grid_fit():
    """Check that fit_head gives a bar without a total its grid fits (6 C values x 2 folds + the final fit) and
    counts each of them, in process and with n_jobs=2."""
    from featx.progress import Progress

    X, y = blobs()
    for enabled, n_jobs in ((True, None), (True, 2), (False, None)):  # by the scorer, after the search, no bar
        with Progress(None, enabled=enabled, unit="fit") as bar:
            fit_head(X, y, inner_cv=2, progress=bar, n_jobs=n_jobs)
        assert bar.total == 6 * 2 + 1 and bar.n == 13
