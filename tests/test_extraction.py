import json
import numpy as np
import pytest
import torch
from PIL import Image

from featx.backbones import list_layers, load_backbone
from featx.exceptions import FeatxError, ImageDecodeError, UnknownLayerError, UnknownPoolingError
from featx.extraction import extract, resolve_device, resolve_precision
from featx.pooling import POOLINGS

from conftest import TINY


def test_extract_shapes_match_layer_listing_for_every_alias_and_pooling():
    """Check that extract returns, for every alias and pooling, the dimension list_layers announces."""
    images = np.random.default_rng(0).integers(0, 256, size=(2, 50, 60, 3), dtype=np.uint8)
    for name in [TINY, "efficientnet_lite0"]:
        layers = list_layers(name)
        features = extract(
            images,
            backbone=name,
            weights=None,
            layers=[layer.alias for layer in layers],
            pooling=list(POOLINGS),
            device="cpu",
        )
        assert len(features) == len(layers) * len(POOLINGS)
        for layer in layers:
            for pooling in POOLINGS:
                value = features[f"{layer.alias}/{pooling}"]
                assert value.dtype == np.float32
                assert value.shape == (2, layer.dims[pooling]), (layer.alias, pooling)


def test_extract_does_not_depend_on_batch_size_or_neighbours(images):
    """Check that an image's features are the same alone, in small batches and among other images."""
    arrays, _ = images
    full = extract(arrays, backbone=TINY, layers="all", pooling="spp", batch_size=12, device="cpu")
    ones = extract(arrays, backbone=TINY, layers="all", pooling="spp", batch_size=1, device="cpu")
    order = np.random.default_rng(1).permutation(len(arrays))
    shuffled = extract(arrays[order], backbone=TINY, layers="all", pooling="spp", batch_size=5, device="cpu")
    for key in full:
        np.testing.assert_allclose(full[key], ones[key], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(full[key][order], shuffled[key], rtol=1e-5, atol=1e-5)


def test_extract_uses_eval_mode_batch_statistics_would_differ(images):
    """Check that features come from eval-mode BatchNorm: train-mode statistics give other values."""
    arrays, _ = images
    backbone = load_backbone(TINY)
    features = extract(arrays, backbone=backbone, layers=["stage3"], device="cpu", precision="fp32")["stage3/avg"]
    x = backbone.preprocess.normalize(torch.stack([backbone.preprocess.to_tensor(Image.fromarray(a)) for a in arrays]))
    module = backbone.module
    with torch.inference_mode():
        stem_out = module.stage3(module.stage2(module.stage1(module.stem(x)))).mean(dim=(2, 3))
        np.testing.assert_allclose(features, stem_out.numpy(), rtol=1e-5, atol=1e-5)
        module.train()
        train_out = module.stage3(module.stage2(module.stage1(module.stem(x)))).mean(dim=(2, 3))
        module.eval()
    assert not np.allclose(features, train_out.numpy(), atol=1e-3)


def test_extract_is_deterministic(images):
    """Check that two runs give identical features."""
    arrays, _ = images
    a = extract(arrays, backbone=TINY, layers=["stage2", "pre_logits"], device="cpu")
    b = extract(arrays, backbone=TINY, layers=["stage2", "pre_logits"], device="cpu")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_extract_accepts_paths_pil_and_arrays(images, image_folder):
    """Check that paths, PIL images, RGB arrays and grayscale arrays are all accepted."""
    arrays, _ = images
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))
    pil = [Image.open(p) for p in paths]
    from_paths = extract(paths, backbone=TINY, device="cpu")["pre_logits/avg"]
    from_pil = extract(pil, backbone=TINY, device="cpu")["pre_logits/avg"]
    np.testing.assert_allclose(from_paths, from_pil, rtol=1e-6, atol=1e-6)
    gray = extract(arrays[..., 0], backbone=TINY, device="cpu")["pre_logits/avg"]
    assert gray.shape == (len(arrays), 32)
    rgb = extract(np.repeat(arrays[..., :1], 3, axis=-1), backbone=TINY, device="cpu")["pre_logits/avg"]
    np.testing.assert_allclose(gray, rgb, rtol=1e-5, atol=1e-5)


