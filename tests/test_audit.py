"""Tests of featx.audit: planted duplicates, near-duplicates, leaks and flipped labels are found."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import colour_pixels, make_images
from PIL import Image

from featx.audit import (
    AuditResult,
    audit,
    audit_page,
    class_balance,
    cosine_pairs,
    exact_duplicates,
    label_issues,
    out_of_fold_probabilities,
)
from featx.cli import main
from featx.exceptions import FeatxError
from featx.images import open_source

TINY = "featx_tiny_cnn"
#: The tiny random CNN's features tell distinct synthetic scenes apart only by where things are: its
#: stage2 features with spp pooling, where a resized or re-encoded copy keeps >= 0.998 and two
#: distinct scenes stay <= 0.996 (measured on 60 scenes below).
FEATURES = {"backbone": TINY, "layers": "stage2", "pooling": "spp", "device": "cpu"}
TINY_THRESHOLD = 0.997
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230]])


def scene(rng, colour, size: int = 48) -> np.ndarray:
    """A background of the class colour with three discs of random greys at random places."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.ones((size, size, 3)) * colour
    for _ in range(3):
        cx, cy = rng.uniform(0.15, 0.85, 2)
        radius = rng.uniform(0.08, 0.18)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < radius * radius] = rng.integers(0, 256)
    return image.astype(np.uint8)


