"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ), checked against the PyTorch model.

torch's exporter refuses fake-quant below 8 bits, so each quantized layer is traced as one opaque
placeholder node (``mixbits::QLayer``) and then replaced by a subgraph (built in ``qdq``):

    x -> QuantizeLinear -> [Clip] -> DequantizeLinear(1) -> Conv/Gemm/MatMul -> Mul scale -> Add bias
                                    integer weight -> DequantizeLinear(1) -^

the layer's integer form, which PyTorch's inference runs too (quant/layers.py). Everything else
(BatchNorm, pooling, residual adds, reshapes, float layers) comes from torch's own TorchScript-based
exporter, untouched: the placeholder keeps BatchNorm from being folded into the weights, which would
destroy the integer codes, and the quantized model's BatchNorm infers as the Mul and Add it traces to
(quant/batchnorm.py). The integers are the ones PyTorch computes, ONNX QuantizeLinear divides and
rounds half to even like PyTorch, and the integer products do not depend on summation order, so each
layer reproduces PyTorch to the bit (``check.check_layers``) and so does the whole graph wherever the
float ops between layers round alike (``check.check_onnx`` says how often they do not).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import asdict, dataclass, field

import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import call_model, first_rows
from ..errors import MixbitsError
from ..layer_types import kept_float
from ..quant import quant_layers
from ..quant.convert import _set_submodule, require_quantized
from ..utils import atomic_write_bytes
from .check import _check, first_batch
from .fused import add_layer_initializers, build_fast, fast_types, unfused_layers
from .inputs import GraphInputs, output_names
from .locate import padded_conv
from .placement import Refusal, settle_types
from .qdq import LayerSpec, QTypes, choose_types, layer_nodes, layer_spec, resolve_opset, session, set_opset

DOMAIN = "mixbits"
FORMS = ("fast", "exact")
# (tolerance, max_mismatch, min_agreement) of the check by form: the fast form requantizes residual streams to
# 8 bits, which PyTorch adds in float, so its logits move by a fraction of a level everywhere (docs/export.md).
CHECK_LIMITS = {"exact": (1e-3, 0.5, 99.0), "fast": (0.05, 0.5, 90.0)}


@dataclass
class ExportReport:
    """What was written and how well it matches PyTorch (``check`` is None when nothing was checked)."""

    path: str
    opset: int
    bytes: int
    layers: dict[str, dict] = field(default_factory=dict)
    float_layers: list[str] = field(default_factory=list)
    widened_inputs: list[str] = field(default_factory=list)  # narrow input types the whole graph refused
    check: dict | None = None
    form: str = "fast"
    kernels: dict[str, int] = field(default_factory=dict)  # node types of onnxruntime's optimised graph (fast form)
    unfused_layers: list[str] = field(default_factory=list)  # quantized layers onnxruntime left as float products

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
        stub.out_dtype = out.dtype
        return out

    @staticmethod
    def symbolic(g, x, name):
        stub = _TRACING[name]
        out = g.op(f"{DOMAIN}::QLayer", x, name_s=name)
        shape = stub.out_shapes[stub.symbolic_calls]
        stub.symbolic_calls += 1
        out.setType(x.type().with_dtype(stub.out_dtype).with_sizes([None, *shape[1:]]))
        return out


class _Stub(nn.Module):
    """Stands in for one quantized layer during tracing; records the input ranks it is called with."""

    def __init__(self, name: str, layer: nn.Module):
        super().__init__()
        self.name, self.layer = name, layer
        self.prepad = padded_conv(layer)
        self.ranks: set[int] = set()
        self.out_shapes: list[tuple] = []
        self.out_dtype = torch.float32
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
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(layer.kernel_size) - 1]
        return conv(layer.quantized_input(x), layer.quantized_weight(), layer.bias, layer.stride, 0, layer.dilation,
                    layer.groups)


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


