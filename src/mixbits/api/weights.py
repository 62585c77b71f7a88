"""``mixbits.quantize_weights``: weight-only post-training quantization of a causal LM under a bits-per-weight
budget, each layer at its own bits.

A sibling of :func:`mixbits.search` rather than one of its methods: ``search`` chooses weight *and* activation
bits for layers with trained (LSQ) quantizers under BitOPs/size/latency; here only weights are quantized, after
training, in groups with stored scales and zero points, and the budget counts those (``bpw<=3.5``). What the
two share is the integer program (``mixbits.search.ilp``) and the size units of ``mixbits.budget``.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import MixbitsError, did_you_mean
from ..lm.allocate import ALLOCATORS, allocate
from ..lm.bpw import layer_bits, parse_weight_budget
from ..lm.gptq import input_hessians
from ..lm.groupwise import BITS, QUANTIZERS, GroupFormat, QuantizedWeight, check_bits, quantize
from ..lm.measure import SCORES, measure
from ..lm.targets import quantizable, resolve_overrides
from .arguments import check_int, check_model, check_path


@dataclass
class WeightQuantResult:
    """What :func:`quantize_weights` chose and measured. ``model`` is a copy whose quantized layers hold their
    dequantized weights (it runs anywhere torch does); ``packed`` holds the codes, scales and zero points."""

    model: nn.Module
    bits: dict[str, int]  # layer -> bits (layers kept in float by an override are absent)
    bpw: float  # stored bits (codes, scales, zeros) / weights, over the quantized layers
    size_bytes: float
    budget: str
    method: str
    quantizer: str
    errors: dict[str, dict[int, float]] = field(default_factory=dict)  # measured score per searched layer and bits
    predicted_error: float | None = None  # summed score of the searched layers at their bits (None: uniform, random)
    measurement_key: str | None = None
    measure_seconds: float = 0.0
    solve_seconds: float = 0.0
    packed: dict[str, QuantizedWeight] = field(default_factory=dict, repr=False)


def quantize_weights(model: nn.Module, batches: Iterable, budget: str, method: str = "ilp", *,
                     quantizer: str = "gptq", bits: tuple[int, ...] = (2, 3, 4, 8), group_size: int = 64,
                     integer_zero: bool = False, score: str = "kl", overrides: dict | None = None,
                     head: bool = False, embeddings: bool = False, cache_dir: str | os.PathLike | None = None,
                     seed: int = 0) -> WeightQuantResult:
    """Quantize the weights of ``model``'s linear layers group-wise, each layer at the bits ``method`` chooses.

    ``model``: a causal LM called as ``model(input_ids)``, returning logits or an output with ``.logits`` (a
    Hugging Face causal LM, or any module with that convention). ``batches``: calibration token ids, each a
    LongTensor (batch, tokens) or a dict with ``input_ids``. ``budget``: ``"bpw<=3.5"`` (bits per weight of the
    quantized layers, scales and zero points counted; see ``mixbits.lm.bpw``) or ``"size<=1.2MB"``.
    ``method``: ``ilp`` (exact: least summed measured error), ``greedy``, ``uniform`` (one bit-width for all) or
    ``random`` (a seeded baseline). ``quantizer``: ``gptq`` (uses the calibration inputs; embeddings fall back to
    RTN), ``hqq`` or ``rtn`` (no data). ``score``: ``kl`` (each layer's effect on
    the next-token distribution) or ``output`` (its own output error); see ``mixbits.lm.measure``.
    ``overrides``: ``{layer name or regex: bits, or None to keep it in float}``. ``head``/``embeddings``: also
    quantize the output head / nn.Embedding layers. ``cache_dir``: where the measurement is saved and reused.
    The same arguments give the same model bit for bit; ``seed`` only drives ``method='random'``.
    """
    check_model(model)
    _check_choice(method, ALLOCATORS, "method")
    _check_choice(quantizer, QUANTIZERS, "quantizer")
    _check_choice(score, SCORES, "score")
    check_int(seed, "seed")
    check_path(cache_dir, "cache_dir")
    bits = _check_bits(bits)
    fmt = GroupFormat(group_size=group_size, integer_zero=integer_zero)
    weight_budget = parse_weight_budget(budget)
    ids = _token_batches(batches)
    work = copy.deepcopy(model).eval()
    layers = quantizable(work, head=head, embeddings=embeddings)
    fixed = resolve_overrides(overrides, list(layers))
    layers = {n: m for n, m in layers.items() if not (n in fixed and fixed[n] is None)}
    fixed = {n: b for n, b in fixed.items() if b is not None}
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    costs = {n: {b: layer_bits(shapes[n], b, fmt) for b in sorted({*bits, *([fixed[n]] if n in fixed else [])})}
             for n in layers}
    hessians = input_hessians(work, layers, ids) if quantizer == "gptq" else {}
    measured = None
    if method in ("ilp", "greedy"):
        searched = {n: m for n, m in layers.items() if n not in fixed}
        measured = measure(work, searched, ids, bits, fmt, quantizer, score, cache_dir, hessians)
    errors = dict(measured.errors) if measured else {}
    start = time.perf_counter()
    chosen = allocate(method, errors, costs, weight_budget.limit_bits(shapes), fixed, seed)
    solve_seconds = time.perf_counter() - start
    packed = _apply(layers, chosen, fmt, quantizer, hessians)
    stored = sum(costs[n][chosen[n]] for n in layers)
    total = sum(r * c for r, c in shapes.values())
    predicted = sum(errors[n][chosen[n]] for n in errors) if measured else None  # pinned layers not included
    return WeightQuantResult(work, chosen, stored / total, stored / 8, weight_budget.text, method, quantizer,
                             errors if measured else {}, predicted, measured.key if measured else None,
                             measured.seconds if measured else 0.0, solve_seconds, packed)


@torch.no_grad()
def _apply(layers: dict[str, nn.Module], chosen: dict[str, int], fmt: GroupFormat, quantizer: str,
           hessians: dict) -> dict[str, QuantizedWeight]:
    packed = {}
    for n, module in layers.items():  # each from the float weights and float inputs (not sequential GPTQ)
        packed[n] = quantize(module.weight.data, chosen[n], fmt, quantizer, hessians.get(n))
        module.weight.data = packed[n].dequantize().to(module.weight.dtype)
    return packed


def _check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise MixbitsError(f"{name} must be one of {', '.join(choices)}, got {value!r}{did_you_mean(value, choices)}")


def _check_bits(bits) -> tuple[int, ...]:
    if isinstance(bits, int) or not bits:
        raise MixbitsError(f"bits must be a non-empty tuple of candidate bit-widths from {BITS}, got {bits!r}")
    return tuple(sorted({check_bits(b) for b in bits}))


def _token_batches(batches) -> list[torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        raise MixbitsError("batches must be an iterable of token-id batches (a list of LongTensors), got one tensor; "
                           "wrap it in a list: [ids]")
    out = []
    for i, batch in enumerate(batches):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise MixbitsError(f"calibration batch {i} must be token ids, an integer tensor (batch, tokens) or a dict "
                               f"with 'input_ids', got {type(ids).__name__}"
                               f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else ''}")
        out.append(ids.long())
    if not out:
        raise MixbitsError("batches is empty; give at least one batch of calibration token ids")
    return out
