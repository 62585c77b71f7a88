"""The fast form of an export: quantized layers as onnxruntime's integer kernels.

The exact form (``qdq.layer_nodes``) multiplies integer codes in a float Conv/Gemm and rescales in float, which
reproduces PyTorch to the bit but runs slower than the float model. Here every layer is written as the QDQ
pattern onnxruntime's CPU provider fuses into an integer kernel, with the real scales in the DequantizeLinear
nodes:

    x -> QuantizeLinear(a_step) -> [Clip] -> DequantizeLinear(a_step) -+
    codes -> DequantizeLinear(w_step * bn_scale, per output channel) --+-> Conv(bias) -> QuantizeLinear(out)

- BatchNorm after a convolution is folded into the per-channel weight scale and the bias (the integer codes
  stay the trained ones; a channel with a negative BatchNorm scale has its codes negated);
- a convolution's output is requantized to 8 bits, so onnxruntime fuses DQ -> Conv -> Q into QLinearConv (a
  ReLU before that Q is absorbed by its zero point). Where every consumer of that output is a quantized layer
  with one input quantizer, the output is quantized with that layer's own step (no extra rounding); elsewhere
  (residual streams) with a step that covers the tensor's range on calibration inputs, and residual additions
  are requantized the same way so that they run as QLinearAdd;
- a Linear layer keeps a float output: DQ -> Gemm/MatMul fuses into an integer product with float output
  (QGemm, MatMulIntegerToFloat), so it needs no requantization.

Every code is carried in an 8-bit container: CPU kernels compute in 8 bits whatever the bit-width. Weight codes
beyond [-64, 64] go as uint8 with zero point 128 (``qdq.wide_weights``: the uint8 x int8 kernels of CPUs without
VNNI saturate on them), and inputs as uint8 (signed ones with zero point 128).

What differs from PyTorch's integer form: the 8-bit requantization of residual streams (PyTorch adds them in
float), the bias rounded to int32 at the product's scale, and the requantization multiplier. Each is below one
level of the tensor it rounds; a later low-bit quantizer turns some into whole levels (docs/export.md).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import MixbitsError
from ..quant import integer_range
from .qdq import (
    SIGNED,
    SINCE,
    UNSIGNED,
    WIDTH,
    LayerSpec,
    QTypes,
    _input_inits,
    _int_tensor,
    session,
    set_opset,
    wide_weights,
)

INTEGER_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                   "ConvInteger", "MatMulInteger")
# float products as onnxruntime's optimised graph names them (FusedConv: a Conv with its activation)
FLOAT_PRODUCTS = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NhwcFusedConv")


def fast_types(spec: LayerSpec) -> QTypes:
    """8-bit containers: uint8 inputs (signed ones shifted by 128) with a Clip below 8 bits; int8 weights, or uint8
    with zero point 128 where their codes leave [-64, 64]."""
    wide = wide_weights(spec)
    return QTypes(UNSIGNED[8] if wide else TensorProto.INT8, UNSIGNED[8], spec.a_bits < 8,
                  128 if spec.a_signed else 0, 128 if wide else 0)


@dataclass
class Fold:
    """A BatchNorm (x * scale + shift per channel) folded into the layer before it."""

    scale: np.ndarray
    shift: np.ndarray


def fast_layer_nodes(spec: LayerSpec, x: str, y: str, types: QTypes, fold: Fold | None = None,
                     upper: float | None = None) -> tuple[list, list]:
    """(nodes, initializers) computing ``y`` from ``x`` as a QDQ pattern that fuses into an integer kernel (the
    requantization of the output, where there is one, is added by the caller). ``upper``: a ReLU6's bound
    before the layer, applied to the input codes (``round(min(x, 6) / s) == min(round(x / s), round(6 / s))``)."""
    n, node = spec.name, helper.make_node
    channels = spec.codes.shape[0]
    w_scale = np.broadcast_to(np.float32(spec.a_scale) * spec.w_scale.astype(np.float32), (channels,))
    w_scale = (w_scale / np.float32(spec.a_scale)).astype(np.float32)  # the weight step PyTorch rounds with
    bias = np.zeros(channels, np.float32) if spec.bias is None else spec.bias.astype(np.float32).reshape(-1)
    codes = spec.codes.astype(np.int64)
    if fold is not None:
        sign = np.where(fold.scale < 0, -1, 1)
        codes = codes * sign.reshape((-1,) + (1,) * (codes.ndim - 1))
        w_scale = (w_scale * np.abs(fold.scale)).astype(np.float32)
        bias = (bias * fold.scale + fold.shift).astype(np.float32)
    m = 1
    if spec.kind == "conv":  # onnxruntime rounds a convolution's bias to int32 at input step x weight step: at
        # 2-bit inputs one such unit was 7 levels of the output. Codes times m (within [-32, 32]) with the weight
        # step divided by m give the same products and an m times finer bias. (Up to 64, ResNet-20 W4A4 agreed
        # on 90.0 % of samples instead of 97.7 %: QLinearConv computes its integer model exactly, but which
        # outputs land beside a midpoint moves with m; docs/export.md.)
        m = max(1, 32 // max(int(np.abs(codes).max(initial=0)), 1))
        w_scale = (w_scale / np.float32(m)).astype(np.float32)
    matmul = spec.kind == "linear" and max(spec.in_ranks or (2,)) > 2
    if matmul:  # MatMul takes (in, out): per output channel is axis 1
        codes = codes.T
    codes_name, nodes = f"{y}/input_int", []
    nodes.append(node("QuantizeLinear", [x, f"{n}.input_scale", f"{n}.input_zero_point"], [codes_name],
                      name=f"{y}/Quantize"))
    if types.clip:
        nodes.append(node("Clip", [codes_name, f"{n}.input_min", f"{n}.input_max"], [f"{y}/input_clip"],
                          name=f"{y}/Clip"))
        codes_name = f"{y}/input_clip"
    xd, wd = f"{y}/input_codes", f"{y}/weight"
    nodes.append(node("DequantizeLinear", [codes_name, f"{n}.input_scale", f"{n}.input_zero_point"], [xd],
                      name=f"{y}/DequantizeInput"))
    wzp, container = types.weight_zero_point, UNSIGNED[8] if types.weight_zero_point else TensorProto.INT8
    widen, weight = _widening_nodes(n, y, types.weight, container, m)
    nodes += widen
    nodes.append(node("DequantizeLinear", [weight, f"{n}.weight_scale", f"{n}.weight_zero_point"], [wd],
                      name=f"{y}/DequantizeWeight", axis=1 if matmul else 0))
    upper_code = None if upper is None else relu6_code(spec, upper)
    inits = _input_inits(spec, types, upper_code) + [
        _int_tensor(f"{n}.weight_int", (codes if widen else codes * m) + wzp, types.weight),
        _int_tensor(f"{n}.weight_zero_point", np.full(channels, wzp, np.int64), container),
        numpy_helper.from_array(w_scale, f"{n}.weight_scale"),
        numpy_helper.from_array(bias, f"{n}.bias")]
    if widen and m > 1:
        inits.append(numpy_helper.from_array(np.array(m, np.int32), f"{n}.weight_multiplier"))
    if spec.kind == "conv":
        nodes.append(node("Conv", [xd, wd, f"{n}.bias"], [y], name=f"{y}/Conv", **spec.conv))
        return nodes, inits
    # A float bias input keeps onnxruntime from fusing Gemm into QGemm: the bias is its own Add, as PyTorch adds it.
    product = node("MatMul", [xd, wd], [f"{y}/product"], name=f"{y}/MatMul") if matmul else \
        node("Gemm", [xd, wd], [f"{y}/product"], name=f"{y}/Gemm", transB=1)
    nodes += [product, node("Add", [f"{y}/product", f"{n}.bias"], [y], name=f"{y}/AddBias")]
    return nodes, inits


def relu6_code(spec: LayerSpec, upper: float) -> int:
    """The input code a ReLU6 bound ``upper`` lands on at the layer's input step."""
    return int(np.round(np.float32(upper) / np.float32(spec.a_scale)))


