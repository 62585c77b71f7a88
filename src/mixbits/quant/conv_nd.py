"""Quantized convolutions beyond 2-D: `QConv1d`, `QConv3d`, `QConvTranspose1d` and `QConvTranspose2d`.

They follow `QConv2d` (layers.py): the float layer's subclass with the same arguments and parameter
names, a weight and an input quantizer, the ``QuantLayer`` interface, and at inference the integer form
(the product of the integer codes, one multiply by the steps, one bias add). They train through the
two-node composition (quantizer, then the convolution), not the fused autograd function QConv2d uses:
the fused one's memory saving matters for the image networks that dominate training time, and these
layers are rarer.

A transposed convolution keeps its weight as (in, out / groups, *kernel), so per-channel weight steps
lie along dimension 1 and need ``groups == 1`` to name one step per output channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MixbitsError
from .layers import QuantLayer
from .quantizer import LsqQuantizer


def _attach(layer: QuantLayer, w_bits: Sequence[int], a_bits: Sequence[int], per_channel: bool,
            channel_dim: int) -> None:
    channels = layer.weight.shape[channel_dim] if per_channel else 1
    layer.w_quant = LsqQuantizer(w_bits, signed=True, channels=channels, channel_dim=channel_dim)
    layer.w_quant.to(layer.weight.device)
    layer.a_quant = LsqQuantizer(a_bits, signed=None).to(layer.weight.device)
    layer._init_quant_state()


def _float_kwargs(conv: nn.modules.conv._ConvNd) -> dict:
    return {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
            "bias": conv.bias is not None, "padding_mode": conv.padding_mode, "device": conv.weight.device,
            "dtype": conv.weight.dtype}


class _QConvNd(QuantLayer):
    """What the quantized N-d convolutions share; ``_product(x, w)`` is the float layer's own convolution."""

    def __init__(self, *args, w_bits: Sequence[int] = (8,), a_bits: Sequence[int] = (8,), per_channel: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)  # the float layer's (QuantLayer defines none)
        self._setup(w_bits, a_bits, per_channel)

    def _setup(self, w_bits, a_bits, per_channel: bool) -> None:
        _attach(self, w_bits, a_bits, per_channel, channel_dim=0)

    @classmethod
    def from_float(cls, conv, w_bits, a_bits, per_channel: bool = False):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, w_bits=w_bits, a_bits=a_bits,
                per_channel=per_channel, **cls._extra_kwargs(conv), **_float_kwargs(conv))
        q.weight, q.bias = conv.weight, conv.bias  # share the float parameters: no copy, same state-dict keys
        q.train(conv.training)
        return q

    @staticmethod
    def _extra_kwargs(conv) -> dict:
        return {}

    def _channel_shape(self) -> tuple[int, ...]:
        return (-1, *[1] * len(self.kernel_size))

    def _product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        self._apply_sampler()
        if self._runs_integer_form():
            return self._integer_forward(x, lambda q, w: self._product(q, w, None), self._channel_shape())
        return self._product(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"


class QConv1d(_QConvNd, nn.Conv1d):
    """``nn.Conv1d`` with LSQ weight and input quantizers."""


class QConv3d(_QConvNd, nn.Conv3d):
    """``nn.Conv3d`` with LSQ weight and input quantizers."""


class _QConvTransposeNd(_QConvNd):
    def _setup(self, w_bits, a_bits, per_channel: bool) -> None:
        if per_channel and self.groups != 1:
            raise MixbitsError(f"per-channel steps of a transposed convolution need groups=1, got groups={self.groups};"
                               " quantize it per tensor (per_channel=False)")
        _attach(self, w_bits, a_bits, per_channel, channel_dim=1)

    @staticmethod
    def _extra_kwargs(conv) -> dict:
        return {"output_padding": conv.output_padding}

    def _product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        fn = F.conv_transpose1d if len(self.kernel_size) == 1 else F.conv_transpose2d
        return fn(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is not None:  # the float layer would pick another output padding: not exported that way
            raise MixbitsError(f"{type(self).__name__} is called with output_size={output_size}; set output_padding "
                               "on the layer instead, so that the quantized and exported layers compute the same")
        return super().forward(x)


class QConvTranspose1d(_QConvTransposeNd, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with LSQ weight and input quantizers."""


class QConvTranspose2d(_QConvTransposeNd, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with LSQ weight and input quantizers."""
