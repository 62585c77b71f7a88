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


def one_batch(inputs: Any) -> Any:
    """A batch's inputs as data that ``first_input`` reads back whole: a tensor as it is, a tuple or dict of
    inputs as a one-batch list (a bare tuple would read as an ``(inputs, targets)`` pair)."""
    return inputs if isinstance(inputs, torch.Tensor) else [(inputs,)]


def model_input(batch: Any) -> Any:
    """The model's input in a batch: the first element of an ``(inputs, targets, ...)`` tuple, else the batch."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def first_input(data: torch.Tensor | Iterable) -> Any:
    """The model input of ``data``: an input tensor as it is, else the inputs of its first batch (an
    ``(inputs, targets)`` pair counts too: its first item is the inputs). A loader that takes ``set_epoch``
    is set to epoch 0 first: what is calibrated on it must not depend on the epoch an earlier run left it at
    (a fine-tune after another on the same loader would otherwise calibrate on a different batch)."""
    if isinstance(data, (torch.Tensor, dict)):  # a dict is one batch's named inputs, never a loader
        return data
    set_epoch(data, 0)
    for batch in data:
        return model_input(batch)
    raise MixbitsError("the data yields no batches, so there is no example input; pass example_input=")


# A batch's inputs are one tensor (model(x)), a tuple or list of them (model(*inputs)) or a dict of them
# (model(**inputs)): token ids, several streams, named features. Targets never travel with them.
def call_model(model, inputs: Any):
    """``model`` applied to a batch's inputs: positional for a tuple or list, keywords for a dict."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def to_device(data, device):
    """Tensors, and tensors inside tuples, lists and dicts, moved to ``device``; anything else as it is."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, (tuple, list)):
        return type(data)(to_device(d, device) for d in data)
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    return data


def first_rows(data, count: int):
    """The first ``count`` samples of a batch's inputs (every tensor cut along its first dimension)."""
    if isinstance(data, torch.Tensor):
        return data[:count] if data.dim() else data
    if isinstance(data, (tuple, list)):
        return type(data)(first_rows(d, count) for d in data)
    if isinstance(data, dict):
        return {k: first_rows(v, count) for k, v in data.items()}
    return data


def batch_size(data) -> int:
    """Samples in a batch: the first dimension of its first tensor (1 when it holds none)."""
    if isinstance(data, torch.Tensor):
        return int(data.shape[0]) if data.dim() else 1
    items = data.values() if isinstance(data, dict) else data if isinstance(data, (tuple, list)) else ()
    for item in items:
        return batch_size(item)
    return 1


def input_tensors(data) -> list:
    """The tensors of a batch's inputs, in order (dict values in key order as given)."""
    if isinstance(data, torch.Tensor):
        return [data]
    items = data.values() if isinstance(data, dict) else data if isinstance(data, (tuple, list)) else ()
    return [t for item in items for t in input_tensors(item)]
