"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ), checked against the PyTorch model.

torch's exporter refuses fake-quant below 8 bits, so each quantized layer is traced as one opaque
placeholder node (``mixbits::QLayer``) and then replaced by a subgraph written here:

    x -> QuantizeLinear -> [Clip] -> DequantizeLinear -> Conv/Gemm/MatMul <- DequantizeLinear <- integer weight

Everything else (BatchNorm, pooling, residual adds, reshapes, float layers) comes from torch's own
TorchScript-based exporter, untouched: the placeholder keeps BatchNorm from being folded into the
weights, which would destroy the integer codes. The integers are the ones PyTorch computes, and ONNX
QuantizeLinear rounds half to even like ``torch.round``, so each layer reproduces the fake-quant layer
up to float summation order (``check_layers``); end to end, that rounding can flip rare activations
lying on a midpoint between two levels (``check_onnx`` says how often).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..errors import MixbitsError
from ..quant import integer_range, quant_layers
from ..quant.convert import _set_submodule, require_quantized
from ..utils import atomic_write_bytes
from .packing import pack_bits

DOMAIN = "mixbits"
OPSETS = (25, 21, 13)  # tried in this order when no opset is given
# Integer types by width, and the opset that introduced each narrow one.
SIGNED = {8: TensorProto.INT8, 4: TensorProto.INT4, 2: TensorProto.INT2}
UNSIGNED = {8: TensorProto.UINT8, 4: TensorProto.UINT4, 2: TensorProto.UINT2}
SINCE = {8: 10, 4: 21, 2: 25}
WIDTH = {t: w for table in (SIGNED, UNSIGNED) for w, t in table.items()}


# one quantized layer as QDQ nodes -----------------------------------------------------------------
@dataclass
class LayerSpec:
    """Everything the QDQ subgraph of one layer needs, as numpy values."""

    name: str
    kind: str  # "conv" | "linear"
    codes: np.ndarray  # integer weight codes
    w_scale: np.ndarray  # float32: one value, or one per output channel
    a_scale: np.float32
    a_signed: bool
    w_bits: int
    a_bits: int
    bias: np.ndarray | None = None
    conv: dict = field(default_factory=dict)  # Conv attributes
    per_channel: bool = False
    in_ranks: tuple[int, ...] = ()  # ranks of the inputs it was called with (Linear: 2 uses Gemm)


def _conv_attrs(conv: nn.Conv2d) -> dict:
    kernel, dilation = list(conv.kernel_size), list(conv.dilation)
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        pads = [0, 0, 0, 0]  # non-zero padding modes are applied before the layer (see _Stub)
    elif conv.padding == "same":  # torch puts the odd pixel at the end
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        pads = list(conv.padding) * 2
    return {"kernel_shape": kernel, "strides": list(conv.stride), "pads": pads, "dilations": dilation,
            "group": conv.groups}


def layer_spec(name: str, layer) -> LayerSpec:
    """The integers and scales of a quantized layer at its fixed bits (what PyTorch computes with)."""
    if layer.mode != "fixed":
        raise MixbitsError(f"layer {name!r} is in {layer.mode} mode; set fixed bits with apply_policy before export")
    w_bits, a_bits = layer.bits
    for quant, bits, what in ((layer.w_quant, w_bits, "weight"), (layer.a_quant, a_bits, "input")):
        if not bool(quant.initialized[quant.index(bits)]):
            raise MixbitsError(f"layer {name!r}: the {what} step of {bits} bits is uncalibrated; run "
                               "calibrate(model, batch) or train the model first")
    codes, step = layer.w_quant.integers(layer.weight, w_bits)
    conv = isinstance(layer, nn.Conv2d)
    bias = None if layer.bias is None else layer.bias.detach().float().cpu().numpy()
    return LayerSpec(name, "conv" if conv else "linear", codes.cpu().numpy(),
                     step.float().cpu().numpy().reshape(-1), np.float32(layer.a_quant.step(a_bits, 1).item()),
                     layer.a_quant.signed, w_bits, a_bits, bias, _conv_attrs(layer) if conv else {},
                     layer.w_quant.steps.shape[1] > 1, (4,) if conv else (2,))


