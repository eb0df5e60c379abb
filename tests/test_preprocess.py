import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from featx.preprocess import Preprocess


def test_preprocess_matches_torchvision_pipeline():
    """Check that resize, crop and normalisation equal torchvision's Resize/CenterCrop/Normalize."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(75, 120, 3), dtype=np.uint8))
    p = Preprocess(resize=40, crop=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), interpolation="bicubic")
    ours = p.normalize(p.to_tensor(image)[None])[0]
    theirs = transforms.Compose(
        [
            transforms.Resize(40, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(p.mean, p.std),
        ]
    )(image)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_preprocess_from_crop_pct_follows_timm():
    """Check that crop_pct gives timm's resize length floor(crop / crop_pct)."""
    assert Preprocess.from_crop_pct(224, 0.875).resize == 256
    assert Preprocess.from_crop_pct(240, 0.882).resize == 272


def test_preprocess_describe_is_plain_json():
    """Check that the description is JSON-ready and records every parameter."""
    d = Preprocess(resize=36, crop=32).describe()
    assert d == {
        "resize": 36,
        "crop": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
    }
