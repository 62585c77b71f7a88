"""``--method oneshot``: one weight-sharing supernet, then one bidirectional greedy walk per budget.

Retraining-free one-shot mixed-precision search (Tang et al. 2024, seed 002). See the package docstring
for what follows the paper and what is this library's choice.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...budget import Budget
from ...data.batches import one_batch, to_device
from ...errors import MixbitsError
from ...quant import fit_steps, quant_layers
from ...quant.pair_bn import attach_pair_bn, follows
from ...space import Policy
from ...train import save_checkpoint
from ..base import SEARCHERS, SearchContext, SearchResult, method_options
from ..evaluator import PolicyEvaluator
from ..greedy import descents_to_bottom, fill_up, greedy_search, neighbours
from ..searched import save_searched_weights, searched_dir
from .options import OneshotOptions, check_options
from .random_baseline import random_on_supernet
from .supernet import train_supernet

SUPERNET_FILE = "oneshot_supernet.pt"


@SEARCHERS.register("oneshot")
def oneshot_search(ctx: SearchContext) -> SearchResult:
    """One-shot weight-sharing supernet (bit-width scheduler, IDM, fair decay), greedy walk per budget."""
    opts = method_options(OneshotOptions, ctx.options, "oneshot")
    check_options(opts, tuple(sorted(set(ctx.space.w_bits) & set(ctx.space.a_bits))))
    by_name = quant_layers(ctx.model)
    if not ctx.space.searchable:
        raise MixbitsError("search method 'oneshot' has nothing to search: every quantized layer is fixed")
    layers = {n: by_name[n] for n in ctx.space.searchable}
    if opts.keep_weights:
        searched_dir(ctx, "oneshot")  # no run directory: fail before training
    # The supernet is the result (its weights are what the policies run on), so the model is not put back.
    # LSQ's initial steps clip heavy-tailed layers (search/start.py)
    fit_steps(ctx.model, one_batch(ctx.calibration_input()))
    pair_bn = _pair_batchnorm(ctx) if opts.score_bn == "pair" else None
    supernet = train_supernet(ctx, layers, opts) if opts.epochs > 0 else {"epochs": [], "frozen_periods": []}
    saved = _save_supernet(ctx, opts, pair_bn)
    evaluator = PolicyEvaluator(ctx.model, ctx.val_loader, ctx.train_loader, opts.eval_batches, opts.bn_batches,
                                ctx.device, bn_mode="running" if pair_bn is not None else opts.score_bn,
                                eval_samples=opts.eval_samples,
                                reuse_prefix=opts.reuse_prefix and opts.score_bn == "batch", loss_fn=ctx.loss_fn)
    front = FrontRecorder(ctx, evaluator)
    screen = _screening_evaluator(ctx, opts, evaluator)
    start = start_policy(ctx, opts)
    walks: dict[tuple, Walk] = {}
    policies, trace = [], [{"stage": "supernet", **supernet}]
    for budget in ctx.budgets:
        front.budget = budget.text
        began = time.perf_counter()
        walk, continued = _walk_for(ctx, opts, budget, start, front, walks, screen)
        policy, filled = walk.path[-1], []
        if opts.fill:
            raised = fill_up(policy, ctx.space, front, lambda p, b=budget: ctx.fits(p, b), _focus(evaluator, screen),
                             screen=screen, keep=opts.screen_keep, raises_per_round=moves_per_step(ctx, opts))
            policy, filled = raised.policy, raised.steps
        seconds = time.perf_counter() - began
        policies.append(policy)
        trace.append({"stage": "greedy", "budget": budget.text, "start": start.describe(),
                      "start_score": front(start), "continued_from": continued, "shortcut": walk.shortcut,
                      "seconds": seconds, "evaluated_so_far": evaluator.evaluations, "steps": walk.steps,
                      "walked_to": walk.path[-1].describe(), "fill": filled,
                      "policy": policy.describe(), **ctx.cost(policy), **front(policy)})
    info = {"options": asdict(opts), "evaluations": evaluator.evaluations,
            "screen_evaluations": screen.evaluations if screen is not None else 0, "supernet": saved,
            "scored_with": "PolicyEvaluator (BatchNorm recalibration + held-out loss)"}
    if opts.keep_weights:
        info["finetune_init"] = [save_searched_weights(ctx, "oneshot", i, p) for i, p in enumerate(policies)]
    if opts.random_baseline:  # after the walks: it neither shares their scores' order nor changes their policies
        baseline = random_on_supernet(ctx, evaluator, screen)
        trace.extend(baseline.pop("trace"))
        info["random_baseline"] = baseline
    return SearchResult("oneshot", list(ctx.budgets), policies, trace=trace, front=front.entries(),
                        retraining_free=True, info=info)


@dataclass
class Walk:
    path: list[Policy]
    steps: list[dict] = field(default_factory=list)
    budget: str = ""
    shortcut: bool = False  # the budget admits only the lowest policy: no walk was needed


class FrontRecorder:
    """Scores through the evaluator and keeps every distinct evaluated point: policy, costs, loss, top-1."""

    def __init__(self, ctx: SearchContext, evaluator: PolicyEvaluator):
        self.ctx, self.evaluator = ctx, evaluator
        self.points: dict[tuple, dict] = {}
        self.budget = ""

    def __call__(self, policy: Policy) -> dict:
        score = self.evaluator(policy)
        if policy.key() not in self.points:
            self.points[policy.key()] = {"budget": self.budget, "policy": policy.to_dict(), **self.ctx.cost(policy),
                                         **score}
        return score

    def entries(self) -> list[dict]:
        fits = {b.text: b for b in self.ctx.budgets}
        return [{**p, "fits": [t for t, b in fits.items() if self.ctx.fits(Policy.from_dict(p["policy"]), b)]}
                for p in self.points.values()]


def start_policy(ctx: SearchContext, opts: OneshotOptions) -> Policy:
    highest = Policy.from_rules(ctx.space, default=(ctx.space.w_bits[-1], ctx.space.a_bits[-1]))
    if opts.start == "highest":
        return highest
    if opts.start == "auto":
        return lowest_above_budgets(ctx, highest)
    return Policy.uniform(ctx.space, opts.start)


def lowest_above_budgets(ctx: SearchContext, highest: Policy) -> Policy:
    """The lowest uniform policy k (over the bit-widths weights and activations share) such that neither it nor
    any uniform policy above it fits a budget; ``highest`` when even that fits one. Under BitOPs and size caps
    every policy with all layers at k bits or more costs more than uniform k, so a walk from the highest
    candidates would pass only policies that fit nothing before reaching this level: starting here skips
    their scores. Each budget's walk still begins above its budget. A latency table need not grow with the bits
    (a policy above uniform k may be faster than it), so with a latency cap the walk starts at ``highest``."""
    if any("latency" in b.limits(ctx.stats, ctx.space, ctx.latency) for b in ctx.budgets):
        return highest
    shared = sorted(set(ctx.space.w_bits) & set(ctx.space.a_bits))
    fits_any = [any(ctx.fits(Policy.uniform(ctx.space, k), b) for b in ctx.budgets) for k in shared]
    if fits_any[-1]:
        return highest
    last_fitting = max((i for i, fits in enumerate(fits_any) if fits), default=-1)
    return Policy.uniform(ctx.space, shared[last_fitting + 1])


def _cost_term(ctx: SearchContext, opts: OneshotOptions, budget: Budget):
    """(cost in J, key under which walks with the same J can be shared, or None)."""
    if opts.cost_term == "bitops":
        return (lambda p: ctx.cost(p)["bitops"]), ("bitops",)
    limits = budget.limits(ctx.stats, ctx.space, ctx.latency)

    def relative(policy: Policy) -> float:
        cost = ctx.cost(policy)
        return sum(cost[m] / limit for m, limit in limits.items())

    # Min-max normalisation ignores a positive scale, so single-cap budgets on one metric share J exactly.
    return relative, (tuple(limits) if len(limits) == 1 else None)


def _screening_evaluator(ctx: SearchContext, opts: OneshotOptions, evaluator: PolicyEvaluator):
    """The walk's cheap first scorer: the evaluator's first ``screen_samples`` images, scored the same way;
    None when screening is off or would not be cheaper (a user's loss_fn scores whole batches)."""
    if opts.screen_samples is None or ctx.loss_fn is not None:
        return None
    if opts.screen_samples >= sum(len(y) for _, y in evaluator.batches):
        return None
    return PolicyEvaluator(ctx.model, evaluator.batches, evaluator.bn_batches, len(evaluator.batches),
                           len(evaluator.bn_batches), ctx.device, bn_mode=evaluator.bn_mode,
                           eval_samples=opts.screen_samples, reuse_prefix=evaluator.prefix is not None)


def _walk_for(ctx: SearchContext, opts: OneshotOptions, budget: Budget, start: Policy, score: FrontRecorder,
              walks: dict[tuple, Walk], screen: PolicyEvaluator | None = None) -> tuple[Walk, str | None]:
    """The budget's greedy walk; an earlier walk with the same J is reused up to its first fitting policy,
    or continued from its end (the same walk a fresh start would take, without re-scoring its steps)."""
    lowest = Policy.from_rules(ctx.space, default=(ctx.space.w_bits[0], ctx.space.a_bits[0]))
    if only_lowest_fits(ctx, budget, lowest):
        return Walk([lowest], [], budget.text, shortcut=True), None
    cost, key = _cost_term(ctx, opts, budget)
    limit = opts.max_steps if opts.max_steps is not None else 2 * descents_to_bottom(start, ctx.space)
    earlier = walks.get(key) if opts.continue_path and key is not None else None
    if earlier is not None:
        hit = next((i for i, p in enumerate(earlier.path) if ctx.fits(p, budget)), None)
        if hit is not None:
            return Walk(earlier.path[: hit + 1], earlier.steps[:hit], budget.text), earlier.budget
    begin = earlier.path[-1] if earlier is not None else start
    done = earlier.steps if earlier is not None else []
    result = greedy_search(begin, ctx.space, score, cost, lambda p: ctx.fits(p, budget), opts.lam,
                           opts.bidirectional, max(0, limit - len(done)), ctx.progress,
                           description=f"greedy {budget}", visited={p.key() for p in (earlier.path if earlier else [])},
                           paired=opts.moves == "layer", focus=_focus(score.evaluator, screen),
                           moves_per_step=moves_per_step(ctx, opts),
                           screen=screen, keep=opts.screen_keep)
    steps = done + [{**s, "step": len(done) + s["step"]} for s in result.steps]
    walk = Walk((earlier.path if earlier else []) + result.path[(1 if earlier else 0):], steps, budget.text)
    if key is not None:
        walks[key] = walk
    return walk, (earlier.budget if earlier is not None else None)


def moves_per_step(ctx: SearchContext, opts: OneshotOptions) -> int:
    """Moves a walk step, or raises a fill round, may take: ``stride`` of the searchable layers, at least one."""
    return max(1, round(opts.stride * len(ctx.space.searchable)))


def _focus(*evaluators: PolicyEvaluator | None):
    """Tell every scorer of the walk its current policy (each records the shared blocks on its own images)."""
    def focus(policy: Policy) -> None:
        for evaluator in evaluators:
            if evaluator is not None:
                evaluator.focus(policy)
    return focus


def only_lowest_fits(ctx: SearchContext, budget: Budget, lowest: Policy) -> bool:
    """True when the all-lowest policy is the only one within ``budget``, so every walk would end there.

    BitOPs and size grow with every bit, so any other policy costs at least one of the lowest policy's
    one-step-up neighbours; if none of those fits, nothing else does. Latency tables need not be
    monotone, so a latency budget is always walked.
    """
    if "latency" in budget.limits(ctx.stats, ctx.space, ctx.latency) or not ctx.fits(lowest, budget):
        return False
    ups = [p for _, p in neighbours(lowest, ctx.space, bidirectional=True, paired=False)]
    return not any(ctx.fits(p, budget) for p in ups)


def _pair_batchnorm(ctx: SearchContext) -> dict[str, str]:
    """Give every BatchNorm that follows a searchable layer one copy per (w, a) pair; returns which follows which."""
    mapping = follows(ctx.model, to_device(ctx.calibration_input(), ctx.device))
    attach_pair_bn(ctx.model, mapping)
    return mapping


def _save_supernet(ctx: SearchContext, opts: OneshotOptions, pair_bn: dict[str, str] | None) -> str | None:
    """Write the trained weights beside the search (the policies are meant to run on them without retraining)."""
    if ctx.run_dir is None or not opts.save_supernet or opts.epochs == 0:
        return None
    path = Path(ctx.run_dir) / SUPERNET_FILE
    # The layout mixbits.runs.subnets.load_supernet reads back.
    save_checkpoint(path, {"model": ctx.model.state_dict(), "space": ctx.space.to_dict(),
                           "info": {"method": "oneshot", "options": asdict(opts), "pair_bn": pair_bn}})
    return str(path)