def _clips(spec: LayerSpec, types: QTypes, upper: float | None) -> bool:
    """Whether the layer's input codes need a Clip: below 8 bits, or where a ReLU6 moved onto them bounds them below
    the top of the 8-bit container (at or above it the QuantizeLinear's own saturation is the bound: no node)."""
    return types.clip or (upper is not None and relu6_code(spec, upper) < integer_range(spec.a_bits, False)[1])


def _widening_nodes(n: str, y: str, stored: int, container: int, m: int) -> tuple[list, str]:
    """(nodes, the weight tensor DequantizeLinear reads): codes stored in a 2- or 4-bit type are widened to int8
    (and multiplied by m) by Cast/Mul nodes on constants, which onnxruntime folds once at session start, so the
    file keeps them packed and the kernel still gets an int8 initializer to fuse (a DequantizeLinear of int4
    or int2 itself is not fused into QLinearConv by onnxruntime 1.32)."""
    if WIDTH[stored] == 8:
        return [], f"{n}.weight_int"
    node = helper.make_node
    if m == 1:
        return [node("Cast", [f"{n}.weight_int"], [f"{y}/weight_int8"], name=f"{y}/WidenWeight", to=container)], \
            f"{y}/weight_int8"
    return [node("Cast", [f"{n}.weight_int"], [f"{y}/weight_int32"], name=f"{y}/WidenWeight", to=TensorProto.INT32),
            node("Mul", [f"{y}/weight_int32", f"{n}.weight_multiplier"], [f"{y}/weight_times_m"],
                 name=f"{y}/MultiplyWeight"),
            node("Cast", [f"{y}/weight_times_m"], [f"{y}/weight_int8"], name=f"{y}/NarrowWeight", to=container)], \
        f"{y}/weight_int8"


