"""Export across the ops that sit between an activation and the next quantized layer, checked as deployed.

Every common op after a ReLU (max, average and adaptive pooling, flatten, reshape, concat, residual add,
ReLU6, Hardswish) feeds its own quantized layer; each export is run by onnxruntime with its default graph
optimisations and with none, at every supported opset and at 2, 3, 4 and 8-bit activations.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixbits import MixbitsError, Policy, SearchSpace
from mixbits.__main__ import main
from mixbits.commands import export as export_command
from mixbits.errors import AdvisedError
from mixbits.quant import apply_policy, calibrate, quantize_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from mixbits.export import check_onnx, export_onnx  # noqa: E402
from mixbits.export.placement import settle_types  # noqa: E402
from mixbits.export.qdq import SIGNED, UNSIGNED, WIDTH, LayerSpec, QTypes  # noqa: E402

SHAPE = (3, 16, 16)
OPSETS = (13, 21, 25)


class OpsNet(nn.Module):
    """Each op of interest between a ReLU (or ReLU6/Hardswish) and the quantized layer it feeds, named after it."""

    def __init__(self):
        super().__init__()
        conv = lambda i, o, k=3: nn.Conv2d(i, o, k, padding=k // 2)  # noqa: E731 - a table of shapes
        self.stem, self.after_maxpool, self.after_avgpool = conv(3, 8), conv(8, 8), conv(8, 8)
        self.after_adaptive, self.side = conv(8, 8), conv(8, 8)
        self.after_add, self.after_concat = conv(8, 8), conv(16, 8)
        self.after_relu6, self.after_hardswish = conv(8, 8, 1), conv(8, 8, 1)
        self.after_flatten, self.after_reshape, self.after_mean = nn.Linear(32, 5), nn.Linear(32, 5), nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.stem(x)), 2)  # 8x8; the stem's bias meets a low-bit quantizer here
        x = F.avg_pool2d(torch.relu(self.after_maxpool(x)), 2)  # 4x4
        x = F.adaptive_avg_pool2d(torch.relu(self.after_avgpool(x)), 2)  # 2x2
        x = torch.relu(self.after_adaptive(x))
        x = x + torch.relu(self.side(x))  # residual add of two ReLU outputs
        x = torch.cat([x, torch.relu(self.after_add(x))], 1)
        x = F.relu6(self.after_concat(x))
        x = F.hardswish(self.after_relu6(x))
        x = torch.relu(self.after_hardswish(x))
        return self.after_flatten(x.flatten(1)) + self.after_reshape(x.reshape(x.shape[0], -1)) + \
            self.after_mean(x.mean((2, 3)))


def _ops_model(a_bits: int) -> nn.Module:
    torch.manual_seed(a_bits)
    model = OpsNet()
    space = SearchSpace.from_model(model, (4, 8), range(2, 9), fixed="none")
    qmodel = quantize_model(model, space)
    calibrate(qmodel, torch.randn(64, *SHAPE))
    policy = Policy.from_rules(space, (8, a_bits), {"stem": (8, 8)})
    return apply_policy(qmodel.eval(), policy)


@pytest.mark.parametrize("a_bits", [2, 3, 4, 8])
def test_every_op_exports_and_matches_under_default_optimisations(a_bits, tmp_path):
    model = _ops_model(a_bits)
    x = torch.randn(500, *SHAPE)
    for opset in OPSETS:
        report = export_onnx(model, SHAPE, tmp_path / "m.onnx", form="exact", opset=opset, check_inputs=x.split(250))
        check = report.check
        assert check["layer_max_rel_diff"] == 0.0  # each layer alone: the integer form, to the bit
        for figures in (check, check["unoptimized"]):  # as deployed, and with no graph optimisation
            assert figures["top1_agreement"] == 100.0, (opset, figures)
            assert figures["differing_samples"] == 0, (opset, figures)
        for name, layer in report.layers.items():
            width = WIDTH[getattr(onnx.TensorProto, layer["act_type"].upper())]
            assert width == layer["a_bits"] or (width == 8 and layer["clip"] == (layer["a_bits"] < 8)), name
            assert (name in report.widened_inputs) <= (width == 8 and layer["a_bits"] < 8)
        assert (tmp_path / "m.onnx").stat().st_size == report.bytes


def _spec(name: str, a_bits: int = 2) -> LayerSpec:
    return LayerSpec(name, "conv", None, None, None, False, 4, a_bits)


def test_settle_types_widens_only_the_refused_layers():
    specs = {n: _spec(n) for n in "abcde"}
    narrow = QTypes(SIGNED[4], UNSIGNED[2], False)
    types = {n: narrow for n in specs}
    refused_alone = {"b", "e"}  # e.g. the layers right after a MaxPool
    seen = []

    def refusal(t):
        seen.append(t)
        bad = [n for n in refused_alone if WIDTH[t[n].act] < 8]
        return f"type of {bad} refused" if bad else None

    settled, widened = settle_types(types, specs, refusal, opset=25)
    assert widened == ["b", "e"]
    assert {n for n, t in settled.items() if t == narrow} == {"a", "c", "d"}
    assert settled["b"] == QTypes(SIGNED[4], UNSIGNED[8], True)  # same levels: uint8 with a Clip to 0..3
    assert len(seen) < 2 * len(specs) + 2
    assert settle_types(types, specs, lambda t: None, opset=25) == (types, [])


def test_settle_types_names_the_refusal_and_speaks_the_callers_language():
    specs = {"a": _spec("a")}
    with pytest.raises(AdvisedError, match="refuses the exported graph.*no kernel; try opset=13$") as caught:
        settle_types({"a": QTypes(SIGNED[4], UNSIGNED[2], False)}, specs, lambda t: "no kernel", opset=25)
    assert caught.value.for_cli().endswith("try --opset 13")


class Bias(nn.Module):
    """A biased convolution whose output reaches a 2-bit quantizer through a ReLU and a MaxPool."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Linear(8, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.first(x)), 2)
        return self.head(torch.relu(self.second(x)).mean((2, 3)))


