"""Latency lookup tables measured on this machine, in the ``mixbits.latency/1`` format budgets read.

Every (layer, w, a) the search space allows is timed on its own: the layer's subgraph exactly as
``export_onnx`` writes it in the chosen form (default ``exact``, as the export's: the float product of the codes
and the Mul by the scales; ``fast``: input QuantizeLinear, the Clip below 8 bits, the integer kernel onnxruntime
fuses (QLinearConv with its 8-bit output, QGemm, MatMulIntegerToFloat), for convolutions and Linear layers),
with the layer's real shapes at batch 1, run by
onnxruntime with its default optimisations. The weights are random codes: timing does not depend on their
values. ``runtime="torch"`` times the PyTorch layer's inference instead (its integer form: what evaluation
pays, not a deployment figure).

A table only says what this runtime does here: onnxruntime's CPU kernels compute in 8 bits whatever the
bit-width, so below 8 bits the entries differ by noise and by the Clip to the narrower range, not by
arithmetic savings: on CPUs sub-8-bit pays in size and BitOPs, not in time.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..cost import LatencyTable, profile
from ..data.batches import input_tensors
from ..errors import MixbitsError, did_you_mean
from ..layer_types import kind as layer_kind
from ..quant import integer_range, quant_layers, space_of
from ..quant.convert import quantized_class
from ..quant.layers import QuantLayer
from ..space import SearchSpace

RUNTIMES = ("onnxruntime", "torch")


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _resolve(model, space: SearchSpace | None, input_shape) -> tuple[nn.Module, SearchSpace, tuple[int, ...]]:
    """(model, space, input shape) from a ModelCard or a model plus the arguments."""
    from ..pipeline import ModelCard

    if isinstance(model, ModelCard):
        input_shape = input_shape if input_shape is not None else model.example_input()
        space = space if space is not None else model.space
        model = model.float_model()
    if space is None and quant_layers(model):
        space = space_of(model)
    if space is None:
        raise MixbitsError("no search space to measure: pass space=SearchSpace.from_model(model) or a quantized model")
    if input_shape is None:
        raise MixbitsError("input_shape (C, H, W) or an example input is needed to give every layer its real shapes, "
                           "e.g. (1, 28, 28)")
    if input_tensors(input_shape):  # an example input (a tensor, or a tuple or dict): token ids keep their dtype
        return model, space, input_shape
    return model, space, tuple(int(s) for s in input_shape)


def _input_signed(module: nn.Module, name: str, space: SearchSpace) -> bool:
    """The layer's own input sign when it is calibrated; else signed for the first layer (normalised images)."""
    if isinstance(module, QuantLayer) and module.a_quant._signed is not None:
        return module.a_quant.signed
    return name == space.layers[0]


def _synthetic_spec(name: str, module: nn.Module, w: int, a: int, signed: bool, rank: int):
    from .qdq import LayerSpec, _conv_attrs

    qmin, qmax = integer_range(w, True)
    codes = np.random.default_rng(0).integers(qmin, qmax + 1, size=tuple(module.weight.shape), dtype=np.int32)
    bias = None if getattr(module, "bias", None) is None else module.bias.detach().float().cpu().numpy()
    kind = layer_kind(module)
    conv = kind in ("conv", "conv_transpose")
    return LayerSpec(name, kind, codes, np.full(1, 0.01, np.float32), np.float32(0.05),
                     signed, w, a, bias, _conv_attrs(module) if conv else {}, in_ranks=(rank,))