def storage_type(spec: LayerSpec, types: QTypes, fold: Fold | None, opset: int) -> QTypes:
    """The narrowest signed type that holds the layer's stored codes (negated where a folded BatchNorm scale is
    negative) at ``opset``: int2 from opset 25, int4 from 21, else the 8-bit container."""
    if types.weight_zero_point:  # wide codes: uint8 with zero point 128
        return types
    codes = spec.codes.astype(np.int64)
    if fold is not None:
        codes = codes * np.where(fold.scale < 0, -1, 1).reshape((-1,) + (1,) * (codes.ndim - 1))
    low, high = int(codes.min(initial=0)), int(codes.max(initial=0))
    for width in (2, 4):
        if opset >= SINCE[width] and -(1 << (width - 1)) <= low and high < (1 << (width - 1)):
            return replace(types, weight=SIGNED[width])
    return replace(types, weight=TensorProto.INT8)


def requantize_nodes(tensor: str, source: str, scale: str, zero_point: str) -> list:
    """``tensor`` = DequantizeLinear(QuantizeLinear(``source``)): the 8-bit point onnxruntime fuses kernels around."""
    return [helper.make_node("QuantizeLinear", [source, scale, zero_point], [f"{tensor}/requantized"],
                             name=f"{tensor}/Requantize"),
            helper.make_node("DequantizeLinear", [f"{tensor}/requantized", scale, zero_point], [tensor],
                             name=f"{tensor}/Dequantize")]


# the graph-level plan: which BatchNorms fold, where outputs are requantized ----------------------------------
def constants(graph) -> dict[str, np.ndarray]:
    """Initializers and the Identity/Constant nodes torch's exporter puts in front of shared ones."""
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
        elif node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


@dataclass
class Plan:
    """How the placeholder graph turns into the fast form."""

    folds: dict  # layer node output -> (Fold, the BatchNorm Add's output the layer now writes, nodes dropped)
    requantized: dict  # tensor -> (scale name, zero point name) of its 8-bit requantization, or None: calibrate
    dropped: set
    grid: dict = field(default_factory=dict)  # calibrated tensor -> the input step of a quantized layer it feeds
    bounds: dict = field(default_factory=dict)  # layer -> the ReLU6 bound applied to its input codes instead
    bypassed: set = field(default_factory=set)  # the Clip nodes of those ReLU6s (an Identity takes their place)
    into_add: dict = field(default_factory=dict)  # calibrated tensor -> the requantized output of the addition


