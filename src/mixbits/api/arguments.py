"""Argument checks of the library verbs: a wrong type is one MixbitsError naming the argument, what it got and
what it takes, before any work (instead of an AttributeError from deep inside a model swap)."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import MixbitsError
from ..space import quantizable_layers
from ..train.inputs import check_parameters


def check_model(model, name: str = "model") -> nn.Module:
    """A float32 ``nn.Module``."""
    if not isinstance(model, nn.Module):
        hint = (f"; build it first, e.g. mixbits.models.create({model!r}, num_classes=10)" if isinstance(model, str)
                else "")
        raise MixbitsError(f"{name} must be a torch.nn.Module, got {_got(model)}{hint}")
    check_parameters(model, name)
    return model


def check_int(value, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        expected = "a whole number" + (f" >= {minimum}" if minimum is not None else "")
        raise MixbitsError(f"{name} must be {expected}, got {_got(value)}")
    return value


def check_optional_callable(value, name: str) -> None:
    if value is not None and not callable(value):
        raise MixbitsError(f"{name} must be a function (model, batch) -> loss, or None; got {_got(value)}")


def check_path(value, name: str, optional: bool = True) -> None:
    if (value is None and optional) or isinstance(value, (str, os.PathLike)):
        return
    raise MixbitsError(f"{name} must be a directory path (str or pathlib.Path){' or None' * optional}, got "
                       f"{_got(value)}")


def check_device(value) -> None:
    if not isinstance(value, (str, torch.device)):
        raise MixbitsError(f"device must be a string such as 'cpu' or 'cuda:0', or a torch.device; got {_got(value)}")


def check_mapping(value, name: str) -> None:
    if value is not None and not isinstance(value, dict):
        raise MixbitsError(f"{name} must be a dict of settings, or None; got {_got(value)}")


def check_trainable(model: nn.Module, method: str) -> None:
    """HAWQ measures each layer's curvature through its weight's gradient: every quantizable weight must train."""
    if method != "hawq":
        return
    modules = dict(model.named_modules())
    frozen = [name for name in quantizable_layers(model) if not modules[name].weight.requires_grad]
    if frozen:
        raise MixbitsError(f"method 'hawq' differentiates every layer's weight, and layer(s) "
                           f"{', '.join(map(repr, frozen[:5]))}{' ...' if len(frozen) > 5 else ''} have "
                           "requires_grad=False; unfreeze them "
                           "(model.requires_grad_(True)) or choose another method, which trains what is trainable")


def _got(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
