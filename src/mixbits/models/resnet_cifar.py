"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2): 6n+2 layers, three stages of 16/32/64 channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MixbitsError
from . import MODELS
from .init import init_resnet_weights


class PadShortcut(nn.Module):
    """Option A shortcut: parameter-free stride-2 subsampling, then zero channels appended."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Pad the channel dimension evenly on both sides, as the reference implementation does.
        front = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, front, self.extra_channels - front))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity, zero-pad (A) or 1x1 conv (B) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(stride, planes - in_planes)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv, three stages of ``blocks_per_stage`` basic blocks, global average pool, linear head."""

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_chans: int = 3,
        *,
        shortcut: str = "A",
        width: float = 1.0,
    ):
        super().__init__()
        shortcut = str(shortcut).upper()
        if shortcut not in ("A", "B"):
            raise MixbitsError(f"shortcut must be 'A' or 'B', got {shortcut!r}.")
        if not width > 0:
            raise MixbitsError(f"width must be > 0, got {width!r}.")
        widths = [max(4, round(c * width)) for c in (16, 32, 64)]

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for stage_index, planes in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, in_chans: int = 3, *, shortcut: str = "A", width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-20 (0.27M params at 10 classes), option-A shortcuts by default."""
    return CifarResNet(3, num_classes, in_chans, shortcut=shortcut, width=width)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 10, in_chans: int = 3, *, shortcut: str = "A", width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-32 (0.46M params at 10 classes), option-A shortcuts by default."""
    return CifarResNet(5, num_classes, in_chans, shortcut=shortcut, width=width)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, in_chans: int = 3, *, shortcut: str = "A", width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-56 (0.85M params at 10 classes), option-A shortcuts by default."""
    return CifarResNet(9, num_classes, in_chans, shortcut=shortcut, width=width)
