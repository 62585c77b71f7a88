"""Which layers carry weights, which of them mixbits quantizes, and what one call of each costs in MACs.

One table for the search space, the cost model and the export, so that no weight-bearing layer is
counted by one and missed by another. A layer is

- *quantizable* (``QUANTIZABLE``): convolutions (1-3-D, transposed 1-2-D), ``nn.Linear``, and
  ``nn.Embedding`` (weight only). They enter the search space and the policy;
- *kept float* (``kept_float``): every other module that owns a weight matrix (a parameter named
  ``weight...`` with two or more dimensions), e.g. ``nn.GRU``/``nn.LSTM``/``nn.RNN``, a packed
  ``nn.MultiheadAttention``, ``nn.Bilinear``, or a quantizable layer left out of the space. They are
  profiled too and priced at 32/32 bits, so budgets and compression figures include them.

MACs are per input sample (profiling runs at batch 1), from the layer's real input and output.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)
RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)  # kept float: their gates' products are not quantized
SUPPORTED = "nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d, nn.Linear, nn.Embedding"


def kind(module: nn.Module) -> str:
    """``conv``, ``conv_transpose``, ``linear``, ``embedding``, ``recurrent``, ``attention`` or ``other``."""
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "conv_transpose"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, RECURRENT):
        return "recurrent"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return "other"


def owns_weights(module: nn.Module) -> bool:
    """Whether the module itself holds a weight matrix (norm layers' 1-D scales do not count)."""
    return any(name.startswith("weight") or name.endswith("_weight")
               for name, p in module.named_parameters(recurse=False) if p.dim() >= 2)


def weight_elements(module: nn.Module) -> int:
    """Elements of the module's own weight matrices (what a quantized layer stores in w bits)."""
    return sum(p.numel() for name, p in module.named_parameters(recurse=False)
               if p.dim() >= 2 and (name.startswith("weight") or name.endswith("_weight")))


def own_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def macs(module: nn.Module, inputs: tuple, out) -> int:
    """Multiply-accumulates of one call, per sample of a batch-1 call."""
    k = kind(module)
    if k == "conv":
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if k == "conv_transpose":  # every input element scatters into (out / groups) x kernel outputs
        return inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if k == "linear":  # out.numel() counts every row (tokens, positions) times out_features
        return out.numel() * module.in_features
    if k == "recurrent":
        return _recurrent_steps(module, inputs[0]) * weight_elements(module)
    if k == "attention":  # the four projections of a packed nn.MultiheadAttention (query, key, value rows)
        return _attention_macs(module, inputs)
    return 0  # a lookup (Embedding) multiplies nothing; an unknown module's product is not known


def _recurrent_steps(module: nn.Module, x) -> int:
    """Time steps of one sample: every weight matrix of every layer and direction is applied once per step."""
    if isinstance(x, PackedSequence):
        return int(x.data.shape[0])
    if x.dim() == 2:  # unbatched (L, features)
        return int(x.shape[0])
    return int(x.shape[1] if module.batch_first else x.shape[0])


def _attention_macs(module: nn.MultiheadAttention, inputs: tuple) -> int:
    tensors = [t for t in inputs[:3] if isinstance(t, torch.Tensor)]
    if len(tensors) < 3:
        return 0
    q, k, v = tensors
    rows = [t.shape[:-1].numel() for t in (q, k, v)]  # batch 1: the rows are the tokens
    e = module.embed_dim
    return rows[0] * e * e + rows[1] * module.kdim * e + rows[2] * module.vdim * e + rows[0] * e * e


def weighted_layers(model: nn.Module) -> list[str]:
    """Names of every quantizable layer and every other module that owns a weight matrix, in registration order.

    Children of a packed ``nn.MultiheadAttention`` are left out: that module reads their weights directly
    (its output projection never runs as a layer), and the attention counts as one kept-float layer.
    """
    inside_attention = {f"{name}.{child}" for name, m in model.named_modules()
                        if isinstance(m, nn.MultiheadAttention) for child, _ in m.named_modules() if child}
    return [name for name, m in model.named_modules()
            if name not in inside_attention and (isinstance(m, QUANTIZABLE) or owns_weights(m))]


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers mixbits quantizes (quantized ones included), in registration order."""
    modules = dict(model.named_modules())
    return [n for n in weighted_layers(model) if isinstance(modules[n], QUANTIZABLE)]


def kept_float(model: nn.Module, quantized) -> list[str]:
    """The weight-bearing layers of ``model`` outside ``quantized`` (names): what stays at 32 bits."""
    quantized = set(quantized)
    return [n for n in weighted_layers(model) if n not in quantized]
