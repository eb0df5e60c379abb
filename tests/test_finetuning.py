"""Tests of featx.finetuning: the tail, TailClassifier, finetune() and its model files, on featx_tiny_cnn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featx.backbones import Tap, load_backbone, run_taps
from featx.exceptions import UnknownLayerError
from featx.finetuning import FinetuneError, TailClassifier, build_tail, finetune, memory_format, read_maps
from featx.images import open_source
from featx.models import evaluate_model, load_model, predict, save_model

from conftest import TINY, make_images


def _maps(n_per_class=20, seed=0, layer="stage1"):
    """Maps of the tiny backbone's ``layer`` for separable synthetic images, float16, and labels."""
    from featx.extraction import extract

    images, labels = make_images(n_per_class=n_per_class, n_classes=3, seed=seed)
    X = extract(images, backbone=TINY, layers=[layer], pooling="map", device="cpu")[f"{layer}/map"]
    return X.astype(np.float16), labels


@pytest.fixture(scope="module")
def maps():
    return _maps()


def _fit(X, y, **kwargs):
    options = dict(layer="stage1", epochs=4, batch_size=16, device="cpu", val_split=0.25, random_state=0)
    return TailClassifier(TINY, **{**options, **kwargs}).fit(X, y)


# --------------------------------------------------------------------------- the tail


@pytest.mark.parametrize("layer", ["stem", "stage1", "stage2"])
def test_build_tail_reproduces_pre_logits(layer):
    """Check that the copied tail applied to the tapped map gives the backbone's pre_logits vector."""
    backbone = load_backbone(TINY)
    tail, n_features = build_tail(backbone, layer)
    x = torch.randn(3, 3, 32, 32)
    out = run_taps(backbone.module, x, [Tap(layer), Tap("classifier", "input")])
    with torch.no_grad():
        got = tail(out[Tap(layer)])
    assert n_features == 32
    torch.testing.assert_close(got, out[Tap("classifier", "input")])
    assert all(p.requires_grad for p in tail.parameters())
    assert not any(p.requires_grad for p in backbone.module.parameters())  # the backbone is untouched


@pytest.mark.parametrize(
    ("layer", "match"),
    [("pre_logits", "trains only a linear head"), ("logits", "trains only a linear head"),
     ("stage3", "Nothing to fine-tune after 'stage3'")],
)
def test_build_tail_refuses_layers_without_a_trainable_tail(layer, match):
    """Check that pre_logits, logits and the last stage are refused with what to do instead."""
    with pytest.raises(FinetuneError, match=match):
        build_tail(load_backbone(TINY), layer)


def test_build_tail_refuses_a_network_it_cannot_chain(monkeypatch):
    """Check that a backbone whose forward is not the chain of its modules is refused by the numerical check."""
    backbone = load_backbone(TINY)
    original = type(backbone.module).forward

    def forward(self, x):  # an extra ReLU after stage3 that no module holds, like DenseNet's
        x = torch.relu(self.stage3(self.stage2(self.stage1(self.stem(x)))) - 0.5)
        return self.classifier(self.pool(x))

    monkeypatch.setattr(type(backbone.module), "forward", forward)
    with pytest.raises(FinetuneError, match="cannot be split after 'stage1'.*supports"):
        build_tail(backbone, "stage1")
    monkeypatch.setattr(type(backbone.module), "forward", original)


# --------------------------------------------------------------------------- TailClassifier


def test_tailclassifier_training_lowers_loss(maps):
    """Check that training lowers the training loss and learns the separable classes."""
    X, y = maps
    clf = _fit(X, y, epochs=6, lr=1e-3, patience=10)
    losses = [r["train_loss"] for r in clf.history_]
    assert losses[-1] < losses[0]
    assert clf.history_[clf.best_epoch_ - 1]["val_accuracy"] >= 0.8
    assert (clf.predict(X) == y).mean() >= 0.8
    proba = clf.predict_proba(X[:5])
    assert proba.shape == (5, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)


def test_tailclassifier_early_stopping_restores_best_epoch():
    """Check that early stopping ends training after `patience` epochs without improvement, keeping the best epoch."""
    X, _ = _maps(n_per_class=12)
    y = np.random.default_rng(1).permutation(np.repeat(["a", "b", "c"], 12))  # labels without signal
    clf = _fit(X, y, epochs=30, patience=2, head_lr=0.5, schedule="constant")
    assert clf.stopped_early_
    assert len(clf.history_) < 30
    assert clf.best_epoch_ == len(clf.history_) - 2
    best = clf.history_[clf.best_epoch_ - 1]
    assert all((r["val_accuracy"], -r["val_loss"]) <= (best["val_accuracy"], -best["val_loss"]) for r in clf.history_)


