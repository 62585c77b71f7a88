"""Training the weight-sharing supernet through ``mixbits.train.fit``: sampled policies, IDM, fair decay.

One optimiser step accumulates the gradients of ``policies_per_step`` sampled policies (Monte-Carlo
estimate of Eq. 2), plus the largest policy (every searchable layer at its highest candidates) when
``largest`` is "train" and the smallest (every layer at its lowest available bits) when
``train_smallest`` is set (the "sandwich rule" of weight-sharing NAS: without it the all-low corner,
which the tightest budgets need, is almost never drawn); with ``sandwich_every`` k > 1 those two train on
one step in k only (the others train the sampled policies alone, with the task loss: no teacher, no IDM),
so a step costs K + 2/k passes on average instead of K + 2. Each trained pass's loss is divided by the step's
number of trained passes, so the step follows the mean loss. The largest policy trains with cross-entropy; the
others with (1 − d)·CE + d·KL to the largest policy's detached output (in-place distillation, d = ``distill``),
plus the IDM term of Eq. 8. With ``largest`` "teach" the largest policy only runs forward, without autograd, for
those targets: it still teaches, its weights (shared with every policy) are trained by the others, and a step
costs about a third of a pass less.

Fairness weight regularisation: a "low-bit pass" of a layer is a forward in which it ran at its smallest
candidate weight bit-width. The searchable layers' weights leave the optimiser's decayed group; the
``FairDecay`` hook adds wd · (1 − low_passes/passes) · W to their gradients before the step, i.e. the
optimiser's own coupled L2 decay, counted only over the step's passes that were not low-bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ...quant import QuantLayer
from ...space import Bits
from ...train import Hook, StepOutput, TrainConfig, TrainState, fit, kd_loss, param_groups
from ..base import SearchContext, task_loss
from .bit_scheduler import BitWidthScheduler, PolicySampler
from .idm import FeatureAlignment, OutputCapture
from .options import OneshotOptions


class FairDecay(Hook):
    """Weight decay on the searchable layers' weights, only for the passes where they ran above their lowest bits."""

    def __init__(self, layers: Mapping[str, QuantLayer], lowest_w: int, weight_decay: float):
        self.layers, self.lowest_w, self.weight_decay = dict(layers), lowest_w, weight_decay
        self.start_step()
        self._shares: list[float] = []

    def start_step(self) -> None:
        self.passes = 0
        self.low = dict.fromkeys(self.layers, 0)

    def record(self, bits: Mapping[str, Bits]) -> None:
        self.passes += 1
        for name, (w, _) in bits.items():
            self.low[name] += int(w == self.lowest_w)

    def share(self, name: str) -> float:
        """The fraction of this step's passes that decay ``name``'s weight."""
        return 1.0 - self.low[name] / max(1, self.passes)

    def after_backward(self, state: TrainState) -> None:
        for name, layer in self.layers.items():
            share = self.share(name)
            self._shares.append(share)
            if share > 0 and self.weight_decay > 0 and layer.weight.grad is not None:
                layer.weight.grad.add_(layer.weight.detach(), alpha=self.weight_decay * share)

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        metrics["decay_share"] = sum(self._shares) / max(1, len(self._shares))
        self._shares = []


