"""Any iterable of batches as mixbits' training and scoring read it.

A user's data is a ``DataLoader``, a list of ``(inputs, targets)`` tuples, or any iterable of batches
their ``loss_fn`` understands. The train loop needs a length (its learning-rate schedule is per step) and
a way to ask for an epoch's order; :class:`Batches` gives both without copying a loader that has them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..errors import MixbitsError


class Batches:
    """Wraps ``data`` (re-iterable, with a length); one-pass iterables are read once and kept in memory."""

    def __init__(self, data: Iterable, what: str = "data"):
        if isinstance(data, Batches):
            data = data.data
        if data is None or not isinstance(data, Iterable) or isinstance(data, (torch.Tensor, str, bytes)):
            raise MixbitsError(f"{what} must be an iterable of batches (a DataLoader or a list of (inputs, targets) "
                               f"tuples), got {type(data).__name__}")
        if not hasattr(data, "__len__") or iter(data) is data:  # a generator would be empty on its second pass
            data = list(data)
        self.data = data
        if len(self) == 0:
            raise MixbitsError(f"{what} yields no batches; check the dataset and the batch size")

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator:
        return iter(self.data)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the loader or its sampler (DistributedSampler, mixbits' BatchLoader) when they have it."""
        set_epoch(self.data, epoch)


def set_epoch(loader, epoch: int) -> None:
    """Make the data order depend only on (seed, epoch), which makes resumed runs reproduce: told to the
    loader or its sampler (DistributedSampler, mixbits' BatchLoader) when either listens."""
    for obj in (loader, getattr(loader, "sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def model_input(batch: Any) -> Any:
    """The model's input in a batch: the first element of an ``(inputs, targets, ...)`` tuple, else the batch."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def first_input(data: torch.Tensor | Iterable) -> Any:
    """The model input of ``data``: an input tensor as it is, else the inputs of its first batch (an
    ``(inputs, targets)`` pair counts too: its first item is the inputs). A loader that takes ``set_epoch``
    is set to epoch 0 first: what is calibrated on it must not depend on the epoch an earlier run left it at
    (a fine-tune after another on the same loader would otherwise calibrate on a different batch)."""
    if isinstance(data, torch.Tensor):
        return data
    set_epoch(data, 0)
    for batch in data:
        return model_input(batch)
    raise MixbitsError("the data yields no batches, so there is no example input; pass example_input=")