def jpeg_copy(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def write_set(root: Path, n_per_class: int, seed: int) -> dict[str, list[Path]]:
    """Scenes in three class folders, as PNG files; returns each class's files."""
    rng = np.random.default_rng(seed)
    files: dict[str, list[Path]] = {}
    for label, colour in enumerate(COLOURS):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            path = folder / f"s{seed}_{label}_{i:02d}.png"
            Image.fromarray(scene(rng, colour)).save(path)
            files.setdefault(f"class{label}", []).append(path)
    return files


@pytest.fixture
def planted(tmp_path):
    """A training set with planted exact copies, resized / re-encoded copies and flipped labels, and a
    validation set with planted leaks; returns the folders and what was planted."""
    train, val = tmp_path / "train", tmp_path / "val"
    files = write_set(train, 10, seed=1)
    write_set(val, 4, seed=2)
    a, b, c = files["class0"], files["class1"], files["class2"]
    # exact copies: one with a conflicting label, one with the same label
    shutil.copy(a[0], train / "class1" / "copy_of_a0.png")
    shutil.copy(b[1], train / "class1" / "copy_of_b1.png")
    # near-duplicates: resized, re-encoded, both
    Image.open(a[2]).resize((36, 36), Image.BILINEAR).save(train / "class0" / "small_a2.png")
    jpeg_copy(Image.open(b[3]), 70).save(train / "class1" / "jpeg_b3.jpg", quality=95)
    jpeg_copy(Image.open(c[4]).resize((72, 72), Image.BICUBIC), 60).save(train / "class2" / "big_jpeg_c4.jpg",
                                                                           quality=90)
    # flipped labels: scenes of one class filed in another
    shutil.move(a[5], train / "class2" / "flipped_a5.png")
    shutil.move(c[6], train / "class1" / "flipped_c6.png")
    # leaks into the validation set: a byte copy and a re-encoded copy
    shutil.copy(b[7], val / "class1" / "leak_b7.png")
    jpeg_copy(Image.open(c[8]), 80).save(val / "class2" / "leak_c8.jpg", quality=95)
    return {"train": train, "val": val, "a": a, "b": b, "c": c}


def _names(rows, *columns):
    return {tuple(sorted(Path(row[c]).name for c in columns)) for row in rows}


# --------------------------------------------------------------------------- tables from arrays


def test_exact_duplicates_finds_groups_and_conflicts():
    """Check that images with one key form a group, conflicting when their labels differ."""
    keys = ["k1", "k2", "k1", "k3", "k3", "k3", None, None]
    rows = exact_duplicates(keys, [f"i{n}" for n in range(8)], ["a", "b", "b", "c", "c", "c", "a", "a"])
    assert [(row["positions"], row["conflicting"]) for row in rows] == [([3, 4, 5], False), ([0, 2], True)]
    assert [row["group"] for row in rows] == [1, 2]


def test_exact_duplicates_clean_set_has_none():
    """Check that distinct keys (and unreadable images) give no group, with or without labels."""
    assert exact_duplicates(["a", "b", "c", None, None], list("vwxyz"), list("ppqqq")) == []
    assert exact_duplicates(["a", "b"], ["x", "y"]) == []


def test_cosine_pairs_finds_planted_near_copies():
    """Check that slightly perturbed copies are found, and distinct random vectors are not."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 64))
    copies = X[[3, 17]] * 2.0 + rng.normal(scale=0.02, size=(2, 64))  # scale does not matter to cosine
    pairs = cosine_pairs(np.vstack([X, copies]), threshold=0.95)
    assert [(i, j) for i, j, _ in pairs] == [(3, 50), (17, 51)] or [(i, j) for i, j, _ in pairs] == [(17, 51), (3, 50)]
    assert all(s > 0.99 for _, _, s in pairs)
    leaks = cosine_pairs(X, copies, threshold=0.95)
    assert sorted((i, j) for i, j, _ in leaks) == [(3, 0), (17, 1)]


def test_cosine_pairs_blocks_give_every_pair_once(monkeypatch):
    """Check that the similarity computed in blocks lists each pair once, as in one block."""
    rng = np.random.default_rng(1)
    X = np.repeat(rng.normal(size=(7, 8)), 3, axis=0)  # 7 triples of identical rows
    whole = cosine_pairs(X, threshold=0.999)
    monkeypatch.setattr("featx.audit._BLOCK", 4)
    assert cosine_pairs(X, threshold=0.999) == whole
    assert len(whole) == 7 * 3


def test_cosine_pairs_rejects_mismatched_widths():
    """Check that X and Y of different widths are refused with both widths named."""
    with pytest.raises(FeatxError, match="X has 2 features but Y has 3"):
        cosine_pairs([[1.0, 0.0]], [[1.0, 0.0, 0.0]])


def test_out_of_fold_probabilities_flag_flipped_labels():
    """Check that flipped labels of well separated clusters get a low given-label probability, and are ranked first."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(3, 16))
    X = np.vstack([centre + rng.normal(size=(20, 16)) for centre in centres])
    y = np.repeat(["a", "b", "c"], 20)
    flipped = [4, 27, 50]
    y[4], y[27], y[50] = "b", "c", "a"
    probabilities, classes = out_of_fold_probabilities(X, y, cv=5)
    rows = label_issues(probabilities, y, classes)
    assert sorted(row["position"] for row in rows) == flipped
    assert {row["position"]: row["suggested"] for row in rows} == {4: "a", 27: "b", 50: "c"}
    assert [row["rank"] for row in rows] == [1, 2, 3]


def test_out_of_fold_probabilities_leave_out_a_class_of_one():
    """Check that a class of one image gets NaN rows (it cannot be held out) and the others are predicted."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(13, 4))
    y = np.array(["a"] * 6 + ["b"] * 6 + ["c"])
    probabilities, classes = out_of_fold_probabilities(X, y, cv=5)
    assert classes == ["a", "b", "c"]
    assert np.isnan(probabilities[12]).all() and not np.isnan(probabilities[:12]).any()
    np.testing.assert_allclose(probabilities[:12].sum(axis=1), 1.0)


def test_label_issues_needs_both_conditions():
    """Check that a low given-label probability alone (no other class high) is no label issue."""
    P = [[0.15, 0.45, 0.40], [0.1, 0.8, 0.1], [np.nan] * 3]
    rows = label_issues(P, ["a", "a", "a"], ["a", "b", "c"], ["x.png", "y.png", "z.png"])
    assert [(row["image"], row["suggested"]) for row in rows] == [("y.png", "b")]


def test_class_balance_counts_both_sets():
    """Check that class balance counts each class of the data and of the other set."""
    rows = class_balance(["a", "a", "b"], ["b", "c"])
    assert [(r["class"], r["n_images"], r["n_against"]) for r in rows] == [("a", 2, 0), ("b", 1, 1), ("c", 0, 1)]


# --------------------------------------------------------------------------- the audit end to end


def test_audit_finds_every_planted_duplicate_and_leak(planted, tmp_path):
    """Check that the audit finds every planted duplicate, near-duplicate and leak, and nothing else."""
    result = audit(str(planted["train"]), against=str(planted["val"]), threshold=TINY_THRESHOLD, store=tmp_path / "s",
                   cv=5, **FEATURES)
    assert isinstance(result, AuditResult) and result.n_images == 35 and result.n_against == 14
    exact = {tuple(sorted(Path(p).name for p in row["images"])): row["conflicting"] for row in result.exact_duplicates}
    assert exact == {("copy_of_a0.png", planted["a"][0].name): True, ("copy_of_b1.png", planted["b"][1].name): False}
    near = _names(result.near_duplicates, "image_a", "image_b")
    assert near == {tuple(sorted(pair)) for pair in [("small_a2.png", planted["a"][2].name),
                                                     ("jpeg_b3.jpg", planted["b"][3].name),
                                                     ("big_jpeg_c4.jpg", planted["c"][4].name)]}
    assert {(row["kind"], Path(row["image"]).name, Path(row["other_image"]).name) for row in result.leaks} == {
        ("exact", planted["b"][7].name, "leak_b7.png"), ("near", planted["c"][8].name, "leak_c8.jpg")}
    assert [row["n_images"] for row in result.class_balance] == [10, 14, 11]
    assert [row["n_against"] for row in result.class_balance] == [4, 5, 5]


def test_audit_finds_flipped_labels(tmp_path):
    """Check that images filed under the wrong class are the likely label errors, with their true class suggested.

    Colour classes, which the tiny CNN's pre_logits/avg features separate (its spatial features, above, are for
    near-duplicates and too noisy for a head on a few dozen images).
    """
    arrays, labels = make_images(n_per_class=8, n_classes=3, seed=5)
    labels[[3, 12]] = ["class2", "class0"]  # a class-0 image filed as class 2, a class-1 one as class 0
    result = audit(open_source(list(arrays), labels=labels), backbone=TINY, device="cpu", store=tmp_path, cv=4)
    assert sorted((row["position"], row["label"], row["suggested"]) for row in result.label_issues) == [
        (3, "class2", "class0"), (12, "class0", "class1")]
    assert all(row["label_probability"] < 0.2 < 0.5 < row["suggested_probability"] for row in result.label_issues)


def test_audit_clean_set_gives_no_duplicate_alarm(tmp_path):
    """Check that a clean set of distinct scenes has no exact duplicate, no near-duplicate and no leak."""
    write_set(tmp_path / "train", 8, seed=3)
    write_set(tmp_path / "val", 3, seed=4)
    result = audit(str(tmp_path / "train"), against=str(tmp_path / "val"), threshold=TINY_THRESHOLD,
                   store=tmp_path / "s", cv=3, **FEATURES)
    assert (result.exact_duplicates, result.near_duplicates, result.leaks, result.label_issues) == ([], [], [], [])


def test_audit_after_cv_computes_nothing(image_folder, tmp_path, capsys):
    """Check that 'featx audit' after 'featx cv' on the same data extracts no image again."""
    cache = str(tmp_path / "cache")
    assert main(["cv", str(image_folder), "--model", TINY, "--device", "cpu", "--cache", cache, "--cv", "3",
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["audit", str(image_folder), "--model", TINY, "--device", "cpu", "--cache", cache, "--cv", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_computed"] == 0 and out["n_images"] == 12
    result = audit(str(image_folder), backbone=TINY, device="cpu", store=cache, cv=3)
    assert result.n_computed == 0


def test_audit_unlabelled_source_lists_duplicates_only(tmp_path):
    """Check that an unlabelled set gets its duplicates and a note, and no label table."""
    rng = np.random.default_rng(0)
    images = [scene(rng, COLOURS[i % 3]) for i in range(6)]
    images.append(images[2].copy())
    result = audit(open_source(images), store=tmp_path, threshold=TINY_THRESHOLD, **FEATURES)
    assert [row["positions"] for row in result.exact_duplicates] == [[2, 6]]
    assert result.exact_duplicates[0]["labels"] is None
    assert (result.label_issues, result.class_balance) == ([], [])
    assert result.notes == ["<memory> has no labels: no label issues nor class balance."]


def test_audit_notes_features_that_do_not_separate_the_images(tmp_path):
    """Check that a threshold at which most images have a near-duplicate adds the note that says so."""
    rng = np.random.default_rng(0)
    images = [scene(rng, COLOURS[i % 3]) for i in range(6)]
    result = audit(open_source(images), store=tmp_path, threshold=0.5, **FEATURES)
    assert len(result.near_duplicates) == 15
    assert any("6 of 6 distinct images have a near-duplicate at similarity 0.5" in note for note in result.notes)


def test_audit_rejects_several_feature_sets_and_no_store(tmp_path):
    """Check that several layers, no store, a threshold that is no similarity or one fold are refused before anything
    is extracted."""
    with pytest.raises(FeatxError, match="one feature set, but 2 were asked for"):
        audit(np.zeros((2, 8, 8, 3), np.uint8), backbone=TINY, layers="stage1,stage2", store=tmp_path)
    with pytest.raises(FeatxError, match="store=None was given"):
        audit(np.zeros((2, 8, 8, 3), np.uint8), backbone=TINY, store=None)
    with pytest.raises(FeatxError, match=r"threshold must be a cosine similarity in \(0, 1\], got 95"):
        audit(np.zeros((2, 8, 8, 3), np.uint8), backbone=TINY, store=tmp_path, threshold=95)
    with pytest.raises(FeatxError, match="cv must be a whole number of folds >= 2, got 1"):
        audit(np.zeros((2, 8, 8, 3), np.uint8), backbone=TINY, store=tmp_path, cv=1)


def test_audit_to_dict_is_json(planted, tmp_path):
    """Check that the result's dict is JSON and holds every table, and to_pandas refuses an unknown table."""
    result = audit(str(planted["val"]), threshold=TINY_THRESHOLD, store=tmp_path, cv=3, **FEATURES)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(AuditResult.TABLES) <= set(data) and data["features"] == "stage2/spp"
    with pytest.raises(FeatxError, match="Unknown audit table 'leak'"):
        result.to_pandas("leak")


