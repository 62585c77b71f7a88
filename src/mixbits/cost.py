"""What a policy costs: BitOPs, model size and table-driven latency, from one profiling pass.

``profile`` runs the model once and records per-layer MACs and parameter counts in ``ModelStats``.
Every cost function after that is a pure function of (stats, policy): no torch work, so searches
can price thousands of policies cheaply. Layers in the stats but not in the policy are *kept float*
and count at 32/32 (recurrent layers, excluded layers, ...); so do all parameters outside quantized
weights (biases, BatchNorm, embeddings' positions).
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .data.batches import call_model, first_rows, input_tensors, to_device
from .errors import MixbitsError, did_you_mean
from .layer_types import QUANTIZABLE, SUPPORTED, own_parameters, weight_elements, weighted_layers
from .layer_types import kind as layer_kind
from .layer_types import macs as layer_macs
from .space import Policy, SearchSpace

FP_BITS = 32
STATS_FORMAT = "mixbits.stats/1"
LATENCY_FORMAT = "mixbits.latency/1"
TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}  # a latency table's units, in seconds
METRICS = ("bitops", "size", "latency")


@dataclass(frozen=True)
class LayerStats:
    """One weight-bearing layer: MACs per input sample, weight and other element counts, shapes."""

    name: str
    kind: str  # "conv" | "conv_transpose" | "linear" | "embedding" | "recurrent" | "attention" | "other"
    macs: int
    params: int  # weight-matrix elements: a quantized layer stores these at its weight bits
    bias: int  # the layer's other parameters (biases): kept at 32 bits
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    groups: int = 1


@dataclass(frozen=True)
class ModelStats:
    """Per-layer stats in registration order plus the model's total parameter count."""

    layers: dict[str, LayerStats]
    total_params: int  # every parameter except quantizer step sizes
    input_shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"format": STATS_FORMAT, "input_shape": list(self.input_shape), "total_params": self.total_params,
                "layers": [asdict(s) for s in self.layers.values()]}

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelStats:
        if not isinstance(d, Mapping) or d.get("format") != STATS_FORMAT:
            raise MixbitsError(f"not mixbits model stats: expected a JSON object with format {STATS_FORMAT!r}")
        try:
            layers = [LayerStats(**{**s, "in_shape": tuple(s["in_shape"]), "out_shape": tuple(s["out_shape"])})
                      for s in d["layers"]]
            return cls({s.name: s for s in layers}, int(d["total_params"]), tuple(d["input_shape"]))
        except (KeyError, TypeError) as e:
            raise MixbitsError(f"model stats are malformed ({e}); re-create them with mixbits.cost.profile") from None


# profiling ----------------------------------------------------------------------------------------
def _batched_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """A batch-1 shape from one sample's shape ((C, H, W), (F,), (L, F) ...) or an already batched (1, C, H, W)."""
    shape = tuple(input_shape)
    ok = len(shape) > 0 and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape)
    if not ok:
        raise MixbitsError(f"input_shape {list(shape)} is not understood; expected one sample's shape as positive "
                           "integers, e.g. (3, 32, 32) or (16,), or pass an example input tensor instead")
    shape = tuple(int(s) for s in shape)
    return shape if len(shape) == 4 and shape[0] == 1 else (1, *shape)


def _sample_shape(t) -> tuple[int, ...]:
    """Shape without the batch dim (profiling runs at batch 1, so a leading 1 is the batch)."""
    if not isinstance(t, torch.Tensor):  # a PackedSequence, or a layer called with keywords only
        return ()
    shape = tuple(t.shape)
    return shape[1:] if len(shape) > 1 and shape[0] == 1 else shape


def _example(model: nn.Module, input_shape) -> tuple[object, tuple[int, ...]]:
    """(a batch-1 input, one sample's shape) from a shape or an example input (tensor, tuple or dict of them)."""
    if isinstance(input_shape, (torch.Tensor, Mapping)) or (
            isinstance(input_shape, (tuple, list)) and input_tensors(input_shape)):
        tensors = input_tensors(input_shape)
        if not tensors:
            raise MixbitsError("the example input holds no tensor; give a tensor, or a tuple or dict of tensors")
        return first_rows(input_shape, 1), tuple(tensors[0].shape[1:])
    shape = _batched_shape(input_shape)
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    return torch.zeros(shape, dtype=dtype), shape[1:]


