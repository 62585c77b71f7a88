"""Information distortion mitigation (seed 002, Eq. 8): align a layer's low-bit output with its high-bit output.

Paper form, per layer that ran at its smallest available weight bit-width, with O^S its output and O^H
the same layer's output under the largest policy of the same step:

    D = E_n[ ‖ max(Q, N(O^S_n)·η + ξ) − max(Q, N(O^H_n)) ‖₂ ] / sqrt(numel(O_n))

N normalises each channel by its batch mean and variance (√(σ² + 1e-5)), η and ξ are learnable per
channel (initialised to 1 and 0), Q is the floor (``idm_floor``, 0 by default: a ReLU-like rectifier).

Ours, where the paper is not explicit: the target O^H carries no gradient, so its own affine in Eq. 8
would never learn and is the identity here; the distance is divided by sqrt(elements per sample) so its
scale does not depend on the layer's size; the layer's own output (before any BatchNorm) is aligned: in
training mode a following BatchNorm normalises each channel just as N does, so nothing is lost.
``idm_form: mse`` is the released code's plain mean squared error between the raw outputs.

Speed: the paper form's forward and backward are written by hand and, where the quantizers' compiled kernels
are on (``set_fused``), run as compiled kernels too: a sandwich step aligns every searchable layer once, so
autograd through the expression cost as much as a fifth pass (benchmarks/experiments/idm_cost.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ...quant import QuantLayer, kernels
from ...quant.lsq import fused_applies, fused_unavailable

NORM_EPS = 1e-5


def _channel_dim(x: Tensor) -> int:
    """Dim 1 of a convolution's (N, C, H, W) output; the last dim of a linear layer's (N, ..., C) one."""
    return 1 if x.dim() == 4 else x.dim() - 1


def _channel_dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != _channel_dim(x)]


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    shape = [1] * x.dim()
    shape[_channel_dim(x)] = x.shape[_channel_dim(x)]
    return tuple(shape)


# The arithmetic, on a three-dimensional view of a layer's output: (N, C, S) for a convolution's, (N, S, C) for a
# linear layer's (``cdim`` names the channel dimension). Plain tensor functions, so the same code runs eager or as
# compiled kernels (quant/kernels.py): one pass for the statistics and one for the rest, where autograd through
# the eager expression makes about fifteen passes over every aligned output a step.
def _stat_dims(cdim: int) -> tuple[int, int]:
    return (0, 3 - cdim)


def _per_channel(v: Tensor, cdim: int) -> Tensor:
    return v.view(1, -1, 1) if cdim == 1 else v.view(1, 1, -1)


def _normalised(x: Tensor, cdim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(x - mean) / sqrt(var + eps) per channel, with the mean and 1/sqrt(var + eps)."""
    var, mean = torch.var_mean(x, dim=_stat_dims(cdim), correction=0, keepdim=True)
    rstd = torch.rsqrt(var + NORM_EPS)
    return (x - mean) * rstd, mean, rstd


def _target(high: Tensor, floor: Tensor, cdim: int) -> tuple[Tensor]:
    return (torch.clamp_min(_normalised(high, cdim)[0], floor),)