def _consumers(graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _fold(layer_out: str, spec: LayerSpec, users: dict, values: dict) -> tuple[Fold, str, list] | None:
    """The BatchNorm (Mul by a constant, then Add of one) that alone follows a convolution, if it can fold."""
    chain = users.get(layer_out, [])
    if spec.kind != "conv" or len(chain) != 1 or chain[0].op_type != "Mul" or chain[0].input[1] not in values:
        return None
    mul = chain[0]
    after = users.get(mul.output[0], [])
    if len(after) != 1 or after[0].op_type != "Add" or after[0].input[1] not in values:
        return None
    add, channels = after[0], spec.codes.shape[0]
    scale, shift = values[mul.input[1]].astype(np.float32), values[add.input[1]].astype(np.float32)
    if scale.size not in (1, channels) or shift.size not in (1, channels):
        return None
    scale = np.broadcast_to(scale.reshape(-1), (channels,)).copy()
    shift = np.broadcast_to(shift.reshape(-1), (channels,)).copy()
    negated = spec.codes.reshape(channels, -1)[scale < 0]
    lo, hi = -(1 << 7), (1 << 7) - 1
    if negated.size and not (lo <= -int(negated.max()) and -int(negated.min()) <= hi):
        return None  # a negated code would leave the 8-bit container
    return Fold(scale, shift), add.output[0], [mul.name, add.name]


def _requant_point(tensor: str, users: dict) -> tuple[str, str]:
    """(where to requantize ``tensor``, the tensor whose consumers decide its step).

    After a ReLU that alone consumes it: onnxruntime absorbs the ReLU into the QuantizeLinear's zero point.
    Before a Clip (ReLU6) that alone consumes it, with the step of what the Clip feeds: a Clip between Conv
    and QuantizeLinear stops the fusion, and quantizing first changes nothing, since rounding is monotone and
    the Clip's bound lands on the same code either way (``min(round(y / s), round(6 / s))``)."""
    after = users.get(tensor, [])
    if len(after) == 1 and after[0].op_type == "Relu":
        return after[0].output[0], after[0].output[0]
    if len(after) == 1 and after[0].op_type == "Clip":
        return tensor, after[0].output[0]
    return tensor, tensor


def plan(proto, specs: dict[str, LayerSpec], layer_of) -> Plan:
    """Which BatchNorms fold into the layer before them and which tensors are requantized to 8 bits.

    ``layer_of(node)`` names the quantized layer a placeholder node stands for (None for other nodes).
    """
    graph = proto.graph
    values, users = constants(graph), _consumers(graph)
    folds, points, dropped = {}, {}, set()  # requantization point -> the tensor whose consumers decide its step
    for node in graph.node:
        name = layer_of(node)
        if name is None:
            # A residual addition of requantized outputs runs as QLinearAdd once it is requantized too; one of
            # float tensors (a transformer's, after its Linear layers) stays float: no kernel to gain, only rounding.
            if node.op_type == "Add" and any(i in points for i in node.input) and not any(i in values for i in
                                                                                         node.input):
                point, through = _requant_point(node.output[0], users)
                points[point] = through
            continue
        out = node.output[0]
        found = _fold(out, specs[name], users, values)
        if found is not None:
            folds[out] = found
            dropped.update(found[2])
            out = found[1]
        point, through = _requant_point(out, users)
        ends = users.get(through, [])
        # A convolution whose output goes to quantized layers or residual additions runs as QLinearConv; one that
        # feeds float ops (a transformer's patch embedding) stays a float product: no kernel to gain after it.
        if specs[name].kind == "conv" and ends and all(layer_of(u) or u.op_type == "Add" for u in ends):
            points[point] = through
    outputs, the_plan = {o.name for o in graph.output}, Plan(folds, {}, dropped)
    for tensor, through in points.items():
        if tensor in outputs or through in outputs:  # the model's own outputs stay float
            continue
        consumers = [specs[layer_of(u)] if layer_of(u) else None for u in users.get(through, [])]
        same = consumers and None not in consumers and len({_quantizer(s) for s in consumers}) == 1
        first = consumers[0] if same else None  # one input quantizer: its own step, no extra rounding
        the_plan.requantized[tensor] = (f"{first.name}.input_scale", f"{first.name}.input_zero_point") if same else None
        clip = users[tensor][0] if through != tensor else None
        bound = _relu6_bound(clip, values)
        if same and bound is not None and not any(c.a_signed for c in consumers):  # the ReLU6 on the codes
            the_plan.bypassed.add(clip.name)
            the_plan.bounds.update({c.name: bound for c in consumers})
        layer = next((c for c in consumers if c is not None), None)
        if not same and layer is not None:
            the_plan.grid[tensor] = float(layer.a_scale)
        after = users.get(through, [])
        if not same and len(after) == 1 and after[0].op_type == "Add":
            the_plan.into_add[tensor] = _requant_point(after[0].output[0], users)[0]
    return the_plan


def _relu6_bound(clip, values: dict) -> float | None:
    """The upper bound of a Clip from 0 (a ReLU6), if that is what ``clip`` is."""
    if clip is None or len(clip.input) < 3 or clip.input[1] not in values or clip.input[2] not in values:
        return None
    low, high = float(values[clip.input[1]]), float(values[clip.input[2]])
    return high if low == 0.0 else None


def _quantizer(spec: LayerSpec) -> tuple:
    return float(spec.a_scale), spec.a_signed


def calibrated_step(low: float, high: float, grid: float | None) -> float:
    """An 8-bit step covering [low, high] (uint8 from 0 when never negative, else int8 around 0); with ``grid``,
    the input step of a quantized layer the tensor feeds, the largest ``grid / n`` (n odd) that still covers it.

    With an odd n every midpoint between two levels of the layer is a midpoint of the finer grid too, so rounding
    to the fine grid first and then to the layer's gives the layer's own codes (PyTorch rounds only once)."""
    levels = 255 if low >= 0 else 127
    step = max(high if low >= 0 else max(-low, high), 1e-8) / levels
    if grid is not None and grid >= step:
        n = int(grid / step)
        n -= 1 - n % 2  # the largest odd n with grid / n >= step
        step = grid / n
    return step


def calibrated_scale(tensor: str, step: float, unsigned: bool) -> tuple[list, str, str]:
    """(initializers, scale, zero point) of an 8-bit requantization of ``tensor`` with ``step``: uint8, from 0 or
    around 128 (every activation in uint8: onnxruntime 1.32 refuses a ViT whose int8 and uint8 activations meet
    where it moves a QuantizeLinear across a Reshape)."""
    scale, zero = f"{tensor}/requant_scale", f"{tensor}/requant_zero_point"
    inits = [numpy_helper.from_array(np.array(step, np.float32), scale),
             helper.make_tensor(zero, TensorProto.UINT8, [], [0 if unsigned else 128])]
    return inits, scale, zero


def kernel_counts(optimized: onnx.ModelProto) -> Counter:
    """How many nodes of each type the optimised graph runs."""
    return Counter(node.op_type for node in optimized.graph.node)


# building the graph ---------------------------------------------------------------------------------------------
def add_layer_initializers(graph, name: str, inits: list, taken: set[str], done: set[str]) -> None:
    """Add a layer's initializers once (a layer called twice shares them), refusing names the float graph has."""
    if name in done:
        return
    done.add(name)
    clash = [i.name for i in inits if i.name in taken]
    if clash:
        raise MixbitsError(f"initializer names {clash} of layer {name!r} are taken by the float graph")
    graph.initializer.extend(inits)


def _expand(proto, specs: dict[str, LayerSpec], types: dict[str, QTypes], layer_of, the_plan: Plan,
            scales: dict[str, tuple[str, str]]) -> None:
    """Replace every placeholder by its fast subgraph, drop folded BatchNorms and requantize the planned tensors
    that have a scale in ``scales`` (the others stay float: that is how their ranges are measured)."""
    graph, nodes, done = proto.graph, [], set()
    taken = {init.name for init in graph.initializer}

    def emit(new_nodes: list, produced: str) -> None:
        if produced in scales:  # the last node writes the float value; Q/DQ make the tensor itself
            new_nodes[-1].output[list(new_nodes[-1].output).index(produced)] = f"{produced}/float"
            new_nodes += requantize_nodes(produced, f"{produced}/float", *scales[produced])
        nodes.extend(new_nodes)

    for node in graph.node:
        if node.name in the_plan.dropped:
            continue
        if node.name in the_plan.bypassed:  # a ReLU6 now applied to the next layer's codes
            nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
            continue
        name = layer_of(node)
        if name is None:
            emit([node], next((o for o in node.output if o in scales), ""))
            continue
        out, fold = node.output[0], None
        if out in the_plan.folds:
            fold, out, _ = the_plan.folds[out]
        sub_nodes, inits = fast_layer_nodes(specs[name], node.input[0], out, types[name], fold,
                                            the_plan.bounds.get(name))
        emit(sub_nodes, out)
        add_layer_initializers(graph, name, inits, taken, done)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}  # folded BatchNorm constants are no longer needed
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _ranges(data: bytes, tensors: list[str], x: np.ndarray) -> dict[str, tuple[float, float]]:
    """(min, max) of each tensor over the calibration inputs, from the graph with no requantization yet."""
    proto = onnx.load_from_string(data)
    proto.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    sess = session(proto.SerializeToString(), optimize=False)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {"input": x}), strict=True))
    return {t: (float(values[t].min()), float(values[t].max())) for t in tensors}


