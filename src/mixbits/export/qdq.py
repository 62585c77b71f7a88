"""One quantized layer as QDQ ONNX nodes, and which integer types and opsets the installed onnxruntime runs.

Each layer's subgraph is built from the integers and scales PyTorch computes (``layer_spec``); its types
are the narrowest the opset has that onnxruntime actually runs, found by running a probe graph of the
layer's form once (``choose_types``), else int8/uint8 with a Clip to the layer's range.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..errors import AdvisedError, MixbitsError
from ..layer_types import kind as layer_kind
from ..quant import integer_range
from .packing import pack_bits

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
    kind: str  # "conv" | "conv_transpose" | "linear" | "embedding" (layer_types.kind)
    codes: np.ndarray  # integer weight codes
    w_scale: np.ndarray  # float32: one value, or one per output channel
    a_scale: np.float32
    a_signed: bool
    w_bits: int
    a_bits: int
    bias: np.ndarray | None = None
    conv: dict = field(default_factory=dict)  # Conv / ConvTranspose attributes
    per_channel: bool = False
    in_ranks: tuple[int, ...] = ()  # ranks of the inputs it was called with (Linear: 2 uses Gemm)


def _conv_attrs(conv: nn.modules.conv._ConvNd) -> dict:
    kernel, dilation = list(conv.kernel_size), list(conv.dilation)
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        pads = [0] * 2 * len(kernel)  # non-zero padding modes are applied before the layer (see onnx_export._Stub)
    elif conv.padding == "same":  # torch puts the odd pixel at the end
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        pads = list(conv.padding) * 2
    attrs = {"kernel_shape": kernel, "strides": list(conv.stride), "pads": pads, "dilations": dilation,
             "group": conv.groups}
    if conv.transposed:
        attrs["output_padding"] = list(conv.output_padding)
    return attrs


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
    kind = layer_kind(layer)
    conv = kind in ("conv", "conv_transpose")
    bias = None if getattr(layer, "bias", None) is None else layer.bias.detach().float().cpu().numpy()
    return LayerSpec(name, kind, codes.cpu().numpy(),
                     step.float().cpu().numpy().reshape(-1), np.float32(layer.a_quant.step(a_bits, 1).item()),
                     layer.a_quant.signed, w_bits, a_bits, bias, _conv_attrs(layer) if conv else {},
                     layer.w_quant.steps.shape[1] > 1, (codes.dim(),) if conv else (2,))


@dataclass(frozen=True)
class QTypes:
    """ONNX integer types of one layer: weight codes, input codes, whether a Clip narrows the input, the
    input zero point (128 when a signed input is carried as uint8, for runtimes that need it) and the
    weight zero point (128 when signed 8-bit weight codes are carried as uint8: see ``choose_types``)."""

    weight: int
    act: int
    clip: bool
    zero_point: int = 0
    weight_zero_point: int = 0

    def describe(self) -> dict:
        name = TensorProto.DataType.Name
        return {"weight_type": name(self.weight).lower(), "act_type": name(self.act).lower(), "clip": self.clip,
                "zero_point": self.zero_point, "weight_zero_point": self.weight_zero_point}


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
    a_type = _narrowest(spec.a_bits, act_table, opset, exact=True)
    if wide_linear_weights(spec):
        weights = [(UNSIGNED[8], 128)]
    else:
        weights = [(w, 0) for w in (_narrowest(spec.w_bits, SIGNED, opset, exact=False), SIGNED[8])]
    tries = [QTypes(w, a, spec.a_bits < WIDTH[a], 0, wzp) for w, wzp in weights for a in (a_type, act_table[8])]
    if spec.a_signed:  # the same levels, shifted: some onnxruntime fusions only take uint8 inputs
        tries += [QTypes(w, UNSIGNED[8], spec.a_bits < 8, 128, wzp) for w, wzp in weights]
    for types in dict.fromkeys(tries):
        if _runs(spec, types, opset):
            return types
    raise AdvisedError(f"onnxruntime {ort.__version__} runs no QDQ form of layer {spec.name!r} at opset {opset}",
                       [("opset=13", "--opset 13")] if opset != 13 else [])


def wide_weights(spec: LayerSpec) -> bool:
    """Whether a layer's weight codes leave [-64, 64], so that an integer kernel must take them as uint8 with zero
    point 128.

    onnxruntime's uint8 x int8 kernels add pairs of products in int16 on x86 CPUs without VNNI (AVX2,
    AVX-512F), which saturates once |code| > 64 (255 x 65 x 2 > 32767): a W8 layer's outputs moved by up to a
    tenth of their range. Unsigned weights take the uint8 x uint8 kernel, which widens to int16 before
    multiplying and is exact."""
    return int(np.abs(spec.codes).max(initial=0)) > 64


def wide_linear_weights(spec: LayerSpec) -> bool:
    """``wide_weights`` for the exact form, where only a Linear layer's DequantizeLinear -> Gemm/MatMul is fused
    into an integer product (QGemm, MatMulIntegerToFloat); its convolutions stay float (no Q after them)."""
    return spec.kind == "linear" and wide_weights(spec)


def widened(types: QTypes, spec: LayerSpec) -> QTypes:
    """The same layer with its input codes in an 8-bit container and a Clip to its range (weights unchanged)."""
    if WIDTH[types.act] == 8:
        return types
    return replace(types, act=(SIGNED if spec.a_signed else UNSIGNED)[8], clip=spec.a_bits < 8)


def _int_tensor(name: str, values: np.ndarray, dtype: int):
    if WIDTH[dtype] == 8:
        return numpy_helper.from_array(values.astype(np.int8 if dtype == TensorProto.INT8 else np.uint8), name)
    width = WIDTH[dtype]  # ONNX packs narrow types like pack_bits: element 0 in the lowest bits
    raw = pack_bits(values.astype(np.int64).reshape(-1) & ((1 << width) - 1), width)
    return helper.make_tensor(name, dtype, list(values.shape), raw, raw=True)


def _scalar(name: str, value, dtype: int):
    return helper.make_tensor(name, dtype, [], [int(value)])


def _weight_inits(spec: LayerSpec, types: QTypes) -> list:
    """The weight codes, the unit scale that dequantizes codes to themselves, and the product's scale (input
    step times weight step, rounded once in float32 as PyTorch rounds it) shaped to broadcast over channels."""
    n = spec.name
    shape = _channel_shape(spec) if spec.per_channel else ()
    scale = (np.float32(spec.a_scale) * spec.w_scale.astype(np.float32)).reshape(shape)
    wzp = types.weight_zero_point
    inits = [_int_tensor(f"{n}.weight_int", spec.codes.astype(np.int64) + wzp, types.weight),
             _int_tensor(f"{n}.weight_zero_point", np.array(wzp, np.int64), types.weight),
             numpy_helper.from_array(np.array(1.0, np.float32), f"{n}.unit_scale"),
             numpy_helper.from_array(scale.astype(np.float32), f"{n}.scale")]
    if spec.bias is not None:  # (C, 1, 1) for a 2-D convolution, so that Add broadcasts over (N, C, H, W)
        inits.append(numpy_helper.from_array(spec.bias.astype(np.float32).reshape(_channel_shape(spec)), f"{n}.bias"))
    return inits


def _channel_shape(spec: LayerSpec) -> tuple[int, ...]:
    """How a per-output-channel value broadcasts over the layer's output: (C, 1, ...) for N-d convolutions."""
    return (-1, *[1] * len(spec.conv["kernel_shape"])) if spec.conv else (-1,)


