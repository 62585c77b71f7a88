"""MSE-fitted quantization steps: per bit-width, the step that minimises the squared rounding error ||Q(x) − x||².

LSQ's initial step (2·mean|x|/sqrt(q_max)) is a starting point for training, not a fitted step: for Gaussian
weights its error is 1.5x (2 bits) to 6.5x (6 bits) the best step's, which flattens the difference between
bit-widths that a sensitivity measure (HAWQ) or an untrained score (random search) relies on. The step is
found on a grid of shares of the step that puts the largest |x| on the top level, then refined around the
best share. Large tensors are subsampled (every k-th element) to bound the cost.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..data.batches import call_model, first_input, one_batch, to_device
from ..errors import MixbitsError
from .convert import calibrate, require_quantized
from .quantizer import LsqQuantizer, integer_range

COARSE, FINE = 32, 16  # grid points of the two passes
MAX_ELEMENTS = 1 << 18  # per row (tensor or channel): more are subsampled


def _rows(x: Tensor, channel_dim: int | None) -> Tensor:
    """``x`` as (rows, elements): one row per channel along ``channel_dim``, or one row for the whole tensor."""
    x = x.detach().float()
    rows = x.reshape(1, -1) if channel_dim is None else x.transpose(0, channel_dim).reshape(x.shape[channel_dim], -1)
    stride = -(-rows.shape[1] // MAX_ELEMENTS)
    return rows[:, ::stride]


def _errors(rows: Tensor, steps: Tensor, qmin: int, qmax: int) -> Tensor:
    return (torch.clamp(torch.round(rows / steps), qmin, qmax) * steps - rows).square().sum(dim=1, keepdim=True)


def mse_steps(x: Tensor, bits: int, signed: bool, channel_dim: int | None = None) -> tuple[Tensor, Tensor]:
    """(steps, squared errors), one per row: per tensor, or per channel along ``channel_dim``; shape (rows,).

    The errors are sums over each row's elements (estimated from the subsample for large rows).
    """
    qmin, qmax = integer_range(bits, signed)
    rows = _rows(x, channel_dim)
    top = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / qmax  # the largest |x| on the top level
    best_share, best_err = torch.ones_like(top), _errors(rows, top, qmin, qmax)

    def consider(share: Tensor) -> None:
        nonlocal best_share, best_err
        err = _errors(rows, top * share, qmin, qmax)
        better = err < best_err
        best_err, best_share = torch.where(better, err, best_err), torch.where(better, share, best_share)

    for share in torch.linspace(1 / COARSE, 1, COARSE).tolist():
        consider(torch.full_like(top, share))
    coarse = best_share.clone()
    for offset in torch.linspace(-1 / COARSE, 1 / COARSE, FINE).tolist():
        consider((coarse + offset).clamp_min(1e-4))
    scale = x.numel() / rows.numel()  # the subsample's errors stand for the whole row
    return (top * best_share).squeeze(1), (best_err * scale).squeeze(1)


def quantization_error(x: Tensor, bits: int, signed: bool, channel_dim: int | None = None) -> float:
    """||Q_b(x) − x||² at the MSE-fitted step (per tensor, or per channel along ``channel_dim``)."""
    return float(mse_steps(x, bits, signed, channel_dim)[1].sum())


def fitted_error(quantizer: LsqQuantizer, x: Tensor, bits: int) -> float:
    """``quantization_error`` with ``quantizer``'s sign and granularity (per tensor or per channel)."""
    return quantization_error(x, bits, quantizer.signed, _channel_dim(quantizer))


def _channel_dim(quantizer: LsqQuantizer) -> int | None:
    return quantizer.channel_dim if quantizer.steps.shape[1] > 1 else None


@torch.no_grad()
def fit_quantizer(quantizer: LsqQuantizer, x: Tensor) -> None:
    """Set every candidate's step of ``quantizer`` to the MSE-fitted one for ``x`` (its sign already known)."""
    for i, bits in enumerate(quantizer.candidates):
        steps, _ = mse_steps(x, bits, quantizer.signed, _channel_dim(quantizer))
        quantizer.steps[i].copy_(steps.to(quantizer.steps))


class _Reached(Exception):
    """Stops a forward at the layer whose input was wanted."""


def _input_of(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """``layer``'s input when ``model`` runs on ``x`` (the forward stops there)."""
    captured: list[Tensor] = []

    def hook(module, args):
        captured.append(args[0].detach())
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    try:
        call_model(model, x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def fit_steps(model: nn.Module, batches: Tensor | Iterable) -> None:
    """Calibrate ``model`` on one batch (signs, LSQ steps), then fit every quantizer's steps by MSE.

    ``batches``: an input tensor, an (input, label) pair or a loader (its first batch). Weights are fitted
    to themselves; activations layer by layer, in the order the forward reaches them, to each layer's input
    on that batch with the model at its current bits and the earlier layers already fitted (their
    quantization shapes a later layer's input, as it will when deployed).
    """
    layers = require_quantized(model)
    x = first_input(batches)
    calibrate(model, one_batch(x))
    x = to_device(x, next(model.parameters()).device)
    order: list[str] = []
    handles = [layer.register_forward_pre_hook(lambda m, args, n=n: order.append(n)) for n, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        call_model(model, x)
        for handle in handles:
            handle.remove()
        for name in dict.fromkeys(order):
            layer = layers[name]
            fit_quantizer(layer.w_quant, layer.weight)
            if not layer.weight_only:  # an embedding's token ids are not quantized
                fit_quantizer(layer.a_quant, _input_of(model, layer, x))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


STEP_INITS = ("fitted", "lsq")


def initialize_steps(model: nn.Module, batches: Tensor | Iterable, init: str = "fitted") -> None:
    """Set ``model``'s quantizer steps before training: ``"fitted"`` (:func:`fit_steps`, where every search starts
    too) or ``"lsq"`` (LSQ's initial step, 2·mean|x|/sqrt(q_max), which clips heavy-tailed layers)."""
    if init == "fitted":
        fit_steps(model, batches)
    elif init == "lsq":
        calibrate(model, batches)  # it takes the first batch's inputs itself
    else:
        raise MixbitsError(f"init={init!r} is not a step initialisation; expected one of {', '.join(STEP_INITS)}")
