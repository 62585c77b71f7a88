"""The LSQ fake-quantization function (Esser et al. 2020; seed 002, Eq. 1) with a hand-written backward.

    x_hat = round(clip(x / s, q_min, q_max)) * s

Gradients: straight-through for the rounding (d x_hat / d x = 1 inside the clip range, 0 outside);
for the step, d x_hat / d s = round(x/s) - x/s inside and q_min or q_max outside, scaled by the LSQ
factor ``grad_scale`` = 1 / sqrt(numel * q_max).

Autograd through the plain expression makes about four times as many elementwise passes as needed;
on a CPU those passes, not the convolutions, are what quantized training pays for. This function
saves only the input and recomputes the rest in one backward. With ``set_fused(True)`` (the default
where a C compiler is found) forward and backward each become one compiled kernel (kernels.py).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..compiler import fused_default
from . import kernels

# On where a C compiler is found, unless MIXBITS_FUSED pins it: read at the first quantizer call, never at import
# (a bad value then fails the call that needs it, not `import mixbits`).
_FUSED: dict[str, bool | None] = {"enabled": None}


def set_fused(enabled: bool) -> None:
    """Use compiled single-pass kernels (needs a C compiler; the first call compiles for ~10 s)."""
    _FUSED["enabled"] = bool(enabled)


def fused_enabled() -> bool:
    if _FUSED["enabled"] is None:
        _FUSED["enabled"] = fused_default()
    return _FUSED["enabled"]


def _codes(x: Tensor, step: Tensor, qmin: Tensor, qmax: Tensor) -> Tensor:
    """The integer levels of ``x``: the same division, clamp and rounding as onnx QuantizeLinear."""
    return torch.clamp(x / step, qmin, qmax).round()


def _eager_codes(x: Tensor, step: Tensor, qmin: float, qmax: float) -> Tensor:
    """``_codes`` as eager ops, in place after the first one (one allocation instead of three)."""
    return torch.div(x, step).clamp_(qmin, qmax).round_()


def _forward(x: Tensor, step: Tensor, qmin: Tensor, qmax: Tensor) -> Tensor:
    return _codes(x, step, qmin, qmax) * step


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


# The compiled kernels, on flattened operands (quant/kernels.py): the step is reduced over the last dimension.
def _forward_kernel(x, step, qmin, qmax):
    return (_forward(x, step, qmin, qmax),)


def _codes_into_kernel(out, x, step, qmin, qmax):
    out.copy_(_codes(x, step, qmin, qmax))
    return ()


def _forward_into_kernel(out, x, step, qmin, qmax):
    out.copy_(_forward(x, step, qmin, qmax))
    return ()


def _backward_kernel(grad, x, step, qmin, qmax):
    return _backward_reduced(grad, x, step, qmin, qmax, (-1,))


def _requantizing_backward_kernel(out, grad, x, step, qmin, qmax):
    """As ``_backward_kernel``, also writing the forward's output into ``out``: one loop over ``x`` makes both.
    (The grad wrt x is a new tensor: written over ``grad``, inductor would read ``grad`` in a second loop.)"""
    out.copy_(_forward(x, step, qmin, qmax))
    return _backward_reduced(grad, x, step, qmin, qmax, (-1,))


# Below this many elements the eager ops cost no more than a kernel call (~15 us); above it, weights included,
# the kernel's one pass is cheaper than their several (a mixture of K candidates is 5K eager ops).
FUSED_MIN_NUMEL = 1 << 10


def fused_applies(x: Tensor) -> bool:
    """Whether an operation on ``x`` runs as a compiled kernel (``set_fused``) rather than as eager ops."""
    # Inside a compiled model the whole graph is fused already; nested compiled kernels would break it.
    return (not torch.compiler.is_compiling() and fused_enabled() and x.numel() >= FUSED_MIN_NUMEL
            and x.dtype == torch.float32)


def fused_unavailable(what: str, error: Exception) -> None:
    """A kernel could not be built or run here (no compiler, an unsupported backend): warn once, go eager."""
    warnings.warn(f"fused {what} kernels unavailable ({type(error).__name__}: {error}); using eager ops", stacklevel=4)
    set_fused(False)


def fused_layout(x: Tensor, step_shape: tuple[int, ...]) -> str | None:
    """The kernels' layout for ``x`` (see kernels.layout), or None when the eager ops run."""
    return kernels.layout(x, step_shape) if fused_applies(x) else None


def _kernel(fn, kind: str, device: torch.device):
    def example():
        x = kernels.example(kind, device)
        step = torch.ones(1, device=device) if kind == "tensor" else torch.ones(x.shape[0], 1, device=device)
        args = (x, step, torch.tensor(0.0, device=device), torch.tensor(3.0, device=device))
        # before those, tensors like x: none (forward), the output (into) or grad, or both (requantizing)
        lead = {_forward_kernel: 0, _requantizing_backward_kernel: 2}.get(fn, 1)
        return (*(torch.randn_like(x) for _ in range(lead)), *args)

    return kernels.compiled(fn, (kind, device), example)


_BOUNDS: dict[tuple[float, float], tuple[Tensor, Tensor]] = {}


