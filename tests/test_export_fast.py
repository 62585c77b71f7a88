"""The fast form of the ONNX export: quantized layers run as onnxruntime integer kernels, checked against PyTorch."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mixbits import MixbitsError, Policy, SearchSpace
from mixbits.quant import apply_policy, calibrate, quantize_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from test_export_ops import TracedDifferently  # noqa: E402 - the same model for the exact form's test

from mixbits.export import export_onnx  # noqa: E402
from mixbits.export.fused import FLOAT_PRODUCTS, calibrated_step, unfused_layers  # noqa: E402

SHAPE = (3, 10, 10)


class Residual(nn.Module):
    """conv-BN-ReLU, a residual block (conv-BN-ReLU-conv-BN + identity, ReLU), global pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.relu(x + y).mean((2, 3)))


def _model(bits: int, negative_bn: bool = False) -> nn.Module:
    torch.manual_seed(bits)
    model = Residual()
    for bn in (model.bn0, model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    if negative_bn:  # channels whose BatchNorm flips the sign: folding negates their codes
        model.bn1.weight.data[::2] *= -1
    space = SearchSpace.from_model(model, range(2, 9), range(2, 9), fixed="none")
    qmodel = quantize_model(model, space)
    calibrate(qmodel, torch.randn(64, *SHAPE))
    return apply_policy(qmodel.eval(), Policy.uniform(space, bits))


def _uniform(model_class, bits: int) -> nn.Module:
    """A seeded ``model_class()`` quantized at ``bits`` everywhere (no fixed layers), calibrated, in eval mode."""
    torch.manual_seed(0)
    model = model_class()
    space = SearchSpace.from_model(model, (bits,), (bits,), fixed="none")
    qmodel = quantize_model(model, space)
    calibrate(qmodel, torch.randn(64, *SHAPE))
    return apply_policy(qmodel.eval(), Policy.uniform(space, bits))


def _optimized_ops(path: Path) -> Counter:
    """The node types of the graph onnxruntime runs, read back from ``optimized_model_filepath``."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fast_form_runs_integer_kernels_and_agrees(bits, tmp_path):
    model = _model(bits)
    x = torch.randn(300, *SHAPE)
    report = export_onnx(model, SHAPE, tmp_path / "m.onnx", check_inputs=x.split(100), form="fast")
    assert report.form == "fast" and report.unfused_layers == []
    ops = _optimized_ops(tmp_path / "m.onnx")
    # every convolution a QLinearConv, the head a QGemm, the residual addition a QLinearAdd: no float product left
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 1 and ops["QLinearAdd"] == 1, ops
    assert not any(ops[op] for op in FLOAT_PRODUCTS), ops
    assert dict(ops) == report.kernels
    check = report.check
    assert check["layer_max_levels"] <= 1.001  # each layer alone: within one level of its 8-bit output
    assert check["top1_agreement"] >= 90.0 and check["unoptimized"]["top1_agreement"] >= 90.0


def test_fast_form_requantizes_with_the_next_layers_own_step(tmp_path):
    # conv1 -> BN -> ReLU feeds only conv2: its output is quantized once, with conv2's input step, so the codes
    # conv2 multiplies are PyTorch's; the graph holds no calibrated step for it.
    model = _model(4)
    export_onnx(model, SHAPE, tmp_path / "m.onnx", check_inputs=torch.randn(64, *SHAPE), form="fast")
    proto = onnx.load(tmp_path / "m.onnx")
    requantize = {n.input[0]: n for n in proto.graph.node if n.name.endswith("/Requantize")}
    assert requantize["/Relu_1_output_0/float"].input[1] == "conv2.input_scale"  # conv1 -> BN -> ReLU (the 2nd)
    assert any(n.input[1].endswith("/requant_scale") for n in requantize.values())  # the residual stream


def test_negative_batchnorm_scale_folds_by_negating_codes(tmp_path):
    model = _model(4, negative_bn=True)
    report = export_onnx(model, SHAPE, tmp_path / "m.onnx", check_inputs=torch.randn(200, *SHAPE), form="fast")
    assert report.unfused_layers == [] and report.check["layer_max_levels"] <= 1.001
    assert report.check["top1_agreement"] >= 90.0
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / "m.onnx").graph.initializer}
    codes, _ = model.conv1.w_quant.integers(model.conv1.weight)
    stored = inits["conv1.weight_int"].astype(np.int64)  # int4 at the default opset, widened at session start
    assert report.layers["conv1"]["weight_type"] == "int4"
    codes = codes.numpy()
    assert np.array_equal(stored[::2], -codes[::2]) and np.array_equal(stored[1::2], codes[1::2])
    # times m for a finer int32 bias (fused.fast_layer_nodes), in a Cast/Mul onnxruntime folds at session start
    assert int(inits["conv1.weight_multiplier"]) == 32 // int(np.abs(codes).max())


def test_wide_convolution_weights_go_as_uint8(tmp_path):
    # QLinearConv with int8 weights runs as uint8 x int8, whose int16 pair sums saturate on x86 CPUs without VNNI
    # once |code| > 64; every code here is +-127, so the weights must go as uint8 with zero point 128.
    model = _model(8)
    with torch.no_grad():
        conv = model.conv1
        conv.weight.copy_(torch.randn_like(conv.weight).sign() * 0.05)
        conv.w_quant.steps[conv.w_quant.index(8)] = 0.05 / 127
    report = export_onnx(model, SHAPE, tmp_path / "m.onnx", check_inputs=torch.randn(200, *SHAPE), form="fast")
    assert report.layers["conv1"]["weight_type"] == "uint8" and report.layers["conv1"]["weight_zero_point"] == 128
    assert report.check["layer_max_levels"] <= 1.001
    codes, _ = conv.w_quant.integers(conv.weight)
    assert set(np.unique(np.abs(codes.numpy())).tolist()) == {127}


def test_lost_fusion_is_reported(tmp_path):
    # A float bias input keeps onnxruntime from fusing DequantizeLinear -> Gemm into QGemm: the check must see it.
    model = _model(4)
    report = export_onnx(model, SHAPE, tmp_path / "m.onnx", check_inputs=torch.randn(64, *SHAPE), form="fast")
    proto = onnx.load(tmp_path / "m.onnx")
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    add = next(n for n in proto.graph.node if n.input and n.input[0] == gemm.output[0])
    gemm.input.append(add.input[1])
    gemm.output[0] = add.output[0]
    proto.graph.node.remove(add)
    specs = {name: _Spec(name) for name in report.layers}
    _, unfused = unfused_layers(proto.SerializeToString(), specs)
    assert unfused == ["fc"]


class _Spec:
    def __init__(self, name):
        self.name = name


def test_calibrated_step_aligns_with_the_next_layer():
    step = calibrated_step(0.0, 2.0, grid=0.5)  # a 2-bit layer's step 0.5 over a tensor reaching 2.0
    n = 0.5 / step
    assert abs(n - round(n)) < 1e-9 and round(n) % 2 == 1 and 255 * step >= 2.0
    assert calibrated_step(-1.0, 0.5, None) == pytest.approx(1.0 / 127)


def test_fast_form_needs_calibration_for_residual_streams(tmp_path):
    with pytest.raises(MixbitsError, match="calibration"):
        export_onnx(_model(4), SHAPE, tmp_path / "m.onnx", form="fast")
    with pytest.raises(MixbitsError, match="form must be one of"):
        export_onnx(_model(4), SHAPE, tmp_path / "m.onnx", form="quick")
    report = export_onnx(_model(4), SHAPE, tmp_path / "m.onnx", calibration=torch.randn(32, *SHAPE), form="fast")
    assert report.check is None and (tmp_path / "m.onnx").stat().st_size == report.bytes


def test_fast_form_mismatch_names_the_layer_whose_input_differs(tmp_path):
    model = _uniform(TracedDifferently, 8)
    with pytest.raises(MixbitsError) as caught, pytest.warns(UserWarning, match="float products"):
        export_onnx(model, SHAPE, tmp_path / "m.onnx", check_inputs=torch.randn(200, *SHAPE), form="fast")
    message = str(caught.value)
    assert "first node that differs from PyTorch" in message and "of the input of layer 'second'" in message
    assert "its own rounding" in message and "try form='exact'" in message  # the fast form's known cause, and the fix
    assert not (tmp_path / "m.onnx").exists()


class ReLU6Net(nn.Module):
    """conv -> BN -> ReLU6 -> conv -> ReLU -> mean -> linear (MobileNetV2's activation)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), \
            nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.b(nn.functional.relu6(self.bn(self.a(x))))).mean((2, 3)))


def test_relu6_is_requantized_before_its_clip_and_fuses(tmp_path):
    # A Clip between Conv and QuantizeLinear stops the fusion (onnxruntime runs a float FusedConv instead): the
    # output is quantized with the next layer's step before the Clip, which lands on the same codes.
    qmodel = _uniform(ReLU6Net, 4)
    with pytest.warns(UserWarning, match="float products, not integer kernels: b$"):
        report = export_onnx(qmodel, SHAPE, tmp_path / "m.onnx", check_inputs=torch.randn(200, *SHAPE), form="fast")
    ops = _optimized_ops(tmp_path / "m.onnx")
    assert ops["QLinearConv"] == 1 and report.unfused_layers == ["b"]  # b feeds a mean: no kernel to gain there
    proto = onnx.load(tmp_path / "m.onnx")
    relu6 = next(n for n in proto.graph.node if n.name == "/Clip")  # the ReLU6 moved onto b's input codes
    assert relu6.op_type == "Identity"
    requantize = next(n for n in proto.graph.node if n.output[0] == relu6.input[0]).input[0]
    assert next(n for n in proto.graph.node if n.output[0] == requantize).input[1] == "b.input_scale"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    step = np.float32(qmodel.b.a_quant.step(4, 1).item())
    assert int(inits["b.input_max"]) == min(15, int(np.round(np.float32(6.0) / step)))
    assert report.check["top1_agreement"] >= 99.0


@pytest.mark.parametrize("step, clipped", [(0.02, False), (0.05, True)])
def test_relu6_bound_at_or_above_the_8bit_range_adds_no_clip(step, clipped, tmp_path):
    # At 8 bits a ReLU6 bound of round(6 / step) >= 255 is the QuantizeLinear's own uint8 saturation: a Clip node
    # there would only cost time (one per MobileNetV2 block); below 255 the bound must stay.
    qmodel = _uniform(ReLU6Net, 8)
    with torch.no_grad():
        qmodel.b.a_quant.steps[qmodel.b.a_quant.index(8)] = step
    with pytest.warns(UserWarning, match="float products"):
        report = export_onnx(qmodel, SHAPE, tmp_path / "m.onnx", check_inputs=torch.randn(200, *SHAPE), form="fast")
    clips = [n for n in onnx.load(tmp_path / "m.onnx").graph.node if n.op_type == "Clip"]
    assert bool(clips) == clipped and report.layers["b"]["clip"] == clipped
    assert _optimized_ops(tmp_path / "m.onnx")["QLinearConv"] == 1
    # unoptimised, the QDQ graph requantizes in float as PyTorch does: without the Clip it still matches it
    assert report.check["unoptimized"]["top1_agreement"] == 100.0 and report.check["layer_max_levels"] <= 1.001
