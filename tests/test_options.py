import pickle

import pytest

from featx.exceptions import FeatxError
from featx.options import CACHED, ExtractOptions, FinetuneOptions


def test_extract_options_defaults_and_normalised_fields():
    """Check the defaults, that sequences become tuples (hashable, picklable) and 'none' tta reads as None."""
    options = ExtractOptions(layers=["stage4", "pre_logits"], pooling=["avg"], tta="none")
    assert options.layers == ("stage4", "pre_logits") and options.pooling == ("avg",) and options.tta is None
    assert ExtractOptions().store is None and ExtractOptions().error_policy == "raise"
    assert CACHED.store is True and CACHED.error_policy == "skip"
    assert pickle.loads(pickle.dumps(options)) == options and hash(options) == hash(options.replace())


@pytest.mark.parametrize("field, value, match", [
    ("precision", "fp64", "Unknown precision 'fp64': expected one of auto, fp32, bf16, fp16"),
    ("decoder", "cv2", "Unknown decoder 'cv2'"),
    ("runtime", "tvm", "Unknown runtime 'tvm'"),
    ("dtype", "int8", "Unknown dtype 'int8'"),
    ("on_error", "ignore", "Unknown on_error 'ignore'"),
    ("tta", "vflip", "Unknown tta 'vflip'"),
    ("batch_size", 0, "batch_size must be a positive integer, got 0"),
    ("batch_size", True, "batch_size must be a positive integer"),
    ("num_workers", -1, "num_workers must be 'auto' or a whole number"),
    ("threads", 0, "threads must be 'auto', None"),
    ("threads", "many", "threads must be 'auto', None"),
])
def test_extract_options_refuse_bad_values_when_made(field, value, match):
    """Check that every setting is checked once, when the object is made (or replaced)."""
    with pytest.raises(FeatxError, match=match):
        ExtractOptions(**{field: value})
    with pytest.raises(FeatxError, match=match):
        ExtractOptions().replace(**{field: value})


def test_extract_options_compile_with_onnxruntime_is_refused():
    """Check that compile=True with runtime='onnxruntime' or 'openvino' fails and says to leave one out; with auto it goes."""
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(FeatxError, match=f"does not go with runtime='{runtime}'. Leave one of them out"):
            ExtractOptions(runtime=runtime, compile=True)
    assert ExtractOptions(compile=True).runtime == "auto"


def test_extract_options_merge_keywords_aliases_and_unknown_names():
    """Check that merge applies keywords over the base, maps aliases, and names the closest field for a typo."""
    base = ExtractOptions(backbone="featx_tiny_cnn", store=True)
    merged = ExtractOptions.merge(base, {"layer": "stage2", "batch_size": 8}, aliases={"layer": "layers"})
    assert (merged.backbone, merged.layers, merged.batch_size, merged.store) == ("featx_tiny_cnn", "stage2", 8, True)
    assert ExtractOptions.merge(None, {}) == ExtractOptions() and ExtractOptions.merge(base) is base
    with pytest.raises(FeatxError, match=r"fit_model got an unknown setting 'precison'\. Did you mean 'precision'\?"):
        ExtractOptions.merge(None, {"precison": "fp32"}, where="fit_model")
    with pytest.raises(FeatxError, match="got both 'layer' and 'layers'"):
        ExtractOptions.merge(None, {"layer": "a", "layers": "b"}, aliases={"layer": "layers"})
    with pytest.raises(FeatxError, match="options must be a featx.ExtractOptions, got dict"):
        ExtractOptions.merge({"store": True})


def test_extract_options_for_maps_is_the_fine_tuning_extraction():
    """Check that for_maps keeps how the run goes and sets what fine-tuning needs: float16 maps, no tta, local eager."""
    options = ExtractOptions(store="cache", device="cpu", batch_size=16, tta="hflip", runtime="onnxruntime")
    maps = options.for_maps("featx_tiny_cnn", ("stage1", "stage2"))
    assert (maps.layers, maps.pooling, maps.dtype, maps.tta, maps.runtime, maps.engine) == (
        ("stage1", "stage2"), "map", "float16", None, "torch", "local")
    assert (maps.store, maps.device, maps.batch_size) == ("cache", "cpu", 16)


def test_finetune_options_merge_from_dict_and_changes():
    """Check that fine-tuning settings merge from an object or a dict, refuse typos, and report what changed."""
    options = FinetuneOptions.merge({"epochs": 3}, {"lr": 1e-3})
    assert options == FinetuneOptions(epochs=3, lr=1e-3) and options.changes() == {"epochs": 3, "lr": 1e-3}
    assert FinetuneOptions().as_params()["patience"] == 5 and FinetuneOptions().changes() == {}
    with pytest.raises(FeatxError, match="Did you mean 'epochs'"):
        FinetuneOptions.merge(None, {"epoch": 3})


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "100"])
def test_extract_options_max_pixels_is_a_positive_integer(value):
    """Check that max_pixels defaults to DEFAULT_MAX_PIXELS (PIL's limit) and refuses anything but a positive int."""
    from featx.images import DEFAULT_MAX_PIXELS as IMAGES_DEFAULT
    from featx.options import DEFAULT_MAX_PIXELS

    assert ExtractOptions().max_pixels == DEFAULT_MAX_PIXELS == IMAGES_DEFAULT == 89_478_485
    with pytest.raises(FeatxError, match=r"max_pixels must be a positive integer \(width × height; default 89478485\)"):
        ExtractOptions(max_pixels=value)
