"""The probability-weighted sum of a tensor's LSQ quantizations, Σ_b p_b · Q_b(x), as one function.

This is the input (and weight) side of the composite convolution of the differentiable searches.
Written with plain autograd, each candidate costs a quantization, a product and a sum, and every one
of them keeps its own copy of the activation for backward: about K times the memory and a dozen
elementwise passes per candidate. Here the forward saves only ``x`` and the backward recomputes
the K quantizations in one pass:

    d out / d x    = Σ_b p_b · 1[x/s_b inside the clip range]       (straight-through per candidate)
    d out / d p_b  = Q_b(x)
    d out / d s_b  = p_b · (round(clip(x/s_b)) − x/s_b inside, the clip bound outside) · grad_scale_b

With ``set_fused(True)`` forward and backward are each one compiled kernel, as for a single quantizer.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .lsq import FUSED_MIN_NUMEL, fused_enabled, set_fused

_KERNELS: dict[str, object] = {}
_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def _mix_forward(x: Tensor, steps: Tensor, probs: Tensor, qmins: Tensor, qmaxs: Tensor) -> Tensor:
    out = None
    for k in range(steps.shape[0]):
        step = steps[k]
        term = probs[k] * (torch.clamp(x / step, qmins[k], qmaxs[k]).round() * step)
        out = term if out is None else out + term
    return out


def _mix_backward(grad: Tensor, x: Tensor, steps: Tensor, probs: Tensor, qmins: Tensor, qmaxs: Tensor,
                  dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """(grad wrt x, per-candidate grad wrt p (K,), per-candidate unscaled grad wrt the step, reduced over dims)."""
    grad_x, grad_p, grad_s = None, [], []
    for k in range(steps.shape[0]):
        step = steps[k]
        scaled = x / step
        inside = (scaled >= qmins[k]) & (scaled <= qmaxs[k])
        levels = torch.clamp(scaled, qmins[k], qmaxs[k]).round()
        term = torch.where(inside, grad, 0.0) * probs[k]
        grad_x = term if grad_x is None else grad_x + term
        grad_p.append((grad * levels * step).sum())
        grad_s.append((grad * torch.where(inside, levels - scaled, levels)).sum(dim=dims, keepdim=True) * probs[k])
    return grad_x, torch.stack(grad_p), torch.stack(grad_s)


def _kernel(name: str):
    if name not in _KERNELS:
        compile_ = torch.compile(dynamic=True, fullgraph=True)
        _KERNELS["forward"], _KERNELS["backward"] = compile_(_mix_forward), compile_(_mix_backward)
    return _KERNELS[name]


def _use_fused(x: Tensor) -> bool:
    return fused_enabled() and x.numel() >= FUSED_MIN_NUMEL and not torch.compiler.is_compiling()


def _bound_tables(bounds: tuple[tuple[float, float], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    key = (bounds, device)
    if key not in _TABLES:
        _TABLES[key] = (torch.tensor([lo for lo, _ in bounds], device=device),
                        torch.tensor([hi for _, hi in bounds], device=device))
    return _TABLES[key]


def mix_forward(x: Tensor, steps: Tensor, probs: Tensor, shape: tuple[int, ...], bounds: tuple) -> Tensor:
    """Σ_k probs[k] · Q_k(x): one compiled kernel when fused, else eager ops."""
    table = steps.view(steps.shape[0], *shape)
    if _use_fused(x):
        try:
            return _kernel("forward")(x.detach(), table.detach(), probs.detach(), *_bound_tables(bounds, x.device))
        except Exception as e:  # no compiler, unsupported backend: stay correct, just slower
            warnings.warn(f"fused LSQ kernels unavailable ({type(e).__name__}: {e}); using eager ops", stacklevel=3)
            set_fused(False)
    return _mix_forward(x, table, probs, *zip(*bounds, strict=True))


def mix_backward(grad: Tensor, x: Tensor, steps: Tensor, probs: Tensor, shape: tuple[int, ...], bounds: tuple,
                 grad_scales: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """(grad wrt x, grad wrt the step table, grad wrt probs) of ``mix_forward``."""
    table = steps.view(steps.shape[0], *shape)
    full = (1,) * (x.dim() - len(shape)) + tuple(shape)
    dims = tuple(d for d in range(x.dim()) if full[d] == 1)
    if _use_fused(x):
        backward, (qmins, qmaxs) = _kernel("backward"), _bound_tables(bounds, x.device)
    else:  # plain float bounds: a cached bound tensor made while compiling would leak out of its graph
        backward, (qmins, qmaxs) = _mix_backward, tuple(zip(*bounds, strict=True))
    grad_x, grad_p, grad_s = backward(grad.detach(), x.detach(), table.detach(), probs.detach(), qmins, qmaxs, dims)
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