def build_fast(raw: bytes, specs: dict[str, LayerSpec], types: dict[str, QTypes], opset: int, layer_of,
               calibration: np.ndarray | None) -> tuple[bytes, dict[str, QTypes]]:
    """(the fast form of the placeholder graph ``raw``, each layer's types with the type its codes are stored in);
    residual streams are requantized with steps that cover their range on ``calibration`` inputs (a batch)."""
    the_plan = plan(onnx.load_from_string(raw), specs, layer_of)
    folds = {fold_info[1]: fold_info[0] for fold_info in the_plan.folds.values()}
    outputs = _layer_outputs(onnx.load_from_string(raw), layer_of, the_plan)
    types = {name: storage_type(specs[name], t, folds.get(outputs.get(name)), opset) for name, t in types.items()}
    types = {name: replace(t, clip=_clips(specs[name], t, the_plan.bounds.get(name))) for name, t in types.items()}
    own = {t: s for t, s in the_plan.requantized.items() if s is not None}
    measured = [t for t, s in the_plan.requantized.items() if s is None]

    def build(scales: dict, extra_inits: list) -> onnx.ModelProto:
        proto = onnx.load_from_string(raw)
        _expand(proto, specs, types, layer_of, the_plan, scales)
        proto.graph.initializer.extend(extra_inits)
        set_opset(proto, opset)
        return proto

    extra, scales = [], dict(own)
    if measured:
        if calibration is None:
            raise MixbitsError(f"the fast form requantizes {len(measured)} residual tensors (first {measured[0]!r}) "
                               "to 8 bits and needs calibration inputs to size their steps: pass calibration= (a "
                               "batch of samples) or check_inputs=, or form='exact'")
        ranges = _ranges(build(own, []).SerializeToString(), measured, np.asarray(calibration, np.float32))
        steps = {t: calibrated_step(*ranges[t], the_plan.grid.get(t)) for t in measured}
        for tensor, point in the_plan.into_add.items():  # the addition's own step where it covers the input:
            low, high = ranges[tensor]  # the integer sum then needs no rescaling of that input
            if point in steps and max(-low, high) <= 127 * steps[point]:
                steps[tensor] = steps[point]
        for tensor in measured:
            inits, scale, zero = calibrated_scale(tensor, steps[tensor], ranges[tensor][0] >= 0)
            extra += inits
            scales[tensor] = (scale, zero)
    proto = build(scales, extra)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString(), types


