"""A tiny conv net for tests and demos: trains in seconds on CPU, any input of 8 px or more."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MixbitsError
from . import MODELS


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (the last two strided), adaptive average pool, linear head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, channels: int = 16):
        super().__init__()
        if int(channels) < 1:
            raise MixbitsError(f"channels must be >= 1, got {channels!r}.")
        c1, c2, c3 = channels, 2 * channels, 4 * channels
        self.conv1 = nn.Conv2d(in_chans, c1, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@MODELS.register("small_cnn")
def small_cnn(num_classes: int = 10, in_chans: int = 3, *, channels: int = 16) -> nn.Module:
    """Tiny 3-conv CNN (24k params at 10 classes) for tests and demos; any input size >= 8 px."""
    return SmallCNN(num_classes, in_chans, channels)