def test_tailclassifier_same_seed_gives_identical_weights(maps):
    """Check that the same random_state gives identical weights and another one different weights (CPU)."""
    X, y = maps
    state = torch.get_rng_state()
    a, b, c = _fit(X, y, epochs=2), _fit(X, y, epochs=2), _fit(X, y, epochs=2, random_state=1)
    assert torch.equal(state, torch.get_rng_state())  # the caller's global generator is untouched
    for key, value in a.net_.state_dict().items():
        assert torch.equal(value, b.net_.state_dict()[key]), key
    assert not all(torch.equal(v, c.net_.state_dict()[k]) for k, v in a.net_.state_dict().items())


@pytest.mark.parametrize("options", [dict(optimizer="sgd", schedule="step", batchnorm="frozen", flip=False),
                                     dict(val_split=0, label_smoothing=0.0)])
def test_tailclassifier_options_train(maps, options):
    """Check that SGD, step decay, frozen BatchNorm, no flips and training without a validation split all run."""
    X, y = maps
    clf = _fit(X, y, epochs=2, **options)
    assert len(clf.history_) == 2
    assert clf.predict(X).shape == y.shape
    if options.get("val_split") == 0:
        assert clf.history_[0]["val_accuracy"] is None and clf.best_epoch_ == 2


def test_tailclassifier_batchnorm_auto_freezes_pretrained_statistics_only(maps):
    """Check that batchnorm='auto' trains the statistics of a random-init network and freezes pretrained ones."""
    X, y = maps
    assert _fit(X, y, epochs=1).batchnorm_ == "train"  # the tiny backbone is random-init
    assert _fit(X, y, epochs=1, batchnorm="frozen").batchnorm_ == "frozen"


@pytest.mark.weights
def test_tailclassifier_batchnorm_auto_is_frozen_for_imagenet_weights():
    """Check that batchnorm='auto' keeps the ImageNet statistics of efficientnet_lite0's trained blocks."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 320 * 7 * 7)).astype(np.float32)  # stage5 maps of 12 images
    y = np.repeat(["a", "b"], 6)
    backbone = load_backbone("efficientnet_lite0")
    before = build_tail(backbone, "stage5")[0].state_dict()
    clf = TailClassifier("efficientnet_lite0", layer="stage5", epochs=1, batch_size=6, val_split=0, device="cpu",
                         random_state=0).fit(X, y)
    after = clf.net_.tail.state_dict()
    assert clf.batchnorm_ == "frozen"
    stats = [k for k in before if k.endswith("running_var")]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)


def test_tailclassifier_frozen_batchnorm_keeps_running_statistics(maps):
    """Check that batchnorm='frozen' leaves the tail's BatchNorm running statistics as ImageNet (here: init) left them."""
    X, y = maps
    before = build_tail(load_backbone(TINY), "stage1")[0].state_dict()
    after = _fit(X, y, epochs=1, batchnorm="frozen").net_.tail.state_dict()
    trained = _fit(X, y, epochs=1, batchnorm="train").net_.tail.state_dict()
    stats = [k for k in before if k.endswith("running_mean")]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not all(torch.equal(before[k], trained[k]) for k in stats)


@pytest.mark.parametrize(
    ("options", "match"),
    [(dict(optimizer="adam"), "optimizer must be one of adamw, sgd"), (dict(epochs=0), "epochs must be a positive"),
     (dict(val_split=1.5), r"val_split must lie in \[0, 1\)"), (dict(lr=-1), "learning rates must be positive"),
     (dict(batchnorm="off"), "batchnorm must be one of auto, frozen, train")],
)
def test_tailclassifier_bad_options_raise(maps, options, match):
    """Check that bad training options raise FinetuneError naming the option and the allowed values."""
    X, y = maps
    with pytest.raises(FinetuneError, match=match):
        _fit(X, y, **options)


def test_tailclassifier_wrong_map_width_raises(maps):
    """Check that maps of another layer are refused with both widths named."""
    X, y = maps
    with pytest.raises(FinetuneError, match=r"X has 1024 columns but the map of 'stage2'.*512 values \(32x4x4\)"):
        _fit(X, y, layer="stage2")


