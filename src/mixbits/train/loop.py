"""The one training loop every search method runs on.

A method changes what happens per batch through an *objective* (which may run several forward and
backward passes itself, e.g. sampled policies with gradient accumulation) and acts at fixed points
through *hooks* (architecture updates after each weight step, weight-decay fixes after backward,
bit-width schedules at epoch starts). The loop owns everything else: optimiser and per-step lr schedule,
the loss guard (non-finite or diverged loss, see guard.py), progress, metrics.jsonl, and checkpoints that
resume bit-identically on CPU.

Under DistributedDataParallel (pass the wrapped model) every rank runs ``fit`` in lockstep: the
checkpoint holds the plain module, metrics are reduced over ranks so every rank sees the same numbers,
and a bad loss or a stop request on any rank stops all of them at the same step.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..compiler import compile_enabled, compile_model
from ..data.batches import batch_size, call_model, set_epoch, to_device
from ..errors import MixbitsError, TrainingDiverged
from ..progress import bar_enabled, progress_line
from ..quant.ebr import model_ebr
from ..utils import atomic_write_text, seed_everything
from .checkpoint import CHECKPOINT, open_run, restore_training, save_checkpoint, training_payload
from .distill import kd_loss
from .distributed import all_reduce_sum, broadcast_object, is_distributed, is_main, unwrap
from .evaluate import evaluate
from .guard import LossGuard
from .inputs import (
    batchnorm_failure,
    check_logits,
    check_loss,
    check_parameters,
    check_teacher_logits,
    non_finite_inputs,
)
from .memory import retained_memory
from .optim import TrainConfig, build_optimizer, build_scheduler, param_groups
from .stopping import Stopped, pending_signal, stop_pending, stops_deferred

METRICS = "metrics.jsonl"


@dataclass
class StepOutput:
    """What an objective returns for one batch."""

    loss: torch.Tensor  # scalar; if it requires grad the loop calls backward(), else the objective already did
    logits: torch.Tensor | None = None  # for train top-1 (None = skip)
    metrics: dict[str, float] = field(default_factory=dict)  # floats or 0-dim tensors, averaged over the epoch


@dataclass
class TrainState:
    """Everything an objective or hook may read or change while training."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cfg: TrainConfig
    device: torch.device
    epoch: int = 0  # current epoch (0-based); equals cfg.epochs once training is done
    step: int = 0  # optimiser steps done
    steps_per_epoch: int = 0
    teacher: nn.Module | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)  # for methods' sampling; checkpointed
    run_dir: Path | None = None
    extra: dict = field(default_factory=dict)  # saved as the checkpoint's "extra" (weights-only types)
    loss_guard: LossGuard = field(default_factory=LossGuard)  # checkpointed, so a resumed run judges alike

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def module(self) -> nn.Module:
        """The plain model: ``model`` without its DistributedDataParallel wrapper, if any."""
        return unwrap(self.model)


Objective = Callable[[TrainState, torch.Tensor, torch.Tensor], StepOutput]