def _bounds(qmin: float, qmax: float, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (qmin, qmax, device)
    if key not in _BOUNDS:
        _BOUNDS[key] = (torch.tensor(qmin, device=device), torch.tensor(qmax, device=device))
    return _BOUNDS[key]


def _kernel_args(kind: str, x: Tensor, steps: Tensor, row: int, qmin: float, qmax: float) -> tuple:
    """The arguments every kernel takes after its leading tensors: ``x``, row ``row`` of the step table and the
    clip bounds, flattened for layout ``kind`` (detached: the kernels see plain tensors, never Parameters)."""
    return (kernels.flat(kind, x.detach()), kernels.flat_steps(kind, steps.detach())[row],
            *_bounds(qmin, qmax, x.device))


def _reduce_dims(x: Tensor, step: Tensor) -> tuple[int, ...]:
    """Dimensions of ``x`` over which one step value is shared (all of them for per-tensor)."""
    shape = (1,) * (x.dim() - step.dim()) + tuple(step.shape)
    return tuple(d for d in range(x.dim()) if shape[d] == 1)


def row_forward(x: Tensor, steps: Tensor, row: int, shape: tuple[int, ...], qmin: float, qmax: float,
                transient: bool = False) -> Tensor:
    """Quantize ``x`` with ``steps[row].view(shape)``: one compiled kernel when fused, else eager ops.
    ``transient``: the caller drops the result before its next call here, so it may live in scratch memory."""
    kind = fused_layout(x, shape)
    if kind is not None:
        try:
            args = _kernel_args(kind, x, steps, row, qmin, qmax)
            if transient:
                out = kernels.scratch(x)
                _kernel(_forward_into_kernel, kind, x.device)(kernels.flat(kind, out), *args)
                return out
            return _kernel(_forward_kernel, kind, x.device)(*args)[0].view(x.shape)
        except Exception as e:  # stay correct, just slower
            fused_unavailable("LSQ", e)
    step = steps[row].view(shape)
    return _eager_codes(x, step, qmin, qmax).mul_(step)


def row_codes(x: Tensor, steps: Tensor, row: int, shape: tuple[int, ...], qmin: float, qmax: float,
              transient: bool = False) -> Tensor:
    """The integer codes (``_codes``) of ``x`` with ``steps[row].view(shape)``, in ``x``'s dtype and with no
    gradient: one compiled kernel when fused, else eager ops. ``transient`` as for ``row_forward``."""
    kind = fused_layout(x, shape)
    if kind is not None:
        try:
            out = kernels.scratch(x) if transient else torch.empty_like(x, memory_format=torch.contiguous_format)
            _kernel(_codes_into_kernel, kind, x.device)(kernels.flat(kind, out),
                                                         *_kernel_args(kind, x, steps, row, qmin, qmax))
            return out
        except Exception as e:  # stay correct, just slower
            fused_unavailable("LSQ", e)
    return _eager_codes(x.detach(), steps.detach()[row].view(shape), qmin, qmax)


def row_backward(grad: Tensor, x: Tensor, steps: Tensor, row: int, shape: tuple[int, ...], qmin: float,
                 qmax: float, grad_scale: float) -> tuple[Tensor, Tensor]:
    """(grad wrt x, grad wrt the whole step table) of ``row_forward``."""
    kind = fused_layout(x, shape)
    if kind is not None:
        args = (kernels.flat(kind, grad.detach()), *_kernel_args(kind, x, steps, row, qmin, qmax))
        grad_x, grad_step = _kernel(_backward_kernel, kind, x.device)(*args)
    else:  # plain float bounds: a cached bound tensor made while compiling would leak out of its graph
        step = steps[row].view(shape)
        grad_x, grad_step = _backward_reduced(grad, x, step, qmin, qmax, _reduce_dims(x, step))
    return grad_x.view(x.shape), _table_grad(steps, row, grad_step, grad_scale)


def _table_grad(steps: Tensor, row: int, grad_step: Tensor, grad_scale: float) -> Tensor:
    """The gradient wrt the whole step table: ``grad_step`` (scaled) in row ``row``, zeros elsewhere."""
    grad_steps = torch.zeros_like(steps)
    grad_steps[row] = grad_step.reshape(-1) * grad_scale
    return grad_steps


def row_backward_requantized(grad: Tensor, x: Tensor, steps: Tensor, row: int, shape: tuple[int, ...], qmin: float,
                             qmax: float, grad_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(``row_forward``'s output, then ``row_backward``'s two gradients) from one pass over ``x``: for a backward
    that needs the quantized input again (a layer's weight gradient). The output lives in scratch memory.
    Only where ``fused_layout`` gives a layout: a compiled kernel is what makes one pass of it."""
    kind = fused_layout(x, shape)
    out = kernels.scratch(x)
    args = (kernels.flat(kind, out), kernels.flat(kind, grad.detach()), *_kernel_args(kind, x, steps, row, qmin, qmax))
    grad_x, grad_step = _kernel(_requantizing_backward_kernel, kind, x.device)(*args)
    return out, grad_x.view(x.shape), _table_grad(steps, row, grad_step, grad_scale)


def row_step_factor(x: Tensor, steps: Tensor, row: int, shape: tuple[int, ...], qmin: float, qmax: float) -> Tensor:
    """d Q(x) / d step elementwise, before the LSQ scale: round(x/s) - x/s inside the clip range, the bound outside."""
    step = steps[row].view(shape)
    return _backward(torch.ones((), dtype=x.dtype, device=x.device), x, step, qmin, qmax)[1]


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