def profile(model: nn.Module, input_shape: Sequence[int] | torch.Tensor | tuple | dict) -> ModelStats:
    """Run one batch-1 forward pass and record MACs, parameter counts and shapes of every weight-bearing layer.

    ``input_shape`` is one sample's shape (e.g. (C, H, W)), or an example input whose first row is used:
    a tensor of any shape and dtype (token ids, vectors, sequences), or a tuple or dict of them (the
    model is called with them as positional or keyword arguments).

    Every layer ``layer_types.weighted_layers`` names is recorded: the quantizable ones, and those kept
    float (recurrent layers, a packed attention, ...), which every cost prices at 32/32 bits. The forward
    runs on a deep copy with every ``nn.MultiheadAttention`` split into its projections
    (``mixbits.quant.attention.prepare_model``), so a float model and its prepared copy profile alike. A
    module called several times accumulates its MACs; one never called is kept with 0 MACs. The model's
    flags, hooks and any data-initialised quantizer state are never touched.
    """
    from .quant.attention import prepare_model  # quant imports this module's neighbours, not the reverse

    model = copy.deepcopy(model)
    prepare_model(model)
    x, sample_shape = _example(model, input_shape)
    modules = dict(model.named_modules())
    names = {modules[n]: n for n in weighted_layers(model)}
    if not names:
        raise MixbitsError(f"{type(model).__name__} has no layer with weights to profile ({SUPPORTED})")
    macs = dict.fromkeys(names.values(), 0)
    shapes: dict[str, tuple] = {}

    def hook(m, inputs, out):
        name = names[m]
        macs[name] += layer_macs(m, inputs, out)
        first_out = out[0] if isinstance(out, tuple) else out  # recurrent layers return (output, state)
        shapes.setdefault(name, (_sample_shape(inputs[0]) if inputs else (), _sample_shape(first_out)))

    first = next(model.parameters(), None)
    device = first.device if first is not None else "cpu"
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, to_device(x, device))
    except MixbitsError:
        raise
    except Exception as e:
        raise MixbitsError(f"profiling {type(model).__name__} on input shape {list(sample_shape)} failed: "
                           f"{type(e).__name__}: {e}; check that the input (shape) matches the model") from e
    finally:
        for h in handles:
            h.remove()
    layers = {name: _layer_stats(m, name, macs[name], shapes.get(name, ((), ()))) for m, name in names.items()}
    total = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("steps"))
    return ModelStats(layers, total, sample_shape)


def _layer_stats(m: nn.Module, name: str, macs: int, shapes: tuple) -> LayerStats:
    weights = weight_elements(m) if not isinstance(m, QUANTIZABLE) else m.weight.numel()
    others = own_parameters(m) - weights  # biases (a quantizer's steps live in its own submodule)
    return LayerStats(name=name, kind=layer_kind(m), macs=int(macs), params=weights, bias=others,
                      in_shape=shapes[0], out_shape=shapes[1], groups=getattr(m, "groups", 1))


# pure cost functions ------------------------------------------------------------------------------
def _layer_bits(stats: ModelStats, policy: Policy) -> dict[str, tuple[int, int]]:
    """(w, a) for every stats layer: the policy's bits, or 32/32 where the policy leaves it float."""
    unknown = [n for n in policy if n not in stats.layers]
    if unknown:
        hint = did_you_mean(unknown[0], stats.layers)
        raise MixbitsError(f"policy layers {unknown} are not in the model stats.{hint} The stats were profiled on "
                           f"another model (stats layers: {', '.join(stats.layers)}); profile this model again")
    return {n: tuple(policy.bits.get(n, (FP_BITS, FP_BITS))) for n in stats.layers}


def bitops(stats: ModelStats, policy: Policy) -> int:
    """Σ MACs · b_w · b_a over the layers."""
    bits = _layer_bits(stats, policy)
    return sum(s.macs * bits[n][0] * bits[n][1] for n, s in stats.layers.items())


def size_bits(stats: ModelStats, policy: Policy) -> int:
    """Quantized weights at their bits plus every other parameter at 32 bits."""
    bits = _layer_bits(stats, policy)
    return stats.total_params * FP_BITS - sum(s.params * (FP_BITS - bits[n][0]) for n, s in stats.layers.items())


def size_bytes(stats: ModelStats, policy: Policy) -> float:
    return size_bits(stats, policy) / 8


def fp_bitops(stats: ModelStats) -> int:
    return sum(s.macs for s in stats.layers.values()) * FP_BITS * FP_BITS


def fp_size_bits(stats: ModelStats) -> int:
    return stats.total_params * FP_BITS


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 1.0 if num == 0 else float("inf")
    return num / den


def compression(stats: ModelStats, policy: Policy) -> dict[str, float]:
    """How many times smaller than 32/32 the BitOPs and the model size are."""
    return {"bitops": _ratio(fp_bitops(stats), bitops(stats, policy)),
            "size": _ratio(fp_size_bits(stats), size_bits(stats, policy))}