def supervised_objective(state: TrainState, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    """Cross-entropy (with label smoothing), mixed with distillation from ``state.teacher`` if kd_alpha > 0,
    plus ebr_weight · the entropy-aware bin regulariser of the quantized weights (``mixbits.quant.ebr``) if > 0."""
    cfg = state.cfg
    logits = call_model(state.model, x)
    check_logits(logits, y)
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    loss, metrics = ce, {}
    if state.teacher is not None and cfg.kd_alpha != 0:
        if state.teacher.training:
            state.teacher.eval()
        with torch.no_grad():
            teacher_logits = call_model(state.teacher, x)
        check_teacher_logits(teacher_logits, logits)
        kd = kd_loss(logits, teacher_logits, cfg.kd_temperature)
        loss = (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * kd
        metrics = {"ce": ce.detach(), "kd": kd.detach()}
    if cfg.ebr_weight != 0:  # after the forward: the quantizers' steps are initialised by then
        ebr = model_ebr(state.module)
        loss = loss + cfg.ebr_weight * ebr
        metrics = {"ce": ce.detach(), **metrics, "ebr": ebr.detach()}
    return StepOutput(loss, logits, metrics)


def loss_objective(loss_fn: Callable) -> Objective:
    """The objective of a user's task: ``loss_fn(model, batch)`` (the batch as the loader gave it), plus
    ebr_weight · the bin regulariser when set. No logits, so no distillation and no train top-1."""

    def objective(state: TrainState, x, y) -> StepOutput:
        loss = check_loss(loss_fn(state.model, x if y is None else (x, y)))
        if state.cfg.ebr_weight != 0:
            loss = loss + state.cfg.ebr_weight * model_ebr(state.module)
        return StepOutput(loss)

    return objective


class Hook:
    """Extension points; every method is a no-op, override what you need."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_epoch_start(self, state: TrainState) -> None: ...

    def after_backward(self, state: TrainState) -> None:
        """Gradients are in ``.grad``; called before clipping and ``optimizer.step``."""

    def after_step(self, state: TrainState) -> None:
        """Called after ``optimizer.step`` and ``scheduler.step``."""

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        """May add entries to ``metrics`` (they are logged and checkpointed)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    state: TrainState
    history: list[dict]  # one metrics dict per finished epoch


def fit(model: nn.Module, train_loader, cfg: TrainConfig, *, val_loader=None,
        objective: Objective = supervised_objective, hooks: Sequence[Hook] = (), teacher: nn.Module | None = None,
        run_dir=None, resume: bool = False, device="cpu", params=None, extra_state: dict | None = None,
        progress: bool | None = None, is_main_process: bool = True) -> TrainResult:
    """Train ``model`` for ``cfg.epochs`` epochs; with ``run_dir``, log metrics and checkpoint (and resume).

    ``model`` may be wrapped in DistributedDataParallel: then every rank calls ``fit`` with its own slice of
    the data, only ``is_main_process`` writes, and every rank resumes from the same checkpoint file.
    """
    cfg.check()
    device = torch.device(device)
    # Freed memory stays in the process while training on the CPU, and only then (see memory.py).
    with retained_memory() if device.type == "cpu" else contextlib.nullcontext():
        return _fit(model, train_loader, cfg, val_loader=val_loader, objective=objective, hooks=list(hooks),
                    teacher=teacher, run_dir=Path(run_dir) if run_dir is not None else None, resume=resume,
                    device=device, params=params, extra_state=extra_state, progress=progress,
                    is_main_process=is_main_process)


def _fit(model: nn.Module, train_loader, cfg: TrainConfig, *, val_loader, objective: Objective, hooks: list[Hook],
         teacher: nn.Module | None, run_dir: Path | None, resume: bool, device: torch.device, params,
         extra_state: dict | None, progress: bool | None, is_main_process: bool) -> TrainResult:
    check_parameters(unwrap(model))
    saved = open_run(run_dir, resume)
    generator = seed_everything(cfg.seed) if saved is None else torch.Generator()
    model.to(device)
    module = unwrap(model)  # what checkpoints hold and parameter-group names refer to
    steps_per_epoch = _steps_per_epoch(train_loader)
    if compile_enabled(device, cfg.compile, cfg.epochs * steps_per_epoch):
        compile_model(model)
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = build_optimizer(params if params is not None else param_groups(module, cfg.weight_decay), cfg)
    state = TrainState(module, optimizer, build_scheduler(optimizer, cfg, steps_per_epoch), cfg, device,
                       steps_per_epoch=steps_per_epoch, teacher=teacher, generator=generator, run_dir=run_dir,
                       extra=dict(extra_state or {}))
    history = restore_training(state, hooks, saved, run_dir / CHECKPOINT) if saved is not None else []
    state.model = model  # restored as the plain module, trained through the wrapper
    writes = run_dir is not None and is_main_process
    if writes:  # never keep metric lines from after the checkpoint we start from
        _write_metrics(run_dir, history)
    if state.epoch >= cfg.epochs:
        return TrainResult(state, history)

    show = is_main_process and bar_enabled(progress)
    last_checkpoint = run_dir / CHECKPOINT if saved is not None else None
    for hook in hooks:
        hook.on_train_start(state)
    with stops_deferred():
        for epoch in range(state.epoch, cfg.epochs):
            state.epoch = epoch
            started = time.perf_counter()
            metrics = _train_epoch(state, train_loader, objective, hooks, show, last_checkpoint)
            val = _validate(state, val_loader)
            metrics = {"epoch": epoch + 1, "step": state.step, "lr": state.lr, **metrics,
                       "val_loss": val.get("loss"), "val_top1": val.get("top1"),
                       "seconds": time.perf_counter() - started}
            for hook in hooks:
                hook.on_epoch_end(state, metrics)
            history.append(_plain(metrics))
            if is_main_process:
                progress_line(_summary(history[-1], cfg.epochs), progress)
            if writes:
                _write_metrics(run_dir, history)
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    last_checkpoint = run_dir / CHECKPOINT
                    save_checkpoint(last_checkpoint, _payload(state, hooks, history))
            if _agree(state.device, stop_pending())[0]:
                raise Stopped(pending_signal())
    state.epoch = cfg.epochs
    return TrainResult(state, history)


def _validate(state: TrainState, val_loader) -> dict:
    """Validation metrics, the same on every rank: rank 0 evaluates the plain module and shares the result.

    Evaluating the unwrapped module on one rank is exact (no padded or duplicated samples) and needs no
    collective inside the forward.
    """
    if val_loader is None:
        return {}
    val = evaluate(state.module, val_loader, state.device) if is_main() else None
    return broadcast_object(val)


def _payload(state: TrainState, hooks: list[Hook], history: list[dict]) -> dict:
    """The checkpoint, with the plain module's weights: a DDP run's checkpoint loads in a single process."""
    return {**training_payload(state, hooks, history), "model": state.module.state_dict()}


def _train_epoch(state: TrainState, loader, objective: Objective, hooks: list[Hook], show: bool,
                 last_checkpoint: Path | None) -> dict:
    """One pass over ``loader``; returns train_loss, train_top1 and the objective's averaged metrics."""
    cfg, optimizer = state.cfg, state.optimizer
    state.model.train()
    set_epoch(loader, state.epoch)
    for hook in hooks:
        hook.on_epoch_start(state)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    running = _Running(state.device)
    with tqdm(loader, total=state.steps_per_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not show,
              leave=False, dynamic_ncols=True) as bar:
        for batch, data in enumerate(bar):
            x, y = split_batch(data, state.device)
            optimizer.zero_grad(set_to_none=True)
            try:
                out = objective(state, x, y)
            except ValueError as e:
                problem = batchnorm_failure(e, batch_size(x), batch)
                if problem is None:
                    raise
                raise problem from None
            if isinstance(out, torch.Tensor):
                out = StepOutput(out)
            loss = out.loss.detach().float().item()
            problem = state.loss_guard.problem(loss)
            bad_loss, stop = _agree(state.device, problem is not None, stop_pending())
            if bad_loss:
                raise _bad_loss(state, problem, batch, last_checkpoint, x)
            if stop:
                raise Stopped(pending_signal())
            if out.loss.requires_grad:
                out.loss.backward()
            for hook in hooks:
                hook.after_backward(state)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            state.scheduler.step()
            state.step += 1
            for hook in hooks:
                hook.after_step(state)
            running.update(loss, out, x, y)
            if show:
                bar.set_postfix(running.postfix(), refresh=False)
    return running.summary()


def _agree(device: torch.device, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (one small all-reduce), so that every rank takes the same branch."""
    if not is_distributed():
        return list(flags)
    total = all_reduce_sum(torch.tensor([float(f) for f in flags], device=device))
    return [v > 0 for v in total.tolist()]


class _Running:
    """Epoch averages of loss, top-1 and objective metrics, kept on the device to avoid per-step syncs.

    Under DDP the epoch's sums are added over ranks, so every rank reports the whole global batch's numbers.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum, self.samples, self.counted = 0.0, 0, 0
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.metrics: dict[str, list] = {}

    def update(self, loss: float, out: StepOutput, x, y: torch.Tensor | None) -> None:
        n = batch_size(x if y is None else y)
        self.loss_sum += loss * n
        self.samples += n
        if out.logits is not None and y is not None and y.ndim == 1 and out.logits.shape[0] == n:
            self.correct += (out.logits.detach().argmax(dim=-1) == y).sum()
            self.counted += n
        for name, value in out.metrics.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            total = self.metrics.setdefault(name, [0.0, 0])
            total[0], total[1] = total[0] + value, total[1] + 1

    def postfix(self) -> dict:
        post = {"loss": f"{self.loss_sum / max(1, self.samples):.4f}"}
        if self.counted:
            post["acc"] = f"{100.0 * self.correct.item() / self.counted:.2f}"
        return post

    def summary(self) -> dict:
        names = sorted(self.metrics)
        sums = [self.loss_sum, self.samples, self.correct.item(), self.counted]
        sums += [float(self.metrics[n][0]) for n in names] + [self.metrics[n][1] for n in names]
        if is_distributed():  # objectives must report the same metric names on every rank
            sums = all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=self.device)).tolist()
        loss_sum, samples, correct, counted = sums[:4]
        totals, counts = sums[4 : 4 + len(names)], sums[4 + len(names) :]
        out = {"train_loss": loss_sum / max(1, samples),
               "train_top1": 100.0 * correct / counted if counted else None}
        for name, total, count in zip(names, totals, counts, strict=True):
            # An objective metric never overwrites a standard key.
            out[name if name not in _STANDARD else f"train_{name}"] = total / count
        return out


_STANDARD = {"epoch", "step", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "seconds"}


def _bad_loss(state: TrainState, problem: str | None, batch: int, last_checkpoint: Path | None,
              inputs) -> TrainingDiverged:
    what = problem or "training loss is not finite, or diverged, on another rank"
    where = (f"at epoch {state.epoch + 1}/{state.cfg.epochs}, step {state.step + 1} (batch {batch + 1} of the epoch); "
             f"last good checkpoint: {last_checkpoint or 'none yet'}.")
    bad_inputs = non_finite_inputs(inputs)
    if bad_inputs:  # the data, not the learning rate: say so
        return TrainingDiverged(f"{what} {where} The batch's inputs hold {bad_inputs} NaN or infinite values: clean "
                                "or filter the data (e.g. torch.nan_to_num, or drop those samples).")
    return TrainingDiverged(f"{what} {where} Lower the learning rate (train.lr is {state.cfg.lr}) or set "
                            "train.grad_clip.")


def _steps_per_epoch(loader) -> int:
    try:
        n = len(loader)
    except TypeError:
        raise MixbitsError(f"the training loader ({type(loader).__name__}) has no len(); the lr schedule is "
                           "per step, so use a loader with a known number of batches") from None
    if n <= 0:
        raise MixbitsError("the training loader yields no batches; check the dataset path and batch size")
    return n


def split_batch(batch, device: torch.device) -> tuple:
    """(inputs, targets) of an ``(inputs, targets)`` batch on ``device``; any other batch is (batch, None).

    Objectives that take a user's ``loss_fn`` receive other batches (dicts, triples) whole as the inputs.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return to_device(batch[0], device), to_device(batch[1], device)
    return to_device(batch, device), None


def _plain(metrics: dict) -> dict:
    """Metric values as Python scalars, so they go into JSON and weights-only checkpoints."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (torch.Tensor, np.generic)):
            v = v.item()
        out[str(k)] = v
    return out


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    # Rewriting the whole (small) file atomically means a kill never leaves half a line.
    atomic_write_text(run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in history))


def _summary(m: dict, epochs: int) -> str:
    parts = [f"epoch {m['epoch']}/{epochs}", f"loss {m['train_loss']:.4f}"]
    if m.get("train_top1") is not None:
        parts.append(f"top1 {m['train_top1']:.2f}")
    if m.get("val_top1") is not None:
        parts.append(f"val_loss {m['val_loss']:.4f} val_top1 {m['val_top1']:.2f}")
    return "  ".join(parts + [f"{m['seconds']:.1f}s"])
