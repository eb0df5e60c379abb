import joblib
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from featx.exceptions import FeatxError
from featx.images import open_source
from featx.models import ModelFileError, evaluate_model, fit_model, load_model, predict, save_model

from conftest import TINY, make_images


@pytest.fixture
def folders(tmp_path):
    """Train and validation folders of class sub-folders, plus one broken file to predict."""
    arrays, labels = make_images(n_per_class=8, n_classes=3, seed=1)
    roots = {"train": tmp_path / "train", "val": tmp_path / "val"}
    for i, (array, label) in enumerate(zip(arrays, labels)):
        root = roots["val" if i % 4 == 0 else "train"]
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / label / f"{i:02d}.png")
    return roots


def test_fit_save_load_predict_round_trip_matches_in_memory_pipeline(folders, tmp_path):
    """Check that predictions after save and load equal the in-memory pipeline's."""
    model, result = fit_model(str(folders["train"]), backbone=TINY, layer="stage2", pooling="spp", device="cpu")
    assert result.n_computed == 18 and model.classes == ["class0", "class1", "class2"]
    path = tmp_path / "model.joblib"
    save_model(model, path)
    assert path.stat().st_size < 1_000_000
    loaded = load_model(path)
    val = open_source(str(folders["val"]))
    rows = predict(loaded, val)
    expected = model.pipeline.predict([str(p) for p in val.items])
    assert [row["label"] for row in rows] == list(expected)
    assert all(abs(sum(v for k, v in row.items() if k.startswith("p_")) - 1) < 1e-6 for row in rows)
    report = evaluate_model(loaded, val)
    assert report["accuracy"] == pytest.approx(float(np.mean(expected == val.labels)))
    assert report["n_images"] == 6 and sum(map(sum, report["confusion_matrix"])) == 6


def test_predict_reports_bad_images_and_keeps_order(folders, tmp_path):
    """Check that a bad image gets an error row in place and the others are predicted."""
    model, _ = fit_model(str(folders["train"]), backbone=TINY, layer="stage1", device="cpu")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    good = sorted(str(p) for p in folders["val"].rglob("*.png"))[:2]
    rows = predict(model, [good[0], str(bad), good[1]])
    assert [row["label"] is None for row in rows] == [False, True, False]
    assert "empty file" in rows[1]["error"]


def test_evaluate_model_unknown_class_is_refused(folders, tmp_path):
    """Check that held-out data with a class the model never saw is refused by name."""
    model, _ = fit_model(str(folders["train"]), backbone=TINY, layer="stage1", device="cpu")
    extra = folders["val"] / "class9"
    extra.mkdir()
    Image.new("RGB", (40, 40)).save(extra / "x.png")
    with pytest.raises(FeatxError, match=r"classes the model was not trained on: \['class9'\]"):
        evaluate_model(model, str(folders["val"]))


def test_fit_model_needs_labels(folders):
    """Check that fitting on an unlabelled source says what is needed."""
    paths = [str(p) for p in folders["val"].rglob("*.png")]
    with pytest.raises(FeatxError, match="has no labels"):
        fit_model(paths, backbone=TINY, device="cpu")


def test_load_model_refuses_other_files(tmp_path):
    """Check that a missing file, a non-model pickle and an old format are refused with the fix."""
    with pytest.raises(ModelFileError, match="does not exist.*featx fit"):
        load_model(tmp_path / "none.joblib")
    joblib.dump(LogisticRegression(), tmp_path / "other.joblib")
    with pytest.raises(ModelFileError, match="not a featx model file"):
        load_model(tmp_path / "other.joblib")
    joblib.dump({"format": "featx-model", "format_version": 0, "featx_version": "0.0.1"}, tmp_path / "old.joblib")
    with pytest.raises(ModelFileError, match=r"written by featx 0\.0\.1.*Refit"):
        load_model(tmp_path / "old.joblib")
    (tmp_path / "garbage.joblib").write_bytes(b"\x00garbage")
    with pytest.raises(ModelFileError, match="Cannot read model file"):
        load_model(tmp_path / "garbage.joblib")


def test_load_model_names_what_a_non_model_file_is(tmp_path):
    """Check that a folder, an image, a text file or an empty file given as a model says what it is and the fix."""
    with pytest.raises(ModelFileError, match=r"is a folder, not a model file; create a model file with 'featx fit"):
        load_model(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "c.csv").write_text("path,label\nx.png,a\n")
    (tmp_path / "d.joblib").write_bytes(b"")
    for name, kind in (("a.jpg", "a JPEG image"), ("b.png", "a PNG image"),
                       ("c.csv", r"a text file \(first line 'path,label'\)"), ("d.joblib", "an empty file")):
        with pytest.raises(ModelFileError, match=rf"{name}' is not a featx model file: it is {kind}, and a model "
                           r"file starts with the line 'featx-model sha256=\.\.\.'; create one with 'featx fit"):
            load_model(tmp_path / name)


