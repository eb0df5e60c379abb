import numpy as np
import pytest

from featx.compare import best_row, cached_evaluate, compare_layers
from featx.exceptions import FeatxError, FeatxWarning
from featx.images import open_source

from conftest import TINY, make_images


def test_compare_layers_one_row_per_combination(tmp_path):
    """Check one row per (layer, pooling, head) with the documented keys and dims."""
    arrays, labels = make_images(n_per_class=6)
    rows = compare_layers(open_source(arrays, labels=labels), backbones=TINY, layers=["stage1", "pre_logits"],
                          poolings=["avg", "spp"], heads=["logreg", "linear-svm"], cv=3, device="cpu", store=tmp_path)
    assert len(rows) == 8
    assert {(r["layer"], r["pooling"], r["head"]) for r in rows} == {
        (l, p, h) for l in ["stage1", "pre_logits"] for p in ["avg", "spp"] for h in ["logreg", "linear-svm"]
    }
    spp = next(r for r in rows if r["layer"] == "stage1" and r["pooling"] == "spp")
    assert spp["dim"] == 80 and spp["depth"] == 0 and spp["n_images"] == 18
    assert all(0 <= r["accuracy_mean"] <= 1 for r in rows)


def test_compare_layers_second_run_reads_reports(tmp_path):
    """Check that a repeated comparison reads its reports back with identical figures."""
    arrays, labels = make_images(n_per_class=6)
    source = open_source(arrays, labels=labels)
    first = compare_layers(source, backbones=TINY, layers=["stage2"], cv=3, device="cpu", store=tmp_path)
    second = compare_layers(source, backbones=TINY, layers=["stage2"], cv=3, device="cpu", store=tmp_path)
    assert not first[0]["from_cache"] and second[0]["from_cache"]
    assert first[0]["accuracy_mean"] == second[0]["accuracy_mean"]
    third = compare_layers(source, backbones=TINY, layers=["stage2"], cv=2, device="cpu", store=tmp_path)
    assert not third[0]["from_cache"]


