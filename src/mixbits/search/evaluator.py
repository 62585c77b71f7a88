"""Scoring a policy without training: set the bits, recalibrate BatchNorm, measure held-out loss.

Shared by every inference-only search (random search here, the one-shot greedy search, and the
derivation step of the differentiable ones). Scores are cached by policy, so a search that revisits a
policy pays nothing. Batches are drawn once from the validation split — never the test split.

BatchNorm statistics differ per policy. ``bn_mode="recalibrate"`` re-estimates them on ``bn_batches``
training batches before scoring (one extra forward per batch); ``bn_mode="batch"`` normalises each
scored batch with its own statistics, one forward per score in all, for searches that score thousands
of policies (the one-shot greedy walk). The model's running statistics are left as they were.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import MixbitsError
from ..quant import apply_policy
from ..space import Policy
from ..train import evaluate, recalibrate_bn

BN_MODES = ("recalibrate", "batch")


class PolicyEvaluator:
    """``evaluator(policy) -> {"loss": .., "top1": ..}`` on a fixed set of held-out batches."""

    def __init__(self, model: nn.Module, val_loader, train_loader=None, eval_batches: int = 4,
                 bn_batches: int = 4, device: torch.device | str = "cpu", bn_mode: str = "recalibrate",
                 eval_samples: int | None = None):
        if bn_mode not in BN_MODES:
            raise MixbitsError(f"bn_mode must be one of {list(BN_MODES)}, got {bn_mode!r}")
        self.model, self.bn_mode = model, bn_mode
        self.device = torch.device(device)
        self.batches = _first_samples(list(itertools.islice(iter(val_loader), eval_batches)), eval_samples)
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
            if self.bn_mode == "batch":
                metrics = _evaluate_with_batch_statistics(self.model, self.batches, self.device)
            else:
                if self.bn_batches:
                    recalibrate_bn(self.model, self.bn_batches, device=self.device)
                metrics = evaluate(self.model, self.batches, self.device)
            self.cache[key] = {"loss": metrics["loss"], "top1": metrics["top1"]}
        return self.cache[key]


def _evaluate_with_batch_statistics(model: nn.Module, batches: list, device: torch.device) -> dict:
    """Mean loss and top-1 with every BatchNorm normalising by the scored batch's own statistics."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    was_training = {m: m.training for m in model.modules()}
    tracking = [bn.track_running_stats for bn in bns]
    loss, correct, samples = 0.0, 0, 0
    try:
        model.eval()
        for bn in bns:
            bn.train()
            bn.track_running_stats = False  # batch statistics, and the stored ones are neither read nor written
        with torch.inference_mode():
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
                correct += int((logits.argmax(dim=-1) == y).sum())
                samples += y.shape[0]
    finally:
        for bn, track in zip(bns, tracking, strict=True):
            bn.track_running_stats = track
        for m, flag in was_training.items():
            m.training = flag
    return {"loss": loss / samples, "top1": 100.0 * correct / samples}


def _first_samples(batches: list, limit: int | None) -> list:
    """The batches cut to their first ``limit`` samples in all (None: all of them)."""
    if limit is None:
        return batches
    out = []
    for x, y in batches:
        if limit <= 0:
            break
        out.append((x[:limit], y[:limit]))
        limit -= len(y)
    return out