@dataclass(frozen=True)
class QTypes:
    """ONNX integer types of one layer: weight codes, input codes, whether a Clip narrows the input, and
    the input zero point (128 when a signed input is carried as uint8, for runtimes that need it)."""

    weight: int
    act: int
    clip: bool
    zero_point: int = 0

    def describe(self) -> dict:
        name = TensorProto.DataType.Name
        return {"weight_type": name(self.weight).lower(), "act_type": name(self.act).lower(), "clip": self.clip,
                "zero_point": self.zero_point}


def _narrowest(bits: int, table: dict, opset: int, exact: bool) -> int:
    """The narrowest type of ``table`` holding ``bits`` (exactly ``bits`` wide if ``exact``) at ``opset``."""
    for width in (2, 4, 8):
        if (width == bits or (not exact and width > bits) or width == 8) and opset >= SINCE[width]:
            return table[width]
    raise AssertionError("unreachable: 8-bit types exist at every opset")


def choose_types(spec: LayerSpec, opset: int) -> QTypes:
    """Narrow types where the opset has them and onnxruntime runs them, else int8/uint8 with a Clip.

    Weights need no Clip (their codes are in range already), so any type at least as wide works.
    An input type must be exactly ``a_bits`` wide, or int8/uint8 followed by a Clip to the narrower range.
    """
    act_table = SIGNED if spec.a_signed else UNSIGNED
    w_type = _narrowest(spec.w_bits, SIGNED, opset, exact=False)
    a_type = _narrowest(spec.a_bits, act_table, opset, exact=True)
    tries = [QTypes(w, a, spec.a_bits < WIDTH[a]) for w in (w_type, SIGNED[8]) for a in (a_type, act_table[8])]
    if spec.a_signed:  # the same levels, shifted: some onnxruntime fusions only take uint8 inputs
        tries += [QTypes(w, UNSIGNED[8], spec.a_bits < 8, 128) for w in (w_type, SIGNED[8])]
    for types in dict.fromkeys(tries):
        if _runs(spec, types, opset):
            return types
    raise MixbitsError(f"onnxruntime {ort.__version__} runs no QDQ form of layer {spec.name!r} at opset {opset}; "
                       f"try --opset 13")


def _int_tensor(name: str, values: np.ndarray, dtype: int):
    if WIDTH[dtype] == 8:
        return numpy_helper.from_array(values.astype(np.int8 if dtype == TensorProto.INT8 else np.uint8), name)
    width = WIDTH[dtype]  # ONNX packs narrow types like pack_bits: element 0 in the lowest bits
    raw = pack_bits(values.astype(np.int64).reshape(-1) & ((1 << width) - 1), width)
    return helper.make_tensor(name, dtype, list(values.shape), raw, raw=True)


def _scalar(name: str, value, dtype: int):
    return helper.make_tensor(name, dtype, [], [int(value)])


def _weight_inits(spec: LayerSpec, types: QTypes) -> list:
    n = spec.name
    zeros = np.zeros(spec.w_scale.shape if spec.per_channel else (), np.int64)
    scale = spec.w_scale if spec.per_channel else spec.w_scale.reshape(())
    inits = [_int_tensor(f"{n}.weight_int", spec.codes, types.weight),
             numpy_helper.from_array(scale.astype(np.float32), f"{n}.weight_scale"),
             _int_tensor(f"{n}.weight_zero_point", zeros, types.weight)]
    if spec.bias is not None:
        inits.append(numpy_helper.from_array(spec.bias.astype(np.float32), f"{n}.bias"))
    return inits


