"""One BatchNorm per (w, a) pair of the quantized layer that feeds it: a weight-sharing supernet's statistics.

A subnet's activation statistics depend on its bits, so a supernet either re-estimates them per policy
(recalibration) or keeps one BatchNorm, affine and running statistics, per bit-width pair of the layer
before it (the released one-shot code's choice, 25 per layer for {2..6}²). ``follows(model, x)`` finds by
one forward the BatchNorm that directly follows each multi-candidate quantized layer (the first BatchNorm to
run after it, before another quantized layer runs: a conv-BN block); ``attach_pair_bn`` replaces each by a
``PairBatchNorm`` that normalises with the pair its layer runs at; ``collapse_pair_bn`` puts plain
BatchNorms back, each a copy of its layer's current pair: an ordinary quantized model for that policy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data.batches import call_model
from .convert import _set_submodule, quant_layers
from .layers import QuantLayer


def pair_key(w: int, a: int) -> str:
    return f"w{w}a{a}"


class PairBatchNorm(nn.Module):
    """A copy of ``bn`` per (w, a) candidate pair of ``layer``; the forward uses the pair ``layer`` runs at."""

    def __init__(self, bn: _BatchNorm, layer: QuantLayer):
        super().__init__()
        w_bits, a_bits = layer.candidates
        self.norms = nn.ModuleDict({pair_key(w, a): copy.deepcopy(bn) for w in w_bits for a in a_bits})
        self._layer = (layer,)  # a reference, not a submodule: the layer belongs to the model

    def current(self) -> _BatchNorm:
        return self.norms[pair_key(*self._layer[0].bits)]

    def forward(self, x: Tensor) -> Tensor:
        return self.current()(x)


@torch.no_grad()
def follows(model: nn.Module, x: Tensor) -> dict[str, str]:
    """BatchNorm name -> name of the multi-candidate quantized layer it directly follows, from one forward."""
    layers = quant_layers(model)
    searchable = {n for n, layer in layers.items() if any(len(c) > 1 for c in layer.candidates)}
    order: list[tuple[str, bool]] = []
    watched = [(n, m, False) for n, m in layers.items()]
    watched += [(n, m, True) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n, bn=bn: order.append((n, bn)))
               for n, m, bn in watched]
    was_training = model.training
    try:
        call_model(model.eval(), x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    out, last = {}, None
    for name, is_bn in order:
        if not is_bn:
            last = name
        elif last is not None:
            if last in searchable:
                out.setdefault(name, last)
            last = None
    return out


def attach_pair_bn(model: nn.Module, mapping: Mapping[str, str]) -> nn.Module:
    """Replace each BatchNorm of ``mapping`` (from :func:`follows`) by a PairBatchNorm of its layer, in place."""
    layers = quant_layers(model)
    for bn_name, layer_name in mapping.items():
        _set_submodule(model, bn_name, PairBatchNorm(model.get_submodule(bn_name), layers[layer_name]))
    return model


def collapse_pair_bn(model: nn.Module) -> nn.Module:
    """Each PairBatchNorm back to a plain BatchNorm: a copy of the pair its layer runs at now, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PairBatchNorm):
            _set_submodule(model, name, copy.deepcopy(module.current()))
    return model
