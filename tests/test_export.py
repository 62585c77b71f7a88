"""Export: QDQ ONNX against PyTorch, exact bit packing, packed models, latency tables, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mixbits import MixbitsError, Policy, SearchSpace
from mixbits.__main__ import main
from mixbits.budget import check_feasible, parse_budget
from mixbits.cost import LatencyTable, profile, size_bits
from mixbits.export import load_packed, pack_bits, pack_model, packed_size, unpack_bits
from mixbits.pipeline import load_trained
from mixbits.quant import apply_policy, calibrate, quantize_model
from mixbits.rundir import MARKER

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from mixbits.export import export_onnx, measure_latency_table  # noqa: E402

SHAPE = (3, 12, 12)
INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.INT2}


class Tiny(nn.Module):
    """A conv, a depthwise conv, a pointwise conv and a linear head, with BatchNorm in between."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(torch.relu(self.pw(x)).mean((2, 3)))


def _tiny_quantized(bits: int, per_channel: bool, exclude=()) -> tuple[nn.Module, SearchSpace]:
    torch.manual_seed(bits)
    model = Tiny()
    for bn in (model.bn1, model.bn2):  # non-trivial BatchNorm so that folding it would show
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    space = SearchSpace.from_model(model, range(2, 9), range(2, 9), fixed="none", exclude=exclude)
    qmodel = quantize_model(model, space, per_channel=per_channel)
    calibrate(qmodel, torch.randn(32, *SHAPE))
    return apply_policy(qmodel.eval(), Policy.uniform(space, bits)), space


@pytest.mark.parametrize("bits", range(2, 9))
def test_onnx_matches_pytorch_and_stores_integers(bits, tmp_path):
    model, space = _tiny_quantized(bits, per_channel=bits % 2 == 0)
    x = torch.randn(48, *SHAPE)
    report = export_onnx(model, SHAPE, tmp_path / "m.onnx", form="exact", check_inputs=x.split(16))
    check = report.check
    assert check["samples"] == 48
    # The integer form and the two-rounding BatchNorm: onnxruntime reproduces PyTorch to the bit, each layer
    # alone and end to end, with and without its graph optimisations.
    assert check["layer_max_rel_diff"] == 0.0
    assert check["max_abs_diff"] == 0.0 and check["unoptimized"]["max_abs_diff"] == 0.0
    assert check["top1_agreement"] == 100.0
    proto = onnx.load(tmp_path / "m.onnx")
    inits = {i.name: i for i in proto.graph.initializer}
    weight_shapes = set()
    for name in space.layers:
        weight = inits[f"{name}.weight_int"]
        assert weight.data_type in INT_TYPES
        assert list(weight.dims) == list(model.get_submodule(name).weight.shape)
        weight_shapes.add(tuple(weight.dims))
    assert not any(i.data_type == onnx.TensorProto.FLOAT and tuple(i.dims) in weight_shapes
                   for i in proto.graph.initializer)  # no float copy of any weight
    assert {n.op_type for n in proto.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Mul"}
    if bits < 8 and bits not in (2, 4):  # no narrow type of exactly this width: int8/uint8 plus a Clip
        assert all(layer["clip"] for layer in report.layers.values())


def test_linear_weights_beyond_64_levels_go_as_uint8_and_stay_exact(tmp_path):
    # onnxruntime fuses a Linear's DequantizeLinear -> Gemm into an integer product; with int8 weights that runs as
    # uint8 x int8 (a signed input shifted by 128), whose int16 pair sums saturate on x86 CPUs without VNNI once
    # |code| > 64. Here every weight code is +-127 and the input codes are signed 8-bit.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 5))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn_like(model[1].weight).sign() * 0.05)
    space = SearchSpace.from_model(model, [8], [8], fixed="none")
    x = torch.randn(48, *SHAPE)
    qmodel = quantize_model(model, space)
    calibrate(qmodel, x)
    fc = qmodel[1]
    with torch.no_grad():
        fc.w_quant.steps[0] = 0.05 / 127
        fc.a_quant.steps[0] = x.abs().max() / 127
    report = export_onnx(qmodel.eval(), SHAPE, tmp_path / "m.onnx", form="exact", check_inputs=x.split(16))
    assert report.check["layer_max_rel_diff"] == 0.0 and report.check["max_abs_diff"] == 0.0
    assert report.layers["1"]["weight_type"] == "uint8" and report.layers["1"]["weight_zero_point"] == 128
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / "m.onnx").graph.initializer}
    codes, _ = fc.w_quant.integers(fc.weight)
    assert np.array_equal(inits["1.weight_int"].astype(np.int64) - 128, codes.numpy())
    assert set(np.unique(codes.numpy()).tolist()) == {-127, 127}


