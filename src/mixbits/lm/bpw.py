"""Bits per weight, counting what a group-wise format stores: codes, scales and zero points.

A layer with an (rows × columns) weight at ``b`` bits in groups of ``g`` columns stores
``rows·columns·b`` code bits plus, for each of the ``rows·ceil(columns/g)`` groups, one scale
(``scale_bits``, 16) and one zero point (16 bits as a float, or ``b`` bits as an integer code). So 4-bit
codes in groups of 64 with float16 scale and zero are 4 + 32/64 = 4.5 bits per weight, and 4.3125
with 4-bit integer zeros. Bits per weight of a model are over the weights of the quantized layers only
(biases, norms and layers left in float are not counted), as llama.cpp and exllamav2 report it.
Budgets: ``bpw<=3.5`` or a size over the same layers, ``size<=1.2MB`` (units as in ``mixbits.budget``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import MixbitsError
from .groupwise import GroupFormat

_BPW = re.compile(r"\s*bpw\s*<=\s*([0-9]*\.?[0-9]+)\s*$", re.IGNORECASE)


def layer_bits(shape: tuple[int, int], bits: int, fmt: GroupFormat) -> int:
    """Stored bits of one layer's weight: codes + per-group scale and zero point."""
    rows, cols = shape
    groups = rows * math.ceil(cols / fmt.group_size)
    return rows * cols * bits + groups * (fmt.scale_bits + fmt.zero_bits(bits))


def model_bpw(shapes: dict[str, tuple[int, int]], bits: dict[str, int], fmt: GroupFormat) -> float:
    stored = sum(layer_bits(shapes[n], bits[n], fmt) for n in shapes)
    return stored / sum(r * c for r, c in shapes.values())


@dataclass(frozen=True)
class WeightBudget:
    """A cap on the quantized layers' stored bits, written as bits per weight or as a size."""

    text: str
    bpw: float | None = None
    size_bits: float | None = None

    def limit_bits(self, shapes: dict[str, tuple[int, int]]) -> float:
        if self.bpw is not None:
            return self.bpw * sum(r * c for r, c in shapes.values())
        return self.size_bits


def parse_weight_budget(text: str) -> WeightBudget:
    """``bpw<=3.5`` or ``size<=1.2MB`` (the size of the quantized layers' codes, scales and zeros)."""
    if not isinstance(text, str):
        raise MixbitsError(f"budget must be a string such as 'bpw<=3.5' or 'size<=1.2MB', got {text!r}")
    m = _BPW.match(text)
    if m:
        value = float(m.group(1))
        if not 1 <= value <= 32:
            raise MixbitsError(f"budget {text!r}: bits per weight must be between 1 and 32, got {value:g}; "
                               "write e.g. 'bpw<=3.5'")
        return WeightBudget(text.strip(), bpw=value)
    if text.strip().lower().startswith("size"):
        from ..budget import parse_budget

        cap = parse_budget(text).caps[0]
        if cap.uniform is not None:
            raise MixbitsError(f"budget {text!r}: a uniform reference is not a weight-only size; "
                               "write 'bpw<=4.5' or an absolute size such as 'size<=1.2MB'")
        return WeightBudget(text.strip(), size_bits=cap.value)
    raise MixbitsError(f"budget {text!r} is not understood; weight-only quantization takes 'bpw<=<bits per weight>' "
                       "(scales and zero points counted) or 'size<=<size><unit>', e.g. 'bpw<=3.5' or 'size<=1.2MB'")