def _trace(model: nn.Module, example, inputs: GraphInputs, opset: int) -> tuple[bytes, dict[str, _Stub], list[str]]:
    """Float graph of ``model`` on the batch-1 ``example`` with one placeholder per quantized layer; returns
    (bytes, stubs, output names)."""
    traced = copy.deepcopy(model).eval()
    stubs = {}
    for name, layer in quant_layers(traced).items():
        stubs[name] = _Stub(name, layer)
        _set_submodule(traced, name, stubs[name])
    args = tuple(inputs.tensors(example))
    with _tracing(stubs), torch.no_grad():
        out = call_model(traced, example)  # how many outputs there are, to name them
    outputs = output_names(out)
    for stub in stubs.values():
        stub.out_shapes.clear()
    buf = io.BytesIO()
    with _tracing(stubs), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(inputs.positional(traced), args, buf, dynamo=False,
                          opset_version=min(opset, _torch_max_opset()), input_names=list(inputs.names),
                          output_names=outputs, dynamic_axes={n: {0: "batch"} for n in [*inputs.names, *outputs]})
    return buf.getvalue(), stubs, outputs


def _expand(proto, specs: dict[str, LayerSpec], types: dict[str, QTypes], opset: int) -> None:
    """Replace every placeholder by its QDQ subgraph with the given types."""
    graph, nodes, done = proto.graph, [], set()
    taken = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        name = next(a.s.decode() for a in node.attribute if a.name == "name")
        sub_nodes, inits = layer_nodes(specs[name], node.input[0], node.output[0], types[name])
        nodes.extend(sub_nodes)
        add_layer_initializers(graph, name, inits, taken, done)
    del graph.node[:]
    graph.node.extend(nodes)
    set_opset(proto, opset)