# --------------------------------------------------------------------------- the page


@pytest.fixture
def planted_audit(planted, tmp_path):
    return audit(str(planted["train"]), against=str(planted["val"]), threshold=TINY_THRESHOLD, store=tmp_path / "s",
                 cv=5, **FEATURES)


def test_audit_page_shows_every_finding(planted_audit):
    """Check that the page has a thumbnail per image of every group, pair, leak and label issue, and the balance table."""
    text = audit_page(planted_audit).render()
    expected = 2 * 2 + 3 * 2 + 2 * 2 + len(planted_audit.label_issues)
    assert text.count("<img") == expected
    assert "Exact duplicates: 2 groups, 1 with conflicting labels" in text and "group 1: conflicting labels" in text
    assert "class1/copy_of_a0.png" in text and "Class balance" in text and text.count("<table>") == 1


def test_audit_page_refuses_a_result_without_source():
    """Check that a result without its source (nothing to make thumbnails of) is refused with the fix."""
    with pytest.raises(FeatxError, match="holds no source"):
        audit_page(AuditResult())


def test_audit_page_renders_in_chromium(planted_audit, chromium, tmp_path):
    """Check in headless Chromium that every thumbnail of the audit page loads and its table shows, and that the
    screenshot holds the three class colours of the thumbnails."""
    page = tmp_path / "audit.html"
    audit_page(planted_audit).write(page)
    seen = chromium.check(page)
    n_images = 2 * 2 + 3 * 2 + 2 * 2 + len(planted_audit.label_issues)
    assert seen["images"] == seen["loaded"] == n_images and seen["broken"] == []
    assert seen["tables"] == 1 and seen["table_rows"] == 3
    assert {"Class balance", "Exact duplicates: 2 groups, 1 with conflicting labels"} <= set(seen["headings"])
    shot = chromium.screenshot(page, tmp_path / "audit.png", width=1200, height=seen["height"] + 50)
    for colour in COLOURS:  # each class has a group or pair on the page; the background is most of a 96×96 box
        assert colour_pixels(shot, colour) > 0.5 * 96 * 96


