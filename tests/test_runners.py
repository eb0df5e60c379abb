import numpy as np
import pytest

from featx.exceptions import FeatxError
from featx.extraction import extract

from conftest import TINY

OPTIONS = dict(backbone=TINY, layers=["stage1", "pre_logits"], pooling=["avg", "spp"], device="cpu", batch_size=5,
               precision="fp32")


def test_onnxruntime_equals_torch_with_a_padded_last_batch(images, tmp_path):
    """Check that runtime='onnxruntime' gives torch's features (short last batch padded, flip averaging too)."""
    pytest.importorskip("onnxruntime")
    arrays, _ = images  # 12 images: batches of 5, 5 and a padded 2
    for tta in (None, "hflip"):
        eager = extract(arrays, tta=tta, **OPTIONS)
        exported = extract(arrays, tta=tta, runtime="onnxruntime", **OPTIONS)
        for key in eager:
            assert exported[key].shape == eager[key].shape
            np.testing.assert_allclose(exported[key], eager[key], rtol=1e-5, atol=1e-6)
    stored = extract(arrays, store=tmp_path, runtime="onnxruntime", **OPTIONS)
    assert extract(arrays, store=tmp_path, **OPTIONS).store.path == stored.store.path  # not part of the configuration


def test_runtime_errors_name_the_fix(images, tmp_path, monkeypatch):
    """Check that an unknown runtime, a GPU device, compile, Ray, and a missing onnxruntime each say what to do."""
    arrays, _ = images
    with pytest.raises(FeatxError, match="Unknown runtime 'tensorrt': expected one of auto, torch, onnxruntime, openvino"):
        extract(arrays, backbone=TINY, device="cpu", runtime="tensorrt")
    with pytest.raises(FeatxError, match="does not go with runtime='onnxruntime'"):
        extract(arrays, backbone=TINY, device="cpu", runtime="onnxruntime", compile=True)
    with pytest.raises(FeatxError, match="does not go with engine='ray'"):
        extract(arrays, backbone=TINY, device="cpu", store=tmp_path, engine="ray", runtime="onnxruntime")
    import importlib.util

    from featx import runners

    real = importlib.util.find_spec
    monkeypatch.setattr(runners.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    monkeypatch.setattr(runners, "_PREPARED", type(runners._PREPARED)())
    with pytest.raises(FeatxError, match=r'onnxruntime missing\): pip install "featx\[onnx\]"'):
        extract(arrays, runtime="onnxruntime", **OPTIONS)


def test_check_runtime_refuses_gpu_devices():
    """Check that ONNX Runtime is refused off the CPU, naming the device and the default runtime."""
    from featx.extraction import check_runtime

    assert check_runtime("onnxruntime", "cpu") == "onnxruntime" and check_runtime("torch", "cuda") == "torch"
    assert check_runtime("auto", "cuda", compile=True) == "auto"
    with pytest.raises(FeatxError, match="runtime='openvino' runs on the CPU, not on 'mps'"):
        check_runtime("openvino", "mps")
    with pytest.raises(FeatxError, match="runs on the CPU, not on 'cuda'.*runtime='auto' or 'torch'"):
        check_runtime("onnxruntime", "cuda")


def test_cli_extract_runtime_onnxruntime(tmp_path, capsys):
    """Check that 'featx extract --runtime onnxruntime' fills the same store as the default runtime."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from featx.cli import main

    from conftest import make_images

    arrays, labels = make_images(n_per_class=3)
    for i, (array, label) in enumerate(zip(arrays, labels)):
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / "data" / label / f"{i}.png")
    common = [str(tmp_path / "data"), "--model", TINY, "--device", "cpu", "--cache", str(tmp_path / "cache"), "--json"]
    assert main(["extract", *common, "--runtime", "onnxruntime"]) == 0
    assert '"n_computed": 9' in capsys.readouterr().out
    assert main(["extract", *common]) == 0
    assert '"n_computed": 0' in capsys.readouterr().out
