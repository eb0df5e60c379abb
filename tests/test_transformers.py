import pickle

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featx import loop
from featx.exceptions import FeatxError, UnknownLayerError
from featx.extraction import extract
from featx.transformers import CNNFeatures

from conftest import TINY, make_images


@pytest.fixture
def count_images(monkeypatch):
    """Count the images that go through the network (per forward pass)."""
    seen = []
    original = loop.run_taps

    def counting(module, x, taps):
        seen.append(len(x))
        return original(module, x, taps)

    monkeypatch.setattr(loop, "run_taps", counting)
    return seen


def test_cnnfeatures_init_stores_params_only():
    """Check that __init__ stores its arguments unchanged and builds nothing."""
    est = CNNFeatures("no_such_model", layer="stage9", device="nonsense")
    assert est.get_params()["backbone"] == "no_such_model"
    assert not hasattr(est, "backbone_")
    with pytest.raises(Exception, match="Unknown backbone 'no_such_model'"):
        est.fit()


def test_cnnfeatures_transform_matches_extract(images):
    """Check that transform equals featx.extract, float32, with layers and poolings concatenated."""
    arrays, _ = images
    est = CNNFeatures(TINY, layer=["stage2", "pre_logits"], pooling=["avg", "spp"], device="cpu", cache=None)
    out = est.fit(arrays).transform(arrays)
    ref = extract(arrays, backbone=TINY, layers=["stage2", "pre_logits"], pooling=["avg", "spp"], device="cpu")
    assert out.dtype == np.float32 and out.shape == (12, est.n_features_out_) == (12, 32 + 160 + 32 + 32)
    np.testing.assert_allclose(out, np.hstack(list(ref.values())), rtol=1e-6, atol=1e-6)
    names = est.get_feature_names_out()
    assert names[0] == "stage2_avg_0" and names[-1] == "pre_logits_spp_31" and len(names) == out.shape[1]


def test_cnnfeatures_cached_equals_uncached(images, tmp_path):
    """Check that features through the store equal the in-memory ones."""
    arrays, _ = images
    cached = CNNFeatures(TINY, layer="stage3", pooling="max", device="cpu", cache=tmp_path).fit_transform(arrays)
    plain = CNNFeatures(TINY, layer="stage3", pooling="max", device="cpu", cache=None).fit_transform(arrays)
    np.testing.assert_allclose(cached, plain, rtol=1e-6, atol=1e-6)


def test_cnnfeatures_set_output_pandas(images):
    """Check that set_output(transform='pandas') gives named columns."""
    pd = pytest.importorskip("pandas")
    arrays, _ = images
    est = CNNFeatures(TINY, layer="stage1", device="cpu", cache=None).set_output(transform="pandas")
    frame = est.fit_transform(arrays)
    assert isinstance(frame, pd.DataFrame) and list(frame.columns[:2]) == ["stage1_avg_0", "stage1_avg_1"]


def test_cnnfeatures_tags_say_no_labels_needed():
    """Check that the tags say no target is required and inputs are images, not 2-D tables."""
    tags = CNNFeatures().__sklearn_tags__()
    assert tags.target_tags.required is False and tags.input_tags.two_d_array is False


def test_cnnfeatures_unknown_layer_at_fit():
    """Check that an unknown layer is reported at fit with a suggestion."""
    with pytest.raises(UnknownLayerError, match="Did you mean 'stage3'"):
        CNNFeatures(TINY, layer="stage33", device="cpu").fit()


def test_cnnfeatures_layer_auto_says_where_the_choice_is_made():
    """Check that layer='auto' fails at fit naming GridSearchCV and fit_model, not as an unknown layer."""
    with pytest.raises(FeatxError, match=r"cannot choose its layer without labels.*fit_model\(data, layers='auto'\)"):
        CNNFeatures(TINY, layer="auto", device="cpu").fit()


def test_cnnfeatures_grid_search_runs_network_once_per_image(tmp_path, count_images):
    """Check that 6 layers x 3 C x 5 folds through the store run the network once per image."""
    arrays, labels = make_images(n_per_class=10, n_classes=3)
    pipe = make_pipeline(CNNFeatures(TINY, device="cpu", cache=tmp_path), StandardScaler(), LogisticRegression())
    grid = GridSearchCV(
        pipe,
        {
            "cnnfeatures__layer": ["stem", "stage1", "stage2", "stage3", "pre_logits", "logits"],
            "logisticregression__C": [0.1, 1.0, 10.0],
        },
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
    )
    grid.fit(arrays, labels)
    assert sum(count_images) == len(arrays)
    assert grid.best_score_ > 0.9
    # The store already holds every pooling too: a grid over poolings runs no forward pass.
    grid.set_params(param_grid={"cnnfeatures__pooling": ["avg", "max", "avgmax", "spp"]}).fit(arrays, labels)
    assert sum(count_images) == len(arrays)


def test_cnnfeatures_without_cache_still_works(count_images):
    """Check that cache=None works in cross_val_score, running the network every time."""
    arrays, labels = make_images(n_per_class=6, n_classes=2)
    pipe = make_pipeline(CNNFeatures(TINY, layer="stage2", device="cpu", cache=None), LogisticRegression())
    scores = cross_val_score(pipe, arrays, labels, cv=3)
    assert scores.mean() > 0.9
    assert sum(count_images) == 3 * len(arrays)  # each fold transforms its train and test parts


