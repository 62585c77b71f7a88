"""From learned probabilities to policies: argmax, sampling, repair into a budget, and filling its slack.

A choice is one pair index per searchable layer (into ``ArchParams.pairs``). Repair lowers, one
candidate step at a time, the layer whose current choice the search was least sure of (lowest pair
probability), among the steps that reduce the budget violation, until the policy fits. Fill does the
reverse for a policy under its budget (a library choice: the derived policy of a penalised search often
leaves much of the budget unused, and methods are compared at equal budget): of the policies that raise
bits only, the most probable one among those that spend the budget as fully as any can (see ``fill``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..budget import Budget
from ..errors import MixbitsError
from ..space import Policy
from .base import SearchContext
from .costs import layer_cost_arrays, remaining_limits
from .differentiable import ArchParams
from .ilp import solve_choice

FILL_TOLERANCE = 0.01  # policies within 1 % of a cap of the fullest one count as full; the most probable wins


def argmax_choice(pair_probs: torch.Tensor) -> list[int]:
    return pair_probs.detach().argmax(dim=-1).tolist()


def sample_choice(pair_probs: torch.Tensor, generator: torch.Generator) -> list[int]:
    """One pair per layer drawn from its probabilities (independent w and a draws for a factored distribution)."""
    p = pair_probs.detach().float().cpu().clamp_min(0)
    return torch.multinomial(p, 1, generator=generator).squeeze(1).tolist()


def choice_policy(ctx: SearchContext, arch: ArchParams, choice: list[int]) -> Policy:
    overrides = {name: arch.bits_of(k) for name, k in zip(arch.layers, choice, strict=True)}
    return Policy.from_rules(ctx.space, default=arch.bits_of(0), overrides=overrides)


def _violation(ctx: SearchContext, policy: Policy, limits: dict[str, float]) -> float:
    cost = ctx.cost(policy)
    return sum(max(0.0, cost[m] / limit - 1.0) for m, limit in limits.items())


def repair(ctx: SearchContext, arch: ArchParams, policy: Policy, budget: Budget,
           pair_probs: torch.Tensor) -> tuple[Policy, list[dict]]:
    """Lower the least certain layers' bits until ``policy`` fits ``budget``; returns it and the steps taken."""
    limits = budget.limits(ctx.stats, ctx.space, ctx.latency)
    probs = pair_probs.detach().double().cpu()
    index = {bits: k for k, bits in enumerate(arch.pairs)}
    steps = []
    while not ctx.fits(policy, budget):
        current = _violation(ctx, policy, limits)
        best = None
        for i, name in enumerate(arch.layers):
            w, a = policy[name]
            confidence = float(probs[i, index[(w, a)]])
            for side, lowered in ((0, _lower(arch.w_bits, w)), (1, _lower(arch.a_bits, a))):
                if lowered is None:
                    continue
                candidate = policy.replace(name, lowered, a) if side == 0 else policy.replace(name, w, lowered)
                gain = current - _violation(ctx, candidate, limits)
                if gain > 0 and (best is None or (confidence, -gain) < best[0]):
                    best = ((confidence, -gain), name, side, candidate)
        if best is None:
            raise MixbitsError(f"cannot repair policy {policy.describe()} into budget {budget}: no lower bit-width "
                               f"reduces the excess {ctx.cost(policy)} over {limits}")
        (confidence, _), name, side, policy = best
        steps.append({"layer": name, "side": "w" if side == 0 else "a", "bits": list(policy[name]),
                      "probability": confidence})
    return policy, steps


def _lower(candidates: tuple[int, ...], bits: int) -> int | None:
    i = candidates.index(bits)
    return candidates[i - 1] if i > 0 else None


def fill(ctx: SearchContext, arch: ArchParams, policy: Policy, budget: Budget, pair_probs: torch.Tensor,
         tolerance: float = FILL_TOLERANCE) -> tuple[Policy, list[dict]]:
    """Spend what ``policy`` leaves of ``budget``, raising bits only; returns the policy and the layers raised.

    Two exact integer programs over the policies that keep every layer's w and a at least at ``policy``'s:
    the first finds the most budget any of them spends (Σ over caps of cost / cap), the second the most
    probable of those that spend within ``tolerance`` (a share of one cap) of it, by Σ log p of the
    chosen pairs. Raising one step at a time stops where every single step overshoots, which on layers of
    unequal MACs can leave a tenth of the budget unused; the programs also find raises of several steps
    and of several layers together.
    """
    layers, pairs = list(arch.layers), list(arch.pairs)
    base, arrays = layer_cost_arrays(ctx, pairs)
    limits = remaining_limits(ctx, budget, base)
    caps = budget.limits(ctx.stats, ctx.space, ctx.latency)
    spend = sum(arrays[m] / caps[m] for m in limits)
    floor = np.array([[w >= policy[n][0] and a >= policy[n][1] for w, a in pairs] for n in layers])
    costs = {m: arrays[m] for m in limits}
    most = solve_choice(np.where(floor, -spend, np.inf), costs, limits, layers)
    reachable = float(spend[np.arange(len(layers)), most].sum())
    log_p = np.log(pair_probs.detach().double().cpu().numpy().clip(1e-12, None))
    costs["-spend"], limits["-spend"] = -spend, tolerance - reachable
    choice = solve_choice(np.where(floor, -log_p, np.inf), costs, limits, layers)
    steps, filled = [], policy
    for i, (name, k) in enumerate(zip(layers, choice, strict=True)):
        if pairs[k] != policy[name]:
            filled = filled.replace(name, *pairs[k])
            steps.append({"layer": name, "from": list(policy[name]), "to": list(pairs[k]),
                          "probability": float(np.exp(log_p[i, k]))})
    return filled, steps
