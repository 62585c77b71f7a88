"""`LsqQuantizer`: one tensor's fake-quantizer, with one learnable step size per candidate bit-width.

The current bit-width is runtime state (``quantizer.bits``), so a single latent tensor can run at any
candidate (weight sharing), and ``mix`` returns a probability-weighted sum over candidates
(differentiable search). Each bit-width keeps its own step (seed 002 and EdMIPS), so training one
bit-width never disturbs another's scale.

A step must stay positive, and LSQ's gradient alone does not keep it so: a layer whose input the loss would
rather silence (a tiny fitted step, a large learning rate) is driven through zero in one epoch, and a negative
step flips the sign of every code, which onnxruntime's optimiser does not expect (it folds a Relu before the
QuantizeLinear as if the scale were positive). So every use of a step goes through :meth:`LsqQuantizer.table`,
which floors the learned value at ``STEP_FLOOR`` in the forward and passes the gradient through unchanged
(straight through), as if the floor were not there: the parameter may sit below the floor for a while, and the
first gradient that asks for a larger step brings it back, where a plain clamp (zero gradient below the floor)
would hold it at the floor for good. At the floor the layer quantizes every input to a clip bound times
``STEP_FLOOR``: practically a constant, which is what the loss was asking for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import MixbitsError
from .lsq import lsq_quantize_row, row_codes
from .lsq_mix import lsq_mix

_UNKNOWN, _UNSIGNED, _SIGNED = -1, 0, 1
STEP_FLOOR = 1e-8  # the smallest step a quantizer uses (and initialises to): positive, far below any data's scale


class _FloorStep(torch.autograd.Function):
    """``steps`` floored at STEP_FLOOR, with the gradient passed through as it comes (see the module doc)."""

    @staticmethod
    def forward(ctx, steps: Tensor) -> Tensor:
        return steps.clamp_min(STEP_FLOOR)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer levels of a b-bit code: [-2^(b-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class LsqQuantizer(nn.Module):
    """Fake-quantizer over ``candidates`` bit-widths.

    Args:
        candidates: the bit-widths this tensor may run at.
        signed: True for weights; None lets the first data seen decide (activations after a ReLU
            are unsigned, others signed).
        channels: >1 for per-channel steps along ``channel_dim`` (weights: output channels).
    Every candidate's step is initialised from the first data seen (LSQ: 2·mean|x|/sqrt(q_max)), or
    again from the next input after ``init_all_next`` is set (``calibrate``); the ``initialized``
    buffer makes this survive checkpoints.
    """

    def __init__(self, candidates: Sequence[int], signed: bool | None = None, channels: int = 1, channel_dim: int = 0):
        super().__init__()
        self.candidates = tuple(sorted({int(b) for b in candidates}))
        if not self.candidates or min(self.candidates) < 2 or max(self.candidates) > 8:
            raise MixbitsError(f"quantizer bit-widths must be in 2..8, got {list(candidates)}")
        self.channel_dim = channel_dim
        self.steps = nn.Parameter(torch.ones(len(self.candidates), channels))
        self.register_buffer("initialized", torch.zeros(len(self.candidates), dtype=torch.bool))
        self.register_buffer("sign_mode", torch.tensor(_UNKNOWN if signed is None else int(signed), dtype=torch.int8))
        self.bits: int = self.candidates[-1]
        self.init_all_next = False  # set by calibrate(): initialise every candidate from the next input
        # Python mirrors of the buffers, so the forward needs no tensor-to-Python sync per call;
        # refreshed after every state-dict load.
        self._ready = False
        self._signed: bool | None = signed
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_cache())

    def _refresh_cache(self) -> None:
        self._ready = bool(self.initialized.all())
        mode = int(self.sign_mode)
        self._signed = None if mode == _UNKNOWN else bool(mode)

    # bit-widths --------------------------------------------------------------------------------
    def index(self, bits: int) -> int:
        try:
            return self.candidates.index(int(bits))
        except ValueError:
            raise MixbitsError(f"bit-width {bits} is not a candidate of this quantizer; expected one of "
                               f"{list(self.candidates)}") from None

    @property
    def signed(self) -> bool:
        if self._signed is None:
            raise MixbitsError("quantizer sign is unknown until it has seen data; run calibrate(model, batch) first")
        return self._signed

    def table(self) -> Tensor:
        """The (candidates x channels) steps the quantizer uses: the learned ``steps`` floored at STEP_FLOOR."""
        return _FloorStep.apply(self.steps)

    def step(self, bits: int, ndim: int) -> Tensor:
        """The step of ``bits`` shaped to broadcast against a tensor of ``ndim`` dimensions."""
        return self.table()[self.index(bits)].view(self._step_shape(ndim))

    def _step_shape(self, ndim: int) -> tuple[int, ...]:
        channels = self.steps.shape[1]
        if channels == 1:
            return (1,)
        shape = [1] * ndim
        shape[self.channel_dim] = channels
        return tuple(shape)

    # initialisation ------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_steps(self, x: Tensor, indices: Sequence[int]) -> None:
        if int(self.sign_mode) == _UNKNOWN:
            self.sign_mode.fill_(_SIGNED if bool((x < 0).any()) else _UNSIGNED)
        mean_abs = self._mean_abs(x)
        for i in indices:
            _, qmax = integer_range(self.candidates[i], bool(int(self.sign_mode)))
            self.steps[i].copy_((2 * mean_abs / math.sqrt(qmax)).clamp_min(STEP_FLOOR))
            self.initialized[i] = True
        self._refresh_cache()

    def _mean_abs(self, x: Tensor) -> Tensor:
        if self.steps.shape[1] == 1:
            return x.detach().abs().mean().reshape(1)
        dims = [d for d in range(x.dim()) if d != self.channel_dim]
        return x.detach().abs().mean(dim=dims)

    # forward ----------------------------------------------------------------------------------------
    def _ensure_init(self, x: Tensor) -> None:
        if self.init_all_next:
            self._init_steps(x, range(len(self.candidates)))
            self.init_all_next = False
        elif not self._ready:
            # All at once: changing the steps in place later would break graphs already using them.
            self._init_steps(x, [i for i, done in enumerate(self.initialized.tolist()) if not done])

    def _grad_scale(self, x: Tensor, qmax: int) -> float:
        return 1.0 / math.sqrt(x.numel() // self.steps.shape[1] * qmax)

    def row_plan(self, x: Tensor, bits: int) -> tuple:
        """How ``x`` is quantized at ``bits``, for ``fused_layer``: ("row", row, shape, qmin, qmax, grad_scale)."""
        row = self.index(bits)
        self._ensure_init(x)
        qmin, qmax = integer_range(bits, self.signed)
        return "row", row, self._step_shape(x.dim()), float(qmin), float(qmax), self._grad_scale(x, qmax)

    def quantize(self, x: Tensor, bits: int) -> Tensor:
        plan = self.row_plan(x, bits)  # first: it initialises the steps on the first data seen
        return lsq_quantize_row(x, self.table(), *plan[1:])

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(x, self.bits)

    def mix_plan(self, x: Tensor, probs: Tensor, bits: Sequence[int] | None = None) -> tuple[Tensor, tuple]:
        """(the step rows taking part, ("mix", shape, bounds, grad_scales)): how ``mix`` quantizes ``x``."""
        bits = self.candidates if bits is None else tuple(bits)
        if probs.shape != (len(bits),):
            raise MixbitsError(f"mixture weights must have shape ({len(bits)},) for bit-widths {list(bits)}, "
                               f"got {tuple(probs.shape)}")
        rows = [self.index(b) for b in bits]
        self._ensure_init(x)
        bounds = [integer_range(b, self.signed) for b in bits]
        table = self.table()
        steps = table if rows == list(range(len(self.candidates))) else table[rows]
        return steps, ("mix", self._step_shape(x.dim()), tuple((float(lo), float(hi)) for lo, hi in bounds),
                       tuple(self._grad_scale(x, qmax) for _, qmax in bounds))

    def mix(self, x: Tensor, probs: Tensor, bits: Sequence[int] | None = None) -> Tensor:
        """Σ_i probs[i] · Q_{bits[i]}(x) (probs may carry grad); ``bits`` defaults to every candidate. Naming
        only the candidates with weight (SDQ's two adjacent ones) skips the passes of the others."""
        steps, plan = self.mix_plan(x, probs, bits)
        return lsq_mix(x, steps, probs, *plan[1:])

    @torch.no_grad()
    def codes(self, x: Tensor, bits: int | None = None, transient: bool = False) -> tuple[Tensor, Tensor]:
        """(the integer codes of ``x`` at ``bits``, in ``x``'s float dtype; the step shaped for ``x``): the
        operands of a layer's integer form. ``transient``: dropped before the next transient call (lsq.py)."""
        bits = self.bits if bits is None else bits
        _, row, shape, qmin, qmax, _ = self.row_plan(x, bits)
        table = self.table()
        return row_codes(x, table, row, shape, qmin, qmax, transient), table[row].view(shape)

    def integers(self, x: Tensor, bits: int | None = None) -> tuple[Tensor, Tensor]:
        """(integer codes as int32, step) of ``x`` at ``bits``: what an exporter stores."""
        codes, step = self.codes(x, bits)
        return codes.to(torch.int32), step.detach().clone()

    def extra_repr(self) -> str:
        sign = {_UNKNOWN: "?", _UNSIGNED: "unsigned", _SIGNED: "signed"}[int(self.sign_mode)]
        per = "per-channel" if self.steps.shape[1] > 1 else "per-tensor"
        return f"bits={self.bits}, candidates={list(self.candidates)}, {sign}, {per}"
