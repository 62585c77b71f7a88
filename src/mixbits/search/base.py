"""What every search method takes and returns.

A searcher is one function registered in ``SEARCHERS``: ``searcher(ctx: SearchContext) -> SearchResult``.
The context holds the quantized model (built over the space, calibrated, from the float weights), the
cost statistics, the budgets, the data and the method's options; the result holds one policy per
budget, the trace of the search and every evaluated point (the front). Fine-tuning the policies is
not the searcher's job: ``mixbits search`` does it through the shared train loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..budget import Budget
from ..cost import LatencyTable, ModelStats, bitops, size_bits
from ..data.batches import call_model, first_input
from ..errors import MixbitsError, did_you_mean
from ..registry import Registry
from ..space import Policy, SearchSpace
from ..train.checkpoint import CHECKPOINT
from ..train.inputs import check_logits, check_loss

SEARCHERS = Registry("search method")


@dataclass
class SearchContext:
    model: nn.Module  # quantized over ``space``, calibrated, float weights loaded
    space: SearchSpace
    stats: ModelStats
    budgets: list[Budget]
    train_loader: Any
    val_loader: Any
    options: dict = field(default_factory=dict)
    float_model: nn.Module | None = None  # the float model the quantized one was built from (eval mode)
    latency: LatencyTable | None = None
    run_dir: Path | None = None
    device: torch.device = torch.device("cpu")
    seed: int = 0
    progress: bool | None = None
    resume: bool = False  # a method that checkpoints its training under run_dir continues it
    loss_fn: Callable | None = None  # loss_fn(model, batch) -> loss of the user's task; None = cross-entropy
    example_input: Any = None  # the model's input for calibration; None = the first training batch's

    def calibration_input(self):
        """What step fitting and calibration run the model on (a user's batches may not be (x, y) pairs)."""
        return self.example_input if self.example_input is not None else first_input(self.train_loader)

    def task_loss(self, model: nn.Module, x, y) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, logits) of one batch: cross-entropy of model(x) on y, or the user's loss_fn (logits None)."""
        return task_loss(self.loss_fn, model, x, y)

    def cost(self, policy: Policy) -> dict[str, float]:
        """The policy's BitOPs, size in bits and (with a table) latency."""
        out = {"bitops": float(bitops(self.stats, policy)), "size": float(size_bits(self.stats, policy))}
        if self.latency is not None:
            out["latency"] = self.latency.cost(policy)
        return out

    def fits(self, policy: Policy, budget: Budget) -> bool:
        return budget.satisfied(self.stats, policy, self.space, self.latency)

    def training_run(self, name: str = "") -> tuple[Path | None, bool]:
        """(checkpoint directory of the search's training ``name`` under run_dir/supernet, whether to resume it):
        (None, False) without a run directory; resume when ``resume`` is set and a checkpoint is there."""
        if self.run_dir is None:
            return None, False
        run_dir = Path(self.run_dir, "supernet", name)
        return run_dir, self.resume and (run_dir / CHECKPOINT).is_file()


@dataclass
class SearchResult:
    method: str
    budgets: list[Budget]
    policies: list[Policy]  # one per budget, in the same order
    trace: list[dict] = field(default_factory=list)  # what the search did, step by step
    front: list[dict] = field(default_factory=list)  # every evaluated point: policy, cost, score
    seconds: float = 0.0
    retraining_free: bool = False  # True when the policies are usable without fine-tuning
    finetune: dict = field(default_factory=dict)  # train settings for the fine-tune stage, e.g. {"kd_alpha": 0.5}
    info: dict = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)  # weight-bearing layers outside the space: priced at 32 bits
    # In memory only (not in to_dict): the space searched and the search's quantized model, whose weights
    # a retraining-free method's policies run on (mixbits.subnet).
    space: SearchSpace | None = field(default=None, repr=False, compare=False)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"method": self.method, "budgets": [b.text for b in self.budgets],
                "policies": [p.to_dict() for p in self.policies], "trace": self.trace, "front": self.front,
                "seconds": self.seconds, "retraining_free": self.retraining_free, "finetune": self.finetune,
                "info": self.info, "kept_float": self.kept_float}


def task_loss(loss_fn: Callable | None, model: nn.Module, x, y) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, logits): cross-entropy on an ``(x, y)`` batch, or ``loss_fn(model, batch)`` with the batch as the
    loader gave it (then no logits: what needs them, such as distillation between policies, is skipped)."""
    if loss_fn is None:
        logits = call_model(model, x)
        check_logits(logits, y)
        return F.cross_entropy(logits, y), logits
    return check_loss(loss_fn(model, x if y is None else (x, y))), None


def method_options(cls, options: dict, method: str):
    """Build a method's options dataclass from a mapping; unknown keys are an error naming the valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in names]
    if unknown:
        hint = did_you_mean(unknown[0], names)
        raise MixbitsError(f"unknown option(s) {unknown} for search method {method!r}; valid: {names}.{hint}")
    return cls(**options)


def method_problems(method, prefix: str = "search") -> list[str]:
    """``["search.method: unknown ..."]`` for a name no searcher is registered under, else []."""
    if method in SEARCHERS:
        return []
    return [f"{prefix}.method: unknown search method {method!r}; expected one of: {', '.join(SEARCHERS.names())}."
            f"{did_you_mean(str(method), SEARCHERS.names())}"]


def run_searcher(name: str, ctx: SearchContext) -> SearchResult:
    """Look the method up, run it, time it, and check every returned policy against its budget."""
    searcher = SEARCHERS.get(name)
    start = time.perf_counter()
    result = searcher(ctx)
    result.seconds = time.perf_counter() - start
    result.space, result.model = ctx.space, ctx.model
    result.kept_float = [n for n in ctx.stats.layers if n not in ctx.space.layers]
    for budget, policy in zip(result.budgets, result.policies, strict=True):
        policy.validate(ctx.space)
        if not ctx.fits(policy, budget):  # a searcher bug, never the user's: say so loudly
            raise RuntimeError(f"{name} returned a policy over its budget {budget}: {ctx.cost(policy)}")
    return result


def cheapest_fitting_uniform(ctx: SearchContext, budget: Budget) -> Policy | None:
    """The highest uniform W{b}A{b} over the space's shared candidates that fits, or None."""
    shared = sorted(set(ctx.space.w_bits) & set(ctx.space.a_bits), reverse=True)
    for bits in shared:
        policy = Policy.uniform(ctx.space, bits)
        if ctx.fits(policy, budget):
            return policy
    return None
