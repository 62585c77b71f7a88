"""Entropy-aware bin regularisation (EBR): keep the weights of each quantization bin tight around its level.

For one quantized layer with weight W (N elements), its quantizer's step s at the layer's current
bit-width b (per-tensor or per-channel) and the integer range [q_min, q_max] of b bits:

    q_i = clamp(round(W_i / s), q_min, q_max)        the level of weight i; bin k = {i : q_i = k}
    r_i = W_i / s − q_i                              its distance to the level, in steps
    π_k = n_k / N                                    the bin's share of the weights
    EBR(W) = Σ_k π_k · (1 − log π_k) · (μ_k² + σ_k²)

where μ_k is the mean and σ_k² the population variance of the residuals r of bin k: μ_k² is the
squared distance of the bin's mean to its level, σ_k² the bin's spread, both normalised by the step.
A bin's term is zero exactly when every weight of the bin sits on its level (clipped weights included,
which belong to the edge bins), so EBR is zero exactly when W is representable at b bits, positive
otherwise. Since μ_k² + σ_k² is the bin's mean of r², the whole sum equals (1/N) Σ_i (1 − log π_{q_i}) · r_i².

The weighting is this library's choice. With the share π_k alone the sum would collapse to the plain
mean squared residual, in which bins play no part; the added −π_k log π_k is the bin's contribution to
the entropy of the level distribution, so a weight in a sparsely populated bin (the outer levels, which
carry the most information per weight) is pulled to its level harder than one in a crowded bin, and no
non-empty bin is ever weightless. The bin shares are counts: no gradient flows through them. The step is
detached: EBR moves the weights onto the grid, the task loss keeps learning the grid (LSQ).

A model's EBR is the mean over its quantized layers, so its scale does not grow with depth
(``TrainConfig.ebr_weight`` multiplies it in ``supervised_objective``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import MixbitsError
from .convert import quant_layers
from .layers import QuantLayer
from .quantizer import integer_range


def bin_regularizer(w: Tensor, step: Tensor, qmin: int, qmax: int) -> Tensor:
    """EBR of ``w`` on the grid ``step`` · [qmin, qmax] (``step`` broadcastable to ``w``; treated as given)."""
    scaled = w / step
    levels = torch.clamp(torch.round(scaled.detach()), qmin, qmax)
    residual = scaled - levels
    bins = (levels - qmin).long().flatten()
    share = torch.bincount(bins, minlength=qmax - qmin + 1).to(w.dtype) / bins.numel()
    weight = 1.0 - torch.log(share[bins])  # every weight's bin is non-empty, so the log is finite
    return (weight * residual.flatten().square()).mean()


def layer_ebr(layer: QuantLayer) -> Tensor:
    """EBR of the layer's weight at its quantizer's current bit-width and step."""
    quant = layer.w_quant
    qmin, qmax = integer_range(quant.bits, quant.signed)
    return bin_regularizer(layer.weight, quant.step(quant.bits, layer.weight.dim()).detach(), qmin, qmax)


def model_ebr(model: nn.Module) -> Tensor:
    """Mean EBR over the model's quantized layers."""
    layers = list(quant_layers(model).values())
    if not layers:
        raise MixbitsError(f"train.ebr_weight > 0 regularises quantized weights, but {type(model).__name__} has no "
                           "quantized layer; give a policy (quant.policy) or set train.ebr_weight to 0")
    return torch.stack([layer_ebr(layer) for layer in layers]).mean()
