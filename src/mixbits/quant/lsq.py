"""The LSQ fake-quantization function (Esser et al. 2020; seed 002, Eq. 1) with a hand-written backward.

    x_hat = round(clip(x / s, q_min, q_max)) * s

Gradients: straight-through for the rounding (d x_hat / d x = 1 inside the clip range, 0 outside);
for the step, d x_hat / d s = round(x/s) - x/s inside and q_min or q_max outside, scaled by the LSQ
factor ``grad_scale`` = 1 / sqrt(numel * q_max).

Autograd through the plain expression makes about four times as many elementwise passes as needed;
on a CPU those passes, not the convolutions, are what quantized training pays for. This function
saves only the input and recomputes the rest in one backward. With ``set_fused(True)`` forward and
backward each become one compiled (torch.compile / inductor) kernel.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

_FUSED = {"enabled": os.environ.get("MIXBITS_FUSED", "0") == "1", "kernels": None}


def set_fused(enabled: bool) -> None:
    """Use compiled single-pass kernels (needs a C compiler; the first call compiles for ~10 s)."""
    _FUSED["enabled"] = bool(enabled)


def fused_enabled() -> bool:
    return _FUSED["enabled"]


def _forward(x: Tensor, step: Tensor, qmin: Tensor, qmax: Tensor) -> Tensor:
    return torch.clamp(x / step, qmin, qmax).round() * step


def _backward(grad: Tensor, x: Tensor, step: Tensor, qmin: Tensor, qmax: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (grad wrt x, grad * d x_hat / d step) — the latter still to be reduced to the step's shape."""
    scaled = x / step
    inside = (scaled >= qmin) & (scaled <= qmax)
    levels = torch.clamp(scaled, qmin, qmax).round()
    grad_x = torch.where(inside, grad, 0.0)
    grad_step_elems = grad * torch.where(inside, levels - scaled, levels)
    return grad_x, grad_step_elems


def _backward_reduced(grad, x, step, qmin, qmax, dims: tuple[int, ...]):
    grad_x, elems = _backward(grad, x, step, qmin, qmax)
    return grad_x, elems.sum(dim=dims, keepdim=True)


def _kernels():
    """Compiled forward/backward, built once; bounds are tensors so one graph serves every bit-width."""
    if _FUSED["kernels"] is None:
        compile_ = torch.compile(dynamic=True, fullgraph=True)
        _FUSED["kernels"] = (compile_(_forward), compile_(_backward_reduced))
    return _FUSED["kernels"]


_BOUNDS: dict[tuple[float, float], tuple[Tensor, Tensor]] = {}


def _bounds(qmin: float, qmax: float, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (qmin, qmax, device)
    if key not in _BOUNDS:
        _BOUNDS[key] = (torch.tensor(qmin, device=device), torch.tensor(qmax, device=device))
    return _BOUNDS[key]


def _reduce_dims(x: Tensor, step: Tensor) -> tuple[int, ...]:
    """Dimensions of ``x`` over which one step value is shared (all of them for per-tensor)."""
    shape = (1,) * (x.dim() - step.dim()) + tuple(step.shape)
    return tuple(d for d in range(x.dim()) if shape[d] == 1)


class _LsqFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, qmin: float, qmax: float, grad_scale: float):
        lo, hi = _bounds(qmin, qmax, x.device)
        ctx.save_for_backward(x, step)
        ctx.bounds, ctx.grad_scale = (lo, hi), grad_scale
        if _FUSED["enabled"]:
            try:
                return _kernels()[0](x, step, lo, hi)
            except Exception as e:  # no compiler, unsupported backend: stay correct, just slower
                warnings.warn(f"fused LSQ kernels unavailable ({type(e).__name__}: {e}); using eager ops", stacklevel=2)
                set_fused(False)
        # In place after the first op: one allocation instead of four.
        return torch.div(x, step).clamp_(qmin, qmax).round_().mul_(step)

    @staticmethod
    def backward(ctx, grad):
        x, step = ctx.saved_tensors
        lo, hi = ctx.bounds
        dims = _reduce_dims(x, step)
        if _FUSED["enabled"]:
            grad_x, grad_step = _kernels()[1](grad, x, step, lo, hi, dims)
        else:
            grad_x, grad_step = _backward_reduced(grad, x, step, lo, hi, dims)
        grad_step = grad_step.reshape(step.shape) * ctx.grad_scale
        return grad_x, grad_step, None, None, None


def lsq_quantize(x: Tensor, step: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
    """Fake-quantize ``x`` with learnable ``step`` (broadcastable to x: per-tensor or per-channel)."""
    return _LsqFunction.apply(x, step, float(qmin), float(qmax), float(grad_scale))


def lsq_reference(x: Tensor, step: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
    """The same quantizer written with plain autograd ops: the specification the fast path is tested against."""
    step = step * grad_scale + (step - step * grad_scale).detach()  # value s, gradient scaled by grad_scale
    clipped = torch.clamp(x / step, qmin, qmax)
    return (clipped.round() - clipped).detach().add(clipped).mul(step)
