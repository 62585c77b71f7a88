"""From learned probabilities to policies: argmax, sampling, repair into a budget, and filling its slack.

A choice is one pair index per searchable layer (into ``ArchParams.pairs``). Repair lowers, one
candidate step at a time, the layer whose current choice the search was least sure of (lowest pair
probability), among the steps that reduce the budget violation, until the policy fits. Fill does the
reverse for a policy well under its budget: one candidate step up at a time, the raise whose pair the
search gave the most probability, while the policy still fits (a library choice: the derived policy of a
penalised search often leaves much of the budget unused, and the comparison is at equal budget).
"""

from __future__ import annotations

import torch

from ..budget import Budget
from ..errors import MixbitsError
from ..space import Policy
from .base import SearchContext
from .differentiable import ArchParams


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


def fill(ctx: SearchContext, arch: ArchParams, policy: Policy, budget: Budget,
         pair_probs: torch.Tensor) -> tuple[Policy, list[dict]]:
    """Raise bits one candidate step at a time, most probable raise first, while ``policy`` fits ``budget``."""
    probs = pair_probs.detach().double().cpu()
    index = {bits: k for k, bits in enumerate(arch.pairs)}
    steps = []
    while True:
        best = None
        for i, name in enumerate(arch.layers):
            w, a = policy[name]
            for side, raised in ((0, _raise(arch.w_bits, w)), (1, _raise(arch.a_bits, a))):
                if raised is None:
                    continue
                pair = (raised, a) if side == 0 else (w, raised)
                candidate = policy.replace(name, *pair)
                if not ctx.fits(candidate, budget):
                    continue
                key = (float(probs[i, index[pair]]), -ctx.cost(candidate)["bitops"])
                if best is None or key > best[0]:
                    best = (key, name, side, candidate)
        if best is None:
            return policy, steps
        (probability, _), name, side, policy = best
        steps.append({"layer": name, "side": "w" if side == 0 else "a", "bits": list(policy[name]),
                      "probability": probability})


def _raise(candidates: tuple[int, ...], bits: int) -> int | None:
    i = candidates.index(bits)
    return candidates[i + 1] if i + 1 < len(candidates) else None