def _input_inits(spec: LayerSpec, types: QTypes) -> list:
    n = spec.name
    zp = types.zero_point
    inits = [numpy_helper.from_array(np.array(spec.a_scale, np.float32), f"{n}.input_scale"),
             _scalar(f"{n}.input_zero_point", zp, types.act)]
    if types.clip:
        lo, hi = integer_range(spec.a_bits, spec.a_signed)
        inits += [_scalar(f"{n}.input_min", lo + zp, types.act), _scalar(f"{n}.input_max", hi + zp, types.act)]
    return inits


def layer_nodes(spec: LayerSpec, x: str, y: str, types: QTypes) -> tuple[list, list]:
    """(nodes, initializers) computing ``y`` from ``x`` like the quantized layer; node names derive from ``y``."""
    n, node = spec.name, helper.make_node
    codes = f"{y}/input_int"
    nodes = [node("QuantizeLinear", [x, f"{n}.input_scale", f"{n}.input_zero_point"], [codes], name=f"{y}/Quantize")]
    if types.clip:
        nodes.append(node("Clip", [codes, f"{n}.input_min", f"{n}.input_max"], [f"{y}/input_clip"], name=f"{y}/Clip"))
        codes = f"{y}/input_clip"
    nodes.append(node("DequantizeLinear", [codes, f"{n}.input_scale", f"{n}.input_zero_point"], [f"{y}/input_dq"],
                      name=f"{y}/DequantizeInput"))
    axis = {"axis": 0} if spec.per_channel else {}
    nodes.append(node("DequantizeLinear", [f"{n}.weight_int", f"{n}.weight_scale", f"{n}.weight_zero_point"],
                      [f"{y}/weight_dq"], name=f"{y}/DequantizeWeight", **axis))
    bias = [f"{n}.bias"] if spec.bias is not None else []
    xd, wd = f"{y}/input_dq", f"{y}/weight_dq"
    if spec.kind == "conv":
        nodes.append(node("Conv", [xd, wd, *bias], [y], name=f"{y}/Conv", **spec.conv))
    elif max(spec.in_ranks or (2,)) <= 2:
        nodes.append(node("Gemm", [xd, wd, *bias], [y], name=f"{y}/Gemm", transB=1))
    else:  # inputs of rank > 2 (tokens): MatMul with the transposed weight, then the bias
        mm = f"{y}/matmul" if bias else y
        nodes += [node("Transpose", [wd], [f"{y}/weight_t"], name=f"{y}/Transpose", perm=[1, 0]),
                  node("MatMul", [xd, f"{y}/weight_t"], [mm], name=f"{y}/MatMul")]
        if bias:
            nodes.append(node("Add", [mm, *bias], [y], name=f"{y}/Add"))
    return nodes, _input_inits(spec, types) + _weight_inits(spec, types)