def test_extract_one_hwc_array_is_one_image(images):
    """Check that extract on one (64, 64, 3) array returns one row, the same as that image in a stack of one."""
    arrays, _ = images
    one = arrays[0]
    single = extract(one, backbone=TINY, layers=["stage2"], device="cpu")["stage2/avg"]
    stacked = extract(one[None], backbone=TINY, layers=["stage2"], device="cpu")["stage2/avg"]
    assert single.shape[0] == 1
    np.testing.assert_array_equal(single, stacked)
    with pytest.raises(FeatxError, match=r"shape \(5, 5, 3\) is ambiguous .*array\[None\]"):
        extract(np.zeros((5, 5, 3), np.uint8), backbone=TINY, layers=["stage2"], device="cpu")


def test_extract_bad_image_names_the_file(tmp_path, image_folder):
    """Check that an undecodable file stops in-memory extraction with its name in the message."""
    bad = tmp_path / "broken.jpg"
    bad.write_text("this is not a jpeg")
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))[:2] + [str(bad)]
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        extract(paths, backbone=TINY, device="cpu")


def test_extract_validates_layers_and_poolings(images):
    """Check that unknown layers and poolings are refused before any work."""
    arrays, _ = images
    with pytest.raises(UnknownLayerError, match="Did you mean 'stage3'"):
        extract(arrays, backbone=TINY, layers=["stage33"], device="cpu")
    with pytest.raises(UnknownPoolingError, match="Did you mean 'max'"):
        extract(arrays, backbone=TINY, pooling="maxx", device="cpu")


