"""Scoring a policy without training: set the bits, recalibrate BatchNorm, measure held-out loss.

Shared by every inference-only search (random search here, the one-shot greedy search, and the
derivation step of the differentiable ones). Scores are cached by policy, so a search that revisits a
policy pays nothing. Batches are drawn once from the validation split — never the test split.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..quant import apply_policy
from ..space import Policy
from ..train import evaluate, recalibrate_bn


class PolicyEvaluator:
    """``evaluator(policy) -> {"loss": .., "top1": ..}`` on a fixed set of held-out batches."""

    def __init__(self, model: nn.Module, val_loader, train_loader=None, eval_batches: int = 4,
                 bn_batches: int = 4, device: torch.device | str = "cpu"):
        self.model = model
        self.device = torch.device(device)
        self.batches = list(itertools.islice(iter(val_loader), eval_batches))
        # BN statistics come from training images, as they would in deployment; none of these are scored.
        source = train_loader if train_loader is not None else val_loader
        self.bn_batches = list(itertools.islice(iter(source), bn_batches)) if bn_batches > 0 else []
        self.cache: dict[tuple, dict] = {}
        self.calls = 0

    @property
    def evaluations(self) -> int:
        """Distinct policies actually run (cache misses)."""
        return len(self.cache)

    def __call__(self, policy: Policy) -> dict:
        self.calls += 1
        key = policy.key()
        if key not in self.cache:
            apply_policy(self.model, policy)
            if self.bn_batches:
                recalibrate_bn(self.model, self.bn_batches, device=self.device)
            metrics = evaluate(self.model, self.batches, self.device)
            self.cache[key] = {"loss": metrics["loss"], "top1": metrics["top1"]}
        return self.cache[key]
