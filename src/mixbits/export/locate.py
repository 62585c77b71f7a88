"""Where an exported graph first departs from its reference: the first node whose output differs.

Both searches run the graph unoptimised with intermediate tensors exposed as extra outputs, on the
samples that differed, and walk the nodes in graph order:

- ``against_optimized``: onnxruntime's optimised session against the same graph unoptimised. The
  graph as the optimiser left it is saved and run again unoptimised (the same kernels, so the same
  numbers); the tensors it still shares with the original graph are compared. Nodes the optimiser
  fused away have no tensor to compare, so the answer is the first kept node that differs, the last
  kept node before it that agrees, and the original nodes rewritten in between.
- ``against_pytorch``: the unoptimised graph against PyTorch, at each quantized layer's input codes
  (the output of its ``DequantizeInput`` node: the codes in the exact form, codes x step in the fast form)
  and at the outputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from ..data.batches import call_model
from ..quant import quant_layers
from .inputs import output_tensors
from .qdq import session

# Types numpy has no dtype for: such a tensor cannot be brought out of a session, so it is not compared.
_NARROW = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT2, onnx.TensorProto.UINT2}


def _run_exposing(proto: onnx.ModelProto, names: list[str], feeds: dict) -> dict[str, np.ndarray]:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    present = {o.name for o in exposed.graph.output}
    typed = onnx.shape_inference.infer_shapes(exposed).graph.value_info
    narrow = {v.name for v in typed if v.type.tensor_type.elem_type in _NARROW}
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names
                                if n not in present and n not in narrow)
    sess = session(exposed.SerializeToString(), optimize=False)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _first_divergence(order: list[tuple], ref: dict, got: dict, tolerance: float) -> dict | None:
    """The first (node, tensor) of ``order`` whose values differ by more than ``tolerance`` of the reference's
    largest |value|, with the last one before it that agrees."""
    last = None
    for node, tensor in order:
        if tensor not in ref or tensor not in got:  # a narrow integer type numpy cannot hold (see _run_exposing)
            continue
        r, g = np.asarray(ref[tensor], np.float64), np.asarray(got[tensor], np.float64)
        if r.shape != g.shape or r.size == 0:
            continue
        diff = float(np.abs(r - g).max())
        if diff > tolerance * max(float(np.abs(r).max()), 1e-12):
            return {"node": node.name, "op_type": node.op_type, "output": tensor, "max_abs_diff": diff,
                    "after": last, "layer": _layer_of(node)}
        last = node.name
    return None


def _layer_of(node) -> str | None:
    """The quantized layer whose input or weight this Quantize/DequantizeLinear node handles (by its scale's name)."""
    scale = next((t for t in node.input if t.endswith((".input_scale", ".unit_scale"))), None)
    return scale.rsplit(".", 1)[0] if scale else None


def _optimized(data: bytes) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(data, optimized_path=str(path))
        return onnx.load(path)


def _rewritten(proto: onnx.ModelProto, found: dict, kept: set[str]) -> list[str]:
    """Original nodes on the data path into the differing node, after the last agreeing one, that the optimiser
    removed (constant folding of weights is left out: it computes nothing per sample)."""
    nodes = list(proto.graph.node)
    producer = {t: i for i, n in enumerate(nodes) for t in n.output}
    live = {o.name for o in proto.graph.input}
    for n in nodes:  # graph order is topological
        if live & set(n.input):
            live.update(n.output)
    start = next((i for i, n in enumerate(nodes) if n.name == found["after"]), -1)
    stack, feeding = [producer[found["output"]]], set()
    while stack:
        for t in nodes[stack.pop()].input:
            j = producer.get(t)
            if t in live and j is not None and j > start and j not in feeding:
                feeding.add(j)
                stack.append(j)
    return [nodes[i].name for i in sorted(feeding) if not kept & set(nodes[i].output)]


def against_optimized(data: bytes, feeds: dict, tolerance: float) -> dict | None:
    """The first node kept by onnxruntime's optimiser whose output differs from the unoptimised graph's."""
    proto, optimized = onnx.load_from_string(data), _optimized(data)
    kept = {t for n in optimized.graph.node for t in n.output}
    order = [(n, t) for n in proto.graph.node for t in n.output if t in kept]
    names = [t for _, t in order]
    found = _first_divergence(order, _run_exposing(proto, names, feeds), _run_exposing(optimized, names, feeds),
                              tolerance)
    if found:
        found["rewritten"] = _rewritten(proto, found, kept)
    return found


@torch.no_grad()
def against_pytorch(model: nn.Module, data: bytes, x, feeds: dict, tolerance: float) -> dict | None:
    """The first quantized layer input (or output) of the unoptimised graph that differs from PyTorch's."""
    proto, layers = onnx.load_from_string(data), quant_layers(model)
    order, tensors, scaled = [], {}, set()  # the first input codes of each layer, in graph order
    for node in proto.graph.node:
        name = _layer_of(node) if node.name.endswith("/DequantizeInput") else None
        if name in layers and name not in tensors:
            order.append((node, node.output[0]))
            tensors[name] = node.output[0]
            if node.input[1].endswith(".input_scale"):  # the fast form dequantizes to codes x step
                scaled.add(name)
    ref = _quantized_inputs(model, tensors, x, scaled)
    outputs = [o.name for o in proto.graph.output]
    ref.update(zip(outputs, [t.float().numpy() for t in output_tensors(call_model(model, x))], strict=True))
    producers = {t: n for n in proto.graph.node for t in n.output}
    order += [(producers[t], t) for t in outputs]
    return _first_divergence(order, ref, _run_exposing(proto, list(ref), feeds), tolerance)


def _quantized_inputs(model: nn.Module, tensors: dict[str, str], x,
                      scaled: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """PyTorch's input codes of each layer in ``tensors`` (its first call), keyed by that layer's ONNX tensor;
    times the step for the layers in ``scaled``."""
    layers, seen = quant_layers(model), {}

    def record(name):
        def hook(module, inputs):
            codes, step = module.a_quant.codes(padded(module, inputs[0]), module.a_quant.bits)
            codes = codes.float() * step.float() if name in scaled else codes.float()
            seen.setdefault(tensors[name], codes.numpy())
        return hook

    hooks = [layers[name].register_forward_pre_hook(record(name)) for name in tensors]
    try:
        call_model(model, x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def padded_conv(layer: nn.Module) -> bool:
    """Whether a convolution pads with a non-zero mode (reflect, replicate, circular): exported as Pad, then Conv."""
    return isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed and layer.padding_mode != "zeros"


def padded(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input as its ONNX graph sees it: non-zero padding modes are applied before the layer."""
    if padded_conv(layer):
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    return x