def _layer_outputs(proto, layer_of, the_plan: Plan) -> dict[str, str]:
    """Each layer's output tensor after folding (the first call of a layer called twice)."""
    out = {}
    for node in proto.graph.node:
        name = layer_of(node)
        if name is not None and name not in out:
            fold = the_plan.folds.get(node.output[0])
            out[name] = fold[1] if fold else node.output[0]
    return out


def optimized_graph(data: bytes) -> onnx.ModelProto:
    """The graph as onnxruntime's default optimisations leave it (``SessionOptions.optimized_model_filepath``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(data, optimized_path=str(path))
        return onnx.load(path)


def unfused_layers(data: bytes, specs: dict[str, LayerSpec]) -> tuple[Counter, list[str]]:
    """(node types of the optimised graph, the quantized layers whose float Conv/Gemm/MatMul onnxruntime kept)."""
    optimized = optimized_graph(data)
    owner = {f"{s.name}.{what}": s.name for s in specs.values() for what in ("weight_int", "bias")}
    for node in optimized.graph.node:  # a weight DequantizeLinear left unfused hands its layer on
        if node.op_type == "DequantizeLinear" and node.input[0] in owner:
            owner[node.output[0]] = owner[node.input[0]]
    unfused = {owner[i] for n in optimized.graph.node if n.op_type in FLOAT_PRODUCTS for i in n.input if i in owner}
    return kernel_counts(optimized), sorted(unfused)


def fast_layer_model(spec: LayerSpec, types: QTypes, opset: int, in_shape, out_scale: float = 1.0):
    """A graph holding only this layer in the fast form, input ``x`` of shape ``in_shape`` (batch included); a
    convolution's output is requantized to int8 at ``out_scale``, as in the whole graph."""
    conv = spec.kind == "conv"
    nodes, inits = fast_layer_nodes(spec, "x", "y/float" if conv else "y", types)
    if conv:
        nodes += requantize_nodes("y", "y/float", "y.scale", "y.zero_point")
        inits += [numpy_helper.from_array(np.array(out_scale, np.float32), "y.scale"),
                  helper.make_tensor("y.zero_point", TensorProto.INT8, [], [0])]
    graph = helper.make_graph(nodes, spec.name or "layer", [helper.make_tensor_value_info("x", 1, list(in_shape))],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    set_opset(proto, opset)
    return proto