def test_load_model_checks_the_weights_still_resolve(folders, tmp_path):
    """Check that a model whose weights file changed is refused, naming both weights."""
    import torch

    from featx.backbones import load_backbone

    weights = tmp_path / "tiny.pth"
    torch.save(load_backbone(TINY).module.state_dict(), weights)
    model, _ = fit_model(str(folders["train"]), backbone=TINY, weights=str(weights), layer="stage1", device="cpu")
    save_model(model, tmp_path / "m.joblib")
    state = load_backbone(TINY).module.state_dict()
    state["classifier.bias"] += 1
    torch.save(state, weights)
    with pytest.raises(ModelFileError, match=r"trained with weights 'file:tiny\.pth:sha256=.*resolves to"):
        load_model(tmp_path / "m.joblib")


def test_fit_model_layers_auto_chooses_from_one_extraction(folders, tmp_path):
    """Check that layers='auto' extracts every layer once, keeps the table it chose from, and predicts."""
    train, val = str(folders["train"]), str(folders["val"])
    model, result = fit_model(train, backbone=TINY, layers="auto", pooling="avg,spp", device="cpu", store=tmp_path / "c")
    selection = model.info["selection"]
    names = [row["name"] for row in selection["table"]]
    assert names[0] == "pre_logits/avg" and len(names) == len(set(names)) > 4 and "stage1/spp" in names
    assert selection["chosen"] in names and [row["chosen"] for row in selection["table"]].count(True) == 1
    assert f"{model.features.layer}/{model.features.pooling}" == selection["chosen"]
    assert result.n_computed == len(result.keys) and "stage1/spp" in {r.key for r in result.requests}  # one pass
    again, second = fit_model(train, backbone=TINY, layers="auto", pooling="avg,spp", device="cpu",
                              store=tmp_path / "c")
    assert second.n_computed == 0 and again.info["selection"] == selection
    assert all(row["label"] in model.classes for row in predict(model, val))
    with pytest.raises(FeatxError, match="layers='auto' chooses a layer of one backbone"):
        fit_model(train, backbone=f"{TINY}+{TINY}", layers="auto", device="cpu", store=tmp_path / "c")


def test_fit_model_concatenated_backbones_and_hflip_round_trip(folders, tmp_path):
    """Check that a model over two backbones' concatenated, flip-averaged features saves, loads and predicts as fitted."""
    train, test = str(folders["train"]), str(folders["val"])
    model, _ = fit_model(train, backbone=[TINY, TINY], layer="stage2/spp+pre_logits/avg", tta="hflip", device="cpu",
                         store=tmp_path)
    assert len(model.parts) == 2 and model.info["tta"] == "hflip"
    assert type(model.head.named_steps["standardize"]).__name__ == "BlockScaler"
    assert model.head.named_steps["standardize"].blocks == [160, 32, 160, 32]
    save_model(model, tmp_path / "m.joblib")
    loaded = load_model(tmp_path / "m.joblib")
    rows = predict(loaded, test)
    in_memory = model.pipeline.predict(open_source(test))
    assert [r["label"] for r in rows] == list(in_memory)
    assert "hflip" in loaded.describe() and evaluate_model(loaded, test)["n_images"] == len(rows)


def test_evaluate_model_predictions_are_those_of_predict(folders):
    """Check that predictions=True lists every scored image with predict's label and probabilities, and that
    the scores stay those without it."""
    model, _ = fit_model(str(folders["train"]), backbone=TINY, layer="stage1", device="cpu")
    val = open_source(str(folders["val"]))
    plain = evaluate_model(model, val)
    report = evaluate_model(model, val, predictions=True)
    assert "predictions" not in plain and {k: v for k, v in report.items() if k != "predictions"} == plain
    rows = predict(model, val)
    assert [p["position"] for p in report["predictions"]] == list(range(len(val)))
    for p, row in zip(report["predictions"], rows):
        assert p["image"] == row["image"] and p["predicted"] == row["label"]
        assert p["label"] == val.labels[p["position"]]
        assert p["proba"] == pytest.approx([row[f"p_{c}"] for c in model.classes])
