import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.auto import (AutoResult, Candidate, FinetuneCandidate, FrozenCandidate, Search, auto_fit,
                        finetune_candidates, frozen_candidates, parse_budget)
from featx.cli import main
from featx.exceptions import FeatxError
from featx.images import open_source
from featx.models import load_model, predict

from conftest import TINY, make_images

OPTIONS = dict(backbones=TINY, cv=3, device="cpu", finetune="none")


@pytest.fixture
def source():
    arrays, labels = make_images(n_per_class=6)
    return open_source(arrays, labels=labels)


def _folder(root: Path, arrays, labels) -> Path:
    for i, (array, label) in enumerate(zip(arrays, labels)):
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / label / f"{i:02d}.png")
    return root


def test_parse_budget_units_and_errors():
    """Check that budgets read as seconds, minutes and hours, and that bad ones say the syntax."""
    assert parse_budget("15m") == 900 and parse_budget("1h") == 3600 and parse_budget("90s") == 90
    assert parse_budget("120") == 120 and parse_budget(2.5) == 2.5
    for bad in ("soon", "", "-5", 0, "10 minutes"):
        with pytest.raises(FeatxError, match="budget"):
            parse_budget(bad)


def test_frozen_candidates_grid_and_backbone_pairs():
    """Check the frozen grid: backbone x feature set x tta x head, plus each pair of backbones concatenated."""
    candidates = frozen_candidates(["a", "b"], ["pre_logits/avg", "stage4/spp+pre_logits/avg"], "none,hflip", "logreg")
    names = [c.name for c in candidates]
    assert len(names) == len(set(names)) == 2 * (2 * 2 + 1)
    assert "a+b pre_logits/avg tta=hflip logreg" in names
    pair = next(c for c in candidates if c.backbones == ("a", "b"))
    assert pair.features == "a:pre_logits/avg+b:pre_logits/avg"
    assert isinstance(pair, Candidate) and pair.config["kind"] == "frozen"


def test_auto_fit_leaderboard_best_first_and_model_predicts(source, tmp_path):
    """Check the leaderboard rows (configuration, CV accuracy ± std, seconds), the ranking, and the saved winner."""
    result = auto_fit(source, budget="10m", feature_sets=["stage1/avg", "stage2/spp+pre_logits/avg"],
                      ttas="none,hflip", heads="logreg,linear-svm", store=tmp_path, **OPTIONS)
    assert isinstance(result, AutoResult)
    scored = [row for row in result.leaderboard if row["rank"] is not None]
    assert [row["rank"] for row in scored] == list(range(1, len(scored) + 1))
    assert [row["accuracy_mean"] for row in scored] == sorted((row["accuracy_mean"] for row in scored), reverse=True)
    assert result.best["status"].startswith("scored") and result.best["within_1se"] and result.best["chosen"]
    assert result.best["configuration"] == result.selection.chosen and scored[0]["configuration"] == result.selection.best
    # the table is in the search's order (cheapest estimate first): the chosen is its first row within 1 SE
    assert next(row["name"] for row in result.selection.table if row["within"]) == result.selection.chosen
    assert {row["name"] for row in result.selection.table} == {row["configuration"] for row in scored}
    first_head = {row["configuration"] for row in scored if row["head"] == "logreg"}
    assert len(first_head) == 4  # every feature set and tta with the first head
    assert {"linear-svm"} == {row["head"] for row in scored} - {"logreg"}  # the others on the best ones only
    concatenated = next(row for row in scored if row["features"] == "stage2/spp+pre_logits/avg")
    assert concatenated["dim"] == 160 + 32
    assert all(row["seconds"] >= 0 and 0 <= row["accuracy_std"] <= 1 for row in scored)
    assert {(e["backbone"], e["tta"]) for e in result.extractions} == {(TINY, "none"), (TINY, "hflip")}
    assert result.model.info["auto"]["configuration"] == result.best["config"]
    labels = [row["label"] for row in predict(result.model, source)]
    assert np.mean(np.array(labels) == source.labels) > 0.8
    json.dumps(result.to_json())


