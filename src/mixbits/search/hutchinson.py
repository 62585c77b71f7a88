"""Hessian traces by Hutchinson's estimator: tr(H) ≈ E_v[vᵀ H v] with Rademacher probes v.

One double-backward per probe gives Hessian-vector products for every layer's weight and every
layer's input activation at once; the block-diagonal trace of each tensor is the per-tensor vᵀ(Hv),
because cross-block terms vanish in expectation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..train.loop import split_batch
from .base import task_loss


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, like.shape, generator=gen, device="cpu").to(like) * 2 - 1


def hessian_traces(model: nn.Module, batches: Iterable, layer_names: Sequence[str], probes: int = 16,
                   activations: bool = True, seed: int = 0, device: torch.device | str = "cpu",
                   loss_fn: Callable | None = None) -> dict:
    """name -> {"weight": tr(H_W), "act": tr(H_A), "act_sq": [captured inputs, for error terms]}.

    Traces of the mean cross-entropy (or ``loss_fn(model, batch)``) over each batch, averaged over batches.
    The model runs in eval mode (BatchNorm with running statistics), so the loss is a fixed function of its
    inputs.
    """
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    sums = {n: {"weight": 0.0, "act": 0.0} for n in layer_names}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            captured: dict[str, torch.Tensor] = {}
            handles = [modules[n].register_forward_hook(_capture(n, captured)) for n in layer_names]
            try:
                loss = task_loss(loss_fn, model, *split_batch(batch, torch.device(device)))[0]
            finally:
                for h in handles:
                    h.remove()
            tensors, keys = [], []
            for n in layer_names:
                tensors.append(modules[n].weight)
                keys.append((n, "weight"))
                if activations and captured[n].requires_grad:
                    tensors.append(captured[n])
                    keys.append((n, "act"))
            grads = torch.autograd.grad(loss, tensors, create_graph=True)
            for _ in range(probes):
                vs = [_rademacher(t, gen) for t in tensors]
                hvs = torch.autograd.grad(grads, tensors, grad_outputs=vs, retain_graph=True)
                for (n, kind), v, hv in zip(keys, vs, hvs, strict=True):
                    sums[n][kind] += float((v * hv).sum()) / probes
            count += 1
    finally:
        model.train(was_training)
    return {n: {k: v / max(count, 1) for k, v in s.items()} for n, s in sums.items()}


def _capture(name: str, store: dict):
    def hook(module, inputs, output):
        store[name] = inputs[0]
    return hook


def layer_inputs(model: nn.Module, batches: Iterable, layer_names: Sequence[str],
                 device: torch.device | str = "cpu",
                 loss_fn: Callable | None = None) -> dict[str, list[torch.Tensor]]:
    """The input of each layer for each batch (no grad), to measure activation quantization error."""
    modules = dict(model.named_modules())
    store: dict[str, list[torch.Tensor]] = {n: [] for n in layer_names}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: store[n].append(i[0].detach()))
               for n in layer_names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                task_loss(loss_fn, model, *split_batch(batch, torch.device(device)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return store