# --------------------------------------------------------------------------- the command


def test_cli_audit_prints_tables(planted, tmp_path, capsys):
    """Check that 'featx audit' prints a heading and table per finding, with paths relative to DATA, and --html
    writes the page."""
    page = tmp_path / "audit.html"
    code = main(["audit", str(planted["train"]), "--against", str(planted["val"]), "--model", TINY, "--layers",
                 "stage2", "--pool", "spp", "--device", "cpu", "--cache", str(tmp_path), "--threshold",
                 str(TINY_THRESHOLD), "--limit", "1", "--html", str(page)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"wrote {page}" in out and page.read_text().startswith("<!DOCTYPE html>")
    assert "exact duplicates (same content key): 2 groups, 1 with conflicting labels" in out
    assert "near-duplicates (cosine similarity >= 0.997): 3 pairs" in out
    assert "leaks into" in out and "(1 exact, 1 near)" in out
    assert "... and 2 more (--limit 0 lists them all" in out
    assert "class1/copy_of_a0.png" in out and str(planted["train"]) + "/class1/copy_of_a0.png" not in out
    assert "class balance" in out


def test_cli_audit_one_line_error_for_several_layers(image_folder, tmp_path, capsys):
    """Check that 'featx audit --layers all' fails with one line and exit code 1."""
    code = main(["audit", str(image_folder), "--model", TINY, "--layers", "all", "--cache", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "one feature set" in err


def test_cli_audit_refuses_html_in_a_missing_folder(image_folder, tmp_path, capsys):
    """Check that --html in a folder that does not exist is refused in one line before anything is extracted."""
    code = main(["audit", str(image_folder), "--model", TINY, "--cache", str(tmp_path / "cache"), "--html",
                 str(tmp_path / "nowhere" / "audit.html")])
    err = capsys.readouterr().err
    assert code == 1 and "--html" in err and "does not exist" in err and not (tmp_path / "cache").exists()
