"""Scoring a policy without training: set the bits, recalibrate BatchNorm, measure held-out loss.

Shared by every inference-only search (random search here, the one-shot greedy search, and the
derivation step of the differentiable ones). Scores are cached by policy, so a search that revisits a
policy pays nothing. Batches are drawn once from the validation split — never the test split.

BatchNorm statistics differ per policy. ``bn_mode="recalibrate"`` re-estimates them on ``bn_batches``
training batches before scoring (one extra forward per batch); ``bn_mode="batch"`` normalises each
scored batch with its own statistics, one forward per score in all, for searches that score thousands
of policies (the one-shot greedy walk). The model's running statistics are left as they were.
``bn_mode="running"`` uses the running statistics the model holds, as they are: for a supernet that keeps
them per bit-width pair (``quant.pair_bn``).

With batch statistics, ``reuse_prefix`` lets a walk name its current policy (:meth:`PolicyEvaluator.focus`)
so that scoring a neighbour replays the outputs of the blocks before its first changed layer
(:mod:`mixbits.search.prefix`); the scores are the same, computed in about half the time.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data.batches import call_model, first_rows, to_device
from ..errors import MixbitsError
from ..quant import apply_policy
from ..space import Policy
from ..train import evaluate, recalibrate_bn
from ..train.evaluate import mean_task_loss
from ..train.loop import split_batch
from .base import task_loss
from .prefix import PrefixReuse

BN_MODES = ("recalibrate", "batch", "running")


class PolicyEvaluator:
    """``evaluator(policy) -> {"loss": .., "top1": ..}`` on a fixed set of held-out batches."""

    def __init__(self, model: nn.Module, val_loader, train_loader=None, eval_batches: int = 4,
                 bn_batches: int = 4, device: torch.device | str = "cpu", bn_mode: str = "recalibrate",
                 eval_samples: int | None = None, reuse_prefix: bool = False, loss_fn=None):
        if bn_mode not in BN_MODES:
            raise MixbitsError(f"bn_mode must be one of {list(BN_MODES)}, got {bn_mode!r}")
        if reuse_prefix and bn_mode != "batch":
            raise MixbitsError(f"reuse_prefix needs bn_mode='batch' (recalibration changes every layer's "
                               f"statistics), got bn_mode={bn_mode!r}; set reuse_prefix false or use 'batch'")
        self.model, self.bn_mode, self.loss_fn = model, bn_mode, loss_fn
        self.device = torch.device(device)
        self.batches = list(itertools.islice(iter(val_loader), eval_batches))
        if loss_fn is None:  # a user's batches are scored whole: only (x, y) ones can be cut by samples
            self.batches = _first_samples(self.batches, eval_samples)
        # BN statistics come from training images, as they would in deployment; none of these are scored.
        source = train_loader if train_loader is not None else val_loader
        self.bn_batches = list(itertools.islice(iter(source), bn_batches)) if bn_batches > 0 else []
        self.cache: dict[tuple, dict] = {}
        self.calls = 0
        self.prefix: PrefixReuse | None = None
        if reuse_prefix and self.batches and loss_fn is None:  # a loss_fn runs the model itself: nothing to replay
            with _batch_statistics(model):
                self.prefix = PrefixReuse(model, to_device(first_rows(self.batches[0][0], 2), self.device))

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
                shared = self.prefix.shared_units(policy) if self.prefix is not None else 0
                replay = (lambda i: self.prefix.replaying(i, shared)) if shared else None
                metrics = _evaluate_with_batch_statistics(self.model, self.batches, self.device, replay, self.loss_fn)
            else:
                if self.bn_batches and self.bn_mode == "recalibrate":
                    forward = self._loss_forward if self.loss_fn is not None else None
                    recalibrate_bn(self.model, self.bn_batches, device=self.device, forward=forward)
                metrics = evaluate(self.model, self.batches, self.device, loss_fn=self.loss_fn)
            self.cache[key] = {"loss": metrics["loss"], "top1": metrics.get("top1")}
        return self.cache[key]

    def _loss_forward(self, batch) -> None:
        """One forward for BatchNorm recalibration on a user's batch: through their loss_fn."""
        task_loss(self.loss_fn, self.model, *split_batch(batch, self.device))

    def focus(self, policy: Policy) -> None:
        """``policy`` is the walk's current one: record its block outputs for its neighbours to replay."""
        if self.prefix is None or not self.prefix.active or self.prefix.anchor == policy:
            return
        apply_policy(self.model, policy)
        with _batch_statistics(self.model):
            self.prefix.record(policy, self.model, self.batches, self.device)


@contextlib.contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """Inference with every BatchNorm normalising by the batch's own statistics; the stored ones are neither
    read nor written, and every module's mode is restored afterwards."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    was_training = {m: m.training for m in model.modules()}
    tracking = [bn.track_running_stats for bn in bns]
    try:
        model.eval()
        for bn in bns:
            bn.train()
            bn.track_running_stats = False
        with torch.inference_mode():
            yield
    finally:
        for bn, track in zip(bns, tracking, strict=True):
            bn.track_running_stats = track
        for m, flag in was_training.items():
            m.training = flag


def _evaluate_with_batch_statistics(model: nn.Module, batches: list, device: torch.device, replay=None,
                                    loss_fn=None) -> dict:
    """Mean loss and top-1 under batch statistics; ``replay(i)``, if given, is entered around batch ``i``.
    With a user's ``loss_fn``: its mean over samples, no top-1."""
    if loss_fn is not None:
        with _batch_statistics(model):
            return {**mean_task_loss(model, batches, device, loss_fn), "top1": None}
    loss, correct, samples = 0.0, 0, 0
    with _batch_statistics(model):
        for i, (x, y) in enumerate(batches):
            x, y = to_device(x, device), y.to(device)
            with replay(i) if replay is not None else contextlib.nullcontext():
                logits = call_model(model, x)
            loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())  # classes on dim 1, as cross-entropy reads them
            samples += y.numel()  # targets: one per sample, or one per pixel of a dense output
    return {"loss": loss / samples, "top1": 100.0 * correct / samples}


def _first_samples(batches: list, limit: int | None) -> list:
    """The batches cut to their first ``limit`` samples in all (None: all of them)."""
    if limit is None:
        return batches
    out = []
    for x, y in batches:
        if limit <= 0:
            break
        out.append((first_rows(x, limit), y[:limit]))
        limit -= len(y)
    return out
