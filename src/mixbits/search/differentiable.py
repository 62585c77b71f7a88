"""Shared pieces of the differentiable bit-width searches (DNAS, SSPS, DMPQ).

- ``ArchParams``: per-layer logits over the weight bits and the activation bits (factored), or over the
  (w, a) pairs (joint); decided layers are pinned to one candidate.
- ``LayerProbs``: what a method turns the logits into (softmax, Gumbel-softmax, Dirichlet sample):
  weight and activation marginals, which drive the composite convolution of each layer, and the pair
  probabilities, which price the layer.
- ``ExpectedCost``: E[BitOPs], E[size], E[latency] under the pair probabilities. Every cost mixbits knows
  is a sum over layers, so the expectation is exact and linear in the probabilities.
- Penalties against a budget's caps and the temperature / decay schedules.

A joint distribution runs the forward through its marginals (one convolution per layer); that is the
joint itself when the probabilities are one-hot, an approximation otherwise. Costs use the joint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant import QuantLayer
from .base import SearchContext
from .costs import layer_cost_arrays

PENALTIES = ("hinge", "squared", "linear")
DECAYS = ("linear", "cosine", "none")


@dataclass
class LayerProbs:
    """Per searchable layer: weight marginals (L×Kw), activation marginals (L×Ka), pairs (L×Kw·Ka, w-major)."""

    w: Tensor
    a: Tensor
    pairs: Tensor

    @classmethod
    def factored(cls, w: Tensor, a: Tensor) -> LayerProbs:
        return cls(w, a, (w[:, :, None] * a[:, None, :]).flatten(1))

    @classmethod
    def joint(cls, pairs: Tensor, kw: int, ka: int) -> LayerProbs:
        grid = pairs.view(-1, kw, ka)
        return cls(grid.sum(2), grid.sum(1), pairs)

    def detach(self) -> LayerProbs:
        return LayerProbs(self.w.detach(), self.a.detach(), self.pairs.detach())


class ArchParams(nn.Module):
    """Architecture parameters of the searchable layers, zero-initialised (a uniform start)."""

    def __init__(self, layers: Sequence[str], w_bits: Sequence[int], a_bits: Sequence[int], joint: bool = False):
        super().__init__()
        self.layers, self.w_bits, self.a_bits, self.joint = tuple(layers), tuple(w_bits), tuple(a_bits), joint
        self.pairs = [(w, a) for w in self.w_bits for a in self.a_bits]  # the order of LayerProbs.pairs
        n, kw, ka = len(self.layers), len(self.w_bits), len(self.a_bits)
        if joint:
            self.pair = nn.Parameter(torch.zeros(n, kw * ka))
        else:
            self.w = nn.Parameter(torch.zeros(n, kw))
            self.a = nn.Parameter(torch.zeros(n, ka))
        self.decided: dict[int, int] = {}  # layer index -> pair index, for layers taken out of the search

    def named_logits(self) -> dict[str, Tensor]:
        """The logit tensors by role: column 0 is always the lowest-bit candidate."""
        return {"pair": self.pair} if self.joint else {"w": self.w, "a": self.a}

    def probs(self, transform: Callable[[Tensor], Tensor]) -> LayerProbs:
        """``transform`` maps logit rows to probability rows (softmax, Gumbel, Dirichlet); decided rows are one-hot."""
        kw, ka = len(self.w_bits), len(self.a_bits)
        if self.joint:
            return LayerProbs.joint(self._pin(transform(self.pair), lambda k: k), kw, ka)
        w = self._pin(transform(self.w), lambda k: k // ka)
        a = self._pin(transform(self.a), lambda k: k % ka)
        return LayerProbs.factored(w, a)

    def _pin(self, probs: Tensor, column: Callable[[int], int]) -> Tensor:
        if not self.decided:
            return probs
        pinned = probs.detach().clone().zero_()
        mask = torch.zeros(probs.shape[0], 1, dtype=torch.bool, device=probs.device)
        for layer, pair in self.decided.items():
            pinned[layer, column(pair)] = 1.0
            mask[layer] = True
        return torch.where(mask, pinned, probs)

    def bits_of(self, pair: int) -> tuple[int, int]:
        return self.pairs[pair]


def apply_mixture(layers: Sequence[QuantLayer], probs: LayerProbs) -> None:
    """Run every searchable layer as the composite convolution of its candidates."""
    for i, layer in enumerate(layers):
        layer.set_mixture(probs.w[i], probs.a[i])


def clear_mixture(layers: Sequence[QuantLayer]) -> None:
    for layer in layers:
        layer.set_mixture(None, None)


class ExpectedCost:
    """``cost(pair_probs) -> {metric: expected value}``: fixed layers at their bits, searchable ones in expectation."""

    def __init__(self, ctx: SearchContext, pairs: list[tuple[int, int]]):
        base, arrays = layer_cost_arrays(ctx, pairs)
        base_cost = ctx.cost(base)  # float64: BitOPs reach 1e10 and a float32 sum would round the budget edge
        self.base = {m: torch.tensor(v, dtype=torch.float64, device=ctx.device) for m, v in base_cost.items()}
        self.per_pair = {m: torch.tensor(a, dtype=torch.float64, device=ctx.device) for m, a in arrays.items()}

    def __call__(self, pair_probs: Tensor) -> dict[str, Tensor]:
        p = pair_probs.double()
        return {m: self.base[m] + (p * self.per_pair[m]).sum() for m in self.base}


def cost_ratios(expected: dict[str, Tensor], limits: dict[str, float]) -> dict[str, Tensor]:
    """Expected cost over cap, per capped metric (1.0 = exactly at the cap)."""
    return {m: expected[m] / limit for m, limit in limits.items()}


def budget_penalty(ratios: dict[str, Tensor], kind: str) -> Tensor:
    """Σ over caps of relu(r-1) ("hinge"), relu(r-1)² ("squared"), or r ("linear": always pushes down)."""
    if kind not in PENALTIES:
        raise ValueError(f"unknown penalty {kind!r}; valid: {PENALTIES}")
    terms = []
    for r in ratios.values():
        if kind == "linear":
            terms.append(r)
        else:
            over = F.relu(r - 1.0)
            terms.append(over if kind == "hinge" else over.square())
    return torch.stack(terms).sum().float()


def annealed_temperature(progress: float, start: float, end: float) -> float:
    """τ falling geometrically from ``start`` at progress 0 to ``end`` at progress 1 (clamped to [0, 1])."""
    p = min(1.0, max(0.0, progress))
    return start * (end / start) ** p


def decaying_weight(progress: float, schedule: str, start: float = 1.0) -> float:
    """A weight that falls from ``start`` at progress 0 to 0 at progress 1 (linear or cosine), or stays ("none")."""
    p = min(1.0, max(0.0, progress))
    if schedule == "linear":
        return start * (1.0 - p)
    if schedule == "cosine":
        return start * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "none":
        return start
    raise ValueError(f"unknown decay schedule {schedule!r}; valid: {DECAYS}")


def gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator, hard: bool = False) -> Tensor:
    """Row-wise Gumbel-softmax drawn from ``generator`` (reproducible); ``hard``: one-hot, straight-through."""
    u = torch.rand(logits.shape, generator=generator).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    soft = F.softmax((logits + gumbel) / tau, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return one_hot - soft.detach() + soft


def softmax_rows(logits: Tensor) -> Tensor:
    return F.softmax(logits, dim=-1)


def certainty(probs: LayerProbs, kind: str) -> Tensor:
    """How decided each layer is: the probability of its most likely pair, or its negative pair entropy."""
    p = probs.pairs.detach()
    if kind == "max_prob":
        return p.max(dim=-1).values
    if kind == "entropy":
        return (p * p.clamp_min(1e-12).log()).sum(-1)  # -H: larger means more certain
    raise ValueError(f"unknown certainty {kind!r}; valid: ('max_prob', 'entropy')")
