"""Bidirectional greedy search (seed 002, Eq. 9): walk from a start policy to one that fits a budget.

Inference only and independent of how policies are scored: ``evaluate(policy) -> {"loss": ..}`` may be a
``PolicyEvaluator`` on a trained supernet or any function (the tests use a known loss table).

Each step builds the neighbours of the current policy (every searchable layer one candidate down, and with
``bidirectional`` also one up: the paper's 2L neighbours, weight and activation bits moving together;
``paired=False`` moves them separately, 4L neighbours), scores each by

    J_i = L̄(S_i) + λ · C̄(S_i)

with L̄ and C̄ the min-max normalisation over this step's neighbours of the held-out loss and of the cost
term, and moves to the lowest J (ties: the first neighbour in layer order, down before up, w before a).
It stops at the first policy that fits (the paper's S* = S^(T) once BitOPs(S^(T)) <= C).

Ours, where the paper says nothing: a move never returns to a policy already on the path (so the walk
cannot cycle); after ``max_steps`` steps, or when every neighbour is already on the path, the
walk goes on with descending moves only, which always ends at a fitting policy when the budget is
feasible.

Ours, for speed: with ``moves_per_step`` k > 1, a step whose best move is a descent also takes the next
best descents of that step's ranking on other layers, up to k moves, stopping as soon as the policy fits.
The paper's walk makes one move per step and scores 2L neighbours for each, so a walk costs O(L²) scores
(L searchable layers); k moves a step divide the steps by up to k, and the moves added are the ones the
same scores rank next (a first-order guess that their losses add up, as a sensitivity-based search assumes).
Near the budget the walk still ends one move at a time: the policy that first fits ends the step.

Ours, for speed: with ``screen`` (a cheaper scorer, e.g. the same evaluator on the first 128 of its images),
a step ranks all its neighbours by J on the screen's losses, re-scores only the ``keep`` share ranked best
with ``evaluate``, and moves among those (the further descents follow in the same order, then the rest).
Losses not re-scored are shifted by the mean difference between the two scorers on the re-scored ones, so
the min-max normalisation of J spans every neighbour on one level.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from ..errors import MixbitsError
from ..progress import bar_enabled, progress_line
from ..space import Policy, SearchSpace

Move = tuple[str, str, int]  # (layer, "wa", "w" or "a", +1 up / -1 down)


@dataclass
class GreedyResult:
    policy: Policy
    path: list[Policy]  # from the start policy to ``policy``, both included
    steps: list[dict] = field(default_factory=list)  # per step: the move taken, its loss, cost term and J


def neighbours(policy: Policy, space: SearchSpace, bidirectional: bool = True,
               paired: bool = True) -> list[tuple[Move, Policy]]:
    """Every policy one candidate step away on one layer: w and a together (``paired``), or either alone.

    A paired move shifts each side that can still move; it exists while at least one side can.
    """
    out = []
    directions = (-1, 1) if bidirectional else (-1,)
    sides = (("wa", True, True),) if paired else (("w", True, False), ("a", False, True))
    for name in space.searchable:
        w, a = policy[name]
        for direction in directions:
            for side, move_w, move_a in sides:
                new_w = _shift(space.w_bits, w, direction) if move_w else w
                new_a = _shift(space.a_bits, a, direction) if move_a else a
                if (new_w, new_a) != (w, a):
                    out.append(((name, side, direction), policy.replace(name, new_w, new_a)))
    return out


def _shift(candidates: Sequence[int], bits: int, direction: int) -> int:
    i = candidates.index(bits) + direction
    return candidates[i] if 0 <= i < len(candidates) else bits


def min_max(values: Sequence[float]) -> list[float]:
    """Scale to [0, 1]; all equal values map to 0 (no preference)."""
    low, high = min(values), max(values)
    if high - low <= 0:
        return [0.0] * len(values)
    return [(v - low) / (high - low) for v in values]


def objective(losses: Sequence[float], costs: Sequence[float], lam: float) -> list[float]:
    """J of Eq. 9 for each of a step's neighbours: min-max normalised loss + λ · min-max normalised cost."""
    return [lo + lam * c for lo, c in zip(min_max(losses), min_max(costs), strict=True)]