def layer_model(spec: LayerSpec, types: QTypes, opset: int, in_shape) -> onnx.ModelProto:
    """A graph holding only this layer, input ``x`` of shape ``in_shape`` (batch included)."""
    nodes, inits = layer_nodes(spec, "x", "y", types)
    graph = helper.make_graph(nodes, spec.name or "layer", [helper.make_tensor_value_info("x", 1, list(in_shape))],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    set_opset(proto, opset)
    return proto


def set_opset(proto, opset: int) -> None:
    """Declare the standard domain at ``opset`` only (the placeholder domain is gone) and a matching IR version."""
    del proto.opset_import[:]
    proto.opset_import.append(helper.make_opsetid("", opset))
    proto.ir_version = max(7, helper.find_min_ir_version_for(list(proto.opset_import)))


def session(data: bytes, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: shape-mismatch notices on dynamic batches are expected
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


_RUNS: dict[tuple, bool] = {}


def _form(spec: LayerSpec) -> tuple:
    """What decides whether onnxruntime runs a layer's QDQ graph: its kind and attributes, not its values."""
    conv = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(spec.conv.items()))
    return (spec.kind, spec.in_ranks, spec.per_channel, spec.codes.shape, conv, spec.bias is not None,
            spec.a_signed, spec.a_bits)


def _probe_input(spec: LayerSpec) -> tuple[int, ...]:
    if spec.kind == "linear":
        return (1,) * (max(max(spec.in_ranks or (2,)), 2) - 1) + (spec.codes.shape[1],)
    size = max(d * (k - 1) + 1 for d, k in zip(spec.conv["dilations"], spec.conv["kernel_shape"], strict=True))
    return (1, spec.codes.shape[1] * spec.conv["group"], size, size)


def _runs(spec: LayerSpec, types: QTypes, opset: int) -> bool:
    """Whether the installed onnxruntime loads and runs this layer's form with these types (asked once per form)."""
    key = (_form(spec), types, opset)
    if key not in _RUNS:
        probe = replace(spec, codes=np.zeros_like(spec.codes), w_scale=np.ones_like(spec.w_scale))
        x = np.zeros(_probe_input(spec), np.float32)
        try:
            session(layer_model(probe, types, opset, x.shape).SerializeToString()).run(None, {"x": x})
            _RUNS[key] = True
        except Exception:  # noqa: BLE001 - any failure means "not supported here"
            _RUNS[key] = False
    return _RUNS[key]


def _opset_runs(opset: int) -> bool:
    conv = nn.Conv2d(2, 2, 1)
    spec = LayerSpec("probe", "conv", np.zeros((2, 2, 1, 1), np.int32), np.ones(1, np.float32), np.float32(1),
                     False, 8, 7, None, _conv_attrs(conv), in_ranks=(4,))
    return _runs(spec, QTypes(SIGNED[8], UNSIGNED[8], True), opset)


def resolve_opset(opset: int | None) -> int:
    """The given opset after checking onnxruntime runs QDQ graphs at it, or the highest of OPSETS that runs."""
    if opset is None:
        for candidate in OPSETS:
            if candidate <= onnx.defs.onnx_opset_version() and _opset_runs(candidate):
                return candidate
        raise MixbitsError(f"onnxruntime {ort.__version__} runs none of opsets {OPSETS}; upgrade onnxruntime")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= onnx.defs.onnx_opset_version():
        raise MixbitsError(f"opset must be an integer in 13..{onnx.defs.onnx_opset_version()}, got {opset!r}; "
                           "21 stores 4-bit codes as int4, 25 also 2-bit codes as int2, 13 uses int8 everywhere")
    if not _opset_runs(opset):
        raise MixbitsError(f"onnxruntime {ort.__version__} cannot run opset {opset}; try 21 or 13")
    return opset


@dataclass
class ExportReport:
    """What was written and how well it matches PyTorch (``check`` is None when nothing was checked)."""

    path: str
    opset: int
    bytes: int
    layers: dict[str, dict] = field(default_factory=dict)
    float_layers: list[str] = field(default_factory=list)
    check: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# tracing ------------------------------------------------------------------------------------------
_TRACING: dict[str, _Stub] = {}  # the stubs of the export in progress, by layer name


class _Placeholder(torch.autograd.Function):
    """Runs the real quantized layer while tracing; exports as one ``mixbits::QLayer`` node."""

    @staticmethod
    def forward(ctx, x, name):
        stub = _TRACING[name]
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # the layer's own ops stay inside this one node
        try:
            out = stub.compute(x)
        finally:
            torch._C._set_tracing_state(state)
        stub.out_shapes.append(tuple(out.shape))
        return out

    @staticmethod
    def symbolic(g, x, name):
        stub = _TRACING[name]
        out = g.op(f"{DOMAIN}::QLayer", x, name_s=name)
        shape = stub.out_shapes[stub.symbolic_calls]
        stub.symbolic_calls += 1
        out.setType(x.type().with_sizes([None, *shape[1:]]))
        return out


class _Stub(nn.Module):
    """Stands in for one quantized layer during tracing; records the input ranks it is called with."""

    def __init__(self, name: str, layer: nn.Module):
        super().__init__()
        self.name, self.layer = name, layer
        self.prepad = isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros"
        self.ranks: set[int] = set()
        self.out_shapes: list[tuple] = []
        self.symbolic_calls = 0

    def forward(self, x):
        if self.prepad:  # padding copies values, so it commutes with quantization: pad first, conv unpadded
            x = F.pad(x, self.layer._reversed_padding_repeated_twice, mode=self.layer.padding_mode)
        self.ranks.add(x.dim())
        return _Placeholder.apply(x, self.name)

    def compute(self, x):
        if not self.prepad:
            return self.layer(x)
        layer = self.layer
        return F.conv2d(layer.quantized_input(x), layer.quantized_weight(), layer.bias, layer.stride, 0,
                        layer.dilation, layer.groups)


def _torch_max_opset() -> int:
    constants = getattr(torch.onnx, "_constants", None)
    return int(getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17))


