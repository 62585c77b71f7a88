"""ImageNet-style ResNets with torchvision's layer names, so torchvision state dicts load unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import MODELS
from .init import init_resnet_weights


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN projection when the shortcut changes shape (named downsample.0/1 as in torchvision)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = _downsample(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """Stem, four stages (64/128/256/512 base planes), global average pool, linear ``fc``."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: list[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
    ):
        super().__init__()
        if small_input:
            # 28-32 px images: a 7x7/2 stem plus maxpool would leave too few pixels for the stages.
            self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()

        in_planes = 64
        stages = []
        for stage_index, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage, strict=True)):
            blocks = []
            for block_index in range(count):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, in_chans: int = 3, *, small_input: bool = False) -> nn.Module:
    """ImageNet ResNet-18 (11.7M params at 1000 classes), torchvision layer names; small_input for 32 px."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans, small_input)


@MODELS.register("resnet50")
def resnet50(num_classes: int = 10, in_chans: int = 3, *, small_input: bool = False) -> nn.Module:
    """ImageNet ResNet-50 (25.6M params at 1000 classes), torchvision layer names; small_input for 32 px."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_chans, small_input)