def descents_to_bottom(policy: Policy, space: SearchSpace) -> int:
    """How many one-step descents lead from ``policy`` to the lowest candidates everywhere."""
    return sum(space.w_bits.index(policy[n][0]) + space.a_bits.index(policy[n][1]) for n in space.searchable)


def greedy_search(start: Policy, space: SearchSpace, evaluate: Callable[[Policy], dict],
                  cost_term: Callable[[Policy], float], fits: Callable[[Policy], bool], lam: float = 1.5,
                  bidirectional: bool = True, max_steps: int | None = None, progress: bool | None = False,
                  description: str = "greedy", visited: set | None = None, paired: bool = True,
                  focus: Callable[[Policy], None] | None = None, moves_per_step: int = 1,
                  screen: Callable[[Policy], dict] | None = None, keep: float = 1.0) -> GreedyResult:
    """Greedy walk from ``start`` until ``fits(policy)``; ``cost_term`` is the cost in J (e.g. BitOPs).

    ``max_steps`` bounds the bidirectional phase (default: twice the descents from ``start`` to the bottom).
    ``visited`` (policy keys) lets a walk continue an earlier one without revisiting its policies.
    ``focus(policy)`` is told the current policy before its neighbours are scored (``PolicyEvaluator.focus``
    prepares what they share). ``moves_per_step``: at most this many moves a step; ``screen`` and ``keep`` (the
    share of a step's neighbours re-scored, at least 3): the screened step (see the module docstring).
    """
    policy, path, steps = start, [start], []
    visited = set(visited or ()) | {start.key()}
    limit = 2 * descents_to_bottom(start, space) if max_steps is None else max_steps
    with tqdm(desc=description, disable=not bar_enabled(progress), leave=False) as bar:
        while not fits(policy):
            two_way = bidirectional and len(steps) < limit
            options = neighbours(policy, space, two_way, paired)
            if two_way:
                options = [(m, p) for m, p in options if p.key() not in visited]
            if not options and two_way:  # every neighbour already walked: fall back to descents
                options = neighbours(policy, space, False, paired)
            if not options:
                raise MixbitsError(f"greedy search reached the lowest bit-widths without meeting the budget "
                                   f"({description}); the budget is infeasible for this space")
            if focus is not None:
                focus(policy)
            policies = [p for _, p in options]
            costs = [float(cost_term(p)) for p in policies]
            losses, kept = step_losses(policies, costs, evaluate, screen, keep, lam)
            scores = objective(losses, costs, lam)
            ranking = rescored_first(scores, kept)
            best = ranking[0]
            (name, side, direction), policy = options[best]
            extra, policy = _further_descents(options, ranking, policy, moves_per_step, fits, visited)
            visited.add(policy.key())
            path.append(policy)
            steps.append({"step": len(steps) + 1, "layer": name, "side": side, "direction": direction,
                          "bits": list(policy[name]), "loss": losses[best], "cost": costs[best], "J": scores[best],
                          "candidates": len(options), **({"also": extra} if extra else {}),
                          **({"rescored": len(kept)} if len(kept) < len(options) else {})})
            bar.update(1)
            bar.set_postfix(loss=f"{losses[best]:.4f}", cost=f"{costs[best]:.4g}", refresh=False)
            progress_line(f"{description} step {len(steps)}: {name} {side} {direction} to {list(policy[name])}, "
                          f"loss {losses[best]:.4f}, cost {costs[best]:.4g}", progress)
    return GreedyResult(policy, path, steps)


def step_losses(policies: list[Policy], costs: list[float], evaluate: Callable[[Policy], dict],
                 screen: Callable[[Policy], dict] | None, keep: float, lam: float) -> tuple[list[float], set[int]]:
    """The neighbours' losses and which of them ``evaluate`` scored (all, unless screened; module docstring)."""
    count = max(3, math.ceil(keep * len(policies)))
    if screen is None or count >= len(policies):
        return [float(evaluate(p)["loss"]) for p in policies], set(range(len(policies)))
    rough = [float(screen(p)["loss"]) for p in policies]
    kept = sorted(range(len(policies)), key=objective(rough, costs, lam).__getitem__)[:count]
    exact = {i: float(evaluate(policies[i])["loss"]) for i in kept}
    offset = statistics.fmean(exact[i] - rough[i] for i in kept)  # the two image sets' loss levels differ
    return [exact.get(i, rough[i] + offset) for i in range(len(policies))], set(kept)


