"""DNAS (Wu et al. 2018): a supernet over per-layer bit-widths with Gumbel-softmax masks and a cost-aware loss.

Follows the paper: each searchable layer's output mixes its (w, a) candidate edges with Gumbel-softmax
masks m = GumbelSoftmax(θ, τ) drawn every step, τ annealed; the loss is CE · β · (log Cost)^γ with Cost
the expected cost under m; weights and θ are updated alternately on two splits of the training data;
at the end several policies are sampled from the learned distribution.

Library choices (options): shared weights with one composite convolution per layer (EdMIPS), which equals the
sum over the candidate edges because convolution is bilinear; independent w and a masks (``joint: true`` for
one mask over the pairs); a weight warm-up (``arch_warmup``: the first fifth of the search trains the weights
under uniform masks), then τ annealed geometrically per step from ``tau_start`` to ``tau_end`` over the rest
of the search, however short (per epoch, a few-epoch search would end nearly uniform); an 80/20 split, SGD for
the weights and Adam for θ at a rate scaled to the search's length (``arch_lr: null``,
``search/convergence.py``); β = 0.2, γ = 1.2 (the paper's values are not verified here). Cost is measured
relative to the budget, Cost = cost_scale · E[cost] / cap (the largest ratio over the budget's caps), log Cost
floored at 0.01; with cost_scale 1.1 the cost term pulls hardest just over the cap and not at all under
cap·e^0.01/1.1 (0.92 of it), so the learned distribution ends at its budget instead of 1.9-2.2x over it as at
cost_scale 10 and γ 0.6 (docs/search.md, ``benchmarks/experiments/dnas_pull.py`` and ``arch_rate.py``). The
paper fine-tunes every sampled policy; here the argmax and ``samples`` sampled policies are repaired into the
budget (and filled up to it, ``fill_budget``) and scored with ``PolicyEvaluator`` (BatchNorm recalibrated on
the supernet's weights, held-out loss), and the lowest loss is returned for fine-tuning. ``weights: separate``
gives each weight bit-width its own latent weights for the search (the paper's separate edges share the
activation quantizer's input): the layer still runs one convolution, Σ_w p_w·Q_w(W_w) being one tensor, and
a scored policy uses each layer's weights of its chosen bit-width; the copies are dropped after the budget's
search (with ``keep_weights`` the fine-tune starts from each layer's copy of its chosen bit-width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import SEARCHERS, SearchContext, SearchResult, method_options
from .derive import argmax_choice, choice_policy, fill, repair, sample_choice
from .diff_options import DifferentiableOptions, check_options, is_int, non_negative, positive
from .differentiable import annealed_temperature, gumbel_softmax, softmax_rows
from .evaluator import PolicyEvaluator
from .supernet import BudgetSearch, Derived, MethodSpec, architecture_progress, search_each_budget, train_supernet

WEIGHTS = ("shared", "separate")


@dataclass
class DnasOptions(DifferentiableOptions):
    beta: float = 0.2  # β of CE · β · (log Cost)^γ
    gamma: float = 1.2  # γ (FBNet's 0.6 left the task's gradient the larger on most layers: docs/search.md)
    cost_scale: float = 1.1  # Cost at exactly the budget: log Cost is floored (no pull) below cap·e^0.01/cost_scale
    tau_start: float = 5.0  # Gumbel-softmax temperature until the warm-up ends
    tau_end: float = 0.2  # temperature at the last step: geometric per step in between
    arch_warmup: float = 0.2  # share of the search that trains the weights under uniform masks first
    hard: bool = False  # one-hot masks with straight-through gradients
    weights: str = "shared"  # "separate": each weight bit-width its own latent weights during the search
    samples: int = 8  # policies sampled from the learned distribution, scored with the argmax policy
    eval_batches: int = 2  # validation batches per score
    bn_batches: int = 2  # training batches for BatchNorm recalibration per score


@SEARCHERS.register("dnas")
def dnas_search(ctx: SearchContext) -> SearchResult:
    """DNAS: Gumbel-softmax supernet, loss CE·β·(log cost)^γ, sampled policies scored under the budget."""
    opts = method_options(DnasOptions, ctx.options, "dnas")
    check_options(opts, "dnas", [
        ("beta", positive(opts.beta), "a number > 0"),
        ("gamma", non_negative(opts.gamma), "a number >= 0"),
        ("cost_scale", positive(opts.cost_scale) and opts.cost_scale > 1, "a number > 1 (1.1: the pull holds the "
         "expected cost just under the cap)"),
        ("tau_start", positive(opts.tau_start), "a number > 0"),
        ("tau_end", positive(opts.tau_end) and positive(opts.tau_start) and opts.tau_end <= opts.tau_start,
         "a number in (0, tau_start]"),
        ("hard", isinstance(opts.hard, bool), "true or false"),
        ("weights", opts.weights in WEIGHTS, f"one of {list(WEIGHTS)}"),
        ("samples", is_int(opts.samples) and opts.samples >= 0, "a whole number >= 0"),
        ("eval_batches", is_int(opts.eval_batches) and opts.eval_batches >= 1, "a whole number >= 1"),
        ("bn_batches", is_int(opts.bn_batches) and opts.bn_batches >= 0, "a whole number >= 0"),
    ])
    result = search_each_budget(ctx, "dnas", opts, lambda search: _search_budget(search, opts))
    result.info["scored_with"] = "PolicyEvaluator (BatchNorm recalibration + held-out loss on the supernet)"
    return result


def dnas_loss(ce: torch.Tensor, ratio: torch.Tensor, opts: DnasOptions) -> torch.Tensor:
    """CE · β · (log(cost_scale · ratio))^γ, the log floored at 0.01 so the power stays defined."""
    log_cost = torch.log(opts.cost_scale * ratio).clamp_min(0.01)
    return ce * opts.beta * log_cost.float() ** opts.gamma


def cost_pull(ratio: float, opts: DnasOptions) -> float:
    """How much the loss weighs a relative cut in cost against the same relative cut in CE: d log loss / d log cost
    = γ / log(cost_scale · ratio); 0 where the log is floored. The search stops lowering the cost where CE rises
    by this share of itself per share of cost saved."""
    log_cost = math.log(opts.cost_scale * ratio)
    return opts.gamma / log_cost if log_cost > 0.01 else 0.0


def _search_budget(search: BudgetSearch, opts: DnasOptions) -> Derived:
    if opts.weights == "shared":
        return _search_with_current_weights(search, opts)
    for layer in search.layers:  # every candidate starts from the starting weights
        layer.set_candidate_weights(nn.ParameterList(nn.Parameter(layer.weight.detach().clone())
                                                     for _ in layer.w_quant.candidates))
    try:
        derived = _search_with_current_weights(search, opts)
        if opts.keep_weights:  # the fine-tune starts from each layer's weights of its chosen bit-width
            derived.candidate_weights = {name: [w.detach().clone() for w in layer.candidate_weights]
                                         for name, layer in zip(search.arch.layers, search.layers, strict=True)}
        return derived
    finally:
        for layer in search.layers:
            layer.set_candidate_weights(None)


def _search_with_current_weights(search: BudgetSearch, opts: DnasOptions) -> Derived:
    arch, ctx = search.arch, search.ctx

    def tau(state) -> float:
        return annealed_temperature(architecture_progress(state, opts.arch_warmup), opts.tau_start, opts.tau_end)

    def mixing(state):
        return arch.probs(lambda logits: gumbel_softmax(logits, tau(state), state.generator, opts.hard))

    def arch_loss(state, ce, probs):
        ratio = torch.stack(list(search.ratios(probs).values())).max()
        return dnas_loss(ce, ratio, opts), {"ce": ce.detach(), "cost_over_cap": ratio.detach(),
                                            "cost_pull": cost_pull(float(ratio), opts)}

    def distribution():
        return arch.probs(softmax_rows)

    history = train_supernet(search, opts, MethodSpec(mixing, arch_loss, distribution,
                                                      epoch_info=lambda state: {"tau": tau(state)}))
    with torch.no_grad():
        pair_probs = distribution().pairs
    gen = torch.Generator().manual_seed(ctx.seed + search.index)
    choices = [argmax_choice(pair_probs)] + [sample_choice(pair_probs, gen) for _ in range(opts.samples)]
    evaluator = PolicyEvaluator(ctx.model, ctx.val_loader, ctx.train_loader, opts.eval_batches, opts.bn_batches,
                                ctx.device, loss_fn=ctx.loss_fn)
    best, front = None, []
    for i, choice in enumerate(choices):
        policy, _ = repair(ctx, arch, choice_policy(ctx, arch, choice), search.budget, pair_probs)
        if opts.fill_budget:  # every candidate is scored at the budget it will be given
            policy, _ = fill(ctx, arch, policy, search.budget, pair_probs)
        score = evaluator(policy)
        front.append({"budget": search.budget.text, "sample": i, "argmax": i == 0, "policy": policy.to_dict(),
                      **ctx.cost(policy), **score})
        if best is None or score["loss"] < best[0]:
            best = (score["loss"], policy)
    return Derived(best[1], pair_probs, trace={"epochs": history, "best_loss": best[0],
                                               "evaluations": evaluator.evaluations}, front=front)
