"""Tests of featx.selection: the one-standard-error rule and the selection bias."""

import numpy as np
import pytest

from featx.selection import bootstrap_estimate, one_standard_error


def test_one_standard_error_keeps_the_simplest_within_the_noise():
    """Check that a candidate better only by noise loses to the first one in preference order."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.7, 0.9, size=15)
    noisy = base + rng.normal(0, 0.05, size=15) + 0.005
    choice = one_standard_error({"complex": noisy, "simple": base}, preference=["simple", "complex"])
    assert choice.best == "complex" and choice.chosen == "simple"
    assert [row["name"] for row in choice.table] == ["simple", "complex"]
    assert [row["chosen"] for row in choice.table] == [True, False]


def test_one_standard_error_takes_a_clearly_better_candidate():
    """Check that a candidate better on every fold by far more than the noise is chosen."""
    base = np.array([0.70, 0.72, 0.68, 0.71, 0.69])
    choice = one_standard_error({"simple": base, "better": base + 0.15}, preference=["simple"])
    assert choice.chosen == choice.best == "better"
    assert choice.estimate == pytest.approx(np.mean(base) + 0.15, abs=0.01)


def test_one_standard_error_resists_the_winners_curse():
    """Check that among many equal candidates the preferred one is kept and the estimate is not the maximum."""
    rng = np.random.default_rng(1)
    truth = 0.8
    folds = {f"c{i}": np.clip(truth + rng.normal(0, 0.06, size=10), 0, 1) for i in range(30)}
    choice = one_standard_error(folds, preference=["c0"])
    best_mean = max(np.mean(v) for v in folds.values())
    assert choice.chosen == "c0"
    assert best_mean > truth + 0.015  # the winner's curse is there to resist
    assert abs(choice.estimate - truth) < abs(best_mean - truth)


def test_one_standard_error_compares_other_fold_counts_with_the_best_own_error():
    """Check that a candidate scored on other folds is judged by the best's standard error, not paired."""
    choice = one_standard_error({"a": [0.8, 0.9, 0.85], "b": [0.84, 0.84]}, preference=["b", "a"])
    row = {r["name"]: r for r in choice.table}["b"]
    assert row["se"] == pytest.approx(np.std([0.8, 0.9, 0.85], ddof=1) / np.sqrt(3))
    assert choice.chosen == "b"


def test_bootstrap_estimate_scores_the_rule_not_its_winner():
    """Check that, over many simulated searches among equal candidates, the estimate is nearer the truth than the luckiest mean."""
    errors, curses = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        folds = {f"c{i}": 0.8 + rng.normal(0, 0.05, size=12) for i in range(20)}
        curses.append(max(np.mean(v) for v in folds.values()) - 0.8)
        errors.append(bootstrap_estimate(folds, preference=list(folds)[::-1], n_boot=200) - 0.8)
    assert np.mean(curses) > 0.02  # the winner's curse is there
    assert abs(np.mean(errors)) < np.mean(curses) / 2


def test_bootstrap_estimate_falls_back_to_the_mean_with_few_folds():
    """Check that with two folds the chosen candidate's own mean is returned, and one candidate gives its mean."""
    assert bootstrap_estimate({"a": [0.5, 0.7], "b": [0.6, 0.6]}) == pytest.approx(0.6)
    assert bootstrap_estimate({"a": [0.5, 0.7, 0.6, 0.8]}) == pytest.approx(0.65, abs=0.05)


@pytest.mark.parametrize("scores, match", [
    ({}, "at least one candidate"),
    ({"a": []}, "non-empty list of finite fold scores"),
    ({"a": [0.5, float("nan")]}, "non-empty list of finite fold scores"),
])
def test_one_standard_error_rejects_bad_scores(scores, match):
    """Check that empty or non-finite fold scores fail with what was expected."""
    with pytest.raises(ValueError, match=match):
        one_standard_error(scores)


def test_select_layer_says_how_it_scored_the_candidates():
    """Check that select_layer keeps its head, folds and repeats, says them in words, and survives to_dict."""
    from featx.selection import Selection, select_layer

    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 15)
    candidates = {"stage2/avg": rng.normal(size=(30, 4)) + 3 * (y == "a")[:, None],
                  "pre_logits/avg": rng.normal(size=(30, 4))}
    choice = select_layer(candidates, y, cv=3)
    assert (choice.head, choice.cv, choice.repeats) == ("logreg", 3, 3)
    assert choice.table[0]["n_folds"] == 9
    assert choice.scored_by() == ("2 feature sets scored by logreg with its default parameters on 9 stratified "
                                  "folds (3-fold CV repeated 3 times, as below 500 images)")
    assert Selection(**choice.to_dict()) == choice
    assert one_standard_error({"a": [0.9, 0.8]}).scored_by() == "1 feature set scored on 2 folds"


def test_feature_sets_weigh_avg_and_spp_of_every_map_and_a_vector_once(tmp_path):
    """Check that layers='auto' candidates are avg and spp of every spatial layer, and one pooling of a vector layer."""
    from featx.extraction import extract
    from featx.selection import auto_poolings, feature_sets

    images = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    result = extract(images, backbone="featx_tiny_cnn", layers="all", pooling=auto_poolings("avg"), device="cpu",
                     store=tmp_path)
    names = list(feature_sets(result, "featx_tiny_cnn"))
    assert "stage1/avg" in names and "stage1/spp" in names
    assert "pre_logits/avg" in names and "pre_logits/spp" not in names
    assert auto_poolings(["max"]) == ("max",)
