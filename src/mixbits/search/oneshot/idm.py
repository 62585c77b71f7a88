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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ...quant import QuantLayer

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


def _scale_and_shift(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel, (1/std, -mean/std): ``x * scale + shift`` normalises ``x``. Mean and variance in one pass."""
    var, mean = torch.var_mean(x, dim=_channel_dims(x), correction=0, keepdim=True)
    scale = torch.rsqrt(var + NORM_EPS)
    return scale, -mean * scale


def channel_normalise(x: Tensor) -> Tensor:
    """Per channel, zero mean and unit variance over every other dimension."""
    scale, shift = _scale_and_shift(x)
    return torch.addcmul(shift, x, scale)


@torch.no_grad()
def alignment_target(high: Tensor, floor: float = 0.0, form: str = "paper") -> Tensor:
    """What Eq. 8 compares a low-bit output with, from the high-bit output ``high``: max(Q, N(O^H)) (paper form),
    ``high`` itself (mse). It carries no gradient, so the aligned passes of a step share one, made once."""
    return high.detach() if form == "mse" else channel_normalise(high).clamp_min(floor)


def target_distance(low: Tensor, target: Tensor, eta: Tensor | None = None, xi: Tensor | None = None,
                    floor: float = 0.0, form: str = "paper") -> Tensor:
    """Eq. 8 distance between ``low`` (trained) and an ``alignment_target``.

    N(O^S)·η + ξ is one multiply-add per element with the per-channel scale η/σ and shift ξ - μη/σ, not
    a normalisation followed by the affine (five passes over the output, forward and backward alike).
    """
    if form == "mse":
        return (low - target).square().mean()
    scale, shift = _scale_and_shift(low)
    if eta is not None:
        scale = scale * eta.view(_channel_shape(low))
        shift = shift * eta.view(_channel_shape(low)) + xi.view(_channel_shape(low))
    per_sample = (torch.addcmul(shift, low, scale).clamp_min(floor) - target).flatten(1)
    return (torch.linalg.vector_norm(per_sample, dim=1) / per_sample.shape[1] ** 0.5).mean()


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
        channels = [getattr(m, "out_channels", None) or m.out_features for m in layers.values()]
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


class OutputCapture:
    """Forward hooks that keep the outputs of the named layers while ``names`` is set (else nothing)."""

    def __init__(self, layers: Mapping[str, QuantLayer]):
        self.names: set[str] = set()
        self.outputs: dict[str, Tensor] = {}
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def keep(module, inputs, output):
            if name in self.names:
                self.outputs[name] = output

        return keep

    def start(self, names) -> None:
        self.names, self.outputs = set(names), {}

    def stop(self) -> dict[str, Tensor]:
        outputs, self.names, self.outputs = self.outputs, set(), {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