def _build(raw: bytes, specs: dict[str, LayerSpec], types: dict[str, QTypes], opset: int) -> bytes:
    proto = onnx.load_from_string(raw)
    _expand(proto, specs, types, opset)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _refusal(raw: bytes, specs: dict[str, LayerSpec], opset: int, feeds: dict) -> Refusal:
    """Why onnxruntime's default session refuses the whole graph built with given types (None: it runs it)."""

    def refusal(types: dict[str, QTypes]) -> str | None:
        try:
            session(_build(raw, specs, types, opset)).run(None, feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; the message is the answer
            return str(e).strip().splitlines()[0]
        return None
    return refusal


def _example(model: nn.Module, input_shape):
    """A batch-1 input to trace: the first row of an example input, or float zeros of one sample's shape."""
    if isinstance(input_shape, (torch.Tensor, dict)) or (
            isinstance(input_shape, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in input_shape)):
        return first_rows(input_shape, 1)
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise MixbitsError(f"input_shape {list(shape)} is not understood; give one sample's shape as positive "
                           "integers, e.g. (1, 28, 28), or an example input (a batched tensor, tuple or dict)")
    return torch.zeros(1, *shape, dtype=next(model.parameters()).dtype)


def _layer_of(node) -> str | None:
    """The quantized layer a placeholder node stands for (None for the float graph's own nodes)."""
    return next(a.s.decode() for a in node.attribute if a.name == "name") if node.domain == DOMAIN else None


def _limits(form: str, tolerance, max_mismatch, min_agreement) -> tuple[float, float, float]:
    given = (tolerance, max_mismatch, min_agreement)
    return tuple(d if g is None else g for g, d in zip(given, CHECK_LIMITS[form], strict=True))


# the public entry point ----------------------------------------------------------------------------
def export_onnx(model: nn.Module, input_shape, path, opset: int | None = None, check_inputs=None,
                tolerance: float | None = None, max_mismatch: float | None = None,
                min_agreement: float | None = None, form: str = "exact", calibration=None) -> ExportReport:
    """Write ``model`` (quantized, at fixed bits, calibrated) as a QDQ ONNX file at ``path``.

    ``input_shape`` is one sample's shape (a float input, e.g. (C, H, W)), or an example input of any
    shape and dtype: a batched tensor (token ids, vectors, sequences), or a tuple or dict of them (graph
    inputs ``input_0``... or the dict's keys; see ``inputs.py``). The batch dimension is dynamic. ``opset``
    defaults to the highest of 25, 21, 13 that the installed onnxruntime runs.

    ``form="exact"`` (default) multiplies the integer codes in float Conv/Gemm nodes, which reproduces PyTorch's
    integer form to the bit but runs slower than the float model; ``form="fast"`` writes every quantized layer as
    a pattern onnxruntime fuses into an integer kernel (QLinearConv, QGemm, ...; ``fused.py``), for one float
    tensor input, and agrees with PyTorch less closely (docs/export.md). ``calibration`` (a batch of inputs;
    default: the first batch of ``check_inputs``) sizes the 8-bit steps of residual streams in the fast form.
    With ``check_inputs`` (a tensor, or an iterable of tensors or (x, y) batches) the file is run with
    onnxruntime and compared with the PyTorch model before it is written: every layer alone must match (to
    ``tolerance``, relative, in the exact form; to one level of its 8-bit output in the fast form), the whole
    model as ``check_onnx`` says (limits by form: ``CHECK_LIMITS``); else it raises.
    """
    if form not in FORMS:
        raise MixbitsError(f"form must be one of {FORMS}, got {form!r}: 'fast' runs integer kernels, 'exact' "
                           "matches PyTorch to the bit")
    layers = require_quantized(model)
    opset = resolve_opset(opset)
    specs = {name: layer_spec(name, layer) for name, layer in layers.items()}
    float_layers = kept_float(model, layers)
    if float_layers:
        warnings.warn(f"layers with weights left in float (not quantized): {', '.join(float_layers)}", stacklevel=2)
    example = _example(model, input_shape)
    inputs = GraphInputs.of(example)
    raw, stubs, outputs = _trace(model, example, inputs, opset)
    for name, stub in stubs.items():
        specs[name].in_ranks = tuple(sorted(stub.ranks))
    first, check_inputs = first_batch(check_inputs) if check_inputs is not None else (None, None)
    kernels, unfused = {}, []
    if form == "exact":
        types = {name: choose_types(spec, opset) for name, spec in specs.items()}
        types, widened = settle_types(types, specs, _refusal(raw, specs, opset, inputs.feeds(example)), opset)
        data = _build(raw, specs, types, opset)
    else:
        if not (isinstance(example, torch.Tensor) and example.is_floating_point()):
            raise MixbitsError("form='fast' exports models whose input is one float tensor (images, vectors); "
                               "export this model with form='exact'")
        types, widened = {name: fast_types(spec) for name, spec in specs.items()}, []
        if calibration is None and first is not None:
            calibration = first[0][:256]
        if isinstance(calibration, torch.Tensor):
            calibration = calibration.detach().float().cpu().numpy()
        data, types = build_fast(raw, specs, types, opset, _layer_of, calibration)
        counts, unfused = unfused_layers(data, specs)
        kernels = dict(sorted(counts.items()))
        if unfused:
            warnings.warn(f"onnxruntime {ort.__version__} runs these quantized layers as float products, not integer "
                          f"kernels: {', '.join(unfused)}", stacklevel=2)
    described = {n: {"w_bits": specs[n].w_bits, "a_bits": specs[n].a_bits, "per_channel": specs[n].per_channel,
                     **t.describe()} for n, t in types.items()}
    report = ExportReport(str(path), opset, len(data), described, float_layers, widened, form=form, kernels=kernels,
                          unfused_layers=unfused)
    if check_inputs is not None:
        limits = _limits(form, tolerance, max_mismatch, min_agreement)
        report.check = _check(model, data, check_inputs, (inputs, outputs), (specs, types, opset, form), limits)
    atomic_write_bytes(path, data)
    return report
