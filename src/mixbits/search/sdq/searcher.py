"""SDQ (Huang et al., ICML 2022): stochastic differentiable quantization with Differentiable Bitwidth Parameters.

Follows the paper (abstract and METHODS.md §4): per layer and candidate bit-width a DBP, the probability
of keeping that bit-width rather than the adjacent lower one; the forward quantizes stochastically
between the two adjacent bit-widths and the DBPs learn through a straight-through Gumbel estimator
(``dbp.py``); a regulariser pushes the DBPs toward fewer bits until the target (the budget) is met; a
bit-width whose DBP falls below a threshold is removed, so bit-widths decrease progressively; stage 2
trains the found policy with entropy-aware bin regularisation and distillation from the full-precision
model. Stage 2 is ``mixbits search``'s fine-tune of each policy: the result's ``finetune`` carries
``ebr_weight`` (``mixbits.quant.ebr``) and ``kd_alpha`` (the ``--init`` float model is the teacher).

Library choices (options, ``SdqOptions``):
- weights and DBPs learn jointly from one loss (single level): the weights in ``mixbits.train.fit``, the
  DBPs by Adam in a hook after each weight step; one Gumbel draw per layer and step; the DBP rate by
  default lets a steadily pushed DBP walk a layer from its highest to its lowest candidate within
  ``descent_fraction`` of the search;
- every layer starts at its highest candidate, each DBP at keep-probability ``init_keep`` when its
  bit-width becomes current; removal below ``threshold``, checked after every step, the least kept first
  and, with ``stop_at_budget``, no further than the budget needs;
- the regulariser is ``reg_weight`` · Σ over the budget's caps of E[cost]/cap (``penalty: linear``; or the
  hinge/squared excess), the expectation exact under the DBPs (every cost is a sum over layers and each
  layer's bits are a two-point distribution); it is on only while the current bits (each layer's highest
  remaining bit-width) exceed the budget;
- the policy is the current bits. With ``stop_at_budget`` the budget's search ends as soon as they meet
  the budget (bit-widths are never restored, so more training could only lower them); otherwise it runs
  every epoch, removals going on. A search that ends over its budget is repaired (``derive.repair``: one
  step down at a time, the layer whose DBPs keep its current bits least first);
- weights and activations are searched alike, each with DBPs of its own (at equal BitOPs the trade between
  a layer's weight and activation bits is much of what there is to find); ``search_activations: false``
  fixes the activations, per budget: ``activation_bits`` if given, else the largest activation candidate
  that still fits with every searchable layer's weights at b, where W_b A_b is the highest uniform policy
  that fits; without a fitting uniform policy, the largest activation candidate at which the lowest
  weights fit. Each layer computes only its two adjacent quantizations per side;
- the search starts from MSE-fitted steps (``search/start.py``).
Every budget is searched from the same starting weights; the model's weights and bits are restored
afterwards. The trace records per budget and epoch each layer's bit-widths, the mean keep-probability,
the DBP gradient, whether the regulariser is on and the expected and current cost over each cap, and
every removal (step, layer, side, from, to). With a run directory each budget's training checkpoints every
epoch under ``supernet/budget<i>/`` (weights, DBPs, current bit-widths, removals), so a resumed search
continues it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ...budget import Budget
from ...errors import MixbitsError
from ...quant import QuantLayer, quant_layers
from ...space import Policy
from ...train import Hook, StepOutput, TrainConfig, TrainState, fit
from ..base import SEARCHERS, SearchContext, SearchResult, cheapest_fitting_uniform, method_options
from ..derive import repair
from ..differentiable import ArchParams, ExpectedCost, LayerProbs, budget_penalty, cost_ratios
from ..start import fitted_start
from .dbp import BitParams, drive, logit, set_current_bits
from .options import SdqOptions, check_options


@SEARCHERS.register("sdq")
def sdq_search(ctx: SearchContext) -> SearchResult:
    """SDQ: stochastic quantization between adjacent bit-widths, learned DBPs, bit-widths removed progressively."""
    opts = method_options(SdqOptions, ctx.options, "sdq")
    check_options(opts, ctx.space)
    names = ctx.space.searchable
    if not names:
        raise MixbitsError("search method 'sdq' has nothing to search: every quantized layer is fixed")
    by_name = quant_layers(ctx.model)
    layers = [by_name[n] for n in names]
    cost = ExpectedCost(ctx, ArchParams(names, ctx.space.w_bits, ctx.space.a_bits).pairs)
    a_fixed = [None if opts.search_activations else activation_bits_for(ctx, b, opts.activation_bits)
               for b in ctx.budgets]  # every budget checked before any training
    start_bits = [layer.bits for layer in by_name.values()]
    policies, trace = [], []
    with fitted_start(ctx) as start:  # every budget starts from these weights; the model is restored afterwards
        try:
            for index, budget in enumerate(ctx.budgets):
                ctx.model.load_state_dict(start)
                run = BudgetRun(ctx, opts, budget, layers, cost, a_fixed[index], index)
                found, entry = run.search()
                policy, steps = repair(ctx, run.repair_index(), found, budget, run.repair_probs())
                policies.append(policy)
                trace.append({"budget": budget.text, **entry, "found": found.describe(), "repair": steps,
                              "policy": policy.describe(), **ctx.cost(policy)})
        finally:
            for layer, bits in zip(by_name.values(), start_bits, strict=True):
                layer.set_bits(*bits)  # also clears any mixture
    return SearchResult("sdq", list(ctx.budgets), policies, trace=trace,
                        finetune={"ebr_weight": opts.ebr_weight, "kd_alpha": opts.kd_alpha},
                        info={"options": asdict(opts), "activation_bits": a_fixed})


def activation_bits_for(ctx: SearchContext, budget: Budget, requested: int | None) -> int:
    """The fixed activation bits of a search under ``budget`` (the rule is in the module docstring)."""
    space = ctx.space

    def fits(w: int, a: int) -> bool:
        return ctx.fits(Policy.from_rules(space, default=(w, a)), budget)

    lowest = min(space.w_bits)
    if requested is not None:
        if not fits(lowest, requested):
            raise MixbitsError(f"sdq: budget {budget} cannot hold with activations at activation_bits={requested}, "
                               f"even with every searchable layer's weights at {lowest} bits; lower activation_bits, "
                               "leave it null (chosen per budget) or set search_activations: true")
        return requested
    uniform = cheapest_fitting_uniform(ctx, budget)
    w_ref = uniform[space.searchable[0]][0] if uniform is not None else lowest
    fitting = [a for a in space.a_bits if fits(w_ref, a)]
    if not fitting:
        raise MixbitsError(f"sdq: budget {budget} cannot hold at any fixed activation bit-width "
                           f"{list(space.a_bits)} with the weights at {w_ref} bits; set search_activations: true")
    return max(fitting)


class _BudgetMet(Exception):
    """Ends a budget's training early: the current bits meet the budget (``stop_at_budget``)."""


