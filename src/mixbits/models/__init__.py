"""Model zoo: small CIFAR-style and ImageNet-style networks, created by name.

Every factory takes ``num_classes`` and ``in_chans`` plus its own keyword options, and builds only
``nn.Conv2d``/``nn.Linear`` modules for the layers that carry weights, so the quantizers can swap
them by module name.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..errors import MixbitsError, did_you_mean
from ..registry import Registry
from ..specs import call_with_accepted, is_spec, load_factory

MODELS = Registry("model")
_GIVEN = ("num_classes", "in_chans")  # set from the dataset, never from the model's options


def create(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build the registered model ``name``, or a user's ``module.path:factory`` / ``file.py:factory`` /
    ``torchvision:NAME`` / ``timm:NAME``; extra keyword arguments go to its factory.

    A user's factory is given ``num_classes`` and ``in_chans`` when its signature takes them.
    """
    if int(num_classes) < 1:
        raise MixbitsError(f"num_classes must be >= 1, got {num_classes!r}.")
    if int(in_chans) < 1:
        raise MixbitsError(f"in_chans must be >= 1, got {in_chans!r}.")
    factory = load_factory(name, "model") if is_spec(name) else MODELS.get(name)
    problems = option_problems(factory, kwargs)
    if problems:
        raise MixbitsError("; ".join(f"model option {p}" for p in problems))
    if not is_spec(name):
        return factory(num_classes=int(num_classes), in_chans=int(in_chans), **kwargs)
    model = call_with_accepted(factory, {"num_classes": int(num_classes), "in_chans": int(in_chans)}, kwargs,
                               name, "model")
    if not isinstance(model, nn.Module):
        raise MixbitsError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def option_problems(factory, kwargs) -> list[str]:
    """Each keyword option that ``factory`` (any callable) cannot take, as ``"name: why; the options"``.

    Read from the signature, before anything is built: a factory taking ``**kwargs`` accepts every name.
    """
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call itself decide
        return []
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    options = [n for n, p in params.items() if n not in _GIVEN and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    listed = ", ".join(options) or "none"
    label = getattr(factory, "__name__", repr(factory))
    out = []
    for key in kwargs:
        if key in _GIVEN:
            out.append(f"{key}: set from the dataset, not a model option; remove it")
        elif key not in params and not takes_any:
            out.append(f"{key}: {label} takes no option {key!r}; its options: {listed}.{did_you_mean(key, options)}")
    return out


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return MODELS.names()


# Imported last so that each module's @MODELS.register runs against the registry above.
from . import mobilenetv2, resnet, resnet_cifar, small_cnn, vit  # noqa: E402, F401

__all__ = ["MODELS", "create", "list_models", "option_problems"]
