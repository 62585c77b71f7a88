"""Training configuration, parameter groups, optimiser and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..errors import MixbitsError, did_you_mean

OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainConfig:
    """Everything that shapes a training run; a resumed run must use the same values."""

    epochs: int = 10
    optimizer: str = "sgd"  # "sgd" | "adam"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True  # ignored when momentum is 0
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0  # linear warm-up from 0, then cosine to min_lr
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    kd_alpha: float = 0.0  # weight of the distillation term when a teacher is given (0 = CE only)
    kd_temperature: float = 4.0
    ebr_weight: float = 0.0  # weight of the entropy-aware bin regulariser of quantized weights (0 = off)
    grad_clip: float | None = None
    seed: int = 0
    checkpoint_every: int = 1  # epochs between checkpoints
    # torch.compile the model where a C compiler works (MIXBITS_COMPILE pins it): true, false, or "auto", which
    # compiles runs of at least COMPILE_MIN_STEPS optimiser steps, long enough to repay compiling. For
    # fixed-policy training: a search that changes bit-widths every step sets it off (each new policy would
    # compile a graph).
    compile: bool | str = "auto"

    def problems(self, prefix: str = "train") -> list[str]:
        """Every bad field as ``"train.lr: must be > 0, got -1"``; empty when the config is usable."""
        # A bad epochs or lr is reported once, on its own line, not again through the bounds it sets.
        epochs = self.epochs if _is_int(self.epochs) and self.epochs >= 1 else math.inf
        lr = self.lr if _in(self.lr, 0, math.inf, open_low=True) else math.inf
        rules = [
            ("epochs", _is_int(self.epochs) and self.epochs >= 1, "must be a whole number >= 1"),
            ("optimizer", self.optimizer in OPTIMIZERS,
             f"must be one of {list(OPTIMIZERS)}" + did_you_mean(self.optimizer, OPTIMIZERS)),
            ("lr", _in(self.lr, 0, math.inf, open_low=True), "must be a number > 0"),
            ("momentum", _in(self.momentum, 0, 1, open_high=True), "must be a number in [0, 1)"),
            ("nesterov", isinstance(self.nesterov, bool), "must be true or false"),
            ("weight_decay", _in(self.weight_decay, 0, math.inf), "must be a number >= 0"),
            ("warmup_epochs", _in(self.warmup_epochs, 0, epochs), "must be a number in [0, epochs]"),
            ("min_lr", _in(self.min_lr, 0, lr), "must be a number in [0, lr]"),
            ("label_smoothing", _in(self.label_smoothing, 0, 1, open_high=True), "must be a number in [0, 1)"),
            ("kd_alpha", _in(self.kd_alpha, 0, 1), "must be a number in [0, 1]"),
            ("kd_temperature", _in(self.kd_temperature, 0, math.inf, open_low=True), "must be a number > 0"),
            ("ebr_weight", _in(self.ebr_weight, 0, math.inf), "must be a number >= 0"),
            ("grad_clip", self.grad_clip is None or _in(self.grad_clip, 0, math.inf, open_low=True),
             "must be a number > 0, or null for no clipping"),
            ("seed", _is_int(self.seed) and self.seed >= 0, "must be a whole number >= 0"),
            ("checkpoint_every", _is_int(self.checkpoint_every) and self.checkpoint_every >= 1,
             "must be a whole number >= 1"),
            ("compile", isinstance(self.compile, bool) or self.compile == "auto", 'must be true, false or "auto"'),
        ]
        out = []
        for name, ok, expectation in rules:
            if not ok:
                value = getattr(self, name)
                out.append(f"{prefix}.{name}: {expectation}, got {value!r}{_yaml_hint(value)}")
        return out

    def check(self, prefix: str = "train") -> TrainConfig:
        """Raise one MixbitsError listing every problem; return self when there are none."""
        problems = self.problems(prefix)
        if problems:
            raise MixbitsError("invalid training config:\n  " + "\n  ".join(problems))
        return self

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _in(v, low: float, high: float, open_low: bool = False, open_high: bool = False) -> bool:
    """Is ``v`` a finite number within the bounds?"""
    if not _is_number(v) or not math.isfinite(v):
        return False
    return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)


def _yaml_hint(v) -> str:
    """YAML 1.1 reads ``1e-3`` as a string; say so instead of a bare type error."""
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return ""
        return f" (YAML reads {v} as text; write it with a dot, e.g. 1.0e-3)"
    return ""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    No decay for vectors and scalars (biases, norm affine terms), quantizer step sizes (names ending in
    ``steps``) and names listed in the model's optional ``no_weight_decay`` attribute. Each group carries
    ``"names"`` so hooks can find parameters by name. Empty groups are left out.
    """
    skip = set(getattr(model, "no_weight_decay", ()) or ())
    decay: tuple[list, list] = ([], [])
    no_decay: tuple[list, list] = ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = no_decay if p.ndim <= 1 or name.endswith("steps") or name in skip else decay
        target[0].append(p)
        target[1].append(name)
    groups = [
        {"params": decay[0], "names": decay[1], "weight_decay": float(weight_decay)},
        {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(params_or_groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or Adam; groups may override ``weight_decay`` and ``lr``."""
    params = list(params_or_groups)
    if not params:
        raise MixbitsError("no trainable parameters to optimise; check that the model has requires_grad=True params")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise MixbitsError(f"train.optimizer: must be one of {list(OPTIMIZERS)}, got {cfg.optimizer!r}"
                       + did_you_mean(cfg.optimizer, OPTIMIZERS))


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps: linear warm-up from 0, then cosine to min_lr."""
    total = max(1, int(cfg.epochs * steps_per_epoch))
    warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    if step < warmup:
        return step / warmup
    floor = cfg.min_lr / cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-STEP schedule (call ``scheduler.step()`` after every optimiser step).

    Every group follows the same curve relative to its own base lr, so a group with its own ``lr`` ends at
    ``lr * min_lr / cfg.lr``.
    """

    # A plain function (not a callable object) keeps the scheduler's state_dict free of closures.
    def factor(step: int) -> float:
        return lr_factor(step, cfg, steps_per_epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
