import pytest
import torch

from featx.exceptions import FeatxError, UnknownPoolingError
from featx.pooling import POOLINGS, check_pooling, feature_names, pool, pooled_dim


def test_pool_values_on_known_map():
    """Check that each pooling computes the documented statistics on a known map."""
    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    assert pool(x, "avg").tolist() == [[7.5, 23.5]]
    assert pool(x, "max").tolist() == [[15.0, 31.0]]
    assert pool(x, "avgmax").tolist() == [[7.5, 23.5, 15.0, 31.0]]
    spp = pool(x, "spp")[0].tolist()
    assert spp[:2] == [7.5, 23.5]
    assert spp[2:6] == [2.5, 4.5, 10.5, 12.5]  # channel 0, 2×2 cells in row-major order
    assert spp[6:] == [18.5, 20.5, 26.5, 28.5]


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pool_width_matches_pooled_dim(pooling):
    """Check that pooled widths match pooled_dim for maps, odd sizes and vectors."""
    for shape in [(3, 7, 5), (4, 1, 1), (6,)]:
        out = pool(torch.randn(2, *shape), pooling)
        assert out.shape == (2, pooled_dim(shape, pooling))


def test_pool_vectors_pass_through():
    """Check that 2-D outputs are returned unchanged whatever the pooling."""
    x = torch.randn(3, 5)
    for pooling in POOLINGS:
        assert torch.equal(pool(x, pooling), x)


def test_pool_unknown_pooling_suggests():
    """Check that an unknown pooling names the valid ones and the closest match."""
    with pytest.raises(UnknownPoolingError, match=r"Unknown pooling 'avrg'.*avg, max, avgmax, spp.*Did you mean 'avg'"):
        pool(torch.randn(1, 2, 2, 2), "avrg")


@pytest.mark.parametrize(("name", "meant"), [("mean", "avg"), ("average", "avg"), ("AVG", "avg"),
                                             ("maximum", "max"), ("pyramid", "spp")])
def test_check_pooling_suggests_synonyms(name, meant):
    """Check that a common other name of a pooling suggests featx's name for it, not the closest spelling."""
    with pytest.raises(UnknownPoolingError, match=rf"Unknown pooling '{name}'.*Did you mean '{meant}'\?$"):
        check_pooling(name)


def test_pooled_dim_rejects_other_ranks():
    """Check that a 2-D map without channels is refused with the expected shapes."""
    with pytest.raises(FeatxError, match=r"shape \(4, 4\).*expected \(C, H, W\)"):
        pooled_dim((4, 4), "avg")


def test_feature_names_replace_dots():
    """Check that feature names are valid identifiers built from layer and pooling."""
    assert feature_names("blocks.4", "spp", 2) == ["blocks_4_spp_0", "blocks_4_spp_1"]


def test_pool_map_flattens_in_chw_order_whatever_the_memory_format():
    """Check that pooling 'map' gives the (C, H, W)-ordered map, also for a channels-last tensor."""
    x = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    expected = x.reshape(2, -1)
    assert torch.equal(pool(x, "map"), expected)
    assert torch.equal(pool(x.contiguous(memory_format=torch.channels_last), "map"), expected)
    assert pooled_dim((3, 4, 5), "map") == 60 and pooled_dim((7,), "map") == 7


def test_pool_each_equals_pool_of_the_float_output():
    """Check that pooling several ways at once gives exactly pool(output.float(), p) for each pooling."""
    import torch

    from featx.pooling import pool_each

    maps = torch.randn(3, 5, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    vectors = torch.randn(3, 7).bfloat16()
    for output in (maps, vectors):
        pooled = pool_each(output, ["avg", "max", "avgmax", "spp", "map"])
        for name, value in pooled.items():
            assert value.dtype == torch.float32
            assert torch.equal(value, pool(output.float(), name)), name
    with pytest.raises(FeatxError, match="Unknown pooling"):
        pool_each(maps, ["mean_of_it"])
