"""SSPS: sequential single path search (Sun et al. 2021).

Follows the paper (abstract): a single-path search cell with one latent weight and one convolution per
layer, trained by gradients; the constraints (BitOPs, size, latency caps of the budget) enter the loss as
penalty terms; at intervals the undecided layer whose choice is most certain is fixed and leaves the
search, until every layer is decided. The order of fixing is logged in the trace.

Library choices (options): the cell runs one candidate per layer and step, a one-hot Gumbel sample over
per-layer logits with straight-through gradients (``cell: sampled``; ``cell: mixture`` mixes the candidates'
quantized weights and activations with the softmax probabilities instead, the composite convolution). The
mixture misleads on a layer that is bad at every low bit-width alike: against the mixture its cheapest
candidate looks no worse than the rest, the penalty lifts it, and the argmax fixed the layer at 2 bits on a
toy where it needs 5-6 (tests/test_sensitivity.py; the sampled cell gets it right at 8 of 10 seeds). The
penalty is ``penalty_weight`` · Σ over caps of relu(E[cost]/cap − 1), the expectation under the softmax
(``penalty: squared`` or ``linear`` for other shapes); certainty is the probability of the layer's most likely
(w, a) pair (``certainty: entropy`` for the lowest entropy); one layer is fixed at each of L evenly spaced
steps between ``fix_start`` and ``fix_end`` of the search (several at once when there are fewer steps than
layers); alternating updates on an 80/20 split; Adam for the logits at a rate scaled to the search's length
(``arch_lr: null``, ``search/convergence.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..train import Hook, TrainState
from .base import SEARCHERS, SearchContext, SearchResult, method_options
from .derive import choice_policy
from .diff_options import DifferentiableOptions, check_options, fraction, one_of, positive
from .differentiable import PENALTIES, budget_penalty, certainty, gumbel_softmax, softmax_rows
from .supernet import BudgetSearch, Derived, MethodSpec, search_each_budget, train_supernet

CELLS = ("mixture", "sampled")
CERTAINTIES = ("max_prob", "entropy")


@dataclass
class SspsOptions(DifferentiableOptions):
    penalty: str = "hinge"  # "hinge" relu(r-1), "squared" relu(r-1)², "linear" r; r = E[cost]/cap
    penalty_weight: float = 2.0
    certainty: str = "max_prob"  # or "entropy"
    fix_start: float = 0.3  # fraction of the search before the first layer is fixed
    fix_end: float = 0.9  # fraction of the search by which every layer is fixed
    cell: str = "sampled"  # "sampled" (one candidate per step, straight-through) or "mixture" (composite convolution)
    tau: float = 1.0  # Gumbel temperature of the sampled cell


@SEARCHERS.register("ssps")
def ssps_search(ctx: SearchContext) -> SearchResult:
    """SSPS: single-path cell, constraint penalties, layers fixed one by one by certainty."""
    opts = method_options(SspsOptions, ctx.options, "ssps")
    check_options(opts, "ssps", [
        ("penalty", one_of(opts.penalty, PENALTIES), f"one of {list(PENALTIES)}"),
        ("penalty_weight", positive(opts.penalty_weight), "a number > 0"),
        ("certainty", one_of(opts.certainty, CERTAINTIES), f"one of {list(CERTAINTIES)}"),
        ("fix_start", fraction(opts.fix_start, closed=True), "a number in [0, 1]"),
        ("fix_end", fraction(opts.fix_end, closed=True) and opts.fix_end >= opts.fix_start,
         "a number in [fix_start, 1]"),
        ("cell", one_of(opts.cell, CELLS), f"one of {list(CELLS)}"),
        ("tau", positive(opts.tau), "a number > 0"),
    ])
    return search_each_budget(ctx, "ssps", opts, lambda search: _search_budget(search, opts))


def fixing_steps(layers: int, total_steps: int, start: float, end: float) -> list[int]:
    """The step after which the k-th layer is fixed: L steps evenly spaced over [start, end] of the search."""
    if layers == 1:
        return [round(start * total_steps)]
    return [round((start + (end - start) * k / (layers - 1)) * total_steps) for k in range(layers)]


class SequentialFixing(Hook):
    """Fixes the most certain undecided layer to its most likely (w, a) whenever the schedule says so."""

    def __init__(self, search: BudgetSearch, opts: SspsOptions):
        self.search, self.opts = search, opts
        self.order: list[dict] = []
        self.probs_at_fix = torch.zeros(len(search.arch.layers), len(search.arch.pairs))
        self.due: list[int] = []
        self.last_step = 0

    def on_train_start(self, state: TrainState) -> None:
        total = state.cfg.epochs * state.steps_per_epoch
        self.due = fixing_steps(len(self.search.arch.layers), total, self.opts.fix_start, self.opts.fix_end)

    def after_step(self, state: TrainState) -> None:
        self.last_step = state.step
        while len(self.order) < len(self.due) and self.due[len(self.order)] <= state.step:
            self.fix_most_certain(state.step)

    def fix_most_certain(self, step: int) -> None:
        arch = self.search.arch
        with torch.no_grad():
            probs = arch.probs(softmax_rows)
            score = certainty(probs, self.opts.certainty)
        undecided = [i for i in range(len(arch.layers)) if i not in arch.decided]
        layer = max(undecided, key=lambda i: (float(score[i]), -i))  # ties: the earlier layer
        pair = int(probs.pairs[layer].argmax())
        self.probs_at_fix[layer] = probs.pairs[layer].cpu()
        arch.decided[layer] = pair
        self.order.append({"step": step, "layer": arch.layers[layer], "bits": list(arch.bits_of(pair)),
                           "certainty": float(score[layer]), "probability": float(probs.pairs[layer, pair])})

    def state_dict(self) -> dict:
        return {"order": list(self.order), "probs_at_fix": self.probs_at_fix.clone(), "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.last_step = list(state["order"]), state["last_step"]
        self.probs_at_fix = state["probs_at_fix"].clone()

    def finish(self) -> None:
        """Fix whatever the schedule has not reached (rounding on very short searches)."""
        while len(self.order) < len(self.search.arch.layers):
            self.fix_most_certain(self.last_step)


def _search_budget(search: BudgetSearch, opts: SspsOptions) -> Derived:
    arch = search.arch

    def transform(state):
        if opts.cell == "sampled":
            return lambda logits: gumbel_softmax(logits, opts.tau, state.generator, hard=True)
        return softmax_rows

    def arch_loss(state, ce, probs):
        # the expected cost under the softmax: exact, and free of the sampled cell's noise
        penalty = budget_penalty(search.ratios(arch.probs(softmax_rows)), opts.penalty)
        return ce + opts.penalty_weight * penalty, {"ce": ce.detach(), "penalty": penalty.detach()}

    fixing = SequentialFixing(search, opts)
    spec = MethodSpec(lambda state: arch.probs(transform(state)), arch_loss, lambda: arch.probs(softmax_rows),
                      hooks=[fixing], epoch_info=lambda state: {"decided": len(arch.decided)})
    history = train_supernet(search, opts, spec)
    fixing.finish()
    choice = [arch.decided[i] for i in range(len(arch.layers))]
    return Derived(choice_policy(search.ctx, arch, choice), fixing.probs_at_fix,
                   trace={"epochs": history, "fixing_order": fixing.order})
