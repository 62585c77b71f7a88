"""Which layers read the model's input: the "first" layers a search space holds at fixed bits.

Registration order does not say which layer sees the input first: a model with two input branches has
two first layers, a token model's first layer is its embedding wherever it is declared, and in a
transformer whose first block reads the input, the query, key and value projections all read it. One
forward pass on an example input answers it: a layer is first when its input *is* one of the model's
input tensors (or a view of it: the same storage, shape and strides, as a transpose of the same tensor
gives each projection), and every layer reading the same tensor as a first layer is first too (its
siblings). When no layer reads an input tensor directly (the model normalises it first), the first
layer the forward calls is the first layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .data.batches import call_model, first_rows, input_tensors, to_device
from .errors import MixbitsError


def _key(t) -> tuple | None:
    if not isinstance(t, torch.Tensor):
        return None
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def first_layers(model: nn.Module, names: list[str], example) -> list[str]:
    """The layers of ``names`` that read the model's input (see the module doc), in ``names`` order."""
    model = copy.deepcopy(model).eval()  # hooks and eval mode stay off the caller's model
    modules = dict(model.named_modules())
    first = next(model.parameters(), None)
    example = to_device(first_rows(example, 1), first.device if first is not None else "cpu")
    seen: dict[str, tuple] = {}
    order: list[str] = []
    keep: list[torch.Tensor] = []  # held so no storage is reused (and its address matched) during the pass

    def hook(name):
        def record(module, args, kwargs):
            first = args[0] if args else next(iter(kwargs.values()), None)
            if name not in seen and _key(first) is not None:
                seen[name] = _key(first)
                order.append(name)
                keep.append(first)
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            call_model(model, example)
    except Exception as e:  # noqa: BLE001 - the user's forward may raise anything; say where it happened
        raise MixbitsError(f"finding the layers that read the input of {type(model).__name__} failed: "
                           f"{type(e).__name__}: {e}; check that the example input matches the model") from e
    finally:
        for h in handles:
            h.remove()
    inputs = {_key(t) for t in input_tensors(example)}
    readers = [n for n in order if seen[n] in inputs] or order[:1] or names[:1]
    read = {seen.get(n) for n in readers}
    return [n for n in names if n in readers or (n in seen and seen[n] in read)]
