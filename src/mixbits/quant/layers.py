"""Drop-in quantized layers: `QConv2d` and `QLinear` (conv_nd.py and embedding.py hold the others).

Each subclasses its float layer (same arguments, same ``weight``/``bias`` names, so float checkpoints
load unchanged) and *holds* two quantizers: ``w_quant`` for the weight and ``a_quant`` for the input
activation. Search methods drive a layer through four calls and never touch its internals:

- ``set_bits(w, a)``: run at fixed bits (QAT, one-shot sampling, evaluation of a policy);
- ``set_sampler(fn)``: ``fn() -> (w, a)`` is asked at every forward (per-call stochastic bits);
- ``set_mixture(w_probs, a_probs)``: the composite convolution of differentiable search: the
  probability-weighted sum of the quantized weights convolved once with the probability-weighted
  sum of the quantized inputs (EdMIPS). Because convolution is bilinear this equals the sum over all
  (w, a) candidate branches weighted by p_w·p_a, at the cost of one convolution; ``w_bits``/``a_bits``
  name the bit-widths the weights belong to when only some candidates take part (SDQ's adjacent pair);
- ``bits``: the fixed bits currently set.

``set_candidate_weights(list)`` gives each weight candidate its own latent weight (DNAS with separate
edges): every mode then quantizes candidate *b*'s weight at *b* bits, and the mixture stays one
convolution (Σ_b p_b·Q_b(W_b) is still one tensor).

At fixed bits, inference (eval mode, no autograd) runs the *integer form*: the product of the integer
codes, then one multiply by the steps and one bias add (``_integer_forward``), the same function as
the fake-quant forward, exact where that one rounds, and what the exported ONNX graph computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MixbitsError
from .fused_layer import quantized_layer
from .quantizer import LsqQuantizer

BitsSampler = Callable[[], tuple[int, int]]


class QuantLayer:
    """The interface shared by the quantized layers (mixed into QConv2d and QLinear)."""

    w_quant: LsqQuantizer
    a_quant: LsqQuantizer
    weight_only = False  # True where the input is not an activation (an embedding's token ids): a_quant never runs

    def _init_quant_state(self) -> None:
        self._sampler: BitsSampler | None = None
        self._w_probs: Tensor | None = None
        self._a_probs: Tensor | None = None
        self._mix_bits: tuple[Sequence[int] | None, Sequence[int] | None] = (None, None)

    @property
    def bits(self) -> tuple[int, int]:
        return self.w_quant.bits, self.a_quant.bits

    @property
    def candidates(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.w_quant.candidates, self.a_quant.candidates

    def set_bits(self, w: int, a: int) -> None:
        """Fixed bit-widths from now on; clears any sampler or mixture."""
        self.w_quant.index(w), self.a_quant.index(a)  # validate both before changing anything
        self.w_quant.bits, self.a_quant.bits = int(w), int(a)
        self._init_quant_state()

    def set_sampler(self, sampler: BitsSampler | None) -> None:
        """Ask ``sampler()`` for (w, a) at every forward; None returns to the fixed bits."""
        self._init_quant_state()
        self._sampler = sampler

    def set_mixture(self, w_probs: Tensor | None, a_probs: Tensor | None, w_bits: Sequence[int] | None = None,
                    a_bits: Sequence[int] | None = None) -> None:
        """Mix candidates with these weights (may carry grad): one per candidate, or one per bit-width of
        ``w_bits``/``a_bits`` when given; None = the fixed bits."""
        self._init_quant_state()
        self._w_probs, self._a_probs = w_probs, a_probs
        self._mix_bits = (w_bits, a_bits)

    @property
    def mode(self) -> str:
        if self._sampler is not None:
            return "sampled"
        return "mixture" if self._w_probs is not None or self._a_probs is not None else "fixed"

    def set_candidate_weights(self, weights: nn.ParameterList | None) -> None:
        """One latent weight per weight candidate, in candidate order, from now on; None: the shared ``weight``.
        They are a submodule (``candidate_weights``), so optimisers and checkpoints see them."""
        if weights is not None and (len(weights) != len(self.w_quant.candidates)
                                    or any(w.shape != self.weight.shape for w in weights)):
            raise MixbitsError(f"candidate weights must be {len(self.w_quant.candidates)} tensors of shape "
                               f"{tuple(self.weight.shape)} (one per candidate {list(self.w_quant.candidates)})")
        self.candidate_weights = weights

    def latent_weight(self) -> Tensor:
        """The float weight quantized at the fixed bits: ``weight``, or that bit-width's own candidate weight."""
        separate = getattr(self, "candidate_weights", None)
        return self.weight if separate is None else separate[self.w_quant.index(self.w_quant.bits)]

    def quantized_weight(self) -> Tensor:
        separate = getattr(self, "candidate_weights", None)
        if separate is not None and self._w_probs is not None:
            bits = self._mix_bits[0] or self.w_quant.candidates
            return sum(p * self.w_quant.quantize(separate[self.w_quant.index(b)], b)
                       for p, b in zip(self._w_probs, bits, strict=True))
        if self._w_probs is not None:
            return self.w_quant.mix(self.weight, self._w_probs, self._mix_bits[0])
        return self.w_quant(self.latent_weight())

    def quantized_input(self, x: Tensor) -> Tensor:
        if self._a_probs is not None:
            return self.a_quant.mix(x, self._a_probs, self._mix_bits[1])
        return self.a_quant(x)

    def _quantized_op(self, x: Tensor, op: tuple) -> Tensor:
        """``op`` (see fused_layer) of the quantized input and weight, as one autograd node for the input side."""
        if self._a_probs is not None:
            steps, plan = self.a_quant.mix_plan(x, self._a_probs, self._mix_bits[1])
            probs = self._a_probs
        else:
            plan = self.a_quant.row_plan(x, self.a_quant.bits)  # first: it initialises the steps on first use
            steps, probs = self.a_quant.table(), None
        return quantized_layer(x, steps, probs, plan, self.quantized_weight(), self.bias, op)

    def _runs_integer_form(self) -> bool:
        """Inference (eval mode, no autograd) at fixed bits runs the integer form (``_integer_forward``)."""
        return not self.training and not torch.is_grad_enabled() and self.mode == "fixed"

    def _integer_forward(self, x: Tensor, product: Callable[[Tensor, Tensor], Tensor], channel_shape) -> Tensor:
        """The layer as deployed: ``product`` of the integer codes of input and weight, one multiply by the
        two steps' product, one bias add. The same function as the fake-quant forward, but exact where that
        one rounds: integer codes multiply and sum without rounding in float32 (while every partial sum
        stays below 2^24, far above what 2-8 bit codes reach in common layers), so the result does not
        depend on summation order, and the exported graph repeats the two roundings after it, so onnxruntime
        and PyTorch agree to the bit (export/qdq.py)."""
        w_bits, a_bits = self.bits
        x_codes, x_step = self.a_quant.codes(x, a_bits, transient=True)  # dropped once the product is made
        w_codes, w_step = self.w_quant.codes(self.latent_weight(), w_bits)
        y = product(x_codes, w_codes)
        y.mul_((x_step.reshape(-1) * w_step.reshape(-1)).view(channel_shape))
        return y if self.bias is None else y.add_(self.bias.view(channel_shape))

    def _apply_sampler(self) -> None:
        if self._sampler is not None:
            w, a = self._sampler()
            self.w_quant.bits, self.a_quant.bits = int(w), int(a)

    def quant_repr(self) -> str:
        return f"w_bits={self.w_quant.bits}, a_bits={self.a_quant.bits}, mode={self.mode}"


