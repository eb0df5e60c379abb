"""The tiny test network behind the ``featx_tiny_cnn`` backbone (imports torch; :mod:`featx.backbones.tiny` registers it)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """A small, seeded CNN with BatchNorm, for tests: 32×32 input, 4 stages, 10 logits.

    Examples
    --------
    >>> TinyCNN()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
            )

        self.stem = block(3, width)
        self.stage1 = block(width, 2 * width)
        self.stage2 = block(2 * width, 4 * width)
        self.stage3 = block(4 * width, 4 * width)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.classifier(self.pool(x))
