"""Differentiable Bitwidth Parameters (DBPs) and stochastic quantization between adjacent bit-widths.

Each searchable layer sits at a current bit-width b (its highest candidate at the start) and has, for
every candidate but the lowest, one DBP θ: sigmoid(θ_b) is the probability of quantizing at b rather
than at the next lower candidate b⁻. Every step draws, per layer, z from a straight-through
Gumbel-sigmoid (logistic noise L):

    hard = 1[θ_b + L > 0]    (so P(hard = 1) = sigmoid(θ_b) exactly, whatever the temperature)
    soft = sigmoid((θ_b + L) / τ)
    z = hard + (soft − soft.detach())        value: exactly hard; gradient: the soft sample's

and the layer quantizes its tensor as z · Q_b(x) + (1 − z) · Q_b⁻(x): in value exactly one of the two,
and θ_b receives ∂loss/∂z = ⟨∂loss/∂out, Q_b(x) − Q_b⁻(x)⟩ times soft·(1 − soft)/τ. In expectation
over the draw the output is sigmoid(θ_b) · Q_b(x) + (1 − sigmoid(θ_b)) · Q_b⁻(x). The two quantizations
use the quantizer's own per-bit steps, through the layers' ``set_mixture`` interface.

When sigmoid(θ_b) falls under a threshold the layer loses b for good (``remove_below``): its current
bit-width becomes b⁻ and the DBP of b⁻ (untouched until then) takes over. A layer at its lowest
candidate runs at fixed bits. Each (layer, bit-width) DBP is its own scalar parameter, so an adaptive
optimiser (Adam) starts a fresh state, bias correction included, when a DBP becomes current.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...quant import QuantLayer


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def straight_through_gumbel_sigmoid(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """Per entry: 1 with probability sigmoid(logit), else 0; gradients of sigmoid((logit + noise) / tau)."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).clamp(1e-6, 1.0 - 1e-6).to(logits.device)
    noisy = logits + (torch.log(u) - torch.log1p(-u))  # logistic noise: the difference of two Gumbels
    soft = torch.sigmoid(noisy / tau)
    hard = (noisy > 0).to(soft.dtype)
    return hard + (soft - soft.detach())  # in this order the value is exactly 0 or 1


