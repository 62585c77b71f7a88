"""DMPQ (Zhou et al., ACML 2022): bit-width search as distribution learning, with a decaying skip connection.

Follows the paper (abstract): each layer's choice of bit-width is a distribution to learn, so low
bit-width candidates keep training instead of losing early to high ones (the "Matthew effect"); a skip
connection around each searchable convolution carries an architecture weight that decreases to 0 during
the search and takes no part in the bit-width competition; a penalty on the expected BitOPs; the policy
is the argmax of the mean distribution. The trace records, per epoch, the gradient norm reaching the
lowest-bit candidates' parameters (``grad_lowest_w`` / ``grad_lowest_a``) and the skip weight.

Library choices (options), after DrNAS: the mixing weights of each layer are Dirichlet distributed
with concentration elu(α) + 1 from learnable α, sampled by reparameterisation
(``torch.distributions.Dirichlet.rsample``) at every step, with a KL regulariser towards a symmetric
Dirichlet(``prior``) (``regularizer: l2`` penalises (concentration − prior)² instead); the penalty is
``penalty_weight`` · Σ over the budget's caps of relu(E[cost]/cap − 1), the expectation under the mean
mixing weights (exact: cost is linear in them); the skip is parameter-free (average-pooled to the
output size, channels zero-padded or truncated) and added to the convolution's output, its weight
falling from ``skip_init`` to 0 over the search on a cosine (``skip_schedule: linear``); alternating
updates on an 80/20 split; the architecture rate scaled to the search's length (``arch_lr: null``,
``search/convergence.py``: a steadily pushed α reaches mean probability 0.8 within ``decide_fraction`` of the
search). Dirichlet samples use torch's global generator, which the loop seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Dirichlet, kl_divergence

from ..quant import QConv2d
from ..train import Hook, TrainState
from .base import SEARCHERS, SearchContext, SearchResult, method_options
from .convergence import dirichlet_walk
from .derive import argmax_choice, choice_policy
from .diff_options import DifferentiableOptions, check_options, non_negative, one_of, positive
from .differentiable import DECAYS, PENALTIES, ArchParams, budget_penalty, decaying_weight
from .supernet import BudgetSearch, Derived, MethodSpec, search_each_budget, train_supernet

REGULARIZERS = ("kl", "l2", "none")
SKIP_SCALES = ("matched", "raw")


@dataclass
class DmpqOptions(DifferentiableOptions):
    regularizer: str = "kl"  # "kl" to Dirichlet(prior), "l2" on concentration − prior, or "none"
    reg_weight: float = 1e-3
    prior: float = 1.0  # concentration of the symmetric prior
    penalty: str = "hinge"  # "hinge" relu(r-1), "squared" relu(r-1)², "linear" r; r = E[BitOPs etc.]/cap
    penalty_weight: float = 2.0
    skip_schedule: str = "cosine"  # "cosine", "linear" or "none" (constant: an ablation)
    skip_init: float = 0.1  # skip weight at the start (docs/search.md: 1.0 wrecked the float start); 0: no skip
    skip_scale: str = "matched"  # shortcut rescaled to the convolution output's spread ("raw": as it comes)


@SEARCHERS.register("dmpq")
def dmpq_search(ctx: SearchContext) -> SearchResult:
    """DMPQ: Dirichlet distributions over bit-widths, decaying skip connections, expected-BitOPs penalty."""
    opts = method_options(DmpqOptions, ctx.options, "dmpq")
    check_options(opts, "dmpq", [
        ("regularizer", one_of(opts.regularizer, REGULARIZERS), f"one of {list(REGULARIZERS)}"),
        ("reg_weight", non_negative(opts.reg_weight), "a number >= 0"),
        ("prior", positive(opts.prior), "a number > 0"),
        ("penalty", one_of(opts.penalty, PENALTIES), f"one of {list(PENALTIES)}"),
        ("penalty_weight", positive(opts.penalty_weight), "a number > 0"),
        ("skip_schedule", one_of(opts.skip_schedule, DECAYS), f"one of {list(DECAYS)}"),
        ("skip_init", non_negative(opts.skip_init), "a number >= 0"),
        ("skip_scale", one_of(opts.skip_scale, SKIP_SCALES), f"one of {list(SKIP_SCALES)}"),
    ])
    return search_each_budget(ctx, "dmpq", opts, lambda search: _search_budget(search, opts))


def concentration(logits: Tensor) -> Tensor:
    return F.elu(logits) + 1.0


def dirichlet_regularizer(arch: ArchParams, kind: str, prior: float) -> Tensor:
    terms = []
    for logits in arch.named_logits().values():
        conc = concentration(logits)
        if kind == "kl":
            terms.append(kl_divergence(Dirichlet(conc), Dirichlet(torch.full_like(conc, prior))).sum())
        elif kind == "l2":
            terms.append((conc - prior).square().sum())
    return torch.stack(terms).sum() if terms else torch.zeros((), device=next(arch.parameters()).device)


def skip_shortcut(x: Tensor, out: Tensor) -> Tensor:
    """A parameter-free path from the convolution's input to its output's shape."""
    if x.shape[-2:] != out.shape[-2:]:
        x = F.adaptive_avg_pool2d(x, out.shape[-2:])
    c_in, c_out = x.shape[1], out.shape[1]
    if c_in < c_out:
        return F.pad(x, (0, 0, 0, 0, 0, c_out - c_in))
    return x[:, :c_out]


def matched_scale(shortcut: Tensor, out: Tensor) -> Tensor:
    """The shortcut times std(out) / std(shortcut) (detached): a skip of weight 1 as large as the convolution's
    output. A raw shortcut can dwarf it: a 1x1 expansion's output before its BatchNorm is far smaller than its
    input, and the BatchNorm then normalises mostly the skip (``benchmarks/experiments/dmpq_loss.py``)."""
    ratio = out.detach().float().std() / shortcut.detach().float().std().clamp_min(1e-12)
    return shortcut * ratio.to(shortcut.dtype)


class DecayingSkip(Hook):
    """Adds ``weight`` · shortcut(input) to each searchable convolution's output; ``weight`` follows the schedule."""

    def __init__(self, layers, schedule: str, start: float, scale: str = "matched"):
        self.schedule, self.start, self.weight, self.scale = schedule, start, start, scale
        self._handles = [layer.register_forward_hook(self._add_skip) for layer in layers if isinstance(layer, QConv2d)]

    def _add_skip(self, module, inputs, out):
        if self.weight == 0:
            return out
        shortcut = skip_shortcut(inputs[0], out)
        if self.scale == "matched":
            shortcut = matched_scale(shortcut, out)
        return out + self.weight * shortcut

    def on_train_start(self, state: TrainState) -> None:
        self._total = max(1, state.cfg.epochs * state.steps_per_epoch)
        self.weight = decaying_weight(state.step / self._total, self.schedule, self.start)

    def after_step(self, state: TrainState) -> None:
        self.weight = decaying_weight(state.step / self._total, self.schedule, self.start)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _search_budget(search: BudgetSearch, opts: DmpqOptions) -> Derived:
    arch = search.arch

    def sampled(state):  # a fresh reparameterised draw per forward
        return arch.probs(lambda logits: Dirichlet(concentration(logits)).rsample())

    def mean():
        return arch.probs(lambda logits: concentration(logits) / concentration(logits).sum(-1, keepdim=True))

    def arch_loss(state, ce, probs):
        penalty = budget_penalty(search.ratios(mean()), opts.penalty)
        reg = dirichlet_regularizer(arch, opts.regularizer, opts.prior)
        loss = ce + opts.penalty_weight * penalty + opts.reg_weight * reg
        return loss, {"ce": ce.detach(), "penalty": penalty.detach(), "regularizer": reg.detach()}

    skip = DecayingSkip(search.layers, opts.skip_schedule, opts.skip_init, opts.skip_scale)
    spec = MethodSpec(sampled, arch_loss, mean, hooks=[skip], epoch_info=lambda state: {"skip_weight": skip.weight},
                      decisive_walk=dirichlet_walk)
    try:
        history = train_supernet(search, opts, spec)
    finally:
        skip.remove()
    with torch.no_grad():
        pair_probs = mean().pairs
    return Derived(choice_policy(search.ctx, arch, argmax_choice(pair_probs)), pair_probs,
                   trace={"epochs": history})