def test_auto_fit_second_run_computes_nothing_twice(source, tmp_path):
    """Check that a repeated search reads features and CV reports back from the store."""
    options = dict(budget="10m", feature_sets="pre_logits/avg", ttas="none", heads="logreg", store=tmp_path, **OPTIONS)
    first = auto_fit(source, **options)
    second = auto_fit(source, **options)
    assert first.extractions[0]["n_computed"] == len(source) and second.extractions[0]["n_computed"] == 0
    assert second.leaderboard[0]["status"] == "scored (report from the store)"
    assert second.best["accuracy_mean"] == first.best["accuracy_mean"]


class _Plugged:
    """A candidate of another kind (as fine-tuning will be): fixed estimate, fixed score, refits a frozen model."""

    def __init__(self, name, seconds, accuracy):
        self.name, self.seconds, self.accuracy = name, seconds, accuracy
        self.config = {"kind": "plugged", "backbone": TINY}
        self.scored = False

    def estimate(self, search):
        return self.seconds

    def score(self, search):
        self.scored = True
        assert search.source is not None and search.cv == 3
        return {"accuracy_mean": self.accuracy, "accuracy_std": 0.0, "cv": search.cv}

    def refit(self, search):
        return FrozenCandidate((TINY,), (("stage1", "avg"),), None, "logreg").refit(search)


def test_auto_fit_extra_candidates_plug_in_and_budget_stops_them(source, tmp_path):
    """Check that other kinds of candidates are scheduled by their estimates, can win, and never start over budget."""
    cheap, costly = _Plugged("plugged cheap", 0.0, 1.01), _Plugged("plugged costly", 1e6, 1.02)
    result = auto_fit(source, budget="10m", feature_sets="stage1/avg", ttas="none", heads="logreg",
                      extra_candidates=[cheap, costly], store=tmp_path, **OPTIONS)
    assert cheap.scored and not costly.scored
    assert result.best["configuration"] == "plugged cheap" and result.best["kind"] == "plugged"
    skipped = next(row for row in result.leaderboard if row["configuration"] == "plugged costly")
    assert skipped["rank"] is None and skipped["status"].startswith("not run")
    alone, second = _Plugged("plugged alone", 1e6, 0.5), _Plugged("plugged second", 2e6, 0.6)
    result = auto_fit(source, budget=1, feature_sets="stage1/avg", ttas="none", heads="logreg",
                      extra_candidates=[second, alone], backbones=[], cv=3, device="cpu", store=tmp_path)
    assert alone.scored and not second.scored  # the cheapest always runs, so that there is a model; no other
    assert "started over budget" in result.best["status"] and result.best["configuration"] == "plugged alone"
    with pytest.raises(FeatxError, match="no candidate"):
        auto_fit(source, backbones=[], extra_candidates=[], store=tmp_path, cv=3, device="cpu", finetune="none")


def test_auto_fit_is_public():
    """Check that auto_fit is part of featx's public surface."""
    import featx

    assert featx.auto_fit is auto_fit and "auto_fit" in featx.__all__


def test_auto_fit_needs_a_cache_folder(source):
    """Check that a single .h5 store or no store is refused: the search needs one store per configuration."""
    for store in (None, "x.h5"):
        with pytest.raises(FeatxError, match="needs a cache folder"):
            auto_fit(source, store=store, **OPTIONS)