def test_onnx_opset13_uses_int8_with_clip(tmp_path):
    model, _ = _tiny_quantized(3, per_channel=False)
    report = export_onnx(model, SHAPE, tmp_path / "m.onnx", form="exact", opset=13,
                         check_inputs=torch.randn(16, *SHAPE))
    assert report.opset == 13
    assert {(v["weight_type"], v["clip"]) for v in report.layers.values()} == {("int8", True)}
    assert report.check["layer_max_rel_diff"] < 1e-5


def test_float_layers_are_kept_with_a_warning(tmp_path):
    model, _ = _tiny_quantized(4, per_channel=False, exclude=["fc"])
    with pytest.warns(UserWarning, match="left in float.*fc"):
        report = export_onnx(model, SHAPE, tmp_path / "m.onnx", form="exact", check_inputs=torch.randn(8, *SHAPE))
    assert report.float_layers == ["fc"] and "fc" not in report.layers


def test_export_rejects_bad_input(tmp_path):
    with pytest.raises(MixbitsError, match="no quantized layer"):
        export_onnx(Tiny(), SHAPE, tmp_path / "m.onnx")
    model, _ = _tiny_quantized(4, per_channel=False)
    with pytest.raises(MixbitsError, match="opset"):
        export_onnx(model, SHAPE, tmp_path / "m.onnx", opset=7)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_is_exact(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 7, 8, 9, 1001):
        codes = rng.integers(0, 1 << bits, size=n).astype(np.uint8)
        codes[0], codes[-1] = 0, (1 << bits) - 1  # edge values
        buf = pack_bits(codes, bits)
        assert len(buf) == packed_size(n, bits) == math.ceil(n * bits / 8)
        np.testing.assert_array_equal(unpack_bits(buf, bits, n), codes)


def test_pack_bits_rejects_bad_codes():
    with pytest.raises(MixbitsError, match="0..3"):
        pack_bits(np.array([4]), 2)
    with pytest.raises(MixbitsError, match="2..8"):
        pack_bits(np.array([1]), 9)
    with pytest.raises(MixbitsError, match="truncated"):
        unpack_bits(b"\x00", 4, 3)


@pytest.mark.parametrize("per_channel", [False, True])
def test_packed_model_reproduces_outputs_exactly(per_channel, tmp_path):
    model, space = _tiny_quantized(3, per_channel=per_channel)
    model = apply_policy(model, Policy.from_rules(space, (3, 3), {"dw": (2, 5), "fc": (8, 8)}))
    report = pack_model(model, tmp_path / "m.mxb", input_shape=SHAPE)
    loaded = load_packed(tmp_path / "m.mxb", model=Tiny())
    x = torch.randn(16, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    stats = profile(model, SHAPE)
    assert report.predicted_bytes == size_bits(stats, Policy({n: m.bits for n, m in _layers(model)})) / 8
    assert 0 <= report.param_bytes - report.predicted_bytes < len(space.layers)  # ceil per layer only
    assert report.file_bytes == (tmp_path / "m.mxb").stat().st_size == (
        report.header_bytes + report.metadata_bytes + report.param_bytes + report.buffer_bytes + report.step_bytes)
    for name, layer in report.layers.items():
        assert layer["code_bytes"] == math.ceil(layer["numel"] * layer["bits"] / 8), name


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "w_quant")]


def test_load_packed_rejects_other_files(tmp_path):
    (tmp_path / "x.mxb").write_bytes(b"not a packed model")
    with pytest.raises(MixbitsError, match="not a mixbits packed model"):
        load_packed(tmp_path / "x.mxb")
    with pytest.raises(MixbitsError, match="does not exist"):
        load_packed(tmp_path / "missing.mxb")