def test_resolve_device_and_precision():
    """Check device and precision resolution and their error messages."""
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(FeatxError, match="Unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(FeatxError, match="Unknown precision 'half'.*auto, fp32, bf16, fp16"):
        resolve_precision("half", torch.device("cpu"))
    with pytest.raises(FeatxError, match="'fp16' is not supported on the CPU"):
        resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(FeatxError, match="CUDA is not available"):
            resolve_device("cuda")


def test_extract_bf16_close_to_fp32(images):
    """Check that bf16 autocast on the CPU gives features close to fp32 ones."""
    arrays, _ = images
    fp32 = extract(arrays, backbone=TINY, layers=["stage3"], device="cpu", precision="fp32")["stage3/avg"]
    bf16 = extract(arrays, backbone=TINY, layers=["stage3"], device="cpu", precision="bf16")["stage3/avg"]
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99


# --------------------------------------------------------------------------- with a feature store


def _hostile_folder(root):
    """Good images of awkward kinds and bad files, in two class folders."""
    rng = np.random.default_rng(0)
    good = root / "good"
    bad = root / "bad"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels[..., 0]).save(good / "gray.png")
    Image.fromarray(np.dstack([pixels, np.full((48, 64), 128, np.uint8)])).save(good / "rgba.png")
    Image.fromarray(pixels).convert("CMYK").save(good / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    Image.fromarray(pixels).save(good / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(pixels).save(good / "plain.jpg")
    data = (good / "plain.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("this is a text file")
    return {"good": sorted(good.iterdir()), "bad": sorted(bad.iterdir())}


def test_extract_to_store_skips_and_reports_bad_images(tmp_path):
    """Check that awkward images are decoded, bad ones skipped with their reason, and rows kept."""
    from featx.images import open_source

    files = _hostile_folder(tmp_path / "data")
    source = open_source(str(tmp_path / "data"))
    result = extract(source, backbone=TINY, layers=["stage2"], store=tmp_path / "cache", device="cpu")
    reasons = {name.rsplit("/", 1)[-1]: reason for name, reason in result.skipped}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.jpg"}
    assert "empty file" in reasons["empty.jpg"] and "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    kept = [source[i].rsplit("/", 1)[-1] for i in result.kept]
    assert sorted(kept) == sorted(p.name for p in files["good"])
    assert result["stage2/avg"].shape == (len(files["good"]), 32)
    assert "skipped 3 of 8 images" in result.summary()


def test_extract_to_store_raise_names_file_and_keeps_batches(tmp_path):
    """Check that on_error='raise' names the bad file and keeps the batches computed before it."""
    from featx.images import open_source
    from featx.store import FeatureStore

    files = _hostile_folder(tmp_path / "data")
    source = open_source([str(p) for p in files["good"]] + [str(files["bad"][0])])
    with pytest.raises(ImageDecodeError, match=files["bad"][0].name):
        extract(source, backbone=TINY, layers=["stage2"], store=tmp_path / "cache", device="cpu",
                on_error="raise", batch_size=2)
    [path] = (tmp_path / "cache").glob("*.h5")
    assert len(FeatureStore(path).keys) == 4  # two full batches before the bad one


def _counting(backbone):
    calls = []
    backbone.module.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    return calls


def test_extract_to_store_second_run_runs_no_forward_pass(tmp_path, image_folder):
    """Check that re-extracting stored images, or a renamed copy of one, runs no forward pass."""
    from featx.images import open_source

    first = extract(open_source(str(image_folder)), backbone=TINY, layers=["stage1", "pre_logits"],
                    pooling=["avg", "max"], store=tmp_path / "cache", device="cpu")
    assert first.n_computed == 12
    copy = image_folder / "class0" / "renamed_copy.png"
    copy.write_bytes(next((image_folder / "class0").glob("*.png")).read_bytes())
    backbone = load_backbone(TINY)
    calls = _counting(backbone)
    again = extract(open_source(str(image_folder)), backbone=backbone, layers=["stage1", "pre_logits"],
                    pooling=["avg", "max"], store=tmp_path / "cache", device="cpu")
    assert calls == [] and again.n_computed == 0
    assert len(again["pre_logits/max"]) == 13
    for name in first:
        by_key = dict(zip(again.kept_keys, again[name]))
        for key, row in zip(first.kept_keys, first[name]):
            np.testing.assert_array_equal(by_key[key], row)


def test_extract_to_store_fills_in_new_layer_and_new_images_only(tmp_path, images):
    """Check that a superset of images computes only new ones, and a new layer only that layer."""
    arrays, _ = images
    extract(arrays[:8], backbone=TINY, layers=["stage2"], store=tmp_path / "c", device="cpu")
    backbone = load_backbone(TINY)
    calls = _counting(backbone)
    result = extract(arrays, backbone=backbone, layers=["stage2"], store=tmp_path / "c", device="cpu")
    assert result.n_computed == 4 and sum(calls) == 4
    calls.clear()
    result = extract(arrays, backbone=backbone, layers=["stage2", "stage3"], store=tmp_path / "c", device="cpu")
    assert result.n_computed == 12 and result.store.entries == [("stage2", "avg"), ("stage3", "avg")]
    in_memory = extract(arrays, backbone=TINY, layers=["stage2", "stage3"], device="cpu")
    for name in in_memory:
        np.testing.assert_allclose(result[name], in_memory[name], rtol=1e-6, atol=1e-6)


def test_extract_to_store_mismatched_store_file_is_refused(tmp_path, images):
    """Check that a store file written with another configuration names existing and requested values."""
    from featx.exceptions import CacheMismatchError

    arrays, _ = images
    result = extract(arrays[:2], backbone=TINY, layers=["stage2"], store=tmp_path / "c", device="cpu",
                     precision="fp32")
    with pytest.raises(CacheMismatchError, match=r'precision: existing "fp32" but "bf16" was requested'):
        extract(arrays[:2], backbone=TINY, layers=["stage2"], store=result.store.path, device="cpu", precision="bf16")


def test_extract_to_store_float16(tmp_path, images):
    """Check that a float16 store keeps features close to float32 ones, in a separate file."""
    arrays, _ = images
    f32 = extract(arrays, backbone=TINY, layers=["stage3"], store=tmp_path / "c", device="cpu")
    f16 = extract(arrays, backbone=TINY, layers=["stage3"], store=tmp_path / "c", device="cpu", dtype="float16")
    assert f16.store.path != f32.store.path and f16.store.dtype == "float16"
    np.testing.assert_allclose(f16["stage3/avg"], f32["stage3/avg"], rtol=2e-3, atol=2e-3)


def test_extract_to_store_warm_run_never_loads_weights(tmp_path, images):
    """Check that a run served from the store does not read the weights at all."""
    arrays, _ = images
    extract(arrays, backbone=TINY, layers=["stage1"], store=tmp_path / "c", device="cpu")
    backbone = load_backbone(TINY, lazy=True)
    result = extract(arrays, backbone=backbone, layers=["stage1"], store=tmp_path / "c", device="cpu")
    assert result.n_computed == 0 and not backbone.loaded


def test_backbone_pickle_drops_the_network():
    """Check that a pickled backbone carries no weights and reloads them on use."""
    import pickle

    backbone = load_backbone(TINY)
    clone = pickle.loads(pickle.dumps(backbone))
    assert backbone.loaded and not clone.loaded and clone.weights == backbone.weights
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(clone.module(x), backbone.module(x))


def test_resolve_precision_auto_follows_cpu_flags(monkeypatch):
    """Check that auto picks bf16 only on CPUs with native bf16."""
    from featx import devices as ex

    monkeypatch.setattr(ex, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(ex, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.slow
@pytest.mark.weights
def test_bf16_lite0_features_close_to_fp32():
    """Check that bf16 Lite0 features have mean cosine >= 0.99 with fp32 at every layer.

    The worst single image is held to 0.98: stage1 is a linear bottleneck whose spatial mean
    nearly cancels on digits' black background (measured: mean 0.996, worst 0.983).
    """
    from featx.images import open_source

    source = open_source("digits", per_class=3)
    fp32 = extract(source, layers="all", device="cpu", precision="fp32")
    bf16 = extract(source, layers="all", device="cpu", precision="bf16")
    for key in fp32:
        a, b = fp32[key], bf16[key]
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        assert cosine.mean() >= 0.99 and cosine.min() >= 0.98, (key, cosine.mean(), cosine.min())


@pytest.mark.slow
@pytest.mark.weights
def test_bf16_digits_layer_table_within_001_of_fp32(tmp_path, capsys):
    """Check that the digits layer table (Lite0, every layer, logreg, 5-fold CV) moves by at most 0.01 in bf16.

    The bf16 features are eager torch's (``--runtime torch``): the ONNX runtimes auto may choose
    compute in fp32 at every precision. Measured on a 2-core AVX2 CPU (bf16 emulated: the bf16
    run takes about 3x the fp32 one): the largest change was 0.0082 (stage4 and pre_logits) on
    the 1,347 training images; on an AVX512-BF16 CPU also 0.0082 (stage4; stage1 0.003, where
    OpenVINO's bf16 inference, no longer used, moved it by 0.021).
    """
    from featx.cli import main

    common = ["digits", "--layers", "all", "--device", "cpu", "--cache", str(tmp_path)]
    assert main(["extract", *common, "--precision", "bf16", "--runtime", "torch"]) == 0
    capsys.readouterr()
    tables = {}
    for precision in ("fp32", "bf16"):  # bf16: read from the store the eager extraction filled
        assert main(["cv", *common, "--precision", precision, "--json"]) == 0
        tables[precision] = {row["layer"]: row["accuracy_mean"] for row in json.loads(capsys.readouterr().out)}
    assert list(tables["fp32"]) == list(tables["bf16"]) and len(tables["fp32"]) == 7  # stem … pre_logits
    differences = {layer: tables["bf16"][layer] - tables["fp32"][layer] for layer in tables["fp32"]}
    assert max(abs(d) for d in differences.values()) <= 0.01, differences


def test_extract_stop_check_keeps_completed_batches(tmp_path, images):
    """Check that a stop request ends the run after a batch, with that batch kept in the store."""
    from featx.store import FeatureStore

    arrays, _ = images
    calls = []

    def stop():
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(KeyboardInterrupt):
        extract(arrays, backbone=TINY, layers=["stage1"], store=tmp_path, device="cpu", batch_size=3, stop=stop)
    [path] = tmp_path.glob("*.h5")
    assert len(FeatureStore(path).keys) == 6  # two batches of three completed
    result = extract(arrays, backbone=TINY, layers=["stage1"], store=tmp_path, device="cpu", batch_size=3)
    assert result.n_computed == 6


def _photo_folder(root, n=6, size=(90, 70)):
    """Smooth-gradient JPEGs (what JPEG is for) in two class folders, plus a PNG, a CMYK JPEG,
    an EXIF-rotated JPEG and a truncated JPEG."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(0.02, 0.1, 3)
        pixels = np.stack([127 + 100 * np.sin(f[c] * xx + c) * np.cos(f[(c + 1) % 3] * yy) for c in range(3)], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i}.jpg", quality=95)
    base = Image.open(root / "class0" / "img0.jpg").convert("RGB")
    base.save(root / "class0" / "copy.png")
    base.convert("CMYK").save(root / "class1" / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(root / "class1" / "rotated.jpg", quality=95, exif=exif)
    data = (root / "class0" / "img2.jpg").read_bytes()
    (root / "class0" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return root


def test_extract_torch_decoder_matches_pil_decoder(tmp_path):
    """Check that decoding JPEGs with torchvision.io on the device gives the PIL path's features."""
    from featx.images import open_source

    source = open_source(_photo_folder(tmp_path / "photos"))
    kwargs = dict(backbone=TINY, layers=["stage2", "pre_logits"], pooling="avg", device="cpu", store=tmp_path / "s")
    pil = extract(source, decoder="pil", batch_size=4, **kwargs)
    tensor = extract(source, decoder="torch", batch_size=4, **kwargs)
    assert pil.keys == tensor.keys
    assert [name for name, _ in pil.skipped] == [name for name, _ in tensor.skipped]
    assert len(tensor.skipped) == 1 and tensor.skipped[0][0].endswith("truncated.jpg")
    assert tensor.n_computed == pil.n_computed == len(source) - 1  # a store of its own: all computed again
    for name in ("stage2/avg", "pre_logits/avg"):
        a, b = pil[name], tensor[name]
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.995, (name, cosine)


def test_extract_torch_decoder_store_is_its_own(tmp_path, image_folder):
    """Check that tensor-decoded features never share a store file with PIL-decoded ones."""
    from featx.images import open_source

    source = open_source(image_folder)
    kwargs = dict(backbone=TINY, layers="stage2", device="cpu", store=tmp_path / "s")
    pil = extract(source, decoder="pil", **kwargs)
    tensor = extract(source, decoder="torch", **kwargs)
    assert pil.store.path != tensor.store.path
    assert "decoder" not in pil.store.config and tensor.store.config["decoder"].startswith("torchvision.io")


def test_extract_torch_decoder_is_batch_size_invariant(tmp_path):
    """Check that mixing decoded and encoded images in one batch keeps every row in its place."""
    from featx.images import open_source

    source = open_source(_photo_folder(tmp_path / "photos"))
    runs = [extract(source, backbone=TINY, layers="stage2", device="cpu", decoder="torch", batch_size=b,
                    on_error="skip", store=tmp_path / f"s{b}") for b in (1, 3, 64)]  # fmt: skip
    for run in runs[1:]:
        np.testing.assert_allclose(run["stage2/avg"], runs[0]["stage2/avg"], rtol=1e-5, atol=1e-6)


def test_extract_torch_decoder_raise_names_the_file(tmp_path):
    """Check that on_error='raise' stops at a JPEG no decoder reads, naming it."""
    from featx.images import open_source

    source = open_source(_photo_folder(tmp_path / "photos"))
    with pytest.raises(ImageDecodeError, match="truncated.jpg"):
        extract(source, backbone=TINY, layers="stage2", device="cpu", decoder="torch", on_error="raise", store=True)


def test_resolve_decoder_validates():
    """Check that the decoder resolves by device and unknown names are refused with the choices."""
    from featx.extraction import resolve_decoder

    assert resolve_decoder("auto", torch.device("cpu")) == "pil"
    assert resolve_decoder("auto", torch.device("cuda")) == "torch"
    assert resolve_decoder("torch", torch.device("cpu")) == "torch"
    with pytest.raises(FeatxError, match="expected one of auto, pil, torch"):
        resolve_decoder("nvjpeg", torch.device("cpu"))
def test_extract_hflip_equals_mean_of_image_and_mirror(images):
    """Check that flip-averaged features equal the mean of the plain features of the images and of their mirrors."""
    arrays, _ = images
    options = dict(backbone=TINY, layers=["stage2", "pre_logits"], pooling=["avg", "spp"], device="cpu")
    averaged = extract(arrays, tta="hflip", **options)
    plain = extract(arrays, **options)
    mirrored = extract(np.ascontiguousarray(arrays[:, :, ::-1]), **options)
    for key in plain:
        np.testing.assert_allclose(averaged[key], (plain[key] + mirrored[key]) / 2, rtol=1e-4, atol=1e-5)
    assert not np.allclose(plain["stage2/spp"], mirrored["stage2/spp"])  # the mirror is not a no-op


def test_extract_hflip_has_a_store_of_its_own(tmp_path, images):
    """Check that plain and flip-averaged features never share a store file, and plain stores keep their name."""
    arrays, _ = images
    plain = extract(arrays, backbone=TINY, device="cpu", store=tmp_path)
    averaged = extract(arrays, backbone=TINY, device="cpu", store=tmp_path, tta="hflip")
    assert plain.store.path != averaged.store.path
    assert "tta" not in plain.store.config and averaged.store.config["tta"] == "hflip"
    assert not np.allclose(plain["pre_logits/avg"], averaged["pre_logits/avg"])
    again = extract(arrays, backbone=TINY, device="cpu", store=tmp_path, tta="none")
    assert again.store.path == plain.store.path and again.n_computed == 0


def test_extract_unknown_tta_is_refused(images):
    """Check that an unknown tta names the accepted values."""
    arrays, _ = images
    with pytest.raises(FeatxError, match="expected 'none'.*'hflip'"):
        extract(arrays, backbone=TINY, device="cpu", tta="vflip")


@pytest.mark.slow
def test_extract_compiled_equals_eager_with_a_padded_last_batch(images, tmp_path):
    """Check that compile=True gives the eager features (short last batch padded, flip averaging too) and the same store."""
    arrays, _ = images  # 12 images: batches of 5, 5 and a padded 2
    options = dict(backbone=TINY, layers=["stage1", "pre_logits"], pooling=["avg", "spp"], device="cpu", batch_size=5,
                   precision="fp32")
    for tta in (None, "hflip"):
        eager = extract(arrays, tta=tta, **options)
        compiled = extract(arrays, tta=tta, compile=True, **options)
        for key in eager:
            assert compiled[key].shape == eager[key].shape
            np.testing.assert_allclose(compiled[key], eager[key], rtol=1e-5, atol=1e-6)
    stored = extract(arrays, store=tmp_path, compile=True, **options)
    assert extract(arrays, store=tmp_path, **options).store.path == stored.store.path  # not part of the configuration


def test_extract_compile_refuses_the_ray_engine(images, tmp_path):
    """Check that compile=True with engine='ray' fails at once and says to leave one out."""
    arrays, _ = images
    with pytest.raises(FeatxError, match="does not go with engine='ray'"):
        extract(arrays, backbone=TINY, device="cpu", store=tmp_path, engine="ray", compile=True)


def test_extract_max_pixels_refuses_then_accepts_a_large_file(tmp_path):
    """Check that max_pixels= refuses a 300×300 PNG above it, naming the file and both fixes, and accepts it below."""
    path = tmp_path / "large.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(path)
    fix = r"pass --max-pixels 90000 \(CLI\) or max_pixels=90000 \(Python\), or more, if you trust this file"
    with pytest.raises(ImageDecodeError, match=rf"large\.png' \(decompression bomb: 300×300 = 90000 pixels exceeds the "
                                               rf"limit of 10000\): {fix}"):
        extract([str(path)], backbone=TINY, layers="stage2", device="cpu", on_error="raise", max_pixels=10_000)
    features = extract([str(path)], backbone=TINY, layers="stage2", device="cpu", on_error="raise", max_pixels=100_000)
    assert features["stage2/avg"].shape[0] == 1


def test_extract_max_pixels_is_not_part_of_the_store(tmp_path):
    """Check that max_pixels changes which images are accepted, not the store they are kept in."""
    path = tmp_path / "large.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(path)
    refused = extract([str(path)], backbone=TINY, layers="stage2", device="cpu", store=tmp_path / "c",
                      max_pixels=10_000)
    accepted = extract([str(path)], backbone=TINY, layers="stage2", device="cpu", store=tmp_path / "c",
                       max_pixels=100_000)
    assert len(refused.skipped) == 1 and "--max-pixels 90000" in refused.skipped[0][1]
    assert not accepted.skipped and accepted.n_computed == 1 and accepted.store.path == refused.store.path


def test_extract_to_store_timings_sum_within_the_run_and_decoding_changes_no_feature(tmp_path, image_folder):
    """Check that a store run reports where its time went, and that threads or worker processes store the same rows."""
    from featx.images import open_source

    source = open_source(str(image_folder))
    runs = {}
    for workers in ("auto", 1):
        runs[workers] = extract(source, backbone=TINY, layers=["stage2", "pre_logits"], batch_size=5,
                                store=tmp_path / f"cache-{workers}", device="cpu", num_workers=workers)
    threaded, processes = runs["auto"], runs[1]
    assert set(threaded.timings) == {"hash", "decode", "handover", "network", "write"}
    assert all(seconds > 0 for seconds in threaded.timings.values())
    assert sum(threaded.timings.values()) <= threaded.seconds
    assert processes.timings["decode_workers"] > 0 and processes.timings["decode"] == 0
    for name in threaded:
        np.testing.assert_array_equal(threaded[name], processes[name])
    assert threaded.kept_keys == processes.kept_keys
