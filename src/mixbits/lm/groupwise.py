"""Group-wise asymmetric weight quantization: round-to-nearest, HQQ (half-quadratic) zero points, GPTQ.

A weight matrix (rows = outputs, columns = inputs; an embedding's rows = tokens) is cut along each row
into groups of ``group_size`` consecutive columns, the layout of onnxruntime's ``MatMulNBits`` blocks.
Each group stores ``bits``-bit codes ``q`` in 0..2^bits-1 and one scale ``s`` and zero point ``z``:
``w ≈ (q - z) · s``. Scales are kept at 16-bit float precision (rounded through float16 here, so what
is measured is what would be stored); the zero point is a 16-bit float, or an integer code of ``bits``
bits with ``integer_zero=True`` (see ``mixbits.lm.bpw`` for the count).

HQQ (Badri & Shaji, 2023) keeps RTN's scale and moves the zero point to minimise the ``lp`` norm (p < 1)
of the weight error by half-quadratic splitting: alternately shrink the error (a generalised soft
threshold) and solve for the zero point in closed form (a mean), with the penalty ``beta`` growing.
The math is a few lines and written here: the hqq package (0.2.8) ships only a source archive whose
install runs a CUDA build and requires transformers and accelerate; torchao's (0.18) weight-only int-x
path runs on CPU but its HQQ variant is scale-only and its import reports two CUDA extensions it cannot
load. GPTQ (``mixbits.lm.gptq``) uses calibration inputs. Everything here is deterministic CPU arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MixbitsError

BITS = (2, 3, 4, 8)
QUANTIZERS = ("rtn", "hqq", "gptq")


@dataclass(frozen=True)
class GroupFormat:
    """How quantized weights are stored: codes of each layer's bits, per-group scale and zero point."""

    group_size: int = 64
    scale_bits: int = 16
    integer_zero: bool = False  # False: a 16-bit float zero (HQQ needs it); True: a code of the weight's bits

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or not 8 <= self.group_size:
            raise MixbitsError(f"group_size must be a whole number >= 8 (32..128 is usual), got {self.group_size!r}")

    def zero_bits(self, bits: int) -> int:
        return bits if self.integer_zero else 16


@dataclass
class QuantizedWeight:
    """Codes (uint8, one per weight, groups padded at the row's end) and per-group scale and zero."""

    codes: torch.Tensor  # (rows, groups, group_size) uint8
    scale: torch.Tensor  # (rows, groups, 1) float16
    zero: torch.Tensor  # (rows, groups, 1) float16 (integral values with integer_zero)
    bits: int
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        w = (self.codes.float() - self.zero.float()) * self.scale.float()
        return w.reshape(self.shape[0], -1)[:, :self.shape[1]]


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise MixbitsError(f"weight bits must be one of {BITS}, got {bits!r}; pick from those")
    return bits


def quantize(weight: torch.Tensor, bits: int, fmt: GroupFormat = GroupFormat(), method: str = "rtn",
             hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a 2-D ``weight`` group-wise with ``method``: 'rtn', 'hqq', or 'gptq' (which needs the layer's
    input ``hessian``, Σ xᵀx over calibration tokens; without one, as for an embedding, it is RTN)."""
    check_bits(bits)
    if method not in QUANTIZERS:
        raise MixbitsError(f"quantizer {method!r} unknown; use one of {QUANTIZERS}")
    if weight.dim() != 2:
        raise MixbitsError(f"expected a 2-D weight (rows, columns), got shape {tuple(weight.shape)}")
    if method == "gptq" and hessian is not None:
        from .gptq import gptq_quantize  # here: gptq builds on this module's group parameters

        return gptq_quantize(weight, bits, fmt, hessian)
    groups = _grouped(weight.detach().float(), fmt.group_size)
    scale, zero = group_params(groups, bits, fmt, "hqq" if method == "hqq" else "rtn")
    codes = encode(groups, scale, zero, bits)
    return QuantizedWeight(codes, scale.half(), zero.half(), bits, tuple(weight.shape))


def group_params(groups: torch.Tensor, bits: int, fmt: GroupFormat, method: str = "rtn",
                 iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's scale and zero point (rows, groups, 1), already rounded to what is stored."""
    top = 2**bits - 1
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = _half((high - low).clamp_min(1e-8) / top)
    zero = -low / scale
    if method == "hqq":
        zero = _hqq_zero(groups, scale, zero, top, iters)
    return scale, (zero.round().clamp(0, top) if fmt.integer_zero else _half(zero))


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (w / scale + zero).round().clamp(0, 2**bits - 1).to(torch.uint8)


def _grouped(w: torch.Tensor, size: int) -> torch.Tensor:
    """(rows, groups, size); a short last group is padded with the row's last value (no effect on min/max)."""
    pad = (-w.shape[1]) % size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    return w.reshape(w.shape[0], -1, size)


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _hqq_zero(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, top: int, iters: int,
              p: float = 0.7, beta: float = 10.0, kappa: float = 1.01) -> torch.Tensor:
    """The zero point minimising Σ|w - (q - z)·s|^p (scale fixed), by half-quadratic splitting."""
    best, best_err = zero, None
    for _ in range(iters):
        q = (w / scale + zero).round().clamp(0, top)
        err = w - (q - zero) * scale
        total = err.abs().pow(p).sum(-1, keepdim=True)  # keep the best zero of each group, not the last
        if best_err is None:
            best, best_err = zero, total
        else:
            better = total < best_err
            best, best_err = torch.where(better, zero, best), torch.where(better, total, best_err)
        shrunk = torch.sign(err) * torch.relu(err.abs() - err.abs().clamp_min(1e-12).pow(p - 1) / beta)
        zero = (q - (w - shrunk) / scale).mean(-1, keepdim=True)
        beta *= kappa
    return best