def _onnx_timer(name, module, space, in_shape, opset: int, threads: int | None, form: str = "exact"):
    from .fused import fast_layer_model, fast_types
    from .qdq import choose_types, layer_model, session

    signed = _input_signed(module, name, space)
    if isinstance(module, nn.Embedding):  # token ids: row 0, whatever the timing
        x = np.zeros((1, *in_shape), np.int64)
    else:
        x = np.random.default_rng(1).standard_normal((1, *in_shape)).astype(np.float32)

    def timer(w: int, a: int, repeats: int, warmup: int) -> float:
        spec = _synthetic_spec(name, module, w, a, signed, x.ndim)
        proto = (fast_layer_model(spec, fast_types(spec), opset, x.shape, 0.05) if form == "fast" else
                 layer_model(spec, choose_types(spec, opset), opset, x.shape))
        sess = session(proto.SerializeToString(), threads)
        return _median_ms(lambda: sess.run(None, {"x": x}), repeats, warmup)

    return timer


def _torch_timer(name, module, space, in_shape):
    x = torch.zeros(1, *in_shape, dtype=torch.long) if isinstance(module, nn.Embedding) else torch.randn(1, *in_shape)
    # A quantized layer is its float type too: from_float reads only the float layer's arguments and weights.
    cls = type(module) if isinstance(module, QuantLayer) else quantized_class(module)

    def timer(w: int, a: int, repeats: int, warmup: int) -> float:
        layer = cls.from_float(module, [w], [a]).eval()  # shares the weights, which inference never changes
        with torch.inference_mode():
            return _median_ms(lambda: layer(x), repeats, max(warmup, 1))  # the first call initialises the steps

    return timer


def _device(runtime: str, threads: int | None, form: str = "exact") -> str:
    cpu = platform.processor() or platform.machine() or "cpu"
    if runtime == "torch":
        return f"{cpu}, torch {torch.__version__} integer form, {torch.get_num_threads()} threads"
    import onnxruntime as ort

    return f"{cpu}, onnxruntime {ort.__version__} CPUExecutionProvider, {form} export form, " \
           f"{threads or 'default'} threads"


def measure_latency_table(model, space: SearchSpace | None = None, input_shape=None, runtime: str = "onnxruntime",
                          repeats: int = 10, warmup: int = 2, threads: int | None = None, opset: int | None = None,
                          progress: Callable[[str], None] | None = None, form: str = "exact") -> LatencyTable:
    """Time every layer of ``space`` at every (w, a) it may take; returns the table (in ms, batch 1).

    ``model`` is a ModelCard (its float model, space and input shape) or a model, float or quantized
    (its own space when ``space`` is None). Each entry is the median of ``repeats`` runs after
    ``warmup`` runs; ``progress`` is called with each layer's name as it starts. ``form`` is the export form
    timed (``export_onnx``'s: "exact", the default as there, or "fast").
    """
    if form not in ("fast", "exact"):
        raise MixbitsError(f"form must be 'fast' or 'exact', got {form!r}; use the form you export with")
    if runtime not in RUNTIMES:
        raise MixbitsError(f"unknown runtime {runtime!r}{did_you_mean(runtime, RUNTIMES)}; use one of {RUNTIMES}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1 or warmup < 0:
        raise MixbitsError(f"repeats must be an integer >= 1 and warmup >= 0, got {repeats!r} and {warmup!r}")
    model, space, input_shape = _resolve(model, space, input_shape)
    stats = profile(model, input_shape)
    modules = dict(model.named_modules())
    if runtime == "onnxruntime":
        from .qdq import resolve_opset

        opset = resolve_opset(opset)
    layers = {}
    for name in space.layers:
        if name not in stats.layers or not stats.layers[name].in_shape:
            raise MixbitsError(f"layer {name!r} of the space is not a quantizable layer the forward pass reaches"
                               f"{did_you_mean(name, stats.layers)}")
        if progress:
            progress(name)
        in_shape = stats.layers[name].in_shape
        timer = (_onnx_timer(name, modules[name], space, in_shape, opset, threads, form) if runtime == "onnxruntime"
                 else _torch_timer(name, modules[name], space, in_shape))
        layers[name] = {LatencyTable.key(w, a): round(timer(w, a, repeats, warmup), 6)
                        for w, a in itertools.product(*space.candidates(name))}
    return LatencyTable(layers, "ms", _device(runtime, threads, form))
