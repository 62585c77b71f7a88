"""Next-token loss and perplexity of a causal LM on windows of tokens (inputs and shifted targets)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def logits_of(output) -> torch.Tensor:
    """Logits from a plain module (a tensor) or a Hugging Face causal LM (an output with ``.logits``)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def next_token_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``windows[:, 1:]`` from ``windows[:, :-1]``."""
    logits = logits_of(model(windows[:, :-1]))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """exp of the mean next-token loss over all windows (equal-length windows weigh the same)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        total += float(next_token_loss(model, chunk)) * len(chunk)
    model.train(was_training)
    return math.exp(total / len(windows))


@torch.no_grad()
def run_with_hooks(model: nn.Module, hooks: dict[nn.Module, object], batches) -> None:
    """One forward pass over ``batches`` with a forward hook on each module of ``hooks``, removed afterwards."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        for ids in batches:
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
