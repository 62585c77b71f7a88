"""The layout of a model's inputs, kept in a run's model card so that every command rebuilds an input of the
right structure, shapes and dtypes without the data: one tensor, a tuple of tensors (``model(*inputs)``) or a
dict of them (``model(**inputs)``), nested as the batches nest them.

A layout is JSON: ``{"shape": [...], "dtype": "int64"}`` for a tensor (one sample's shape), ``{"tuple": [...]}``
or ``{"dict": {name: ...}}`` around the layouts of the items.
"""

from __future__ import annotations

import torch

from ..errors import MixbitsError


def describe(inputs) -> dict:
    """The layout of one batch's ``inputs`` (a tensor, or a tuple, list or dict of them)."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise MixbitsError("a model input must be a batched tensor (samples on dim 0), got a 0-d tensor")
        return {"shape": [int(s) for s in inputs.shape[1:]], "dtype": str(inputs.dtype).removeprefix("torch.")}
    if isinstance(inputs, (tuple, list)):
        return {"tuple": [describe(t) for t in inputs]}
    if isinstance(inputs, dict):
        return {"dict": {str(k): describe(v) for k, v in inputs.items()}}
    raise MixbitsError(f"a model input must be a tensor, or a tuple or dict of tensors, got {type(inputs).__name__}")


def build(layout: dict, rows: int = 1, generator: torch.Generator | None = None):
    """An input of ``layout`` with ``rows`` samples: zeros, or with ``generator`` standard normal floats (integer
    inputs, e.g. token ids, stay zeros: a valid id whatever the vocabulary)."""
    if "tuple" in layout:
        return tuple(build(item, rows, generator) for item in layout["tuple"])
    if "dict" in layout:
        return {k: build(item, rows, generator) for k, item in layout["dict"].items()}
    dtype = getattr(torch, layout["dtype"])
    shape = (rows, *layout["shape"])
    if generator is not None and dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.zeros(shape, dtype=dtype)


def first_tensor(layout: dict) -> dict:
    """The layout of the first tensor (in order, dict values as given)."""
    while "shape" not in layout:
        items = layout["tuple"] if "tuple" in layout else list(layout["dict"].values())
        if not items:
            raise MixbitsError("a model input holds no tensor; give each batch at least one input tensor")
        layout = items[0]
    return layout