def rescored_first(scores: list[float], kept: set[int]) -> list[int]:
    """Neighbour indices, best first: the re-scored ones (``kept``) before the rest, each part by score.
    Stable, so ties keep layer order."""
    return sorted(range(len(scores)), key=lambda i: (i not in kept, scores[i]))


def _further_descents(options: list[tuple[Move, Policy]], ranking: list[int], policy: Policy, limit: int,
                      fits: Callable[[Policy], bool], visited: set) -> tuple[list[dict], Policy]:
    """After the best move (already applied in ``policy``): the next-ranked descents on layers not yet moved,
    while fewer than ``limit`` moves are taken and the policy does not fit. Returns (the moves added, the policy)."""
    (name, _, direction), _ = options[ranking[0]]
    if limit <= 1 or direction != -1 or fits(policy):
        return [], policy
    moved, added = {name}, []
    for i in ranking[1:]:
        (layer, side, step), neighbour = options[i]
        if step != -1 or layer in moved:
            continue
        combined = policy.replace(layer, *neighbour[layer])
        if combined.key() in visited:
            continue
        policy = combined
        moved.add(layer)
        added.append({"layer": layer, "side": side, "bits": list(neighbour[layer])})
        if len(moved) >= limit or fits(policy):
            break
    return added, policy


def fill_up(policy: Policy, space: SearchSpace, evaluate: Callable[[Policy], dict], fits: Callable[[Policy], bool],
            focus: Callable[[Policy], None] | None = None, screen: Callable[[Policy], dict] | None = None,
            keep: float = 1.0, raises_per_round: int = 1) -> GreedyResult:
    """Spend what ``policy`` leaves of the budget: while some layer's w or a can go one candidate up and still
    fit, take the raise with the lowest loss (ties: the first in layer order, w before a).

    A walk stops at the first policy that fits, often well under the budget (one step down can cost a
    layer's whole w·a share); the raises are scored like the walk's moves (screened alike with ``screen``:
    ranked by the screen's loss, the best ``keep`` share re-scored, the lowest re-scored loss taken).
    With ``raises_per_round`` k > 1 a round also takes the same ranking's next raises on other layers
    (re-scored ones first), up to k in all, each only if the policy still fits: the walk's stride, upwards.
    """
    path, steps = [policy], []
    while True:
        ups = [(move, p) for move, p in neighbours(policy, space, bidirectional=True, paired=False)
               if move[2] == 1 and fits(p)]
        if not ups:
            return GreedyResult(policy, path, steps)
        if focus is not None:
            focus(policy)
        losses, kept = step_losses([p for _, p in ups], [0.0] * len(ups), evaluate, screen, keep, lam=0.0)
        ranking = rescored_first(losses, kept)
        best = ranking[0]
        (name, side, direction), policy = ups[best]
        also, policy = _further_raises(ups, ranking, policy, raises_per_round, fits)
        path.append(policy)
        steps.append({"step": len(steps) + 1, "layer": name, "side": side, "direction": direction,
                      "bits": list(policy[name]), "loss": losses[best], "candidates": len(ups),
                      **({"also": also} if also else {}),
                      **({"rescored": len(kept)} if len(kept) < len(ups) else {})})


def _further_raises(ups: list[tuple[Move, Policy]], ranking: list[int], policy: Policy, limit: int,
                    fits: Callable[[Policy], bool]) -> tuple[list[dict], Policy]:
    """After the best raise (already in ``policy``): the next-ranked raises on layers not yet raised this round,
    each kept only if the policy still fits, until ``limit`` raises in all. Returns (the raises added, the policy)."""
    raised, added = {ups[ranking[0]][0][0]}, []
    for i in ranking[1:]:
        if len(raised) >= limit:
            break
        (layer, side, _), neighbour = ups[i]
        if layer in raised:
            continue
        combined = policy.replace(layer, *neighbour[layer])
        if fits(combined):
            policy = combined
            raised.add(layer)
            added.append({"layer": layer, "side": side, "bits": list(neighbour[layer])})
    return added, policy