@contextlib.contextmanager
def _tracing(stubs: dict[str, _Stub]):
    _TRACING.update(stubs)
    try:
        yield
    finally:
        _TRACING.clear()


def _trace(model: nn.Module, input_shape, opset: int) -> tuple[bytes, dict[str, _Stub], list[str]]:
    """Float graph of ``model`` with one placeholder per quantized layer; returns (bytes, stubs, output names)."""
    traced = copy.deepcopy(model).eval()
    stubs = {}
    for name, layer in quant_layers(traced).items():
        stubs[name] = _Stub(name, layer)
        _set_submodule(traced, name, stubs[name])
    x = torch.zeros(1, *input_shape, dtype=next(model.parameters()).dtype)
    with _tracing(stubs), torch.no_grad():
        out = traced(x)  # how many outputs there are, to name them
    outputs = ["output"] if isinstance(out, torch.Tensor) else [f"output_{i}" for i in range(len(out))]
    for stub in stubs.values():
        stub.out_shapes.clear()
    buf = io.BytesIO()
    with _tracing(stubs), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(traced, (x,), buf, dynamo=False, opset_version=min(opset, _torch_max_opset()),
                          input_names=["input"], output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in ["input", *outputs]})
    return buf.getvalue(), stubs, outputs


def _expand(proto, specs: dict[str, LayerSpec], opset: int) -> dict[str, QTypes]:
    """Replace every placeholder by its QDQ subgraph; returns the types chosen per layer."""
    graph, nodes, chosen = proto.graph, [], {}
    taken = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        name = next(a.s.decode() for a in node.attribute if a.name == "name")
        first = name not in chosen
        chosen.setdefault(name, choose_types(specs[name], opset))
        sub_nodes, inits = layer_nodes(specs[name], node.input[0], node.output[0], chosen[name])
        nodes.extend(sub_nodes)
        if first:
            clash = [i.name for i in inits if i.name in taken]
            if clash:
                raise MixbitsError(f"initializer names {clash} of layer {name!r} are taken by the float graph")
            graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(nodes)
    set_opset(proto, opset)
    return chosen