class ModuleState(Hook):
    """Checkpoints a module trained beside the model (the IDM affine parameters), so a resume restores it."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


class SupernetObjective:
    """The per-step objective: the largest policy, the smallest, then K sampled ones, each backpropagated at once."""

    def __init__(self, opts: OneshotOptions, sampler: PolicySampler, align: FeatureAlignment | None,
                 capture: OutputCapture | None, fair: FairDecay | None, loss_fn=None):
        self.opts, self.sampler, self.align, self.capture, self.fair = opts, sampler, align, capture, fair
        self.loss_fn = loss_fn  # the user's task loss; None = cross-entropy
        self.passes = 1

    def sandwich(self, state: TrainState) -> bool:
        """Whether this step runs the largest policy and trains the smallest (counted in optimiser steps: a resume
        agrees)."""
        return state.step % self.opts.sandwich_every == 0

    def __call__(self, state: TrainState, x: Tensor, y: Tensor) -> StepOutput:
        if self.fair is not None:
            self.fair.start_step()
        sandwich = self.sandwich(state)
        self.passes = self.opts.policies_per_step + (int(self.opts.largest == "train") + int(self.opts.train_smallest)
                                                     if sandwich else 0)
        teacher, targets = self._largest(state, x, y) if sandwich else (None, {})
        total, metrics, logits = 0.0, {}, None
        if teacher is not None:
            metrics["ce_largest"] = F.cross_entropy(teacher, y).detach()
            if self.opts.largest == "train":  # the step's loss is the mean over its trained passes
                total = metrics["ce_largest"]
        idm_terms = []
        draws = [self.sampler.smallest()] if self.opts.train_smallest and sandwich else []
        draws += [self.sampler.sample(state.generator) for _ in range(self.opts.policies_per_step)]
        for bits in draws:
            loss, logits, idm = self._sampled_pass(state, x, y, bits, teacher, targets)
            total = total + loss
            if idm is not None:
                idm_terms.append(idm)
        if idm_terms:
            metrics["idm"] = torch.stack(idm_terms).mean()
        return StepOutput(total / self.passes, logits, metrics)

    def _largest(self, state: TrainState, x: Tensor, y: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Train the largest policy (or only run it forward for the targets); its detached logits and layer outputs."""
        mode = self.opts.largest
        if mode == "off" and self.align is None:
            return None, {}
        bits = self.sampler.largest()
        self.sampler.apply(bits)
        if self.capture is not None:
            self.capture.start(self.sampler.layers)
        if mode == "train":
            loss, logits = task_loss(self.loss_fn, state.model, x, y)
            (loss / self.passes).backward()
            if self.fair is not None:
                self.fair.record(bits)
        else:
            with torch.no_grad():
                _, logits = task_loss(self.loss_fn, state.model, x, y)
        targets = self.align.targets(self.capture.stop()) if self.capture is not None else {}
        # The largest policy's logits teach the sampled ones (none with a user's loss_fn, which gives no logits).
        return (logits.detach() if mode != "off" and logits is not None else None), targets

    def _sampled_pass(self, state: TrainState, x: Tensor, y: Tensor, bits: Mapping[str, Bits], teacher: Tensor | None,
                      targets: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        self.sampler.apply(bits)
        aligned = self.capture is not None and bool(targets)  # no targets off the sandwich steps
        if aligned:  # layers at their smallest available weight bits are aligned (Eq. 8)
            self.capture.start(n for n, (w, _) in bits.items()
                               if w == self.sampler.smallest_w(n) and len(self.sampler.available_w(n)) > 1)
        loss, logits = task_loss(self.loss_fn, state.model, x, y)
        if teacher is not None and logits is not None and self.opts.distill > 0:
            loss = (1 - self.opts.distill) * loss + self.opts.distill * kd_loss(logits, teacher, 1.0)
        idm = None
        if aligned:
            idm = self.align.loss(self.capture.stop(), targets)
            if idm is not None:
                loss = loss + self.opts.idm_weight * idm
        (loss / self.passes).backward()
        if self.fair is not None:
            self.fair.record(bits)
        detached = [t.detach() if t is not None else None for t in (logits, idm)]
        return loss.detach(), *detached


def _groups(ctx: SearchContext, layers: Mapping[str, QuantLayer], align: FeatureAlignment | None,
            opts: OneshotOptions) -> list[dict]:
    """The loop's usual groups; with fairness, the searchable weights move to an undecayed group (FairDecay)."""
    groups = param_groups(ctx.model, opts.weight_decay)
    if opts.fairness:
        fair_ids = {id(layer.weight) for layer in layers.values()}
        moved: dict = {"params": [], "names": [], "weight_decay": 0.0}
        for group in groups:
            kept = [(p, n) for p, n in zip(group["params"], group["names"], strict=True) if id(p) not in fair_ids]
            moved["params"] += [p for p in group["params"] if id(p) in fair_ids]
            moved["names"] += [n for p, n in zip(group["params"], group["names"], strict=True) if id(p) in fair_ids]
            group["params"], group["names"] = [p for p, _ in kept], [n for _, n in kept]
        groups.append(moved)
    if align is not None:
        groups.append({"params": list(align.parameters()), "names": ["idm.eta", "idm.xi"], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def train_supernet(ctx: SearchContext, layers: Mapping[str, QuantLayer], opts: OneshotOptions) -> dict:
    """Train ``ctx.model`` as a supernet for ``opts.epochs``; returns the trace (epochs and freezing periods)."""
    sampler = PolicySampler(layers, ctx.space)
    align = FeatureAlignment(layers, opts.idm_floor, opts.idm_form).to(ctx.device) if opts.idm else None
    capture = OutputCapture(layers) if opts.idm else None
    fair = FairDecay(layers, ctx.space.w_bits[0], opts.weight_decay) if opts.fairness else None
    hooks: list[Hook] = [fair] if fair is not None else []
    if align is not None:
        hooks.append(ModuleState(align))
    scheduler = None
    if opts.scheduler:
        scheduler = BitWidthScheduler(sampler, opts.epsilon, opts.unstable_scale, opts.freeze_ratio_start,
                                      opts.freeze_ratio_end, opts.freeze_start, opts.freeze_period)
        hooks.append(scheduler)
    cfg = TrainConfig(epochs=opts.epochs, optimizer=opts.optimizer, lr=opts.lr, momentum=opts.momentum,
                      weight_decay=opts.weight_decay, warmup_epochs=opts.warmup_epochs, grad_clip=opts.grad_clip,
                      seed=ctx.seed, compile=False)
    objective = SupernetObjective(opts, sampler, align, capture, fair, ctx.loss_fn)
    run_dir, resume = ctx.training_run()  # checkpointed every epoch
    try:
        result = fit(ctx.model, ctx.train_loader, cfg, objective=objective, hooks=hooks, device=ctx.device,
                     params=_groups(ctx, layers, align, opts), progress=ctx.progress, run_dir=run_dir,
                     resume=resume)
    finally:
        if capture is not None:
            capture.remove()
    return {"epochs": result.history, "frozen_periods": scheduler.trace() if scheduler is not None else []}