def test_cli_fit_auto_never_reads_the_evaluation_folder(tmp_path, capsys):
    """Check that 'featx fit --auto' opens files of DATA only, never of the evaluation folder, and evaluate works after."""
    arrays, labels = make_images(n_per_class=8, seed=3)
    train = _folder(tmp_path / "train", arrays[::2], labels[::2])
    val = _folder(tmp_path / "val", arrays[1::2], labels[1::2])
    opened: list[str] = []
    recording = [True]

    def hook(event, args):
        if recording[0] and event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed: this one records only while recording[0] is True
    model = tmp_path / "model.joblib"
    try:
        code = main(["fit", str(train), "--auto", "--budget", "5m", "--auto-models", TINY, "--auto-layers",
                     "stage1/avg,pre_logits/avg", "--auto-heads", "logreg", "--cv", "3", "--device", "cpu",
                     "--cache", str(tmp_path / "cache"), "--json", "-o", str(model)])
    finally:
        recording[0] = False
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["best"]["chosen"] and len(report["leaderboard"]) == 4
    assert report["selection"]["chosen"] == report["best"]["configuration"] and 0 <= report["selection"]["estimate"] <= 1
    assert any(path.startswith(str(train)) for path in opened)
    assert not [path for path in opened if path.startswith(str(val))]
    assert main(["evaluate", str(model), str(val), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 12
    assert load_model(model).info["auto"]["configuration"]["kind"] == "frozen"


def test_cli_fit_auto_prints_the_leaderboard(tmp_path, capsys, image_folder):
    """Check the human-readable leaderboard, the best line and the timings."""
    code = main(["fit", str(image_folder), "--auto", "--budget", "5m", "--auto-models", TINY, "--auto-layers",
                 "pre_logits/avg", "--auto-tta", "none", "--auto-heads", "logreg", "--cv", "2", "--device", "cpu",
                 "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "m.joblib")])
    out = capsys.readouterr().out
    assert code == 0
    assert "configuration" in out and "accuracy_mean" in out and "chosen: featx_tiny_cnn pre_logits/avg" in out
    assert "estimate of the whole search:" in out
    assert "of a 300 s budget" in out and (tmp_path / "m.joblib").is_file()
    assert main(["fit", str(image_folder), "--json", "-o", str(tmp_path / "x.joblib")]) == 1


def test_search_estimates_unmeasured_heads_from_measured_ones(source, tmp_path):
    """Check that an unmeasured head's evaluation estimate scales from a measured head, by its relative cost."""
    from featx.auto import _RELATIVE_COST

    search = Search(source, cv=5, inner_cv=3, random_state=0, store=tmp_path, weights="DEFAULT", dtype="float32",
                    batch_size=32, device="cpu", precision="auto", num_workers=0, on_error="skip", progress=False)
    before = search.evaluation_estimate("rbf-svm", 100)
    search.record_evaluation("logreg", len(source), 100, 10.0)
    assert search.evaluation_estimate("logreg", 100) == pytest.approx(10.0)
    assert search.evaluation_estimate("linear-svm", 100) == pytest.approx(10.0 * _RELATIVE_COST["linear-svm"])
    assert search.evaluation_estimate("rbf-svm", 200) == pytest.approx(20.0 * _RELATIVE_COST["rbf-svm"])
    assert search.evaluation_estimate("rbf-svm", 100) != before


def _search(source, store, cv=3):
    return Search(source, cv=cv, inner_cv=2, random_state=0, store=store, weights="DEFAULT", dtype="float32",
                  batch_size=32, device="cpu", precision="auto", num_workers=0, on_error="skip", progress=False)


def test_auto_fit_scores_a_finetuning_candidate_on_the_same_folds_and_reuses_it(source, tmp_path):
    """Check that a fine-tuning candidate is scored by CV on the outer folds, from maps, and read back on a rerun."""
    options = dict(budget="10m", feature_sets="pre_logits/avg", ttas="none", heads="logreg", store=tmp_path,
                   backbones=TINY, cv=3, device="cpu", finetune="stage1", finetune_epochs=2)
    first = auto_fit(source, **options)
    row = next(r for r in first.leaderboard if r["kind"] == "finetune")
    assert row["configuration"] == f"{TINY} finetune from stage1" and row["status"] == "scored"
    assert row["cv"] == 3 and row["dim"] == 16 * 8 * 8 and row["features"] == "stage1/map" and row["head"] == "finetune"
    assert 0 <= row["accuracy_mean"] <= 1
    maps = [e for e in first.extractions if e["maps"]]
    assert len(maps) == 1 and maps[0]["n_computed"] == len(source)
    second = auto_fit(source, **options)
    again = next(r for r in second.leaderboard if r["kind"] == "finetune")
    assert again["accuracy_mean"] == row["accuracy_mean"] and again["status"] == "scored (report from the store)"
    assert all(e["n_computed"] == 0 for e in second.extractions)


def test_finetune_candidate_estimate_refit_and_calibration(source, tmp_path):
    """Check the estimate (maps missing, then training only), the refit as a fine-tuned model, and the calibration."""
    candidate = FinetuneCandidate(TINY, "stage1", epochs=2)
    assert isinstance(candidate, Candidate) and candidate.config["kind"] == "finetune"
    search = _search(source, tmp_path)
    search.register(candidate)
    before = candidate.estimate(search)
    training = search.finetune_estimate(candidate)
    assert before > training > 0
    report = candidate.score(search)
    assert candidate.estimate(search) == pytest.approx(training)  # the maps are there now
    search.record_finetune(candidate, {**report, "from_cache": False}, 10 * training)
    assert search.finetune_estimate(candidate) > training
    model = candidate.refit(search)
    assert model.info["kind"] == "finetuned" and model.classes == sorted(set(source.labels))
    assert len(predict(model, source)) == len(source)


def test_finetune_candidates_follow_the_advisor_or_the_layers_given(source, monkeypatch):
    """Check that 'advise' adds the advised layers (none for small data), 'none' none, and bad layers fail loudly."""
    advice, candidates = finetune_candidates(source, [TINY], "advise", device="cpu")
    assert advice["size"] == "small" and advice["finetune_from"] == [] and candidates == []
    assert finetune_candidates(source, [TINY], "none") == (None, [])
    _, candidates = finetune_candidates(source, [TINY], "stage1,stage2", epochs=4)
    assert [(c.from_layer, c.epochs) for c in candidates] == [("stage1", 4), ("stage2", 4)]
    with pytest.raises(FeatxError, match="pre_logits"):
        finetune_candidates(source, [TINY], "pre_logits")
    import featx.advise

    def large(source, **kwargs):
        return {"size": "large", "finetune_from": ["stage5", "stage1"], "quadrant": "large data"}

    monkeypatch.setattr(featx.advise, "advise", large)
    advice, candidates = finetune_candidates(source, [TINY], "advise")
    assert [c.from_layer for c in candidates] == ["stage1"]  # the tiny network has no stage5: said, not hidden
    assert len(advice["finetune_skipped"]) == 1 and "stage5" in advice["finetune_skipped"][0]


def test_cli_fit_auto_finetune_option_adds_a_scored_row(tmp_path, capsys):
    """Check that --auto-finetune LAYERS adds fine-tuning rows to the leaderboard and the advisor is not asked."""
    arrays, labels = make_images(n_per_class=8, seed=5)
    train = _folder(tmp_path / "train", arrays, labels)
    code = main(["fit", str(train), "--auto", "--budget", "5m", "--auto-models", TINY, "--auto-layers", "pre_logits/avg",
                 "--auto-tta", "none", "--auto-heads", "logreg", "--auto-finetune", "stage1", "--auto-finetune-epochs", "2",
                 "--cv", "3", "--device", "cpu", "--cache", str(tmp_path / "cache"), "--json", "-o", str(tmp_path / "m")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    kinds = {row["kind"]: row for row in report["leaderboard"]}
    assert kinds["finetune"]["status"] == "scored" and kinds["finetune"]["cv"] == 3
    assert report["advice"] is None and any(e["maps"] for e in report["extractions"])


def test_search_counts_the_store_warm_after_one_extraction(source, tmp_path):
    """Check that after one extraction of the registered layers, the search estimates no extraction work."""
    from featx.extraction import extract

    search = _search(source, tmp_path)
    candidate = FrozenCandidate((TINY,), (("pre_logits", "avg"),), None, "logreg")
    search.register(candidate)
    assert search.missing_images(TINY, None) == len(source)
    extract(source, backbone=TINY, layers=["pre_logits"], pooling=["avg"], store=tmp_path, device="cpu",
            num_workers=0)
    fresh = _search(source, tmp_path)
    fresh.register(candidate)
    assert fresh.missing_images(TINY, None) == 0
    assert fresh.extraction_estimate(TINY, None) == 0.0


def test_cli_fit_auto_reports_skipped_images_before_the_search(tmp_path, capsys):
    """Check that 'featx fit --auto' lists the broken files once, right after extracting, before any candidate's
    score line."""
    arrays, labels = make_images(n_per_class=6, n_classes=2, seed=4)
    data = _folder(tmp_path / "data", arrays, labels)
    for i in range(2):
        (data / labels[i] / f"broken{i}.png").write_text(f"not an image {i}")
    assert main(["fit", str(data), "--auto", "--budget", "5m", "--auto-models", TINY, "--auto-layers",
                 "stage1/avg,pre_logits/avg", "--auto-tta", "none", "--auto-heads", "logreg", "--cv", "3",
                 "--device", "cpu", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "m.joblib")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines.count("featx: warning: skipped 2 of 14 images:") == 1
    scores = [i for i, line in enumerate(lines) if "tta=none logreg: accuracy" in line]
    assert len(scores) == 2 and lines.index("featx: warning: skipped 2 of 14 images:") < scores[0]


def test_auto_fit_starts_from_the_choice_of_featx_fit(source, tmp_path, monkeypatch):
    """Check that with the default feature sets the search scores featx fit's --layers auto choice and prefers it."""
    from featx import auto
    from featx.models import fit_model

    model, _ = fit_model(source, backbone=TINY, layers="auto", store=tmp_path, device="cpu", progress=False)
    chosen = model.info["selection"]["chosen"]
    grid = ("pre_logits/avg", "stage2/avg")
    monkeypatch.setattr(auto, "DEFAULT_FEATURE_SETS", grid)
    result = auto_fit(source, budget="10m", feature_sets=grid, ttas="none", heads="logreg", store=tmp_path,
                      concat_backbones=False, **OPTIONS)
    default = f"{TINY} {chosen} tta=none logreg"
    assert default in [row["configuration"] for row in result.leaderboard]
    assert result.selection.table[0]["name"] == default  # first in the rule's order
    if result.selection.table[0]["within"]:
        assert result.selection.chosen == default
    plain = auto_fit(source, budget="10m", feature_sets=["stage2/avg"], ttas="none", heads="logreg", store=tmp_path,
                     concat_backbones=False, **OPTIONS)
    assert [row["configuration"] for row in plain.leaderboard] == [f"{TINY} stage2/avg tta=none logreg"]


def test_default_candidate_weighs_the_layers_shallow_to_deep(source, tmp_path, monkeypatch):
    """Check that default_candidate hands select_layer every layer under avg and spp in depth order, whatever the
    search registered first (layer_preference reads the depth from that order)."""
    from featx import auto, selection

    seen, original = {}, selection.select_layer

    def select(blocks, y, **kwargs):
        seen["names"] = list(blocks)
        return original(blocks, y, **kwargs)

    monkeypatch.setattr(selection, "select_layer", select)
    search = Search(source, store=tmp_path, cv=3, inner_cv=3, random_state=0, device="cpu")
    search.register(FrozenCandidate((TINY,), (("pre_logits", "avg"), ("stage2", "spp")), None, "logreg"))
    candidate = auto.default_candidate(search, TINY, "logreg", None)
    assert seen["names"] == ["stem/avg", "stem/spp", "stage1/avg", "stage1/spp", "stage2/avg", "stage2/spp",
                             "stage3/avg", "stage3/spp", "pre_logits/avg"]
    assert candidate.backbones == (TINY,) and f"{candidate.pairs[0][0]}/{candidate.pairs[0][1]}" in seen["names"]
