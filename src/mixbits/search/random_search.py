"""Random search under the budget, scored like the greedy search: BN recalibration + held-out loss.

Each sample draws every searchable layer's (w, a) uniformly, then repairs it into the budget by
lowering randomly chosen layers one step at a time, so samples sit near the budget, where the best
policies are. Policies are scored on the quantized float-initialised model with MSE-fitted steps (a
post-training proxy; ``search/start.py``); the best per budget is returned for fine-tuning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..space import Policy
from .base import SEARCHERS, SearchContext, SearchResult, method_options
from .evaluator import PolicyEvaluator
from .start import fitted_start


@dataclass
class RandomOptions:
    samples: int = 50  # policies scored per budget
    eval_batches: int = 2  # validation batches per score
    bn_batches: int = 2  # training batches for BatchNorm recalibration


@SEARCHERS.register("random")
def random_search(ctx: SearchContext) -> SearchResult:
    """Random policies repaired into the budget; the lowest held-out loss wins."""
    opts = method_options(RandomOptions, ctx.options, "random")
    with fitted_start(ctx):
        return _search(ctx, opts)


def _search(ctx: SearchContext, opts: RandomOptions) -> SearchResult:
    evaluator = PolicyEvaluator(ctx.model, ctx.val_loader, ctx.train_loader, opts.eval_batches, opts.bn_batches,
                                ctx.device, loss_fn=ctx.loss_fn)
    gen = torch.Generator().manual_seed(ctx.seed)
    policies, trace, front = [], [], []
    for budget in ctx.budgets:
        best, best_loss = None, float("inf")
        for i in tqdm(range(opts.samples), desc=f"random {budget}", disable=not ctx.progress, leave=False):
            policy = repair(ctx, sample_policy(ctx, gen), budget, gen)
            score = evaluator(policy)
            front.append({"budget": budget.text, "policy": policy.to_dict(), **ctx.cost(policy), **score})
            if score["loss"] < best_loss:
                best, best_loss = policy, score["loss"]
                trace.append({"budget": budget.text, "sample": i, "loss": score["loss"], "top1": score["top1"]})
        policies.append(best)
    return SearchResult("random", list(ctx.budgets), policies, trace=trace, front=front,
                        info={"options": asdict(opts), "evaluations": evaluator.evaluations})


def sample_policy(ctx: SearchContext, gen: torch.Generator) -> Policy:
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    overrides = {n: (pick(ctx.space.w_bits), pick(ctx.space.a_bits)) for n in ctx.space.searchable}
    return Policy.from_rules(ctx.space, default=(ctx.space.w_bits[0], ctx.space.a_bits[0]), overrides=overrides)


def repair(ctx: SearchContext, policy: Policy, budget, gen: torch.Generator) -> Policy:
    """Lower random (layer, side) pairs one candidate step until the budget holds."""
    w_bits, a_bits = ctx.space.w_bits, ctx.space.a_bits
    while not ctx.fits(policy, budget):
        lowerable = [(n, side) for n in ctx.space.searchable for side in (0, 1)
                     if policy[n][side] > (w_bits, a_bits)[side][0]]
        name, side = lowerable[int(torch.randint(len(lowerable), (1,), generator=gen))]
        w, a = policy[name]
        if side == 0:
            w = w_bits[w_bits.index(w) - 1]
        else:
            a = a_bits[a_bits.index(a) - 1]
        policy = policy.replace(name, w, a)
    return policy