class BitParams(nn.Module):
    """The DBPs of one side (weights or activations) of ``layers``, and each layer's current bit-width."""

    def __init__(self, layers: Sequence[str], candidates: Sequence[int], init_keep: float = 0.9):
        super().__init__()
        self.layers, self.candidates = tuple(layers), tuple(sorted(candidates))
        k = len(self.candidates)
        # DBP of layer i and candidate index c >= 1 at position i * (k - 1) + c - 1
        start = logit(init_keep)
        self.dbps = nn.ParameterList([nn.Parameter(torch.tensor(start)) for _ in range(len(self.layers) * (k - 1))])
        self.levels = [k - 1] * len(self.layers)  # index of each layer's current bit-width: the highest to start

    # state ------------------------------------------------------------------------------------------------
    def dbp(self, layer: int, level: int | None = None) -> nn.Parameter:
        """The DBP of ``layer`` at candidate index ``level`` (default: its current one; must be >= 1)."""
        level = self.levels[layer] if level is None else level
        return self.dbps[layer * (len(self.candidates) - 1) + level - 1]

    def bits(self) -> list[int]:
        """Each layer's current bit-width."""
        return [self.candidates[c] for c in self.levels]

    def undecided(self) -> list[int]:
        """Layers that can still drop (current bit-width above the lowest candidate)."""
        return [i for i, c in enumerate(self.levels) if c > 0]

    def current_dbps(self) -> list[nn.Parameter]:
        return [self.dbp(i) for i in self.undecided()]

    # probabilities and samples ------------------------------------------------------------------------------
    def keep_probs(self) -> Tensor:
        """sigmoid of each layer's current DBP; 1 for layers at their lowest candidate."""
        return self._per_layer(torch.sigmoid(self._current_logits()))

    def mixing(self, z: Tensor) -> Tensor:
        """L × K weights: z at each layer's current bit-width, 1 − z at the next lower one (one-hot at the lowest)."""
        device = z.device
        levels = torch.tensor(self.levels, device=device)
        high = F.one_hot(levels, len(self.candidates)).to(z.dtype)
        low = F.one_hot((levels - 1).clamp_min(0), len(self.candidates)).to(z.dtype)
        return z[:, None] * high + (1.0 - z)[:, None] * low

    def expected(self) -> Tensor:
        """The mixing weights without sampling noise: the distribution the DBPs define."""
        return self.mixing(self.keep_probs())

    def sample(self, tau: float, generator: torch.Generator | None = None) -> Tensor:
        """One straight-through draw per layer (see the module docstring), as L × K mixing weights."""
        return self.mixing(self._per_layer(straight_through_gumbel_sigmoid(self._current_logits(), tau, generator)))

    def _current_logits(self) -> Tensor:
        dbps = self.current_dbps()
        if not dbps:
            return torch.zeros(0, device=self.dbps[0].device if len(self.dbps) else None)
        return torch.stack(dbps)

    def _per_layer(self, values: Tensor) -> Tensor:
        """Undecided layers' values scattered into an L vector; 1 elsewhere (their one-hot row ignores it)."""
        out = torch.ones(len(self.layers), dtype=values.dtype, device=values.device)
        undecided = self.undecided()
        if not undecided:
            return out
        return out.index_put((torch.tensor(undecided, device=values.device),), values)

    # progressive removal ------------------------------------------------------------------------------------
    @torch.no_grad()
    def below(self, threshold: float) -> list[tuple[int, float]]:
        """(layer, keep-probability) of the layers whose current bit-width is kept with less than ``threshold``."""
        undecided = self.undecided()
        probs = torch.sigmoid(self._current_logits()).tolist() if undecided else []  # one device sync
        return [(i, p) for i, p in zip(undecided, probs, strict=True) if p < threshold]

    def drop(self, layer: int) -> tuple[int, int]:
        """Remove the layer's current bit-width for good; returns (old bits, new bits)."""
        old = self.candidates[self.levels[layer]]
        self.levels[layer] -= 1
        return old, self.candidates[self.levels[layer]]

    def remove_below(self, threshold: float) -> list[dict]:
        """Drop every current bit-width kept with less than ``threshold``; returns the drops."""
        drops = []
        for i, p in self.below(threshold):
            old, new = self.drop(i)
            drops.append({"layer": self.layers[i], "from": old, "to": new, "keep_prob": p})
        return drops

def drive(layers: Sequence[QuantLayer], w_mix: Tensor | None, a_mix: Tensor | None, w_params: BitParams,
          a_params: BitParams | None) -> None:
    """Run each layer as the mixture of its current and next lower bit-widths (fixed bits where nothing is left)."""
    for i, layer in enumerate(layers):
        w, w_bits = _adjacent(w_mix, w_params, i)
        a, a_bits = _adjacent(a_mix, a_params, i)
        layer.set_mixture(w, a, w_bits, a_bits)


def _adjacent(mix: Tensor | None, params: BitParams | None, layer: int) -> tuple[Tensor | None, tuple | None]:
    """The layer's weights on its next lower and current bit-widths, and those bit-widths (None: fixed bits).
    Only these two carry weight, so the quantizer computes two quantizations, not one per candidate."""
    if mix is None or params is None or params.levels[layer] == 0:
        return None, None
    level = params.levels[layer]
    return mix[layer, level - 1:level + 1], params.candidates[level - 1:level + 1]


def set_current_bits(layers: Sequence[QuantLayer], w_params: BitParams, a_params: BitParams | None,
                     a_fixed: int | None) -> None:
    """Each layer's fixed bits = its current bit-widths (what it runs at where no mixture is set)."""
    w_bits = w_params.bits()
    a_bits = a_params.bits() if a_params is not None else [a_fixed] * len(layers)
    for layer, w, a in zip(layers, w_bits, a_bits, strict=True):
        layer.set_bits(w, a)
