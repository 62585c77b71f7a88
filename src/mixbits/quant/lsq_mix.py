"""The probability-weighted sum of a tensor's LSQ quantizations, Σ_b p_b · Q_b(x), as one function.

This is the input (and weight) side of the composite convolution of the differentiable searches.
Written with plain autograd, each candidate costs a quantization, a product and a sum, and every one
of them keeps its own copy of the activation for backward: about K times the memory and a dozen
elementwise passes per candidate. Here the forward saves only ``x`` and the backward recomputes
the K quantizations in one pass:

    d out / d x    = Σ_b p_b · 1[x/s_b inside the clip range]       (straight-through per candidate)
    d out / d p_b  = Q_b(x)
    d out / d s_b  = p_b · (round(clip(x/s_b)) − x/s_b inside, the clip bound outside) · grad_scale_b

With ``set_fused(True)`` forward and backward are each one compiled kernel (kernels.py), as for a single
quantizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .lsq import fused_layout, fused_unavailable

_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def _mix_forward(x: Tensor, steps: Tensor, probs: Tensor, qmins, qmaxs) -> Tensor:
    """``qmins``/``qmaxs``: the candidates' bounds, as tensors (compiled kernels) or floats (eager ops)."""
    out = None
    for k in range(steps.shape[0]):
        step = steps[k]
        term = probs[k] * (torch.clamp(x / step, qmins[k], qmaxs[k]).round() * step)
        out = term if out is None else out + term
    return out