def test_tailclassifier_too_small_validation_split_raises(maps):
    """Check that a validation split with fewer images than classes is refused with the fix."""
    X, y = maps
    with pytest.raises(FinetuneError, match="set val_split=0"):
        _fit(X, y, val_split=0.02)


def test_tailclassifier_pickles_without_callback(maps):
    """Check that a fitted classifier pickles (its on_epoch printer dropped) and predicts the same after."""
    import pickle

    X, y = maps
    seen = []
    clf = _fit(X, y, epochs=1, on_epoch=lambda record: seen.append(lambda: record))  # a closure: not picklable
    copy = pickle.loads(pickle.dumps(clf))
    assert len(seen) == 1 and copy.on_epoch is None
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))


def test_tailclassifier_bf16_channels_last_predicts_like_fp32(maps):
    """Check that bf16 autocast on channels-last maps gives fp32's probabilities within bf16's rounding."""
    import copy

    X, y = maps
    clf = _fit(X, y, epochs=2, train_precision="fp32")
    fast = copy.deepcopy(clf)
    fast.precision_ = "bf16"  # the same weights, predicted through the bf16 feed
    assert memory_format(torch.device("cpu"), "bf16") == torch.channels_last
    expected, got = clf.predict_proba(X), fast.predict_proba(X)
    np.testing.assert_allclose(got, expected, atol=0.03)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95


def test_tailclassifier_bf16_training_lowers_loss(maps):
    """Check that training under bf16 autocast lowers the loss and keeps float32 weights."""
    X, y = maps
    clf = _fit(X, y, epochs=6, lr=1e-3, patience=10, train_precision="bf16")
    losses = [r["train_loss"] for r in clf.history_]
    assert clf.precision_ == "bf16" and losses[-1] < losses[0]
    assert (clf.predict(X) == y).mean() >= 0.8
    assert all(p.dtype == torch.float32 for p in clf.net_.parameters())


