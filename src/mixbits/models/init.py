"""Weight initialisation shared by the ResNet families (torchvision's scheme)."""

from __future__ import annotations

from torch import nn


def init_resnet_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) convolutions; BatchNorm at weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