def _distance_forward(low: Tensor, target: Tensor, eta: Tensor, xi: Tensor, floor: Tensor,
                      cdim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample, the squared distance between max(Q, N(low)·η + ξ) and ``target``; the channels' mean and rstd."""
    normal, mean, rstd = _normalised(low, cdim)
    diff = torch.clamp_min(normal * _per_channel(eta, cdim) + _per_channel(xi, cdim), floor) - target
    return diff.square().sum(dim=(1, 2)), mean, rstd


def _distance_backward(coef: Tensor, low: Tensor, target: Tensor, eta: Tensor, xi: Tensor, floor: Tensor,
                       mean: Tensor, rstd: Tensor, cdim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients wrt (low, η, ξ) of Σ_n coef_n · ‖diff_n‖² / 2. Through N (batch statistics, biased variance) as
    a BatchNorm's backward: rstd·η·(g - mean(g) - n·mean(g·n)) for g the gradient wrt the affine's output."""
    normal = (low - mean) * rstd
    affine = normal * _per_channel(eta, cdim) + _per_channel(xi, cdim)
    grad = torch.where(affine >= floor, (torch.clamp_min(affine, floor) - target) * coef, 0.0)
    dims = _stat_dims(cdim)
    grad_xi = grad.sum(dim=dims, keepdim=True)
    grad_eta = (grad * normal).sum(dim=dims, keepdim=True)
    count = low.shape[0] * low.shape[3 - cdim]
    grad_low = (rstd * _per_channel(eta, cdim)) * (grad - grad_xi / count - normal * (grad_eta / count))
    return grad_low, grad_eta.reshape(-1), grad_xi.reshape(-1)


_KERNELS = {fn: {c: functools.partial(fn, cdim=c) for c in (1, 2)}
            for fn in (_target, _distance_forward, _distance_backward)}


def _view3(x: Tensor) -> tuple[Tensor, int]:
    """``x`` as (N, C, S) (a convolution's output) or (N, S, C) (a linear layer's), and which dim is C."""
    if x.dim() == 4:
        return x.reshape(x.shape[0], x.shape[1], -1), 1
    return x.reshape(x.shape[0], -1, x.shape[-1]), 2


def _example(fn, cdim: int, device: torch.device) -> tuple[Tensor, ...]:
    """Traced stand-ins for ``fn``'s arguments (distinct small sizes, so each stays its own symbol)."""
    n, c, s = 5, kernels.EXAMPLE_CHANNELS, kernels.EXAMPLE_SIZE
    x = torch.randn((n, c, s) if cdim == 1 else (n, s, c), device=device)
    floor = torch.tensor(0.0, device=device)
    if fn is _target:
        return x, floor
    eta, xi = torch.ones(c, device=device), torch.zeros(c, device=device)
    if fn is _distance_forward:
        return x, torch.randn_like(x), eta, xi, floor
    mean, rstd = (_per_channel(torch.rand(c, device=device), cdim) for _ in range(2))  # two tensors: one each
    return torch.rand(n, 1, 1, device=device), x, torch.randn_like(x), eta, xi, floor, mean, rstd


def _run(fn, cdim: int, *args: Tensor) -> tuple[Tensor, ...]:
    """``fn`` on ``args``: a compiled kernel when the quantizers' are on (``set_fused``), else eager ops."""
    x = args[1] if fn is _distance_backward else args[0]
    if fused_applies(x):
        try:
            kernel = kernels.compiled(_KERNELS[fn][cdim], (x.device,), lambda: _example(fn, cdim, x.device))
            return kernel(*args)
        except Exception as e:  # stay correct, just slower
            fused_unavailable("IDM", e)
    return _KERNELS[fn][cdim](*args)


def _floor(value: float, like: Tensor) -> Tensor:
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


class _Distance(torch.autograd.Function):
    """Eq. 8's distance with a hand-written backward; saves the output and the target, recomputes the rest."""

    @staticmethod
    def forward(ctx, low: Tensor, target: Tensor, eta: Tensor, xi: Tensor, floor: float) -> Tensor:
        low3, cdim = _view3(low.detach())
        floor_t = _floor(floor, low)
        squared, mean, rstd = _run(_distance_forward, cdim, low3, target.detach().reshape(low3.shape),
                                   eta.detach(), xi.detach(), floor_t)
        ctx.save_for_backward(low, target, eta, xi, squared, mean, rstd)
        ctx.floor = floor_t
        size = low3[0].numel()
        return squared.sqrt().sum() / (low3.shape[0] * size ** 0.5)

    @staticmethod
    def backward(ctx, grad: Tensor):
        low, target, eta, xi, squared, mean, rstd = ctx.saved_tensors
        low3, cdim = _view3(low.detach())
        norm = squared.sqrt()
        # d loss / d diff_n = diff_n / (N · sqrt(size) · ‖diff_n‖); 0 for a sample that already matches
        coef = torch.where(norm > 0, grad / (low3.shape[0] * low3[0].numel() ** 0.5 * norm.clamp_min(1e-30)), 0.0)
        grad_low, grad_eta, grad_xi = _run(_distance_backward, cdim, coef.view(-1, 1, 1), low3,
                                           target.detach().reshape(low3.shape), eta.detach(), xi.detach(),
                                           ctx.floor, mean, rstd)
        return grad_low.view(low.shape), None, grad_eta, grad_xi, None


@torch.no_grad()
def alignment_target(high: Tensor, floor: float = 0.0, form: str = "paper") -> Tensor:
    """What Eq. 8 compares a low-bit output with, from the high-bit output ``high``: max(Q, N(O^H)) (paper form),
    ``high`` itself (mse). It carries no gradient, so the aligned passes of a step share one, made once."""
    if form == "mse":
        return high.detach()
    high3, cdim = _view3(high.detach())
    return _run(_target, cdim, high3, _floor(floor, high))[0].view(high.shape)


def target_distance(low: Tensor, target: Tensor, eta: Tensor | None = None, xi: Tensor | None = None,
                    floor: float = 0.0, form: str = "paper") -> Tensor:
    """Eq. 8 distance between ``low`` (trained) and an ``alignment_target`` (no gradient reaches it)."""
    if form == "mse":
        return (low - target).square().mean()
    channels = low.shape[_channel_dim(low)]
    if eta is None:
        eta, xi = torch.ones(channels, device=low.device), torch.zeros(channels, device=low.device)
    return _Distance.apply(low, target, eta, xi, float(floor))


def alignment_loss(low: Tensor, high: Tensor, eta: Tensor | None = None, xi: Tensor | None = None,
                   floor: float = 0.0, form: str = "paper") -> Tensor:
    """Eq. 8 distance between ``low`` (trained) and ``high`` (the target: no gradient reaches it)."""
    return target_distance(low, alignment_target(high, floor, form), eta, xi, floor, form)


def alignment_loss_reference(low: Tensor, high: Tensor, eta: Tensor | None = None, xi: Tensor | None = None,
                             floor: float = 0.0) -> Tensor:
    """Eq. 8 (paper form) written out step by step: the specification ``alignment_loss`` is tested against."""
    def normalise(x: Tensor) -> Tensor:
        dims = _channel_dims(x)
        return (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, keepdim=True, unbiased=False) + NORM_EPS)

    student = normalise(low)
    if eta is not None:
        student = student * eta.view(_channel_shape(low)) + xi.view(_channel_shape(low))
    diff = (student.clamp_min(floor) - normalise(high.detach()).clamp_min(floor)).flatten(1)
    return (diff.norm(dim=1) / diff.shape[1] ** 0.5).mean()


class FeatureAlignment(nn.Module):
    """The learnable per-channel affine (η, ξ) of each searchable layer, and the loss over a pass."""

    def __init__(self, layers: Mapping[str, QuantLayer], floor: float = 0.0, form: str = "paper"):
        super().__init__()
        self.floor, self.form = floor, form
        self.index = {name: i for i, name in enumerate(layers)}
        channels = [getattr(m, "out_channels", None) or getattr(m, "out_features", None) or m.embedding_dim
                    for m in layers.values()]
        self.eta = nn.ParameterList([nn.Parameter(torch.ones(c)) for c in channels])
        self.xi = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in channels])

    def targets(self, high: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each layer's ``alignment_target`` from its high-bit output."""
        return {name: alignment_target(out, self.floor, self.form) for name, out in high.items()}

    def loss(self, low: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor | None:
        """Mean over the layers in ``low`` of their distance to ``targets`` (from :meth:`targets`); None when no
        layer ran at its lowest bits."""
        terms = []
        for name, out in low.items():
            i = self.index[name]
            terms.append(target_distance(out, targets[name], self.eta[i], self.xi[i], self.floor, self.form))
        return torch.stack(terms).mean() if terms else None


def _as_2d_conv(module: nn.Module, out: Tensor) -> Tensor:
    """A 1-D or 3-D convolution's (N, C, ...) output as (N, C, S, 1), the 4-D form whose dim 1 is the channels
    (a 3-D output otherwise reads as a linear layer's (N, tokens, C))."""
    if isinstance(module, nn.modules.conv._ConvNd) and out.dim() != 4:
        return out.reshape(out.shape[0], out.shape[1], -1, 1)
    return out


class OutputCapture:
    """Forward hooks that keep the outputs of the named layers while ``names`` is set (else nothing)."""

    def __init__(self, layers: Mapping[str, QuantLayer]):
        self.names: set[str] = set()
        self.outputs: dict[str, Tensor] = {}
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def keep(module, inputs, output):
            if name in self.names:
                self.outputs[name] = _as_2d_conv(module, output)

        return keep

    def start(self, names) -> None:
        self.names, self.outputs = set(names), {}

    def stop(self) -> dict[str, Tensor]:
        outputs, self.names, self.outputs = self.outputs, set(), {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
