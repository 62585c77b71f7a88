"""Model zoo: small CIFAR-style and ImageNet-style networks, created by name.

Every factory takes ``num_classes`` and ``in_chans`` plus its own keyword options, and builds only
``nn.Conv2d``/``nn.Linear`` modules for the layers that carry weights, so the quantizers can swap
them by module name.
"""

from __future__ import annotations

from torch import nn

from ..errors import MixbitsError
from ..registry import Registry
from ..specs import call_with_accepted, is_spec, load_factory

MODELS = Registry("model")


def create(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build the registered model ``name``, or a user's ``module.path:factory`` / ``file.py:factory`` /
    ``torchvision:NAME`` / ``timm:NAME``; extra keyword arguments go to its factory.

    A user's factory is given ``num_classes`` and ``in_chans`` when its signature takes them.
    """
    if int(num_classes) < 1:
        raise MixbitsError(f"num_classes must be >= 1, got {num_classes!r}.")
    if int(in_chans) < 1:
        raise MixbitsError(f"in_chans must be >= 1, got {in_chans!r}.")
    if not is_spec(name):
        return MODELS.get(name)(num_classes=int(num_classes), in_chans=int(in_chans), **kwargs)
    model = call_with_accepted(load_factory(name, "model"), {"num_classes": int(num_classes),
                                                             "in_chans": int(in_chans)}, kwargs, name)
    if not isinstance(model, nn.Module):
        raise MixbitsError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return MODELS.names()


# Imported last so that each module's @MODELS.register runs against the registry above.
from . import mobilenetv2, resnet, resnet_cifar, small_cnn, vit  # noqa: E402, F401

__all__ = ["MODELS", "create", "list_models"]
