import numpy as np
import pytest
from sklearn.base import clone

from featx.exceptions import FeatxError
from featx.featuresets import parse_feature_sets, set_name, split_names
from featx.heads import BlockScaler


def test_parse_feature_sets_expands_poolings_and_keeps_fixed_ones():
    """Check that plain layers get every pooling, LAYER/POOLING keeps its own, and duplicates are dropped."""
    sets = parse_feature_sets("stage4+pre_logits,stage4/spp+pre_logits/avg,stage5", ["avg", "spp"])
    assert sets == [
        (("stage4", "avg"), ("pre_logits", "avg")),
        (("stage4", "spp"), ("pre_logits", "spp")),
        (("stage4", "spp"), ("pre_logits", "avg")),
        (("stage5", "avg"),),
        (("stage5", "spp"),),
    ]
    assert parse_feature_sets("all", "avg", all_layers=["stem", "stage1"]) == [(("stem", "avg"),), (("stage1", "avg"),)]
    assert parse_feature_sets(["stage1", "stage1"], "avg") == [(("stage1", "avg"),)]


def test_parse_feature_sets_bad_entries_say_the_syntax():
    """Check that empty blocks and doubled slashes are refused with the expected syntax."""
    for bad in ("stage4+", "stage4/spp/avg", "/avg", "stage4/"):
        with pytest.raises(FeatxError, match="LAYER or LAYER/POOLING"):
            parse_feature_sets(bad, "avg")
    with pytest.raises(FeatxError, match="No pooling"):
        parse_feature_sets("stage4", "")


def test_set_name_with_and_without_backbones():
    """Check the names of concatenated layer and backbone feature sets."""
    assert set_name([("stage4", "spp"), ("pre_logits", "avg")]) == "stage4/spp+pre_logits/avg"
    assert (set_name([("pre_logits", "avg")] * 2, ["efficientnet_lite0", "efficientnet_lite2"])
            == "efficientnet_lite0:pre_logits/avg+efficientnet_lite2:pre_logits/avg")
    assert split_names(["a", "b"]) == ["a", "b"] and split_names("a, b,") == ["a", "b"]


def test_block_scaler_gives_every_block_equal_variance():
    """Check that each block carries D/k of the total variance D, whatever its width and scale."""
    rng = np.random.default_rng(0)
    X = np.hstack([rng.normal(size=(200, 3)) * 100, rng.normal(size=(200, 30)) + 5])
    Xt = BlockScaler(blocks=[3, 30]).fit_transform(X)
    np.testing.assert_allclose(Xt.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose([Xt[:, :3].var(axis=0).sum(), Xt[:, 3:].var(axis=0).sum()], [16.5, 16.5])
    np.testing.assert_allclose(Xt[:, 3:].var(axis=0), 16.5 / 30)


def test_block_scaler_one_block_is_standard_scaling():
    """Check that blocks=None standardises exactly like StandardScaler, constant columns included."""
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 4))
    X[:, 2] = 7.0
    np.testing.assert_allclose(BlockScaler().fit_transform(X), StandardScaler().fit_transform(X))


def test_block_scaler_uses_training_rows_only():
    """Check that transform applies the statistics of the fitted rows, not of the rows it transforms."""
    rng = np.random.default_rng(2)
    train, test = rng.normal(size=(30, 4)), rng.normal(size=(10, 4)) + 50
    scaler = BlockScaler(blocks=[1, 3]).fit(train)
    Xt = scaler.transform(test)
    np.testing.assert_allclose(Xt, (test - train.mean(0)) / train.std(0) * scaler.weights_)
    assert Xt.mean() > 10
    assert clone(scaler).get_params() == {"blocks": [1, 3]}


def test_block_scaler_widths_must_add_up():
    """Check that block widths that do not add up to the columns are refused, naming both."""
    with pytest.raises(FeatxError, match=r"add up to 5 columns, but X has 4"):
        BlockScaler(blocks=[2, 3]).fit(np.zeros((3, 4)))
