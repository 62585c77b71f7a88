"""A model's inputs as an ONNX graph sees them: named tensors of their own dtypes, batch first and dynamic.

A batch's inputs are one tensor (graph input ``input``), a tuple or list of tensors (``input_0``,
``input_1`` ...: the model's positional arguments) or a dict of tensors (its keys: keyword arguments).
Float inputs run as float32, integer ones (token ids) as int64, booleans (masks) as bool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.batches import call_model
from ..errors import MixbitsError


@dataclass(frozen=True)
class GraphInputs:
    """The graph input names and how a batch's inputs map onto them."""

    names: tuple[str, ...]
    form: str  # "tensor" | "tuple" | "dict"

    @classmethod
    def of(cls, example) -> GraphInputs:
        if isinstance(example, torch.Tensor):
            return cls(("input",), "tensor")
        if isinstance(example, Mapping) and example and all(isinstance(v, torch.Tensor) for v in example.values()):
            return cls(tuple(str(k) for k in example), "dict")
        if isinstance(example, (tuple, list)) and example and all(isinstance(v, torch.Tensor) for v in example):
            return cls(tuple(f"input_{i}" for i in range(len(example))), "tuple")
        raise MixbitsError(f"the example input is a {type(example).__name__}; expected a tensor, or a non-empty tuple "
                           "or dict of tensors (the model's positional or keyword arguments)")

    def tensors(self, inputs) -> list[torch.Tensor]:
        """The batch's input tensors in graph-input order."""
        if self.form == "tensor":
            tensors = [inputs] if isinstance(inputs, torch.Tensor) else None
        elif self.form == "dict":
            tensors = [inputs[k] for k in self.names] if isinstance(inputs, Mapping) and set(inputs) == set(
                self.names) else None
        else:
            tensors = list(inputs) if isinstance(inputs, (tuple, list)) and len(inputs) == len(self.names) else None
        if tensors is None:
            raise MixbitsError(f"inputs of type {type(inputs).__name__} do not match the exported graph's inputs "
                               f"{list(self.names)}; give every batch in the form of the example input")
        return tensors

    def feeds(self, inputs) -> dict[str, np.ndarray]:
        """onnxruntime's feed dict for a batch's inputs."""
        return {name: as_numpy(t) for name, t in zip(self.names, self.tensors(inputs), strict=True)}

    def rows(self, inputs, index) -> object:
        """The samples ``index`` (a slice or index tensor) of a batch's inputs, in the same form."""
        tensors = [t[index] for t in self.tensors(inputs)]
        if self.form == "tensor":
            return tensors[0]
        return dict(zip(self.names, tensors, strict=True)) if self.form == "dict" else tuple(tensors)

    def positional(self, model: nn.Module) -> nn.Module:
        """A module taking the graph inputs as positional tensors, for torch's exporter (the model itself when
        it takes one tensor, so that node names stay the model's own)."""
        return model if self.form == "tensor" else _Positional(model, self)


class _Positional(nn.Module):
    def __init__(self, model: nn.Module, inputs: GraphInputs):
        super().__init__()
        self.model, self.inputs = model, inputs

    def forward(self, *tensors):
        if self.inputs.form == "tensor":
            return self.model(tensors[0])
        if self.inputs.form == "dict":
            return call_model(self.model, dict(zip(self.inputs.names, tensors, strict=True)))
        return call_model(self.model, tensors)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """float32 for floating tensors, int64 for integer ones, bool as it is: what the graph's inputs take."""
    t = t.detach().cpu()
    if t.is_floating_point():
        return t.float().numpy()
    return t.numpy() if t.dtype == torch.bool else t.long().numpy()


def output_tensors(out) -> list[torch.Tensor]:
    """A model's outputs as a flat list: a tensor, the tensors of a tuple or list, or a dict's values in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    raise MixbitsError(f"the model returned a {type(out).__name__}; export needs tensors (alone, in a tuple, list "
                       "or dict)")


def output_names(out) -> list[str]:
    """Graph output names: ``output`` for one tensor, else ``output_0``, ``output_1`` ... (dict keys where given)."""
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, Mapping) and all(isinstance(v, torch.Tensor) for v in out.values()):
        return [str(k) for k in out]
    return [f"output_{i}" for i in range(len(output_tensors(out)))]