def _input_inits(spec: LayerSpec, types: QTypes, upper_code: int | None = None) -> list:
    """The input scale and zero point, and the Clip bounds (the highest code at most ``upper_code``)."""
    n = spec.name
    zp = types.zero_point
    inits = [numpy_helper.from_array(np.array(spec.a_scale, np.float32), f"{n}.input_scale"),
             _scalar(f"{n}.input_zero_point", zp, types.act)]
    if types.clip:
        lo, hi = integer_range(spec.a_bits, spec.a_signed)
        hi = hi if upper_code is None else min(hi, upper_code)
        inits += [_scalar(f"{n}.input_min", lo + zp, types.act), _scalar(f"{n}.input_max", hi + zp, types.act)]
    return inits


def layer_nodes(spec: LayerSpec, x: str, y: str, types: QTypes) -> tuple[list, list]:
    """(nodes, initializers) computing ``y`` from ``x`` like the quantized layer's integer form (the form
    PyTorch runs at inference, quant/layers.py); node names derive from ``y``.

    Both DequantizeLinear nodes take a unit scale, so the Conv/Gemm/MatMul multiplies integer codes (exact,
    in any summation order); one Mul by the product's scale and one Add of the bias follow, the two
    roundings PyTorch makes. An embedding has its own form (``embedding_nodes``)."""
    if spec.kind == "embedding":
        return embedding_nodes(spec, x, y, types)
    n, node = spec.name, helper.make_node
    codes = f"{y}/input_int"
    nodes = [node("QuantizeLinear", [x, f"{n}.input_scale", f"{n}.input_zero_point"], [codes], name=f"{y}/Quantize")]
    if types.clip:
        nodes.append(node("Clip", [codes, f"{n}.input_min", f"{n}.input_max"], [f"{y}/input_clip"], name=f"{y}/Clip"))
        codes = f"{y}/input_clip"
    nodes.append(node("DequantizeLinear", [codes, f"{n}.unit_scale", f"{n}.input_zero_point"], [f"{y}/input_codes"],
                      name=f"{y}/DequantizeInput"))
    nodes.append(node("DequantizeLinear", [f"{n}.weight_int", f"{n}.unit_scale", f"{n}.weight_zero_point"],
                      [f"{y}/weight_codes"], name=f"{y}/DequantizeWeight"))
    xd, wd, product = f"{y}/input_codes", f"{y}/weight_codes", f"{y}/integer_product"
    # The bias is a separate Add, never an input of Conv/Gemm: onnxruntime's default optimisations
    # quantize a Conv/Gemm bias to int32, which moves the outputs and, through a later low-bit quantizer,
    # flips whole levels.
    if spec.kind in PRODUCT_OPS:  # Conv, ConvTranspose: the float layer's attributes
        nodes.append(node(PRODUCT_OPS[spec.kind], [xd, wd], [product], name=f"{y}/{PRODUCT_OPS[spec.kind]}",
                          **spec.conv))
    elif max(spec.in_ranks or (2,)) <= 2:
        nodes.append(node("Gemm", [xd, wd], [product], name=f"{y}/Gemm", transB=1))
    else:  # inputs of rank > 2 (tokens): MatMul with the transposed weight
        nodes += [node("Transpose", [wd], [f"{y}/weight_t"], name=f"{y}/Transpose", perm=[1, 0]),
                  node("MatMul", [xd, f"{y}/weight_t"], [product], name=f"{y}/MatMul")]
    scaled = f"{y}/product" if spec.bias is not None else y
    nodes.append(node("Mul", [product, f"{n}.scale"], [scaled], name=f"{y}/Scale"))
    if spec.bias is not None:
        nodes.append(node("Add", [scaled, f"{n}.bias"], [y], name=f"{y}/AddBias"))
    return nodes, _input_inits(spec, types) + _weight_inits(spec, types)