# the public entry point ----------------------------------------------------------------------------
def export_onnx(model: nn.Module, input_shape, path, opset: int | None = None, check_inputs=None,
                tolerance: float = 1e-3, max_mismatch: float = 0.5, min_agreement: float = 99.0) -> ExportReport:
    """Write ``model`` (quantized, at fixed bits, calibrated) as a QDQ ONNX file at ``path``.

    ``input_shape`` is one sample's (C, H, W); the batch dimension is dynamic. ``opset`` defaults to
    the highest of 25, 21, 13 that the installed onnxruntime runs. With ``check_inputs`` (a tensor, or
    an iterable of tensors or (x, y) batches) the file is run with onnxruntime and compared with the
    PyTorch model before it is written: every layer alone must match to ``tolerance`` (relative), the
    whole model as ``check_onnx`` says; else it raises.
    """
    layers = require_quantized(model)
    opset = resolve_opset(opset)
    specs = {name: layer_spec(name, layer) for name, layer in layers.items()}
    float_layers = [n for n, m in model.named_modules()
                    if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in layers]
    if float_layers:
        warnings.warn(f"layers left in float (not quantized): {', '.join(float_layers)}", stacklevel=2)
    raw, stubs, outputs = _trace(model, tuple(input_shape), opset)
    for name, stub in stubs.items():
        specs[name].in_ranks = tuple(sorted(stub.ranks))
    proto = onnx.load_from_string(raw)
    types = _expand(proto, specs, opset)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    described = {n: {"w_bits": specs[n].w_bits, "a_bits": specs[n].a_bits, "per_channel": specs[n].per_channel,
                     **t.describe()} for n, t in types.items()}
    report = ExportReport(str(path), opset, len(data), described, float_layers)
    if check_inputs is not None:
        limits = (tolerance, max_mismatch, min_agreement)
        report.check = _check(model, data, check_inputs, outputs, (specs, types, opset), limits)
    atomic_write_bytes(path, data)
    return report


def _check(model, data: bytes, inputs, outputs, layers, limits: tuple[float, float, float]) -> dict:
    batches = _batches(inputs)
    first = next(batches, None)
    if first is None:
        raise MixbitsError("check_inputs yielded no samples; give a tensor (N, C, H, W) or a loader of batches")
    was_training = model.training
    try:
        per_layer = check_layers(model.eval(), *layers, first[0][:64], limits[0])
    finally:
        model.train(was_training)
    result = check_onnx(model, data, itertools.chain([first], batches), outputs, *limits)
    return {**result, **per_layer}


# the numerical check ---------------------------------------------------------------------------------
def _batches(inputs):
    if isinstance(inputs, torch.Tensor):
        yield inputs, None
        return
    for item in inputs:
        if isinstance(item, (tuple, list)):
            yield item[0], (item[1] if len(item) > 1 else None)
        else:
            yield item, None