def test_cnnfeatures_clone_and_set_params(images, tmp_path):
    """Check that clone keeps params and a new backbone takes effect at the next fit."""
    arrays, _ = images
    est = CNNFeatures(TINY, layer="stage1", device="cpu", cache=tmp_path).fit()
    copy = clone(est)
    assert copy.get_params() == est.get_params() and not hasattr(copy, "backbone_")
    est.set_params(layer="stage2")
    assert est.transform(arrays).shape[1] == 16  # still the fitted layer
    assert est.fit().transform(arrays).shape[1] == 32
    assert "layer='stage2'" in repr(est)


def test_cnnfeatures_pickle_and_joblib_round_trip_without_weights(images, tmp_path):
    """Check that a fitted pipeline pickles small, without weights, and predicts the same after loading."""
    arrays, labels = images
    pipe = make_pipeline(CNNFeatures("efficientnet_lite0", layer="stage3", device="cpu", cache=tmp_path / "c"),
                         LogisticRegression(max_iter=500))
    pipe.fit(arrays, labels)
    path = tmp_path / "model.joblib"
    joblib.dump(pipe, path)
    assert path.stat().st_size < 1_000_000
    loaded = joblib.load(path)
    assert not loaded[0].backbone_.loaded
    np.testing.assert_array_equal(loaded.predict(arrays), pipe.predict(arrays))
    again = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(again.predict_proba(arrays), pipe.predict_proba(arrays))


def test_cnnfeatures_concatenated_layers_width_and_names(images):
    """Check that a list of layers (or LAYER/POOLING joined by +) gives one output of the summed width, unique names."""
    arrays, _ = images
    features = CNNFeatures(TINY, layer="stage2/spp+pre_logits", pooling="avg", device="cpu", cache=None).fit()
    assert features.blocks_ == [160, 32] and features.n_features_out_ == 192
    names = features.get_feature_names_out()
    assert len(set(names)) == 192 and names[0] == "stage2_spp_0" and names[160] == "pre_logits_avg_0"
    X = features.transform(arrays)
    separate = extract(arrays, backbone=TINY, layers=["stage2", "pre_logits"], pooling=["spp", "avg"], device="cpu")
    np.testing.assert_allclose(X, np.hstack([separate["stage2/spp"], separate["pre_logits/avg"]]), rtol=1e-5)
    listed = CNNFeatures(TINY, layer=["stage1", "stage2"], pooling=["avg", "max"], device="cpu", cache=None).fit()
    assert listed.blocks_ == [16, 16, 32, 32]
    assert len(set(listed.get_feature_names_out())) == listed.n_features_out_


def test_cnnfeatures_hflip_matches_extract(images, tmp_path):
    """Check that tta='hflip' in the transformer gives the flip-averaged features of featx.extract, cached or not."""
    arrays, _ = images
    expected = extract(arrays, backbone=TINY, layers="stage2", pooling="avg", device="cpu", tta="hflip")["stage2/avg"]
    for cache in (None, tmp_path):
        X = CNNFeatures(TINY, layer="stage2", device="cpu", cache=cache, tta="hflip").fit_transform(arrays)
        np.testing.assert_allclose(X, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(FeatxError, match="Unknown tta"):
        CNNFeatures(TINY, tta="flip").fit()


def test_cnnfeatures_onnxruntime_matches_torch(images, tmp_path):
    """Check that runtime='onnxruntime' in the transformer gives torch's features, cached or not, and bad runtimes fail at fit."""
    pytest.importorskip("onnxruntime")
    arrays, _ = images
    expected = CNNFeatures(TINY, layer="stage2/spp+pre_logits", device="cpu", cache=None,
                           precision="fp32").fit_transform(arrays)
    for cache in (None, tmp_path):
        X = CNNFeatures(TINY, layer="stage2/spp+pre_logits", device="cpu", cache=cache, precision="fp32",
                        runtime="onnxruntime").fit_transform(arrays)
        np.testing.assert_allclose(X, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(FeatxError, match="Unknown runtime 'tvm'"):
        CNNFeatures(TINY, device="cpu", runtime="tvm").fit()


def test_cnnfeatures_max_pixels_refuses_large_files_and_old_pickles_get_the_default(tmp_path):
    """Check that CNNFeatures(max_pixels=...) refuses a file above it, and a transformer pickled without it gets the default."""
    from PIL import Image

    from featx.exceptions import ImageDecodeError
    from featx.options import DEFAULT_MAX_PIXELS

    path = tmp_path / "large.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(path)
    features = CNNFeatures(TINY, layer="stage2", device="cpu", cache=None, max_pixels=10_000).fit()
    with pytest.raises(ImageDecodeError, match=r"large\.png' \(decompression bomb: .* pass --max-pixels 90000 \(CLI\)"):
        features.transform([str(path)])
    assert features.set_params(max_pixels=100_000).fit().transform([str(path)]).shape[0] == 1
    old = CNNFeatures.__new__(CNNFeatures)
    state = dict(CNNFeatures(TINY).__dict__)
    del state["max_pixels"]
    old.__setstate__(state)
    assert old.max_pixels == DEFAULT_MAX_PIXELS
