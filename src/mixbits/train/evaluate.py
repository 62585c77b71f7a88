"""Top-1 accuracy and cross-entropy of a model over a loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MixbitsError


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
             max_batches: int | None = None) -> dict:
    """Evaluate in eval mode; returns ``{"top1": percent, "loss": mean CE, "samples": n}``.

    ``loader`` is any iterable of ``(x, y)`` tensors. The model's training flags are restored afterwards.
    """
    device = torch.device(device)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    samples = 0
    try:
        with torch.inference_mode():
            for i, (x, y) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                # Sum on the device and read once at the end: no host sync per batch.
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
                correct += (logits.argmax(dim=-1) == y).sum()
                samples += y.shape[0]
    finally:
        for m, flag in was_training.items():
            m.training = flag
    if samples == 0:
        raise MixbitsError("evaluation loader yielded no samples; check the validation split and max_batches")
    return {"top1": 100.0 * correct.item() / samples, "loss": loss_sum.item() / samples, "samples": samples}