def _as_list(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


@torch.no_grad()
def check_layers(model: nn.Module, specs: dict[str, LayerSpec], types: dict[str, QTypes], opset: int,
                 x: torch.Tensor, tolerance: float = 1e-3) -> dict:
    """Each quantized layer's QDQ subgraph alone, fed the very input PyTorch gave that layer.

    With identical inputs the integer codes are identical, so only float summation order separates
    the two: this is where "equal up to float rounding" is checked, and the first layer that breaks
    it is named. (End to end, that rounding can flip an activation sitting exactly between two
    levels in a later layer; ``check_onnx`` allows for those.)
    """
    layers, seen = quant_layers(model), {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs[0], output))  # the first call of a layer used several times
        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in layers.items() if name in specs]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    worst = {"layer_max_rel_diff": 0.0, "worst_layer": None}
    for name, (inp, ref) in seen.items():
        layer = layers[name]
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            inp = F.pad(inp, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        proto = layer_model(specs[name], types[name], opset, tuple(inp.shape))
        got = torch.from_numpy(session(proto.SerializeToString()).run(None, {"x": inp.float().numpy()})[0])
        rel = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
        if rel > tolerance:
            raise MixbitsError(f"layer {name!r} alone differs from PyTorch by {rel:.2g} of its largest output "
                               f"(tolerance {tolerance:g}) with types {types[name].describe()}; try --opset 13")
        if rel >= worst["layer_max_rel_diff"]:
            worst = {"layer_max_rel_diff": rel, "worst_layer": name}
    return worst


@torch.no_grad()
def check_onnx(model: nn.Module, onnx_model: bytes | str | Path, inputs, outputs=("output",),
               tolerance: float = 1e-3, max_mismatch: float = 0.5, min_agreement: float = 99.0) -> dict:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on the same inputs; compare every output.

    A sample "differs" when some output of it is off by more than ``tolerance`` times that output's
    largest |value| over all samples. Float summation order differs between the runtimes, so an
    activation lying within rounding error of a midpoint between two levels can land on the other
    level; a few samples then differ by about one quantization step. A wrong graph makes most samples
    differ instead: more than ``max_mismatch`` (a fraction) of them, or a top-1 agreement below
    ``min_agreement`` percent, raises. Returns max |diff|, its relative size, the differing samples,
    top-1 agreement (first output), and both accuracies when labels are given.
    """
    data = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    sess, was_training = session(data), model.training
    model.eval()
    diffs, scales = [[] for _ in outputs], [0.0] * len(outputs)
    counts = {"samples": 0, "agree": 0, "labelled": 0, "correct_torch": 0, "correct_onnx": 0}
    try:
        for x, y in _batches(inputs):
            ref = [t.float() for t in _as_list(model(x))]
            got = [torch.from_numpy(a) for a in sess.run(list(outputs), {"input": x.float().numpy()})]
            for i, (r, g) in enumerate(zip(ref, got, strict=True)):
                diffs[i].append((r - g).abs().reshape(r.shape[0], -1).amax(1))
                scales[i] = max(scales[i], float(r.abs().max()))
            _count(counts, ref[0].argmax(-1), got[0].argmax(-1), y)
    finally:
        model.train(was_training)
    return _verdict(counts, [torch.cat(d) for d in diffs], scales, outputs, (tolerance, max_mismatch, min_agreement))


def _count(counts: dict, pred_ref, pred_got, y) -> None:
    counts["samples"] += pred_ref.shape[0]
    counts["agree"] += int((pred_ref == pred_got).sum())
    if y is not None:
        counts["labelled"] += int(y.numel())
        counts["correct_torch"] += int((pred_ref == y).sum())
        counts["correct_onnx"] += int((pred_got == y).sum())


def _verdict(counts: dict, diffs: list[torch.Tensor], scales: list[float], outputs, limits) -> dict:
    tolerance, max_mismatch, min_agreement = limits
    n = counts["samples"]
    if n == 0:
        raise MixbitsError("check_inputs yielded no samples; give a tensor (N, C, H, W) or a loader of batches")
    rel = [d / max(s, 1e-12) for d, s in zip(diffs, scales, strict=True)]
    differ = torch.stack([r > tolerance for r in rel]).any(0)
    result = {"samples": n, "max_abs_diff": max(float(d.max()) for d in diffs), "output_scale": scales[0],
              "rel_diff": max(float(r.max()) for r in rel), "differing_samples": int(differ.sum()),
              "top1_agreement": 100.0 * counts["agree"] / n, "tolerance": tolerance}
    if counts["labelled"]:
        result["top1_torch"] = 100.0 * counts["correct_torch"] / counts["labelled"]
        result["top1_onnx"] = 100.0 * counts["correct_onnx"] / counts["labelled"]
    problems = []
    if result["differing_samples"] > max_mismatch * n:
        problems.append(f"{result['differing_samples']} of {n} samples differ by more than {tolerance:g} of the "
                        f"largest output (at most {100 * max_mismatch:g} % may)")
    if result["top1_agreement"] < min_agreement:
        problems.append(f"top-1 agreement is {result['top1_agreement']:.2f} % (at least {min_agreement:g} % needed)")
    if problems:
        worst = max(range(len(outputs)), key=lambda i: float(rel[i].max()))
        raise MixbitsError(f"ONNX output {outputs[worst]!r} does not match PyTorch: {'; '.join(problems)}; max |diff| "
                           f"{float(diffs[worst].max()):.3g} ({float(rel[worst].max()):.2g} of its largest value). "
                           "The file was not written; try --opset 13")
    return result