def test_cached_evaluate_key_covers_labels(tmp_path):
    """Check that other labels on the same features are never served a stale report."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3))
    y = np.repeat(["a", "b"], 10)
    assert not cached_evaluate(X, y, folder=tmp_path, cv=2, inner_cv=2)["from_cache"]
    assert not cached_evaluate(X, y[::-1], folder=tmp_path, cv=2, inner_cv=2)["from_cache"]
    assert cached_evaluate(X, y, folder=tmp_path, cv=2, inner_cv=2)["from_cache"]


def test_cached_evaluate_unwritable_folder_warns_and_returns_report(tmp_path, monkeypatch):
    """Check that a report that cannot be written is returned with a FeatxWarning naming the folder."""
    def refuse(path, data, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("featx.compare.atomic_write", refuse)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 3)), np.repeat(["a", "b"], 10)
    with pytest.warns(FeatxWarning, match=r"cannot keep the cross-validation report in .*Permission denied.*computed"):
        report = cached_evaluate(X, y, folder=tmp_path / "reports", cv=2, inner_cv=2)
    assert not report["from_cache"] and 0 <= report["accuracy_mean"] <= 1
    assert not list((tmp_path / "reports").iterdir())


def test_compare_layers_needs_labels(tmp_path):
    """Check that an unlabelled source is refused with what is needed."""
    arrays, _ = make_images(n_per_class=2)
    with pytest.raises(FeatxError, match="has no labels"):
        compare_layers(arrays, backbones=TINY, layers=["stage1"], device="cpu", store=tmp_path)


def test_best_row_prefers_shallower_on_ties():
    """Check that the best row is the most accurate, the shallowest on a tie."""
    rows = [{"accuracy_mean": 0.9, "depth": 2}, {"accuracy_mean": 0.9, "depth": 1}, {"accuracy_mean": 0.8, "depth": 0}]
    assert best_row(rows)["depth"] == 1
    with pytest.raises(FeatxError, match="No rows"):
        best_row([])


def test_write_comparison_files_and_plot(tmp_path):
    """Check that CSV, JSON and a non-empty PNG are written for several backbones and poolings."""
    rows = [
        {"model": m, "layer": l, "depth": d, "pooling": p, "head": "logreg", "dim": 8, "accuracy_mean": 0.5 + d / 10,
         "accuracy_std": 0.02, "balanced_accuracy": 0.5, "macro_f1": 0.5, "chosen_params": {"classifier__C": 1.0},
         "n_images": 30, "n_classes": 3, "cv": 3, "extraction_time": 1.0, "fit_time": 0.1, "notes": []}
        for m in ["a", "b"] for p in ["avg", "spp"] for d, l in enumerate(["stem", "stage1", "pre_logits"])
    ]
    from featx.compare import write_comparison

    paths = write_comparison(rows, tmp_path / "out")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and paths["png"].stat().st_size > 10_000
    import csv
    import json

    assert len(list(csv.DictReader(paths["csv"].open()))) == 12
    assert json.loads(paths["json"].read_text())[0]["layer"] == "stem"


def test_select_layer_and_evaluate_auto_choose_informative_features():
    """Check that the informative feature set is chosen, inside every outer fold."""
    from featx.selection import evaluate_auto, select_layer

    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 12)
    informative = rng.normal(size=(36, 5)) + 3 * (y[:, None] == np.array(["a", "b", "c", "a", "b"]))
    candidates = {"stem/avg": rng.normal(size=(36, 5)), "stage2/avg": informative}
    choice = select_layer(candidates, y, cv=3)
    means = {row["name"]: row["mean"] for row in choice.table}
    assert choice.chosen == "stage2/avg" and means["stage2/avg"] > means["stem/avg"]
    report = evaluate_auto(candidates, y, cv=3)
    assert report["chosen_per_fold"] == ["stage2/avg"] * 3 and report["accuracy_mean"] > 0.9


def test_compare_layers_concatenated_sets_and_backbones(tmp_path):
    """Check rows for layer and backbone concatenations: width, feature-set names, standardised blocks."""
    arrays, labels = make_images(n_per_class=6)
    source = open_source(arrays, labels=labels)
    rows = compare_layers(source, backbones=[TINY, f"{TINY}+{TINY}"], layers="stage2/spp+pre_logits/avg,stage1",
                          cv=3, device="cpu", store=tmp_path)
    assert [(r["model"], r["features"], r["dim"]) for r in rows] == [
        (TINY, "stage2/spp+pre_logits/avg", 192),
        (TINY, "stage1/avg", 16),
        (f"{TINY}+{TINY}", f"{TINY}:stage2/spp+{TINY}:pre_logits/avg+{TINY}:stage2/spp+{TINY}:pre_logits/avg", 384),
        (f"{TINY}+{TINY}", f"{TINY}:stage1/avg+{TINY}:stage1/avg", 32),
    ]
    assert rows[0]["layer"] == "stage2+pre_logits" and rows[0]["pooling"] == "spp+avg"
    assert all(0 <= r["accuracy_mean"] <= 1 for r in rows)
def test_compare_layers_adds_a_finetuned_row_on_the_same_folds(tmp_path):
    """Check that finetune_from adds a 'finetune' row cross-validated on the frozen rows' folds."""
    from featx.finetuning import cross_validate_finetune

    arrays, labels = make_images(n_per_class=6)
    source = open_source(arrays, labels=labels)
    options = {"epochs": 2, "val_split": 0}
    rows = compare_layers(source, backbones=TINY, layers=["stage1", "pre_logits"], cv=3, device="cpu",
                          store=tmp_path, finetune_from="stage1", finetune_options=options)
    assert [(r["layer"], r["pooling"], r["head"]) for r in rows][-1] == ("stage1", "map", "finetune")
    row = rows[-1]
    assert row["dim"] == 16 * 8 * 8 and row["cv"] == 3 and row["n_images"] == 18 and row["depth"] == 0
    assert "same outer folds" in row["notes"][0]
    from featx.extraction import extract
    from featx.finetuning import read_maps

    result = extract(source, backbone=TINY, layers=["stage1"], pooling="map", store=tmp_path, dtype="float16",
                     device="cpu")
    assert result.n_computed == 0  # the row's maps were cached
    again = cross_validate_finetune(read_maps(result, "stage1"), labels, cv=3, backbone=TINY, layer="stage1",
                                    device="cpu", **options)
    assert again["accuracy_mean"] == row["accuracy_mean"]  # same folds, same seed: same figure