def _bias_model(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    space = SearchSpace.from_model(module, (8,), (2, 8), fixed="none")
    qmodel = quantize_model(module, space)
    calibrate(qmodel, torch.randn(64, *SHAPE))
    return apply_policy(qmodel.eval(), Policy.from_rules(space, (8, 8), {"second": (8, 2)}))


def _bias_into_conv(data: bytes) -> bytes:
    """The graph as mixbits used to write it: the bias an input of the Conv, which onnxruntime quantizes to int32."""
    proto = onnx.load_from_string(data)
    nodes = list(proto.graph.node)
    by_output = {n.output[0]: n for n in nodes}
    for add in [n for n in nodes if n.name.endswith("/AddBias")]:
        conv = by_output[add.input[0]]
        if conv.op_type == "Conv":
            conv.input.append(add.input[1])
            conv.output[0] = add.output[0]
            proto.graph.node.remove(add)
            bias = next(i for i in proto.graph.initializer if i.name == add.input[1])
            del bias.dims[1:]
    return proto.SerializeToString()


def test_mismatch_from_an_optimisation_names_the_first_differing_node(tmp_path):
    model = _bias_model(Bias())
    x = torch.randn(500, *SHAPE)
    report = export_onnx(model, SHAPE, tmp_path / "m.onnx", form="exact", opset=21, check_inputs=x)
    assert report.check["top1_agreement"] == 100.0  # the bias as its own Add: nothing to quantize
    old = _bias_into_conv((tmp_path / "m.onnx").read_bytes())
    try:
        check_onnx(model, old, x, max_mismatch=0.05)  # a right graph differs in a few samples at most
    except AdvisedError as e:
        message = str(e)
    else:
        pytest.skip("this onnxruntime no longer quantizes a Conv bias under its default optimisations")
    assert "with onnxruntime's graph optimisations disabled: matches" in message
    assert "first node that differs from the unoptimised graph" in message and "of layer 'second'" in message
    assert "rewrote in between" in message and "/Conv" in message
    assert message.endswith("try opset=13") and "--opset" not in message


class TracedDifferently(nn.Module):
    """Its forward scales one activation only while exported: a graph that computes something else."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.first(x))
        if torch.onnx.is_in_onnx_export():
            x = x * 1.5
        return self.head(torch.relu(self.second(x)).mean((2, 3)))


def test_mismatch_in_the_graph_itself_names_the_layer_and_writes_nothing(tmp_path):
    model = _bias_model(TracedDifferently())
    with pytest.raises(AdvisedError) as caught:
        export_onnx(model, SHAPE, tmp_path / "m.onnx", form="exact", check_inputs=torch.randn(200, *SHAPE))
    message = str(caught.value)
    assert "with onnxruntime's graph optimisations disabled: 200 of 200 samples differ" in message
    assert "first node that differs from PyTorch" in message and "of the input of layer 'second'" in message
    assert "after '/first/" in message  # the layer before it agrees
    assert "opset" not in message  # another opset would not help here
    assert not (tmp_path / "m.onnx").exists()


def test_cli_says_flags_where_python_says_keywords(monkeypatch, capsys):
    def refuse(args):
        raise AdvisedError("the graph is refused", [("opset=13", "--opset 13")])

    monkeypatch.setattr(export_command, "run", refuse)
    assert main(["export", "run", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "the graph is refused; try --opset 13" in err and "opset=13" not in err
    with pytest.raises(MixbitsError, match="try opset=13$"):
        refuse(None)