@dataclass
class BudgetRun:
    """One budget's search: the DBPs, the stochastic forward, the regulariser and the removals."""

    ctx: SearchContext
    opts: SdqOptions
    budget: Budget
    layers: list[QuantLayer]  # the searchable layers, in the space's order
    cost: ExpectedCost
    a_fixed: int | None  # None: activations searched
    index: int = 0  # of the budget in ctx.budgets: names its checkpoint directory
    fits: bool = False  # do the current bits meet the budget?
    removals: list[dict] = field(default_factory=list)
    met_at_step: int | None = None

    def __post_init__(self):
        space, names, device = self.ctx.space, self.ctx.space.searchable, self.ctx.device
        self.limits = self.budget.limits(self.ctx.stats, space, self.ctx.latency)
        self.w = BitParams(names, space.w_bits, self.opts.init_keep).to(device)
        self.a = BitParams(names, space.a_bits, self.opts.init_keep).to(device) if self.a_fixed is None else None
        self._a_one_hot = None
        if self.a_fixed is not None:
            self._a_one_hot = F.one_hot(torch.full((len(names),), space.a_bits.index(self.a_fixed)),
                                        len(space.a_bits)).float().to(device)
        self.dbp_lr = self.opts.dbp_lr if self.opts.dbp_lr is not None else self.automatic_dbp_lr()

    # the current bits and the distribution --------------------------------------------------------------------
    def sides(self) -> list[tuple[str, BitParams]]:
        return [("w", self.w)] + ([("a", self.a)] if self.a is not None else [])

    def a_bits(self) -> list[int]:
        return self.a.bits() if self.a is not None else [self.a_fixed] * len(self.layers)

    def current_policy(self) -> Policy:
        space = self.ctx.space
        overrides = {n: (w, a) for n, w, a in zip(space.searchable, self.w.bits(), self.a_bits(), strict=True)}
        return Policy.from_rules(space, default=(space.w_bits[0], space.a_bits[0]), overrides=overrides)

    def bits_now(self) -> dict[str, list[int]]:
        """Each searchable layer's current [w, a] bits."""
        return {n: [w, a] for n, w, a in zip(self.ctx.space.searchable, self.w.bits(), self.a_bits(), strict=True)}

    def ratios(self) -> dict[str, Tensor]:
        """Expected cost under the DBPs over each cap of the budget."""
        a_probs = self.a.expected() if self.a is not None else self._a_one_hot
        return cost_ratios(self.cost(LayerProbs.factored(self.w.expected(), a_probs).pairs), self.limits)

    def current_ratios(self) -> dict[str, float]:
        cost = self.ctx.cost(self.current_policy())
        return {m: cost[m] / limit for m, limit in self.limits.items()}

    def update_fit(self, step: int) -> None:
        self.fits = self.ctx.fits(self.current_policy(), self.budget)
        if self.fits and self.met_at_step is None:
            self.met_at_step = step

    @property
    def regularizing(self) -> bool:
        return not self.fits and self.opts.reg_weight > 0

    def automatic_dbp_lr(self) -> float:
        """Adam moves a steadily pushed DBP by about its rate per step; one bit-width down is a walk of
        logit(init_keep) − logit(threshold), the whole way down K − 1 of them (the side with more candidates)."""
        opts, space = self.opts, self.ctx.space
        drops = max(len(space.w_bits), len(space.a_bits) if self.a is not None else 1) - 1
        walk = logit(opts.init_keep) - logit(opts.threshold)
        steps = opts.epochs * len(self.ctx.train_loader)
        return max(1, drops) * walk / max(1.0, opts.descent_fraction * steps)

    # training -------------------------------------------------------------------------------------------------
    def objective(self, state: TrainState, x: Tensor, y: Tensor) -> StepOutput:
        w_mix = self.w.sample(self.opts.tau, state.generator)
        a_mix = self.a.sample(self.opts.tau, state.generator) if self.a is not None else None
        drive(self.layers, w_mix, a_mix, self.w, self.a)
        ce, logits = self.ctx.task_loss(state.model, x, y)
        if not self.regularizing:
            return StepOutput(ce, logits, {"ce": ce.detach()})
        penalty = budget_penalty(self.ratios(), self.opts.penalty)
        return StepOutput(ce + self.opts.reg_weight * penalty, logits, {"ce": ce.detach(), "penalty": penalty.detach()})

    def remove(self, state: TrainState) -> None:
        """Progressive removal after a DBP step, least kept first; with ``stop_at_budget`` no further than the
        budget needs (several layers often cross the threshold at the same step). The layers' fixed bits follow."""
        sides = self.sides()
        due = sorted((p, k, i) for k, (_, params) in enumerate(sides) for i, p in params.below(self.opts.threshold))
        for p, k, i in due:
            side, params = sides[k]
            old, new = params.drop(i)
            self.removals.append({"step": state.step, "epoch": state.epoch + 1, "layer": params.layers[i],
                                  "side": side, "from": old, "to": new, "keep_prob": p})
            self.update_fit(state.step)
            if self.fits and self.opts.stop_at_budget:
                break
        if due:
            set_current_bits(self.layers, self.w, self.a, self.a_fixed)

    def search(self) -> tuple[Policy, dict]:
        """Train until the budget is met (or for every epoch); returns the current bits and the trace entry."""
        opts, ctx = self.opts, self.ctx
        set_current_bits(self.layers, self.w, self.a, self.a_fixed)
        self.update_fit(0)
        entry = {"activation_bits": "searched" if self.a is not None else self.a_fixed, "dbp_lr": self.dbp_lr,
                 "start_bits": self.bits_now()}
        params = [p for _, side in self.sides() for p in side.parameters()]
        if opts.dbp_optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=self.dbp_lr)
        else:
            optimizer = torch.optim.SGD(params, lr=self.dbp_lr, momentum=0.9)
        step = DbpStep(self, optimizer)
        cfg = TrainConfig(epochs=opts.epochs, optimizer=opts.optimizer, lr=opts.lr, momentum=opts.momentum,
                          weight_decay=opts.weight_decay, seed=ctx.seed, compile=False)
        stopped_early = self.fits and opts.stop_at_budget
        # checkpointed every epoch with the DBPs and removals; `mixbits search --resume` continues it
        run_dir, resume = ctx.training_run(f"budget{self.index}")
        try:
            if not stopped_early:
                fit(ctx.model, ctx.train_loader, cfg, objective=self.objective, hooks=[step], device=ctx.device,
                    progress=ctx.progress, run_dir=run_dir, resume=resume)
        except _BudgetMet:
            stopped_early = True
        finally:
            for layer in self.layers:
                layer.set_mixture(None, None)
        entry.update({"epochs": step.history, "removals": self.removals, "budget_met_at_step": self.met_at_step,
                      "stopped_early": stopped_early})
        return self.current_policy(), entry

    # repair inputs ----------------------------------------------------------------------------------------------
    def repair_index(self) -> ArchParams:
        """The candidate pairs repair may move between: activations stay at their fixed bits when not searched."""
        a_bits = self.ctx.space.a_bits if self.a is not None else (self.a_fixed,)
        return ArchParams(self.ctx.space.searchable, self.ctx.space.w_bits, a_bits)

    @torch.no_grad()
    def repair_probs(self) -> Tensor:
        """Each layer's probability of each pair under the DBPs, in ``repair_index().pairs`` order."""
        if self.a is None:
            return self.w.expected()
        return LayerProbs.factored(self.w.expected(), self.a.expected()).pairs