def test_latency_table_drives_a_budget(tmp_path):
    model = Tiny()
    space = SearchSpace.from_model(model, (2, 4), (2, 4))
    table = measure_latency_table(model, space, SHAPE, repeats=2, warmup=1, threads=1, form="fast")
    table.save(tmp_path / "lut.json")
    loaded = LatencyTable.load(tmp_path / "lut.json")
    assert loaded.unit == "ms" and "onnxruntime" in loaded.device and "fast export form" in loaded.device
    loaded.check_covers(space)
    stats = profile(model, SHAPE)
    budget = parse_budget("latency<=uniform:4")
    check_feasible(budget, stats, space, loaded)
    assert budget.satisfied(stats, Policy.uniform(space, 4), space, loaded)
    with pytest.raises(MixbitsError, match="form must be"):
        measure_latency_table(model, space, SHAPE, form="quick")


def test_cli_export_writes_checked_files(tiny_q_run, tmp_path, capsys):
    trained_run = tiny_q_run.dir  # shared with other tests: read only, everything is written under tmp_path
    out = tmp_path / "exported"
    assert main(["export", str(trained_run), "--out", str(out), "--check-samples", "1000", "--form", "fast"]) == 0
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.mxb", "policy.json", "export_report.json", MARKER}
    report = json.loads((out / "export_report.json").read_text())
    check = report["onnx"]["check"]
    # The fast form: integer kernels, whose 8-bit residual streams move a few predictions (docs/export.md)
    assert report["onnx"]["form"] == "fast" and report["onnx"]["kernels"]["QLinearConv"] >= 1
    # a convolution whose output only feeds float ops (the pooling before the head) stays a float product
    assert set(report["onnx"]["unfused_layers"]) < set(report["onnx"]["layers"])
    assert check["samples"] == 1000 and check["top1_agreement"] >= 95.0  # as deployed: default optimisations
    assert check["unoptimized"]["top1_agreement"] >= 95.0 and check["layer_max_levels"] <= 1.001
    packed = report["packed"]
    assert packed["file_bytes"] == (out / "model.mxb").stat().st_size
    assert 0 <= packed["param_bytes"] - packed["predicted_bytes"] < 4
    printed = capsys.readouterr().out
    assert "default optimisations" in printed and "QLinearConv" in printed
    model, card, _ = load_trained(trained_run)
    loaded = load_packed(out / "model.mxb")  # rebuilt from the card alone
    x = torch.randn(8, *card.input_shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_cli_lut_and_bad_input(tiny_q_run, tmp_path, capsys):
    trained_run = tiny_q_run.dir  # read only, as above
    lut = tmp_path / "lut.json"
    assert main(["lut", str(trained_run), "--out", str(lut), "--bits", "2,4", "--repeats", "1", "--warmup", "0",
                 "--threads", "1"]) == 0
    assert set(LatencyTable.load(lut).layers["conv2"]) == {"w2a2", "w2a4", "w4a2", "w4a4"}
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--out", str(tmp_path / "x"), "--format", "onxx"]) == 2
    assert "Did you mean 'onnx'" in capsys.readouterr().err


class Odd(nn.Module):
    """'same' reflect padding, and a Linear on (N, tokens, C) inputs that are signed (no ReLU before it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect")
        self.proj = nn.Linear(4, 6)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.proj(tokens).mean(1)


def test_unusual_layers_export(tmp_path):
    torch.manual_seed(0)
    model = Odd()
    space = SearchSpace.from_model(model, (3,), (3,), fixed="none")
    qmodel = quantize_model(model, space)
    calibrate(qmodel, torch.randn(8, *SHAPE))
    report = export_onnx(apply_policy(qmodel, Policy.uniform(space, 3)), SHAPE, tmp_path / "m.onnx", form="exact",
                         check_inputs=torch.randn(16, *SHAPE))
    assert report.check["layer_max_rel_diff"] < 1e-5 and report.check["differing_samples"] <= 1
