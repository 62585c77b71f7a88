"""Random search on the one-shot supernet: the greedy walk's baseline with the same weights, scorer and compute.

``--method random`` scores its policies on the float model with fitted steps, so a walk on a trained
supernet that beats it may owe the win to the supernet, not to the walk. With ``random_baseline: true``
the one-shot search also draws random policies per budget (random search's draws and repair:
``search/random_search.py``, seeded by the search's seed), scores them with the walk's own evaluator on the
same supernet, and keeps the best per budget beside the walk's policy. It gets the walks' compute: as many
full scores as the walks and fills took in all (each screening score counted as its share of a full
score's images), split evenly over the budgets (at least one each). Its own cost is recorded (``seconds``,
``forward_samples``), so that a caller can keep it out of the search's.
"""

from __future__ import annotations

import math
import time

import torch

from ..base import SearchContext
from ..evaluator import PolicyEvaluator
from ..random_search import repair, sample_policy


def images_per_score(evaluator: PolicyEvaluator) -> int:
    return sum(len(batch[-1]) for batch in evaluator.batches)


def forward_samples(evaluator: PolicyEvaluator, evaluations: int) -> int:
    """Samples through the whole network for ``evaluations`` new scores (BatchNorm recalibration included)."""
    bn = sum(len(batch[-1]) for batch in evaluator.bn_batches) if evaluator.bn_mode == "recalibrate" else 0
    return evaluations * (images_per_score(evaluator) + bn)


def walk_compute(evaluator: PolicyEvaluator, screen: PolicyEvaluator | None) -> float:
    """The walks' and fills' scores so far, in full scores (a screening score: its images over a full score's)."""
    full = float(evaluator.evaluations)
    if screen is None:
        return full
    return full + screen.evaluations * images_per_score(screen) / max(1, images_per_score(evaluator))


def random_on_supernet(ctx: SearchContext, evaluator: PolicyEvaluator, screen: PolicyEvaluator | None) -> dict:
    """Per budget, the best of the walks' compute in random policies scored by ``evaluator``; its record."""
    compute = walk_compute(evaluator, screen)
    samples = max(1, math.ceil(compute / len(ctx.budgets)))
    gen = torch.Generator().manual_seed(ctx.seed)
    before, started = evaluator.evaluations, time.perf_counter()
    policies, scores, trace = [], [], []
    for budget in ctx.budgets:
        best, best_score = None, None
        for _ in range(samples):
            policy = repair(ctx, sample_policy(ctx, gen), budget, gen)
            score = evaluator(policy)
            if best_score is None or score["loss"] < best_score["loss"]:
                best, best_score = policy, score
        policies.append(best.to_dict())
        scores.append(best_score)
        trace.append({"stage": "random", "budget": budget.text, "samples": samples, "policy": best.describe(),
                      **ctx.cost(best), **best_score})
    new = evaluator.evaluations - before  # a policy the walks scored already costs nothing
    return {"samples_per_budget": samples, "walk_scores": compute, "evaluations": new,
            "forward_samples": forward_samples(evaluator, new), "seconds": time.perf_counter() - started,
            "policies": policies, "scores": scores, "trace": trace}