def average_bits(stats: ModelStats, policy: Policy) -> tuple[float, float]:
    """(weight bits weighted by params, activation bits weighted by MACs) over the stats layers."""
    bits = _layer_bits(stats, policy)
    params = sum(s.params for s in stats.layers.values())
    macs = sum(s.macs for s in stats.layers.values())
    w = sum(s.params * bits[n][0] for n, s in stats.layers.items())
    a = sum(s.macs * bits[n][1] for n, s in stats.layers.items())
    return (w / params if params else 0.0, a / macs if macs else 0.0)


# reporting ----------------------------------------------------------------------------------------
def cost_table(stats: ModelStats, policy: Policy) -> list[dict]:
    """One row per layer; ``size_bits`` is the layer's own storage (weights at w bits, bias at 32)."""
    bits = _layer_bits(stats, policy)
    total = bitops(stats, policy)
    rows = []
    for n, s in stats.layers.items():
        w, a = bits[n]
        ops = s.macs * w * a
        rows.append({"name": n, "kind": s.kind, "macs": s.macs, "params": s.params, "w": w, "a": a, "bitops": ops,
                     "share": ops / total if total else 0.0, "size_bits": s.params * w + s.bias * FP_BITS,
                     "kept_float": n not in policy.bits})
    return rows


def kept_float_layers(stats: ModelStats, policy: Policy) -> list[str]:
    """The profiled layers the policy leaves at 32 bits (recurrent layers, excluded layers ...), in order."""
    return [n for n in stats.layers if n not in policy.bits]


def cost_summary(stats: ModelStats, policy: Policy) -> dict:
    """Whole-model totals (biases, BatchNorm and unquantized parameters included) for the totals line."""
    ratios = compression(stats, policy)
    return {"macs": sum(s.macs for s in stats.layers.values()), "params": stats.total_params,
            "bitops": bitops(stats, policy), "size_bits": size_bits(stats, policy),
            "compression_bitops": ratios["bitops"], "compression_size": ratios["size"]}