def test_float32_depthwise_matches_fp32_gradients():
    """Check that depthwise convolutions trained in float32 under bf16 autocast give fp32's loss and gradients
    within bf16's rounding, and that unwrapping restores the module tree and its weights' names."""
    import copy

    from featx.finetuning import _Float32WhileTraining, _prepare, _swap_depthwise

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.BatchNorm2d(8),
                              torch.nn.Conv2d(8, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    x, target = torch.randn(6, 8, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    fast = _prepare(copy.deepcopy(net), torch.device("cpu"), "bf16")
    assert isinstance(fast[0], _Float32WhileTraining) and not isinstance(fast[2], _Float32WhileTraining)
    torch.nn.functional.cross_entropy(net(x), target).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(fast(x.to(torch.bfloat16, memory_format=torch.channels_last)), target)
    loss.backward()
    grad, expected = fast[0].conv.weight.grad, net[0].weight.grad
    assert grad.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(grad.flatten(), expected.flatten(), dim=0) > 0.99
    _swap_depthwise(fast, False)
    assert isinstance(fast[0], torch.nn.Conv2d) and list(fast.state_dict()) == list(net.state_dict())


def test_tailclassifier_unpickles_a_model_saved_before_train_precision(maps):
    """Check that a classifier pickled before train_precision existed loads as fp32 and predicts as saved."""
    import pickle

    X, y = maps
    clf = _fit(X, y, epochs=1, train_precision="fp32")
    state = {k: v for k, v in clf.__getstate__().items() if k not in ("train_precision", "precision_")}
    old = TailClassifier.__new__(TailClassifier)
    old.__setstate__(state)
    old = pickle.loads(pickle.dumps(old))
    assert old.train_precision == "fp32" and old.precision_ == "fp32"
    np.testing.assert_array_equal(old.predict_proba(X), clf.predict_proba(X))


@pytest.mark.parametrize(("options", "match"), [(dict(train_precision="fp16"), "train_precision='fp16' needs CUDA"),
                                                (dict(train_precision="int8"), "train_precision must be one of")])
def test_tailclassifier_bad_train_precision_raises(maps, options, match):
    """Check that fp16 training on the CPU and an unknown precision are refused with the choices."""
    X, y = maps
    with pytest.raises(FinetuneError, match=match):
        _fit(X, y, **options)


# --------------------------------------------------------------------------- finetune() and model files


def _source(n_per_class=8):
    images, labels = make_images(n_per_class=n_per_class, n_classes=3)
    return images, labels, open_source(images, labels=labels)


def test_finetune_save_load_predict_equals_in_memory(tmp_path):
    """Check that a saved and loaded fine-tuned model predicts exactly as the in-memory one, and evaluates."""
    images, labels, source = _source()
    model, report = finetune(source, backbone=TINY, from_layer="stage1", epochs=3, lr=1e-3, val_split=0.25, device="cpu",
                             store=tmp_path / "cache")
    assert report["n_computed"] == 24 and len(report["history"]) == 3
    direct = model.head.predict_proba(read_maps_of(model, images, tmp_path / "cache"))
    save_model(model, tmp_path / "ft.joblib")
    loaded = load_model(tmp_path / "ft.joblib")
    rows = predict(loaded, images)
    np.testing.assert_array_equal([[row[f"p_{c}"] for c in loaded.classes] for row in rows], direct)
    assert [row["label"] for row in rows] == [loaded.classes[i] for i in direct.argmax(axis=1)]
    report = evaluate_model(loaded, source)
    assert report["n_images"] == 24 and report["accuracy"] >= 0.8
    assert "fine-tuned featx_tiny_cnn after stage1" in loaded.describe()


def read_maps_of(model, images, store):
    from featx.extraction import extract

    result = extract(images, backbone=TINY, layers=[model.features.layer], pooling="map", store=store,
                     dtype="float16", device="cpu")
    return read_maps(result, model.features.layer)


def test_finetune_second_run_computes_nothing(tmp_path):
    """Check that a second finetune on the same images reads every map from the store."""
    _, _, source = _source()
    kwargs = dict(backbone=TINY, from_layer="stage2", epochs=1, val_split=0.25, device="cpu", store=tmp_path)
    _, first = finetune(source, **kwargs)
    _, second = finetune(source, **kwargs)
    assert (first["n_computed"], first["n_from_store"]) == (24, 0)
    assert (second["n_computed"], second["n_from_store"]) == (0, 24)
    assert second["store"] == first["store"]


def test_finetune_resumes_an_interrupted_store(tmp_path):
    """Check that after an interruption the frozen part computes only the missing maps, identical to a clean run."""
    images, labels, source = _source()
    calls = []

    def stop():
        calls.append(1)
        return len(calls) >= 2  # stop after the second batch of 4 images

    kwargs = dict(backbone=TINY, from_layer="stage1", epochs=1, val_split=0.25, device="cpu", extract_batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        finetune(source, store=tmp_path / "a", stop=stop, **kwargs)
    _, resumed = finetune(source, store=tmp_path / "a", **kwargs)
    assert (resumed["n_computed"], resumed["n_from_store"]) == (16, 8)
    _, clean = finetune(source, store=tmp_path / "b", **kwargs)
    from featx.extraction import extract

    def stored(folder):
        result = extract(images, backbone=TINY, layers=["stage1"], pooling="map", store=folder, dtype="float16",
                         device="cpu")
        assert result.n_computed == 0
        return read_maps(result, "stage1")

    np.testing.assert_array_equal(stored(tmp_path / "a"), stored(tmp_path / "b"))


def test_finetune_bad_from_raises_before_extracting(tmp_path):
    """Check that an unknown or untrainable --from fails before any image is processed."""
    _, _, source = _source(2)
    with pytest.raises(UnknownLayerError, match="Unknown layer 'stage9'.*Did you mean"):
        finetune(source, backbone=TINY, from_layer="stage9", store=tmp_path)
    with pytest.raises(FinetuneError, match="featx fit DATA --layers pre_logits"):
        finetune(source, backbone=TINY, from_layer="pre_logits", store=tmp_path)
    with pytest.raises(FinetuneError, match="needs a feature store"):
        finetune(source, backbone=TINY, store=None)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.weights
@pytest.mark.parametrize("layer", ["stage3", "stage4", "stage5"])
def test_build_tail_splits_efficientnet_lite0(layer):
    """Check that efficientnet_lite0's real network splits after stage3/4/5 (the tail reproduces pre_logits)."""
    tail, n_features = build_tail(load_backbone("efficientnet_lite0"), layer)
    assert n_features == 1280 and sum(p.numel() for p in tail.parameters()) > 0
