"""Top-1 accuracy and cross-entropy of a model over a loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import batch_size, call_model, to_device
from ..errors import MixbitsError
from .inputs import check_logits, check_loss

LossFn = Callable[[nn.Module, Any], torch.Tensor]  # loss_fn(model, batch) -> scalar loss


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
             max_batches: int | None = None, loss_fn: LossFn | None = None) -> dict:
    """Evaluate in eval mode; returns ``{"top1": percent, "loss": mean CE, "samples": n}``.

    ``loader`` is any iterable of ``(x, y)`` tensors. With ``loss_fn(model, batch) -> loss`` any batch
    works and the result is ``{"loss": mean over samples, "samples": n}`` (no top-1: the task is the
    caller's). The model's training flags are restored afterwards.
    """
    device = torch.device(device)
    if loss_fn is not None:
        return _evaluate_loss(model, loader, device, max_batches, loss_fn)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    samples, targets = 0, 0
    try:
        with torch.inference_mode():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = _pair(batch)
                x, y = to_device(x, device), y.to(device, non_blocking=True)
                logits = call_model(model, x)
                check_logits(logits, y)
                # Sum on the device and read once at the end: no host sync per batch.
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
                # Classes lie on dim 1 for cross-entropy whatever the rank: per-pixel (or per-token) targets of a
                # dense output are scored per target, and (N, classes) scores per sample as before.
                correct += (logits.argmax(dim=1) == y).sum()
                samples, targets = samples + y.shape[0], targets + y.numel()
    finally:
        for m, flag in was_training.items():
            m.training = flag
    if samples == 0:
        raise MixbitsError("evaluation loader yielded no samples; check the validation split and max_batches")
    return {"top1": 100.0 * correct.item() / targets, "loss": loss_sum.item() / targets, "samples": samples}


def _pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) of a classification batch: the inputs a tensor, or a tuple or dict of them (the model's
    arguments), the targets a tensor; any other batch is one message naming loss_fn."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return batch[0], batch[1]
    kind = f"a {type(batch).__name__}" + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
    raise MixbitsError(f"evaluating top-1 and cross-entropy reads (inputs, targets) tensor batches, got {kind}; pass "
                       "loss_fn=lambda model, batch: ... to evaluate batches of another shape")


def _evaluate_loss(model: nn.Module, loader: Iterable, device: torch.device, max_batches: int | None,
                   loss_fn: LossFn) -> dict:
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            return mean_task_loss(model, loader, device, loss_fn, max_batches)
    finally:
        for m, flag in was_training.items():
            m.training = flag


def mean_task_loss(model: nn.Module, loader: Iterable, device: torch.device, loss_fn: LossFn,
                   max_batches: int | None = None) -> dict:
    """``{"loss": mean of loss_fn(model, batch) over samples, "samples": n}``, in whatever mode the model is."""
    from .loop import split_batch

    loss_sum, samples = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = split_batch(batch, device)
        n = batch_size(x if y is None else y)
        loss_sum += float(check_loss(loss_fn(model, x if y is None else (x, y)))) * n
        samples += n
    if samples == 0:
        raise MixbitsError("evaluation loader yielded no samples; check the validation split and max_batches")
    return {"loss": loss_sum / samples, "samples": samples}