PRODUCT_OPS = {"conv": "Conv", "conv_transpose": "ConvTranspose"}


def embedding_nodes(spec: LayerSpec, x: str, y: str, types: QTypes) -> tuple[list, list]:
    """A quantized embedding: its integer table dequantized (code times step, the one rounding PyTorch makes),
    then the rows of the token ids ``x`` gathered. The ids are not quantized (weight-only)."""
    n, node = spec.name, helper.make_node
    wzp = types.weight_zero_point
    per_row = {"axis": 0} if spec.per_channel else {}
    inits = [_int_tensor(f"{n}.weight_int", spec.codes.astype(np.int64) + wzp, types.weight),
             _int_tensor(f"{n}.weight_zero_point", np.full(spec.w_scale.shape if spec.per_channel else (), wzp,
                                                           np.int64), types.weight),
             numpy_helper.from_array(spec.w_scale.astype(np.float32).reshape(-1 if spec.per_channel else ()),
                                     f"{n}.weight_scale")]
    nodes = [node("DequantizeLinear", [f"{n}.weight_int", f"{n}.weight_scale", f"{n}.weight_zero_point"],
                  [f"{y}/table"], name=f"{y}/DequantizeWeight", **per_row),
             node("Gather", [f"{y}/table", x], [y], name=f"{y}/Gather", axis=0)]
    return nodes, inits


