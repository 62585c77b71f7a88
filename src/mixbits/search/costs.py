"""Per-layer cost arrays for integer programs: what each candidate of each layer adds to each metric.

Every cost mixbits knows is a sum over layers, so total(choice) = total(base) + Σ_l [c_l(k_l) − c_l(base_l)].
Computing the differences through the cost functions themselves (rather than re-deriving formulas
here) keeps one cost model for everything.
"""

from __future__ import annotations

import numpy as np

from ..budget import Budget
from ..space import Bits, Policy
from .base import SearchContext


def candidate_pairs(ctx: SearchContext, tied: bool = False) -> list[Bits]:
    """Every (w, a) candidate, or only w == a when ``tied``."""
    pairs = [(w, a) for w in ctx.space.w_bits for a in ctx.space.a_bits]
    return [(w, a) for w, a in pairs if w == a] if tied else pairs


def layer_cost_arrays(ctx: SearchContext, pairs: list[Bits]) -> tuple[Policy, dict[str, np.ndarray]]:
    """(base policy, metric -> L × K array of cost added over the base) for the searchable layers."""
    base = Policy.from_rules(ctx.space, default=pairs[0])
    base_cost = ctx.cost(base)
    layers = ctx.space.searchable
    arrays = {m: np.zeros((len(layers), len(pairs))) for m in base_cost}
    for i, name in enumerate(layers):
        for k, (w, a) in enumerate(pairs):
            cost = ctx.cost(base.replace(name, w, a))
            for m in arrays:
                arrays[m][i, k] = cost[m] - base_cost[m]
    return base, arrays


def remaining_limits(ctx: SearchContext, budget: Budget, base: Policy) -> dict[str, float]:
    """What the searchable layers may add over ``base`` under each cap of ``budget``."""
    base_cost = ctx.cost(base)
    return {m: limit - base_cost[m] for m, limit in budget.limits(ctx.stats, ctx.space, ctx.latency).items()}
