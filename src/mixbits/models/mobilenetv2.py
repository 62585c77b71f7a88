"""MobileNetV2 (Sandler et al. 2018) with torchvision's layer names (features.N, classifier.1)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MixbitsError
from . import MODELS

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without dropping more than 10% (as torchvision)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """Conv, BN, ReLU6; a Sequential so the parameter names match torchvision's Conv2dNormActivation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when the shape is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        width: float = 1.0,
        small_input: bool = False,
        dropout: float = 0.2,
    ):
        super().__init__()
        if not width > 0:
            raise MixbitsError(f"width must be > 0, got {width!r}.")
        in_channels = make_divisible(32 * width)
        self.last_channel = make_divisible(1280 * max(1.0, width))

        # Small images keep full resolution through the stem and the first stride-2 stage (CIFAR variant).
        stem_stride = 1 if small_input else 2
        features: list[nn.Module] = [ConvBNReLU6(in_chans, in_channels, stride=stem_stride)]
        for stage_index, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            if small_input and stage_index == 1:
                s = 1
            out_channels = make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t))
                in_channels = out_channels
        features.append(ConvBNReLU6(in_channels, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@MODELS.register("mobilenetv2")
def mobilenetv2(
    num_classes: int = 10,
    in_chans: int = 3,
    *,
    width: float = 1.0,
    small_input: bool = False,
    dropout: float = 0.2,
) -> nn.Module:
    """MobileNetV2 (3.5M params at 1000 classes), depthwise convs; width multiplier, small_input for 32 px."""
    return MobileNetV2(num_classes, in_chans, width=width, small_input=small_input, dropout=dropout)
