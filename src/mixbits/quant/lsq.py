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

import warnings

import torch
from torch import Tensor

from ..compiler import fused_default

# On where a C compiler is found, unless MIXBITS_FUSED pins it.
_FUSED = {"enabled": fused_default(), "kernels": None}


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


# Below this many elements (weights, small activations) launching a compiled kernel is not worth it.
FUSED_MIN_NUMEL = 1 << 15


def _use_fused(x: Tensor) -> bool:
    # Inside a compiled model the whole graph is fused already; nested compiled kernels would break it.
    return _FUSED["enabled"] and x.numel() >= FUSED_MIN_NUMEL and not torch.compiler.is_compiling()


def _kernels():
    """Compiled forward/backward, built once; bounds are tensors so one graph serves every bit-width."""
    if _FUSED["kernels"] is None:
        # One graph per (rank, per-tensor or per-channel step) pair; the default limit of 8 is too tight.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
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


def row_forward(x: Tensor, steps: Tensor, row: int, shape: tuple[int, ...], qmin: float, qmax: float) -> Tensor:
    """Quantize ``x`` with ``steps[row].view(shape)``: one compiled kernel when fused, else eager ops."""
    step = steps[row].view(shape)
    if _use_fused(x):
        try:  # detached: the kernels see plain tensors, never Parameters (which would force a recompile)
            return _kernels()[0](x.detach(), step.detach(), *_bounds(qmin, qmax, x.device))
        except Exception as e:  # no compiler, unsupported backend: stay correct, just slower
            warnings.warn(f"fused LSQ kernels unavailable ({type(e).__name__}: {e}); using eager ops", stacklevel=3)
            set_fused(False)
    # In place after the first op: one allocation instead of four.
    return torch.div(x, step).clamp_(qmin, qmax).round_().mul_(step)


def row_backward(grad: Tensor, x: Tensor, steps: Tensor, row: int, shape: tuple[int, ...], qmin: float,
                 qmax: float, grad_scale: float) -> tuple[Tensor, Tensor]:
    """(grad wrt x, grad wrt the whole step table) of ``row_forward``."""
    step = steps[row].view(shape)
    dims = _reduce_dims(x, step)
    if _use_fused(x):
        grad_x, grad_step = _kernels()[1](grad.detach(), x.detach(), step.detach(), *_bounds(qmin, qmax, x.device),
                                          dims)
    else:  # plain float bounds: a cached bound tensor made while compiling would leak out of its graph
        grad_x, grad_step = _backward_reduced(grad, x, step, qmin, qmax, dims)
    grad_steps = torch.zeros_like(steps)
    grad_steps[row] = grad_step.reshape(-1) * grad_scale
    return grad_x, grad_steps


class _LsqFunction(torch.autograd.Function):
    """Quantizes with row ``row`` of a (candidates x channels) step table, viewed as ``shape``.

    Taking the whole table rather than a slice of it keeps the backward to one small write into the
    table's gradient, instead of autograd's select/view backward (several allocations per call).
    """

    @staticmethod
    def forward(ctx, x, steps, row: int, shape: tuple[int, ...], qmin: float, qmax: float, grad_scale: float):
        ctx.save_for_backward(x, steps)
        ctx.args = (row, shape, qmin, qmax, grad_scale)
        return row_forward(x, steps, row, shape, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, steps = ctx.saved_tensors
        grad_x, grad_steps = row_backward(grad, x, steps, *ctx.args)
        return grad_x, grad_steps, None, None, None, None, None


def lsq_quantize_row(x: Tensor, steps: Tensor, row: int, shape: tuple[int, ...], qmin: int, qmax: int,
                     grad_scale: float) -> Tensor:
    """Fake-quantize ``x`` with ``steps[row].view(shape)`` (the quantizers' per-bit step table)."""
    return _LsqFunction.apply(x, steps, row, tuple(shape), float(qmin), float(qmax), float(grad_scale))


def lsq_quantize(x: Tensor, step: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
    """Fake-quantize ``x`` with learnable ``step`` (broadcastable to x: per-tensor or per-channel)."""
    return lsq_quantize_row(x, step.reshape(1, -1), 0, tuple(step.shape), qmin, qmax, grad_scale)


def lsq_reference(x: Tensor, step: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
    """The same quantizer written with plain autograd ops: the specification the fast path is tested against."""
    step = step * grad_scale + (step - step * grad_scale).detach()  # value s, gradient scaled by grad_scale
    clipped = torch.clamp(x / step, qmin, qmax)
    return (clipped.round() - clipped).detach().add(clipped).mul(step)
