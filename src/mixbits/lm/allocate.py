"""Choose each layer's bits from measured errors under a stored-bits limit.

- ``ilp``: the project's exact integer program (``mixbits.search.ilp.solve_choice``): minimise the summed
  error subject to the summed stored bits <= the limit.
- ``greedy``: start every layer at its fewest bits and repeatedly take the upgrade with the largest error
  reduction per extra stored bit that still fits (ties go to the earlier layer), until none fits.
- ``uniform``: the most bits that every free layer can have at once (the baseline).
- ``random``: a seeded random allocation that fits (a baseline): layers in a random order each take a random
  bit-width among those that still fit, starting from every layer at its fewest bits.
Overrides pin a layer to one bit-width (it is not searched, but its bits count against the limit).
"""

from __future__ import annotations

import numpy as np

from ..errors import MixbitsError
from ..search.ilp import solve_choice

ALLOCATORS = ("ilp", "greedy", "uniform", "random")


def allocate(method: str, errors: dict[str, dict[int, float]], costs: dict[str, dict[int, int]], limit: float,
             fixed: dict[str, int], seed: int = 0) -> dict[str, int]:
    """Layer -> bits. ``costs[layer][bits]`` are stored bits (every layer, every candidate); ``errors`` the
    measured scores (only ``ilp`` and ``greedy`` read them); ``fixed`` pins layers to bits."""
    names = list(costs)
    options = {n: ([fixed[n]] if n in fixed else sorted(costs[n])) for n in names}
    errors = {**errors, **{n: {fixed[n]: 0.0} for n in fixed}}  # pinned: the same error in every allocation
    cheapest = sum(costs[n][min(options[n])] for n in names)
    if cheapest > limit * (1 + 1e-12):
        raise MixbitsError(f"the budget allows {limit / 8e3:.4g} KB of weights but the fewest bits allowed "
                           f"({min(min(o) for o in options.values())} on every free layer, overrides at theirs) need "
                           f"{cheapest / 8e3:.4g} KB; raise the budget, allow fewer bits or relax the overrides")
    if method == "ilp":
        return _ilp(names, options, errors, costs, limit)
    if method == "greedy":
        return _greedy(names, options, errors, costs, limit)
    if method == "random":
        return _random(names, options, costs, limit, np.random.default_rng(seed))
    return _uniform(names, options, costs, limit, fixed)


def _ilp(names, options, errors, costs, limit):
    bits = sorted({b for n in names for b in errors[n]})
    scores = np.full((len(names), len(bits)), np.inf)
    size = np.full_like(scores, np.inf)
    for i, n in enumerate(names):
        for k, b in enumerate(bits):
            if b in options[n]:
                scores[i, k], size[i, k] = errors[n][b], costs[n][b]
    choice = solve_choice(scores, {"bits": size}, {"bits": limit}, names)
    return {n: bits[k] for n, k in zip(names, choice, strict=True)}


def _greedy(names, options, errors, costs, limit):
    chosen = {n: min(options[n]) for n in names}
    spent = sum(costs[n][chosen[n]] for n in names)
    while True:
        best = None
        for n in names:
            for b in options[n]:
                extra = costs[n][b] - costs[n][chosen[n]]
                if b <= chosen[n] or spent + extra > limit:
                    continue
                gain = (errors[n][chosen[n]] - errors[n][b]) / extra
                if best is None or gain > best[0]:
                    best = (gain, n, b, extra)
        if best is None:
            return chosen
        _, n, b, extra = best
        chosen[n], spent = b, spent + extra


def _random(names, options, costs, limit, rng):
    chosen = {n: min(options[n]) for n in names}
    spent = sum(costs[n][chosen[n]] for n in names)
    for i in rng.permutation(len(names)):
        n = names[i]
        fits = [b for b in options[n] if spent - costs[n][chosen[n]] + costs[n][b] <= limit]
        b = fits[rng.integers(len(fits))]
        spent += costs[n][b] - costs[n][chosen[n]]
        chosen[n] = b
    return chosen


def _uniform(names, options, costs, limit, fixed):
    free = [n for n in names if n not in fixed]
    if not free:  # every layer pinned by an override: nothing to choose
        return {n: fixed[n] for n in names}
    pinned = sum(costs[n][options[n][0]] for n in names if n not in free)
    for b in sorted({b for n in free for b in options[n]}, reverse=True):
        if pinned + sum(costs[n][b] for n in free) <= limit:
            return {n: (b if n in free else options[n][0]) for n in names}
    raise MixbitsError("no single bit-width fits every free layer under the budget; raise it or use method='ilp'")