def input_elem_type(spec: LayerSpec) -> int:
    """The ONNX type of the layer's input: token ids (int64) for an embedding, float otherwise."""
    return TensorProto.INT64 if spec.kind == "embedding" else TensorProto.FLOAT


def layer_model(spec: LayerSpec, types: QTypes, opset: int, in_shape) -> onnx.ModelProto:
    """A graph holding only this layer, input ``x`` of shape ``in_shape`` (batch included)."""
    nodes, inits = layer_nodes(spec, "x", "y", types)
    x_info = helper.make_tensor_value_info("x", input_elem_type(spec), list(in_shape))
    graph = helper.make_graph(nodes, spec.name or "layer", [x_info],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    set_opset(proto, opset)
    return proto


def set_opset(proto, opset: int) -> None:
    """Declare the standard domain at ``opset`` only (the placeholder domain is gone) and a matching IR version."""
    del proto.opset_import[:]
    proto.opset_import.append(helper.make_opsetid("", opset))
    proto.ir_version = max(7, helper.find_min_ir_version_for(list(proto.opset_import)))


def session(data: bytes, threads: int | None = None, optimize: bool = True,
            optimized_path: str | None = None) -> ort.InferenceSession:
    """A CPU session as users deploy it (onnxruntime's default graph optimisations), or with none (``optimize=False``).

    ``optimized_path``: where onnxruntime saves the graph as its optimisations left it.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # onnxruntime raises its errors anyway; a refused probe is an answer, not news
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


_RUNS: dict[tuple, bool] = {}


def _form(spec: LayerSpec) -> tuple:
    """What decides whether onnxruntime runs a layer's QDQ graph: its kind and attributes, not its values."""
    conv = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(spec.conv.items()))
    return (spec.kind, spec.in_ranks, spec.per_channel, spec.codes.shape, conv, spec.bias is not None,
            spec.a_signed, spec.a_bits)


def _probe_input(spec: LayerSpec) -> np.ndarray:
    if spec.kind == "embedding":
        return np.zeros((1, 1), np.int64)
    if spec.kind == "linear":
        return np.zeros((1,) * (max(max(spec.in_ranks or (2,)), 2) - 1) + (spec.codes.shape[1],), np.float32)
    size = max(d * (k - 1) + 1 for d, k in zip(spec.conv["dilations"], spec.conv["kernel_shape"], strict=True))
    channels = spec.codes.shape[0] if spec.kind == "conv_transpose" else spec.codes.shape[1] * spec.conv["group"]
    return np.zeros((1, channels, *[size] * len(spec.conv["kernel_shape"])), np.float32)


def _runs(spec: LayerSpec, types: QTypes, opset: int) -> bool:
    """Whether the installed onnxruntime loads and runs this layer's form with these types (asked once per form)."""
    key = (_form(spec), types, opset)
    if key not in _RUNS:
        probe = replace(spec, codes=np.zeros_like(spec.codes), w_scale=np.ones_like(spec.w_scale))
        x = _probe_input(spec)
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