class DbpStep(Hook):
    """Steps the DBP optimiser after each weight step, removes bit-widths, and keeps the per-epoch trace."""

    def __init__(self, run: BudgetRun, optimizer: torch.optim.Optimizer):
        self.run, self.optimizer = run, optimizer
        self.history: list[dict] = []
        self._grad, self._count = 0.0, 0

    def state_dict(self) -> dict:
        """Checkpointed at each epoch's end: DBPs, current bit-widths, removals, the DBP optimiser, the trace."""
        run = self.run
        return {"sides": {side: {"dbps": {k: v.detach().clone() for k, v in params.state_dict().items()},
                                 "levels": list(params.levels)} for side, params in run.sides()},
                "removals": list(run.removals), "met_at_step": run.met_at_step,
                "optimizer": self.optimizer.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        run = self.run
        for side, params in run.sides():
            params.load_state_dict(state["sides"][side]["dbps"])
            params.levels = list(state["sides"][side]["levels"])
        run.removals, run.met_at_step = list(state["removals"]), state["met_at_step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        set_current_bits(run.layers, run.w, run.a, run.a_fixed)
        run.update_fit(run.met_at_step or 0)  # met_at_step is already restored: this only recomputes fits

    def after_step(self, state: TrainState) -> None:
        grads = [p.grad.abs() for _, side in self.run.sides() for p in side.current_dbps() if p.grad is not None]
        if grads:
            self._grad = self._grad + torch.stack(grads).mean().detach()
        self._count += 1
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.run.remove(state)
        if self.run.fits and self.run.opts.stop_at_budget:
            self.history.append(self.entry(state, epoch=round(state.step / state.steps_per_epoch, 3)))
            raise _BudgetMet

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        entry = self.entry(state, epoch=state.epoch + 1)
        self.history.append(entry)
        metrics.update({k: v for k, v in entry.items() if k not in ("epoch", "step", "bits")})

    @torch.no_grad()
    def entry(self, state: TrainState, epoch: float) -> dict:
        """The trace at this point: each layer's bits, mean keep-probabilities, DBP gradient, cost over each cap."""
        run = self.run
        entry = {"epoch": epoch, "step": state.step, "dbp_grad": float(self._grad) / max(1, self._count),
                 **{f"mean_keep_{side}": float(params.keep_probs().mean()) for side, params in run.sides()},
                 "regularizer_on": run.regularizing,
                 **{f"expected_{m}_over_cap": float(r) for m, r in run.ratios().items()},
                 **{f"{m}_over_cap": r for m, r in run.current_ratios().items()}, "bits": run.bits_now()}
        self._grad, self._count = 0.0, 0
        return entry