def _mix_backward(grad: Tensor, x: Tensor, steps: Tensor, probs: Tensor, qmins, qmaxs,
                  dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """(grad wrt x, per-candidate grad wrt p (K,), per-candidate unscaled grad wrt the step, reduced over dims).

    Two sums per candidate: A = sum(grad * levels) and B = sum(grad * x/s inside the clip range); then
    d/dp = sum(A * s) and d/ds = p * (A - B). The straight-through gradient is grad times the summed
    probability of the candidates whose clip range holds x.
    """
    through, grad_p, grad_s = None, [], []
    for k in range(steps.shape[0]):
        step = steps[k]
        scaled = x / step
        inside = (scaled >= qmins[k]) & (scaled <= qmaxs[k])
        levels = torch.clamp(scaled, qmins[k], qmaxs[k]).round()
        weight = torch.where(inside, probs[k], 0.0)
        through = weight if through is None else through + weight
        total = (grad * levels).sum(dim=dims, keepdim=True)
        inner = torch.where(inside, grad * scaled, 0.0).sum(dim=dims, keepdim=True)
        grad_p.append((total * step).sum())
        grad_s.append((total - inner) * probs[k])
    return grad * through, torch.stack(grad_p), torch.stack(grad_s)


# The compiled kernels, on flattened operands (quant/kernels.py): steps reduced over the last dimension.
def _forward_kernel(x, steps, probs, qmins, qmaxs):
    return (_mix_forward(x, steps, probs, qmins, qmaxs),)


def _forward_into_kernel(out, x, steps, probs, qmins, qmaxs):
    out.copy_(_mix_forward(x, steps, probs, qmins, qmaxs))
    return ()


def _backward_kernel(grad, x, steps, probs, qmins, qmaxs):
    return _mix_backward(grad, x, steps, probs, qmins, qmaxs, (-1,))


def _requantizing_backward_kernel(out, grad, x, steps, probs, qmins, qmaxs):
    """As ``_backward_kernel``, also writing the forward's output into ``out`` from the same loop over ``x``."""
    out.copy_(_mix_forward(x, steps, probs, qmins, qmaxs))
    return _mix_backward(grad, x, steps, probs, qmins, qmaxs, (-1,))


def _kernel(fn, kind: str, candidates: int, device: torch.device):
    """The kernel for ``candidates`` bit-widths (a loop unrolled at tracing, so one graph per count)."""
    def example():
        x = kernels.example(kind, device)
        steps = torch.ones(candidates, *((1,) if kind == "tensor" else (x.shape[0], 1)), device=device)
        bounds = torch.zeros(candidates, device=device), torch.full((candidates,), 3.0, device=device)
        args = (x, steps, torch.full((candidates,), 1.0 / candidates, device=device), *bounds)
        # before those, tensors like x: none (forward), the output (into) or grad, or both (requantizing)
        lead = {_forward_kernel: 0, _requantizing_backward_kernel: 2}.get(fn, 1)
        return (*(torch.randn_like(x) for _ in range(lead)), *args)

    return kernels.compiled(fn, (kind, candidates, device), example)


def _bound_tables(bounds: tuple[tuple[float, float], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    key = (bounds, device)
    if key not in _TABLES:
        _TABLES[key] = (torch.tensor([lo for lo, _ in bounds], device=device),
                        torch.tensor([hi for _, hi in bounds], device=device))
    return _TABLES[key]


def mix_forward(x: Tensor, steps: Tensor, probs: Tensor, shape: tuple[int, ...], bounds: tuple,
                transient: bool = False) -> Tensor:
    """Σ_k probs[k] · Q_k(x): one compiled kernel when fused, else eager ops. ``transient``: the caller drops
    the result before its next call here, so it may live in scratch memory."""
    kind = fused_layout(x, shape)
    if kind is not None:
        try:
            args = _kernel_args(kind, x, steps, probs, bounds)
            if transient:
                out = kernels.scratch(x)
                _kernel(_forward_into_kernel, kind, len(bounds), x.device)(kernels.flat(kind, out), *args)
                return out
            return _kernel(_forward_kernel, kind, len(bounds), x.device)(*args)[0].view(x.shape)
        except Exception as e:  # stay correct, just slower
            fused_unavailable("LSQ", e)
    table = steps.view(steps.shape[0], *shape)
    return _mix_forward(x, table, probs, *zip(*bounds, strict=True))


def mix_backward(grad: Tensor, x: Tensor, steps: Tensor, probs: Tensor, shape: tuple[int, ...], bounds: tuple,
                 grad_scales: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """(grad wrt x, grad wrt the step table, grad wrt probs) of ``mix_forward``."""
    kind = fused_layout(x, shape)
    if kind is not None:
        args = (kernels.flat(kind, grad.detach()), *_kernel_args(kind, x, steps, probs, bounds))
        grad_x, grad_p, grad_s = _kernel(_backward_kernel, kind, len(bounds), x.device)(*args)
    else:  # plain float bounds: a cached bound tensor made while compiling would leak out of its graph
        table = steps.view(steps.shape[0], *shape)
        full = (1,) * (x.dim() - len(shape)) + tuple(shape)
        dims = tuple(d for d in range(x.dim()) if full[d] == 1)
        grad_x, grad_p, grad_s = _mix_backward(grad, x, table, probs, *zip(*bounds, strict=True), dims)
    return _gradients(grad_x.view(x.shape), grad_p, grad_s, steps, probs, grad_scales)


def mix_backward_requantized(grad: Tensor, x: Tensor, steps: Tensor, probs: Tensor, shape: tuple[int, ...],
                             bounds: tuple, grad_scales: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(``mix_forward``'s output, then ``mix_backward``'s three gradients) from one pass over ``x``: for a backward
    that needs the mixed input again (a layer's weight gradient). The output lives in scratch memory.
    Only where ``fused_layout`` gives a layout: a compiled kernel is what makes one pass of it."""
    kind = fused_layout(x, shape)
    out = kernels.scratch(x)
    args = (kernels.flat(kind, out), kernels.flat(kind, grad.detach()), *_kernel_args(kind, x, steps, probs, bounds))
    grad_x, grad_p, grad_s = _kernel(_requantizing_backward_kernel, kind, len(bounds), x.device)(*args)
    return out, *_gradients(grad_x.view(x.shape), grad_p, grad_s, steps, probs, grad_scales)


def _kernel_args(kind: str, x: Tensor, steps: Tensor, probs: Tensor, bounds: tuple) -> tuple:
    """The arguments every mixture kernel takes after its leading tensors, flattened for layout ``kind``."""
    return (kernels.flat(kind, x.detach()), kernels.flat_steps(kind, steps.detach()), probs.detach(),
            *_bound_tables(bounds, x.device))


def _gradients(grad_x: Tensor, grad_p: Tensor, grad_s: Tensor, steps: Tensor, probs: Tensor,
               grad_scales: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """(grad wrt x, wrt the step table with the LSQ scales applied, wrt probs in their dtype)."""
    scales = torch.tensor(grad_scales, dtype=grad_s.dtype, device=grad_s.device)
    grad_steps = grad_s.reshape(steps.shape[0], -1) * scales[:, None]
    return grad_x, grad_steps.reshape(steps.shape), grad_p.to(probs.dtype)


class _LsqMixFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, steps, probs, shape: tuple[int, ...], bounds: tuple, grad_scales: tuple):
        ctx.save_for_backward(x, steps, probs)
        ctx.args = (shape, bounds, grad_scales)
        return mix_forward(x, steps, probs, shape, bounds)

    @staticmethod
    def backward(ctx, grad):
        x, steps, probs = ctx.saved_tensors
        return *mix_backward(grad, x, steps, probs, *ctx.args), None, None, None


def lsq_mix(x: Tensor, steps: Tensor, probs: Tensor, shape: tuple[int, ...], bounds: list[tuple[int, int]],
            grad_scales: list[float]) -> Tensor:
    """Σ_k probs[k] · Q_k(x), Q_k the LSQ quantizer with step ``steps[k].view(shape)`` and ``bounds[k]``."""
    return _LsqMixFunction.apply(x, steps, probs, tuple(shape), tuple((float(lo), float(hi)) for lo, hi in bounds),
                                 tuple(float(g) for g in grad_scales))
