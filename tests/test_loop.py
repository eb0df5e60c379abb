import numpy as np
import pytest

from featx.backbones import load_backbone
from featx.devices import resolve
from featx.exceptions import FeatxError, UnknownLayerError
from featx.loop import iter_batches, make_requests, prepare
from featx.options import ExtractOptions

from conftest import TINY


def test_make_requests_reads_the_one_layer_grammar():
    """Check that names, 'all', LAYER/POOLING and '+' give the distinct blocks in order, for every caller."""
    keys = [r.key for r in make_requests(TINY, "stage2/spp+pre_logits, stage2", "avg,max")]
    assert keys == ["stage2/spp", "pre_logits/avg", "pre_logits/max", "stage2/avg", "stage2/max"]
    everything = [r.key for r in make_requests(TINY, "all", "avg")]
    assert everything[0] == "stem/avg" and everything[-1] == "pre_logits/avg" and "logits/avg" not in everything
    assert [r.key for r in make_requests(TINY, ["stage1", "stage1"], ["avg"])] == ["stage1/avg"]
    with pytest.raises(UnknownLayerError, match="Unknown layer 'stage9' for featx_tiny_cnn"):
        make_requests(TINY, "stage9", "avg")
    with pytest.raises(FeatxError, match="No pooling given"):
        make_requests(TINY, "stage1", "")


def test_iter_batches_needs_resolved_options_and_keeps_order(images):
    """Check that the loop refuses unresolved options and yields every image once, in order, batch by batch."""
    arrays, _ = images
    backbone = load_backbone(TINY)
    requests = make_requests(TINY, "pre_logits", "avg")
    with pytest.raises(FeatxError, match="needs resolved options"):
        next(iter_batches(backbone, list(arrays), requests, ExtractOptions(device="cpu")))
    options = resolve(ExtractOptions(device="cpu", precision="fp32", batch_size=5, num_workers=0, progress=False))
    prepare(backbone, options.device)
    batches = list(iter_batches(backbone, list(arrays), requests, options, indices=[3, 1, 2, 0, 4, 5, 6]))
    assert [len(b.indices) for b in batches] == [5, 2]
    assert np.concatenate([b.indices for b in batches]).tolist() == [3, 1, 2, 0, 4, 5, 6]
    assert batches[0].features[requests[0]].shape == (5, 32)


def test_iter_batches_says_where_each_batch_time_went(image_folder):
    """Check that every batch reports decode, hand-over and network seconds, and that threads change no feature."""
    from featx.images import open_source

    source = open_source(str(image_folder))
    backbone = load_backbone(TINY)
    requests = make_requests(TINY, "stage2,pre_logits", "avg")
    features = {}
    for workers in ("auto", 0):
        options = resolve(ExtractOptions(device="cpu", precision="fp32", batch_size=5, num_workers=workers,
                                         progress=False))
        prepare(backbone, options.device)
        batches = list(iter_batches(backbone, source, requests, options))
        for batch in batches:
            assert set(batch.seconds) == {"decode", "handover", "network"}
            assert all(seconds >= 0 for seconds in batch.seconds.values()) and batch.seconds["network"] > 0
            assert batch.seconds["decode"] > 0
        features[workers] = {r: np.concatenate([b.features[r] for b in batches]) for r in requests}
    for request in requests:
        np.testing.assert_array_equal(features["auto"][request], features[0][request])
