"""A quantized layer's input quantizer and its convolution (or linear product) as one autograd function.

Written as two autograd nodes, the quantizer keeps the float input for its LSQ backward and the
convolution keeps the quantized input for its weight gradient: two full-precision copies of every
activation, where float training keeps one. Here the forward keeps only the input (which the layer
before keeps anyway, e.g. a ReLU's output) and the backward remakes the quantized input from it in the
pass that makes the quantizer's gradients: a whole activation of memory saved for no extra pass.
Forward and gradients are those of the two-node composition; the quantizer's own passes are those of
``lsq.py`` and ``lsq_mix.py``.

The input quantizer is a *plan*: ``("row", row, shape, qmin, qmax, grad_scale)`` (one bit-width, a row
of the step table) or ``("mix", shape, bounds, grad_scales)`` (the probability-weighted candidates).
The layer is ``("conv", stride, padding, dilation, groups)`` or ``("linear",)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .lsq import fused_layout, row_backward, row_backward_requantized, row_forward, row_step_factor
from .lsq_mix import mix_backward, mix_backward_requantized, mix_forward


def _quantize(plan: tuple, x: Tensor, steps: Tensor, probs: Tensor | None) -> Tensor:
    """The quantized input, needed only until the layer's product (or its backward) returns."""
    if plan[0] == "row":
        return row_forward(x, steps, *plan[1:5], transient=True)
    return mix_forward(x, steps, probs, *plan[1:3], transient=True)


def _one_pass(plan: tuple, x: Tensor) -> bool:
    """Whether the compiled kernels quantize ``x`` (so one of them can remake the quantized input in the backward)."""
    return fused_layout(x, plan[2] if plan[0] == "row" else plan[1]) is not None


def _requantizing_backward(plan: tuple, grad: Tensor, x: Tensor, steps: Tensor, probs: Tensor | None):
    """(the quantized input again, in scratch memory; grad wrt x, wrt the step table, wrt probs or None)."""
    if plan[0] == "row":
        return *row_backward_requantized(grad, x, steps, *plan[1:]), None
    return mix_backward_requantized(grad, x, steps, probs, *plan[1:])


def _quantize_backward(plan: tuple, grad: Tensor, x: Tensor, steps: Tensor, probs: Tensor | None):
    """(grad wrt x, wrt the step table, wrt probs or None)."""
    if plan[0] == "row":
        return *row_backward(grad, x, steps, *plan[1:]), None
    return mix_backward(grad, x, steps, probs, *plan[1:])


def _layer(op: tuple, q: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if op[0] == "conv":
        return F.conv2d(q, weight, bias, *op[1:])
    return F.linear(q, weight, bias)


def _layer_backward(op: tuple, grad: Tensor, q: Tensor, weight: Tensor, has_bias: bool, need_w: bool,
                    need_b: bool, need_q: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad wrt the quantized input, wrt the weight, wrt the bias): the kernels autograd runs for F.conv2d."""
    if op[0] == "conv":
        stride, padding, dilation, groups = op[1:]
        return torch.ops.aten.convolution_backward(
            grad, q, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False, [0, 0],
            groups, [need_q, need_w, need_b and has_bias])
    grad_q = grad.matmul(weight) if need_q else None
    flat = grad.reshape(-1, grad.shape[-1])
    grad_w = flat.t().mm(q.reshape(-1, q.shape[-1])) if need_w else None
    grad_b = flat.sum(0) if need_b and has_bias else None
    return grad_q, grad_w, grad_b


class _QuantLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, steps, probs, weight, bias, plan: tuple, op: tuple):
        ctx.save_for_backward(x, steps, probs, weight)
        ctx.plan, ctx.op, ctx.has_bias = plan, op, bias is not None
        return _layer(op, _quantize(plan, x, steps, probs), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, steps, probs, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if not needs[0] and ctx.plan[0] == "row" and ctx.op[0] == "conv" and steps.shape[1] == 1:
            return _input_free_backward(ctx, grad, x, steps, weight)
        with torch.no_grad():
            if _one_pass(ctx.plan, x):
                # The input's gradient first (it needs no quantized input); then one compiled pass over x makes the
                # quantizer's gradients and the quantized input the weight's gradient needs.
                grad_q = _layer_backward(ctx.op, grad, x, weight, ctx.has_bias, need_w=False, need_b=False)[0]
                q, grad_x, grad_steps, grad_probs = _requantizing_backward(ctx.plan, grad_q, x, steps, probs)
                del grad_q
                _, grad_w, grad_b = _layer_backward(ctx.op, grad, q, weight, ctx.has_bias, needs[3], needs[4],
                                                    need_q=False)
            else:  # eager ops, or a compiled model's graph (which fuses on its own): one product backward
                q = _quantize(ctx.plan, x, steps, probs)
                grad_q, grad_w, grad_b = _layer_backward(ctx.op, grad, q, weight, ctx.has_bias, needs[3], needs[4])
                grad_x, grad_steps, grad_probs = _quantize_backward(ctx.plan, grad_q, x, steps, probs)
        del q  # scratch memory: the next layer's backward reuses it
        return grad_x if needs[0] else None, grad_steps, grad_probs, grad_w, grad_b, None, None


def _input_free_backward(ctx, grad: Tensor, x: Tensor, steps: Tensor, weight: Tensor) -> tuple:
    """The backward of a convolution whose input needs no gradient (the network's input), only its quantizer's step.

    That gradient is sum(grad_q * e), e = dQ/ds elementwise; by the adjoint of the convolution it equals
    sum(grad * conv(e)): a forward convolution instead of the backward-data one that makes grad_q, which oneDNN
    runs 30x slower than the forward for a one-channel image.
    """
    needs, plan, op = ctx.needs_input_grad, ctx.plan, ctx.op
    with torch.no_grad():
        q = _quantize(plan, x, steps, None)
        _, grad_w, grad_b = _layer_backward(op, grad, q, weight, ctx.has_bias, needs[3], needs[4], need_q=False)
        grad_steps = None
        if needs[1]:
            factor = F.conv2d(row_step_factor(x, steps, *plan[1:5]), weight, None, *op[1:])
            grad_steps = torch.zeros_like(steps)
            grad_steps[plan[1]] = torch.dot(grad.reshape(-1), factor.reshape(-1)) * plan[5]
    return None, grad_steps, None, grad_w, grad_b, None, None


def quantized_layer(x: Tensor, steps: Tensor, probs: Tensor | None, plan: tuple, weight: Tensor,
                    bias: Tensor | None, op: tuple) -> Tensor:
    """``op`` of the input quantized by ``plan`` (the step table ``steps``, mixture weights ``probs``), with
    ``weight`` (already quantized) and ``bias``."""
    return _QuantLayerFunction.apply(x, steps, probs, weight, bias, plan, op)
