"""Hessian traces by Hutchinson's estimator: tr(H) ≈ E_v[vᵀ H v] with Rademacher probes v.

One double-backward per probe gives Hessian-vector products for every layer's weight and every
layer's input activation at once; the block-diagonal trace of each tensor is the per-tensor vᵀ(Hv),
because cross-block terms vanish in expectation. ``converged_traces`` adds batches until every trace's
relative standard error is below a bound (HAWQ's sensitivities rank layers by them).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..train.loop import split_batch
from .base import task_loss

KINDS = ("weight", "act")


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, like.shape, generator=gen, device="cpu").to(like) * 2 - 1


def hessian_traces(model: nn.Module, batches: Iterable, layer_names: Sequence[str], probes: int = 16,
                   activations: bool = True, seed: int = 0, device: torch.device | str = "cpu",
                   loss_fn: Callable | None = None) -> dict:
    """name -> {"weight": tr(H_W), "act": tr(H_A)}: traces of the mean cross-entropy (or ``loss_fn(model,
    batch)``) over each batch, averaged over the batches, ``probes`` probes each."""
    gen = torch.Generator().manual_seed(seed)
    per_batch = [batch_traces(model, batch, layer_names, probes, activations, gen, device, loss_fn)
                 for batch in batches]
    return {n: {k: statistics.fmean(b[n][k] for b in per_batch) if per_batch else 0.0 for k in KINDS}
            for n in layer_names}


def converged_traces(model: nn.Module, batches: Iterable, layer_names: Sequence[str], probes: int = 16,
                     activations: bool = True, seed: int = 0, device: torch.device | str = "cpu",
                     loss_fn: Callable | None = None, min_batches: int = 2, max_batches: int = 32,
                     bound: float = 0.1, errors: Callable[[list[dict]], dict[str, float]] | None = None) -> dict:
    """Traces from batch after batch (``probes`` probes each) until every layer's error is at most ``bound``, or
    ``max_batches`` (or the batches) run out.

    A trace is the mean of its per-batch estimates; its standard error the standard deviation of those over
    sqrt(batches), which holds both the probes' noise and the batches' differences (probes on one batch share
    its Hessian, so their spread alone would understate it); relative to |trace|. An exact zero (no gradient
    reaches the tensor) has error 0. A layer's error is the larger of its two traces' relative errors, or what
    ``errors(per_batch)`` gives per layer (HAWQ: its sensitivities', ``hawq_stopping``). Returns {"traces": name
    -> {"weight", "act"}, "rse": the traces' relative errors in the same layout, "errors": name -> the error
    the bound was held to, "batches", "probes" (in all), "bound", "converged", "above_bound": [names]}.
    """
    layer_errors = errors or (lambda per: {n: max(r.values()) for n, r in _relative_errors(per, layer_names).items()})
    gen = torch.Generator().manual_seed(seed)
    per_batch: list[dict] = []
    for batch in itertools.islice(batches, max_batches):
        per_batch.append(batch_traces(model, batch, layer_names, probes, activations, gen, device, loss_fn))
        if len(per_batch) >= max(2, min_batches) and max(layer_errors(per_batch).values(), default=0.0) <= bound:
            break
    rse = _relative_errors(per_batch, layer_names)
    held = layer_errors(per_batch)
    traces = {n: {k: statistics.fmean(b[n][k] for b in per_batch) if per_batch else 0.0 for k in KINDS}
              for n in layer_names}
    above = [n for n in layer_names if held[n] > bound]
    return {"traces": traces, "rse": rse, "errors": held, "batches": len(per_batch),
            "probes": len(per_batch) * probes, "bound": bound, "converged": not above, "above_bound": above}


def _relative_errors(per_batch: list[dict], layer_names: Sequence[str]) -> dict:
    out = {}
    for n in layer_names:
        out[n] = {}
        for k in KINDS:
            values = [b[n][k] for b in per_batch]
            mean = statistics.fmean(values) if values else 0.0
            spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else math.inf
            if spread == 0.0:
                out[n][k] = 0.0
            else:
                out[n][k] = spread / abs(mean) if mean != 0.0 else math.inf
    return out


def batch_traces(model: nn.Module, batch, layer_names: Sequence[str], probes: int, activations: bool,
                 gen: torch.Generator, device: torch.device | str = "cpu", loss_fn: Callable | None = None) -> dict:
    """name -> {"weight": tr(H_W), "act": tr(H_A)} on one batch, each the mean of ``probes`` probes (act 0.0
    where no gradient reaches the layer's input, such as the network's input). The model runs in eval mode
    (BatchNorm with running statistics), so the loss is a fixed function of its inputs."""
    modules = dict(model.named_modules())
    sums = {n: {k: 0.0 for k in KINDS} for n in layer_names}
    was_training = model.training
    model.eval()
    try:
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
    finally:
        model.train(was_training)
    return sums


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
