"""A backbone's preprocessing, split where it is cheapest to run.

Workers turn a decoded PIL image into a ``uint8`` tensor of the crop size (resize the shorter
side, centre crop); the main process moves the batch to the device and normalises it there, so
that only a quarter of the bytes cross process and device boundaries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = ["Preprocess"]

_INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """Resize, centre-crop and normalisation that a backbone's weights expect.

    Parameters
    ----------
    resize : int
        Length the shorter image side is resized to.
    crop : int
        Side of the square centre crop fed to the network.
    mean, std : tuple of float
        Per-channel normalisation applied to pixel values scaled to [0, 1].
    interpolation : {"bilinear", "bicubic", "nearest"}

    Examples
    --------
    >>> p = Preprocess(resize=36, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    >>> t = p.to_tensor(Image.new("RGB", (64, 48)))
    >>> tuple(t.shape), t.dtype
    ((3, 32, 32), torch.uint8)
    >>> p.normalize(t[None]).shape
    torch.Size([1, 3, 32, 32])
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    @classmethod
    def from_crop_pct(cls, crop: int, crop_pct: float, **kwargs) -> Preprocess:
        """Build from timm's convention: resize to ``floor(crop / crop_pct)``."""
        return cls(resize=int(math.floor(crop / crop_pct)), crop=crop, **kwargs)

    def describe(self) -> dict:
        """Plain-JSON description, recorded in the feature store's configuration."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def draft_size(self) -> tuple[int, int]:
        """Smallest size a JPEG may be decoded at without losing what the resize keeps."""
        return (self.resize, self.resize)

    def _geometry(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(resized width, height)`` and the crop's ``(left, top)``.

        Same arithmetic as torchvision's ``Resize(int)`` and ``CenterCrop``, so features match theirs.
        """
        if width <= height:
            size = (self.resize, int(self.resize * height / width))
        else:
            size = (int(self.resize * width / height), self.resize)
        return size, (int(round((size[0] - self.crop) / 2.0)), int(round((size[1] - self.crop) / 2.0)))

    def crop_array(self, image: Image.Image) -> np.ndarray:
        """Resize the shorter side and centre-crop: ``uint8`` array of shape (crop, crop, 3)."""
        size, (left, top) = self._geometry(*image.size)
        if size != image.size:
            image = image.resize(size, _INTERPOLATION[self.interpolation])
        image = image.crop((left, top, left + self.crop, top + self.crop))
        return np.array(image.convert("RGB"), dtype=np.uint8)

    def crop_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """:meth:`crop_array` for a decoded ``uint8`` tensor of shape (3, H, W), on its device.

        Used for images decoded on the GPU; the antialiased resize matches PIL's closely but not
        bit for bit, which is why the decoder is part of a feature store's configuration.
        """
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        height, width = image.shape[-2:]
        size, (left, top) = self._geometry(int(width), int(height))
        if size != (width, height):
            mode = InterpolationMode(self.interpolation)
            image = F.resize(image, [size[1], size[0]], interpolation=mode, antialias=True)
        return image[:, top : top + self.crop, left : left + self.crop]

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """:meth:`crop_array` as a ``uint8`` tensor of shape (3, crop, crop).

        The tensor is a channels-last view of the (H, W, 3) pixels: no copy is made, and a
        batch stacked from (H, W, 3) arrays and permuted is already in the channels-last memory
        format the network runs in.
        """
        import torch

        return torch.from_numpy(self.crop_array(image)).permute(2, 0, 1)

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Scale a ``uint8`` batch (n, 3, H, W) to [0, 1] and normalise, on the batch's device."""
        import torch

        if dtype is None:
            dtype = torch.float32
        mean = torch.tensor(self.mean, device=batch.device, dtype=dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device, dtype=dtype).view(1, -1, 1, 1)
        # the same three operations in place on one new tensor (no buffer per step): the same values
        return batch.to(dtype, copy=True).div_(255.0).sub_(mean).div_(std)