def _attach_quantizers(layer: QuantLayer, w_bits: Sequence[int], a_bits: Sequence[int], per_channel: bool) -> None:
    """Give a freshly built float layer its weight and input quantizers, on the weight's device."""
    channels = layer.weight.shape[0] if per_channel else 1
    layer.w_quant = LsqQuantizer(w_bits, signed=True, channels=channels).to(layer.weight.device)
    layer.a_quant = LsqQuantizer(a_bits, signed=None).to(layer.weight.device)
    layer._init_quant_state()


class QConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with LSQ weight and input quantizers (grouped and depthwise convs included)."""

    def __init__(self, *args, w_bits: Sequence[int] = (8,), a_bits: Sequence[int] = (8,), per_channel: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        _attach_quantizers(self, w_bits, a_bits, per_channel)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits, a_bits, per_channel: bool = False) -> QConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype, w_bits=w_bits, a_bits=a_bits,
                per_channel=per_channel)
        q.weight, q.bias = conv.weight, conv.bias  # share the float parameters: no copy, same state-dict keys
        q.train(conv.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        self._apply_sampler()
        if self._runs_integer_form():
            return self._integer_forward(x, lambda q, w: self._conv_forward(q, w, None), (-1, 1, 1))
        if self.padding_mode != "zeros" or isinstance(self.padding, str):  # padded inside F.conv2d's caller
            return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)
        return self._quantized_op(x, ("conv", self.stride, self.padding, self.dilation, self.groups))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"


class QLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with LSQ weight and input quantizers."""

    def __init__(self, *args, w_bits: Sequence[int] = (8,), a_bits: Sequence[int] = (8,), per_channel: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        _attach_quantizers(self, w_bits, a_bits, per_channel)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits, a_bits, per_channel: bool = False) -> QLinear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device,
                dtype=linear.weight.dtype, w_bits=w_bits, a_bits=a_bits, per_channel=per_channel)
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        self._apply_sampler()
        if self._runs_integer_form():
            return self._integer_forward(x, F.linear, (-1,))
        return self._quantized_op(x, ("linear",))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"