def _human(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def format_cost_table(rows: Sequence[Mapping], totals: bool | Mapping = True) -> str:
    """Aligned text table of ``cost_table`` rows with a totals line.

    ``totals=True`` sums the rows (layers only, FP reference 32/32); pass ``cost_summary(stats, policy)``
    for whole-model totals that include BatchNorm and other unquantized parameters.
    """
    head = ("layer", "kind", "MACs", "params", "W", "A", "BitOPs", "share", "size KB")
    body = [(r["name"], r["kind"], _human(r["macs"]), _human(r["params"]), str(r["w"]), str(r["a"]),
             _human(r["bitops"]), f"{100 * r['share']:.1f}%", f"{r['size_bits'] / 8e3:.2f}") for r in rows]
    widths = [max(len(c[i]) for c in (head, *body)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths), *(fmt.format(*c) for c in body)]
    kept = [r["name"] for r in rows if r.get("kept_float")]
    if kept:
        lines.append(f"kept float (32-bit weights and inputs, counted in BitOPs and size): {', '.join(kept)}")
    if totals:
        t = totals if isinstance(totals, Mapping) else _summary_from_rows(rows)
        lines.append(f"total: MACs {_human(t['macs'])}, params {_human(t['params'])}, "
                     f"BitOPs {t['bitops'] / 1e9:.4g} G, size {t['size_bits'] / 8e3:.2f} KB, "
                     f"compression x{t['compression_bitops']:.2f} BitOPs, x{t['compression_size']:.2f} size")
    return "\n".join(lines)


def _summary_from_rows(rows: Sequence[Mapping]) -> dict:
    macs = sum(r["macs"] for r in rows)
    ops = sum(r["bitops"] for r in rows)
    size = sum(r["size_bits"] for r in rows)
    fp_size = sum(r["params"] * FP_BITS + r["size_bits"] - r["params"] * r["w"] for r in rows)
    return {"macs": macs, "params": sum(r["params"] for r in rows), "bitops": ops, "size_bits": size,
            "compression_bitops": _ratio(macs * FP_BITS * FP_BITS, ops), "compression_size": _ratio(fp_size, size)}


# latency / energy lookup tables -------------------------------------------------------------------
_BITS_KEY = re.compile(r"w(\d+)a(\d+)$")


@dataclass(frozen=True)
class LatencyTable:
    """Measured cost per (layer, w, a), e.g. ``{"conv1": {"w4a4": 0.12, "w8a8": 0.3}}``, in ``unit``."""

    layers: Mapping[str, Mapping[str, float]]
    unit: str = "ms"
    device: str = ""

    @staticmethod
    def key(w: int, a: int) -> str:
        return f"w{w}a{a}"

    @classmethod
    def from_dict(cls, d: Mapping) -> LatencyTable:
        if not isinstance(d, Mapping) or d.get("format") != LATENCY_FORMAT or not isinstance(d.get("layers"), Mapping):
            raise MixbitsError(f"not a latency table: expected a JSON object with format {LATENCY_FORMAT!r} and "
                               '\'layers\', e.g. {"layers": {"conv1": {"w4a4": 0.12}}}')
        layers = {}
        for name, entries in d["layers"].items():
            if not isinstance(entries, Mapping):
                raise MixbitsError(f"latency table layer {name!r} must map 'w<bits>a<bits>' keys to numbers")
            for k, v in entries.items():
                number = isinstance(v, (int, float)) and not isinstance(v, bool)
                if not _BITS_KEY.match(k) or not number or not math.isfinite(v) or v < 0:
                    raise MixbitsError(f"latency table entry {name!r}/{k!r}={v!r} is invalid; "
                                       "keys look like 'w4a8' and values are finite non-negative numbers")
            layers[name] = {k: float(v) for k, v in entries.items()}
        unit = d.get("unit", "ms")
        if not isinstance(unit, str) or unit not in TIME_UNITS:
            raise MixbitsError(f"latency table unit {unit!r} is unknown; expected one of {', '.join(TIME_UNITS)}")
        return cls(layers, unit, str(d.get("device", "")))

    def to_dict(self) -> dict:
        return {"format": LATENCY_FORMAT, "unit": self.unit, "device": self.device,
                "layers": {n: dict(e) for n, e in self.layers.items()}}

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        path = Path(path)
        if not path.is_file():
            raise MixbitsError(f"latency table {str(path)!r} does not exist")
        from .utils import read_json

        return cls.from_dict(read_json(path, "latency table", "measure it again with `mixbits lut`"))

    def save(self, path: str | os.PathLike) -> None:
        from .utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def entry(self, name: str, w: int, a: int) -> float:
        """The cost of one layer at W``w``A``a``; a missing layer or key is an error saying what exists."""
        if name not in self.layers:
            raise MixbitsError(f"latency table has no layer {name!r}{did_you_mean(name, self.layers)}; "
                               f"it has: {', '.join(self.layers) or 'none'}")
        key = self.key(w, a)
        if key not in self.layers[name]:
            raise MixbitsError(f"latency table has no entry {key!r} for layer {name!r}; "
                               f"it has: {', '.join(self.layers[name]) or 'none'}")
        return self.layers[name][key]

    def cost(self, policy: Policy) -> float:
        """Σ over the policy's layers of each layer's entry at its (w, a)."""
        return sum(self.entry(n, w, a) for n, (w, a) in policy.bits.items())

    def check_layers(self, space: SearchSpace) -> None:
        """Raise when the table times layers ``space`` does not have: it was measured for another model."""
        foreign = [n for n in self.layers if n not in space.layers]
        if foreign:
            raise MixbitsError(f"latency table has layers the model lacks: {', '.join(foreign[:8])}"
                               f"{' ...' if len(foreign) > 8 else ''}; it was measured for another model. "
                               "Measure this one with `mixbits lut`")

    def check_covers(self, space: SearchSpace) -> None:
        """Raise one error listing every (layer, bits) of ``space`` the table lacks, or layers it lacks."""
        self.check_layers(space)
        missing = []
        for name in space.layers:
            w_ok, a_ok = space.candidates(name)
            have = self.layers.get(name, {})
            keys = [self.key(w, a) for w in w_ok for a in a_ok if self.key(w, a) not in have]
            if keys:
                missing.append(f"{name}: {', '.join(keys)}")
        if missing:
            raise MixbitsError("latency table does not cover the search space; missing entries:\n  "
                               + "\n  ".join(missing))


def require_latency_table(latency: LatencyTable | None) -> LatencyTable:
    if latency is None:
        raise MixbitsError("a latency cost needs a latency table; pass --latency-table PATH "
                           f"(a JSON file in the {LATENCY_FORMAT!r} format)")
    return latency


def measure(metric: str, stats: ModelStats, policy: Policy, latency: LatencyTable | None = None) -> float:
    """One cost in its internal unit: BitOPs, size in bits, or latency in the table's unit."""
    if metric == "bitops":
        return float(bitops(stats, policy))
    if metric == "size":
        return float(size_bits(stats, policy))
    if metric == "latency":
        return require_latency_table(latency).cost(policy)
    raise MixbitsError(f"unknown cost metric {metric!r}{did_you_mean(metric, METRICS)}; valid: {', '.join(METRICS)}")
