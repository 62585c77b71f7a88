"""Options every differentiable search shares, and their validation (one error listing every bad value)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MixbitsError
from ..train.optim import OPTIMIZERS

UPDATES = ("alternating", "single")
ARCH_OPTIMIZERS = ("adam", "sgd")


@dataclass
class DifferentiableOptions:
    """Supernet training: weights through the shared loop, architecture parameters by their own optimiser."""

    epochs: int = 10  # search epochs over the weight split
    lr: float = 0.01  # weights: starts from the float model, so a fine-tuning rate (cosine to 0)
    optimizer: str = "sgd"  # weights: "sgd" (momentum, Nesterov) or "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    arch_lr: float | None = None  # architecture parameters; None (Adam only): automatic, the rate at which a
    #   steadily pushed candidate decides its layer within decide_fraction of the search (search/convergence.py)
    decide_fraction: float = 0.5  # sets the automatic arch_lr
    arch_optimizer: str = "adam"  # "adam" (betas 0.5, 0.999) or "sgd" (momentum 0.9)
    arch_weight_decay: float = 0.0
    updates: str = "alternating"  # "alternating": weights on one split, architecture on the other; "single"
    arch_fraction: float = 0.2  # share of the training data for architecture updates (alternating)
    joint: bool = False  # one distribution over (w, a) pairs instead of independent w and a distributions
    fill_budget: bool = True  # spend the budget the derived policy leaves unused (derive.fill)
    arch_warmup: float = 0.0  # share of the search that trains the weights only, the architecture held uniform
    keep_weights: bool = False  # the fine-tune starts from the searched weights (info["finetune_init"])


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive(v) -> bool:
    return is_number(v) and v > 0


def non_negative(v) -> bool:
    return is_number(v) and v >= 0


def fraction(v, closed: bool = False) -> bool:
    """In (0, 1), or in [0, 1] when ``closed``."""
    return is_number(v) and (0 <= v <= 1 if closed else 0 < v < 1)


def one_of(v, choices: Sequence[str]) -> bool:
    return isinstance(v, str) and v in choices


Rule = tuple[str, bool, str]  # (option name, is it valid, what is expected)


def check_options(opts: DifferentiableOptions, method: str, rules: Sequence[Rule] = ()) -> None:
    """Raise one MixbitsError naming every bad option, its value and what it must be."""
    shared: list[Rule] = [
        ("epochs", is_int(opts.epochs) and opts.epochs >= 1, "a whole number >= 1"),
        ("lr", positive(opts.lr), "a number > 0"),
        ("optimizer", one_of(opts.optimizer, OPTIMIZERS), f"one of {list(OPTIMIZERS)}"),
        ("momentum", is_number(opts.momentum) and 0 <= opts.momentum < 1, "a number in [0, 1)"),
        ("weight_decay", non_negative(opts.weight_decay), "a number >= 0"),
        ("arch_lr", positive(opts.arch_lr) or (opts.arch_lr is None and opts.arch_optimizer == "adam"),
         "a number > 0, or null for the automatic rate (arch_optimizer: adam only)"),
        ("decide_fraction", fraction(opts.decide_fraction, closed=True) and opts.decide_fraction > 0,
         "a number in (0, 1]"),
        ("arch_optimizer", one_of(opts.arch_optimizer, ARCH_OPTIMIZERS), f"one of {list(ARCH_OPTIMIZERS)}"),
        ("arch_weight_decay", non_negative(opts.arch_weight_decay), "a number >= 0"),
        ("updates", one_of(opts.updates, UPDATES), f"one of {list(UPDATES)}"),
        ("arch_fraction", fraction(opts.arch_fraction), "a number strictly between 0 and 1"),
        ("joint", isinstance(opts.joint, bool), "true or false"),
        ("fill_budget", isinstance(opts.fill_budget, bool), "true or false"),
        ("arch_warmup", is_number(opts.arch_warmup) and 0 <= opts.arch_warmup < 1, "a number in [0, 1)"),
        ("keep_weights", isinstance(opts.keep_weights, bool), "true or false"),
    ]
    problems = [f"{name}: must be {expected}, got {getattr(opts, name)!r}"
                for name, ok, expected in [*shared, *rules] if not ok]
    if problems:
        raise MixbitsError(f"invalid options for search method {method!r}:\n  " + "\n  ".join(problems))
