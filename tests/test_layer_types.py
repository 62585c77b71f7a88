"""Every common layer is quantized or declared kept float: the new quantized layers (1-D/3-D and transposed
convolutions, weight-only embeddings), their MACs against hand counts, recurrent layers priced at 32 bits
with a warning, and each new layer's exported graph against PyTorch."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mixbits
from mixbits.cost import bitops, cost_summary, cost_table, format_cost_table, profile, size_bits
from mixbits.errors import MixbitsError
from mixbits.layer_types import weighted_layers
from mixbits.quant import apply_policy, calibrate, quant_layers, quantize_model
from mixbits.quant.convert import quantized_class
from mixbits.space import Policy, SearchSpace


class Wrap(nn.Module):
    """One layer between a float stem and nothing else, so that the layer itself is searchable (not first)."""

    def __init__(self, layer: nn.Module, stem: nn.Module | None = None):
        super().__init__()
        self.stem, self.layer = stem or nn.Identity(), layer

    def forward(self, x):
        out = self.layer(self.stem(x))
        return out[0] if isinstance(out, tuple) else out


# (layer, one sample's input, MACs counted by hand)
HAND_COUNTS = {
    # out (8, 10) x in/groups 4 x kernel 3
    "conv1d": (nn.Conv1d(4, 8, 3, padding=1), torch.randn(4, 10), 8 * 10 * 4 * 3),
    # out (4, 2, 4, 4) x in 2 x kernel 1*3*3
    "conv3d": (nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), torch.randn(2, 2, 4, 4), 4 * 2 * 4 * 4 * 2 * 9),
    # every input element (4 x 6) scatters into out 6 x kernel 3
    "conv_transpose1d": (nn.ConvTranspose1d(4, 6, 3, stride=2), torch.randn(4, 6), 4 * 6 * 6 * 3),
    # input (4, 3, 3), groups 2: out/groups 4 x kernel 2*2
    "conv_transpose2d": (nn.ConvTranspose2d(4, 8, 2, stride=2, groups=2), torch.randn(4, 3, 3), 4 * 3 * 3 * 4 * 4),
    # a lookup multiplies nothing
    "embedding": (nn.Embedding(20, 6), torch.tensor([1, 5, 7]), 0),
    # 5 steps x (3 gates x 8 hidden) x (input 4 + hidden 8)
    "gru": (nn.GRU(4, 8, batch_first=True), torch.randn(5, 4), 5 * 3 * 8 * (4 + 8)),
    # 5 steps x 2 directions x (4 gates x 6 hidden) x (input 4 + hidden 6)
    "lstm": (nn.LSTM(4, 6, bidirectional=True, batch_first=True), torch.randn(5, 4), 5 * 2 * 4 * 6 * (4 + 6)),
}


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_macs_bitops_and_size_of_each_layer_type_match_a_hand_count(name):
    layer, sample, macs = HAND_COUNTS[name]
    model = Wrap(layer)
    stats = profile(model, sample.unsqueeze(0))
    (s,) = stats.layers.values()
    assert s.macs == macs
    weights = sum(p.numel() for n, p in layer.named_parameters() if "weight" in n)
    assert s.params == weights and s.bias == sum(p.numel() for p in layer.parameters()) - weights
    if name in ("gru", "lstm"):  # kept float: priced at 32/32 whatever the policy
        assert bitops(stats, Policy({})) == macs * 32 * 32
        assert size_bits(stats, Policy({})) == (weights + s.bias) * 32
        return
    policy = Policy({"layer": (4, 3)})
    assert bitops(stats, policy) == macs * 4 * 3
    assert size_bits(stats, policy) == weights * 4 + s.bias * 32


QUANTIZED_TYPES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1, bias=True), (2, 4, 9), "zeros"),
    "conv1d_reflect": (lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 9), "zeros"),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 2)), (2, 2, 3, 6, 6), "zeros"),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1), (2, 4, 7), "zeros"),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
                         (2, 4, 5, 5), "zeros"),
    "embedding": (lambda: nn.Embedding(30, 8, padding_idx=0), (2, 7), "ids"),
}


def _input(shape, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "ids":
        return torch.randint(0, 30, shape, generator=gen)
    return torch.randn(shape, generator=gen)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("name", sorted(QUANTIZED_TYPES))
def test_each_new_layer_quantizes_trains_and_exports_matching_pytorch(name, per_channel, tmp_path):
    make, shape, kind = QUANTIZED_TYPES[name]
    torch.manual_seed(0)
    if name == "conv_transpose2d" and per_channel:  # groups=2: one step per output channel is not defined
        with pytest.raises(MixbitsError, match="groups=1"):
            quantized_class(make()).from_float(make(), (4,), (4,), per_channel=True)
        return
    model = Wrap(make())
    x = _input(shape, kind)
    space = SearchSpace.from_model(model, fixed="none")
    q = quantize_model(model, space, per_channel=per_channel)
    layer = q.layer
    assert type(layer).__name__ == "Q" + type(model.layer).__name__
    calibrate(q, x)
    apply_policy(q, Policy.uniform(space, 3))
    with torch.no_grad():
        deployed = q.eval()(x)  # the integer form
    fake = q.train()(x)  # the fake-quantized training form
    torch.testing.assert_close(deployed, fake.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.equal(fake.detach(), model(x))  # 3-bit weights do change the output
    fake.square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.w_quant.steps.grad is not None
    if not layer.weight_only:
        assert layer.a_quant.steps.grad is not None
    report = mixbits.export(q.eval(), tmp_path, x, check_inputs=[(x, None), (_input(shape, kind, seed=1), None)])
    check = report["onnx"]["check"]
    assert check["layer_max_rel_diff"] <= 1e-6 and check["rel_diff"] <= 1e-5, check
    assert check["unoptimized"]["rel_diff"] <= 1e-5
    assert report["kept_float"] == [] and report["packed"]["layers"]["layer"]["bits"] == 3


def test_embedding_is_weight_only_its_activation_bits_change_nothing():
    model = Wrap(nn.Embedding(30, 8))
    x = _input((4, 6), "ids")
    space = SearchSpace.from_model(model, fixed="none")
    q = quantize_model(model, space)
    calibrate(q, x)  # token ids are never quantized: calibration must not ask for their steps
    stats = profile(model, x)
    outs, costs = [], []
    for a in (2, 6):
        policy = Policy({"layer": (4, a)})
        apply_policy(q, policy)
        with torch.no_grad():
            outs.append(q.eval()(x))
        costs.append((bitops(stats, policy), size_bits(stats, policy)))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert costs[0] == costs[1] and costs[0][0] == 0


class SequenceNet(nn.Module):
    """Token ids -> embedding -> GRU -> Conv1d -> class scores: the recurrent layer stays float."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.rnn = nn.GRU(8, 12, batch_first=True)
        self.conv = nn.Conv1d(12, 12, 3, padding=1)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.head(torch.relu(self.conv(h.transpose(1, 2))).mean(-1))


def test_a_recurrent_layer_stays_float_with_a_warning_and_is_counted_everywhere(tmp_path):
    model, x = SequenceNet(), _input((4, 10), "ids")
    stats = profile(model, x)
    assert list(stats.layers) == ["emb", "rnn", "conv", "head"]
    assert stats.layers["rnn"].kind == "recurrent" and stats.layers["rnn"].macs == 10 * 3 * 12 * (8 + 12)
    space = SearchSpace.from_model(model, example_input=x)
    assert space.layers == ("emb", "conv", "head") and set(space.fixed) == {"emb", "head"}
    policy = Policy.uniform(space, 4)
    assert bitops(stats, policy) == stats.layers["rnn"].macs * 32 * 32 + stats.layers["conv"].macs * 16 + \
        stats.layers["head"].macs * 64
    table = format_cost_table(cost_table(stats, policy), totals=cost_summary(stats, policy))
    assert "kept float (32-bit weights and inputs, counted in BitOPs and size): rnn" in table
    with pytest.warns(UserWarning, match=r"rnn \(GRU\)"):
        q = mixbits.quantize(model, policy, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = mixbits.export(q, tmp_path, x)
    assert report["kept_float"] == ["rnn"] and report["onnx"]["float_layers"] == ["rnn"]
    assert report["onnx"]["check"]["top1_agreement"] == 100.0


class TwoRecurrent(nn.Module):
    """Token ids -> embedding -> bidirectional LSTM -> Conv1d -> GRU -> class scores."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True, bidirectional=True)
        self.conv = nn.Conv1d(16, 12, 3, padding=1)
        self.gru = nn.GRU(12, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        h, _ = self.gru(torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2))
        return self.head(h.mean(1))


@pytest.mark.parametrize("method", ["hawq", "oneshot"])
def test_lstm_and_gru_are_kept_float_by_search_fine_tune_and_export_and_priced_at_32_bits(method, tmp_path):
    from test_any_model import QUICK

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 20, (8, 10), generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(3)]
    with pytest.warns(UserWarning, match=r"2 layer\(s\) with weights stay float.*lstm \(LSTM\), gru \(GRU\)"):
        result = mixbits.search(TwoRecurrent(), data, "bitops<=uniform:4", method=method, options=QUICK[method],
                                progress=False)
    assert result.kept_float == ["lstm", "gru"] and result.space.layers == ("emb", "conv", "head")
    (policy,) = result.policies
    stats = profile(TwoRecurrent(), data[0][0])
    recurrent = stats.layers["lstm"].macs * 32 * 32 + stats.layers["gru"].macs * 32 * 32
    assert stats.layers["lstm"].macs == 10 * 2 * 4 * 8 * (8 + 8) and stats.layers["gru"].macs == 10 * 3 * 12 * 24
    assert bitops(stats, policy) == recurrent + sum(stats.layers[n].macs * w * a for n, (w, a) in policy.bits.items())
    weights = {n: stats.layers[n].params + stats.layers[n].bias for n in ("lstm", "gru")}
    assert all(r["w"] == r["a"] == 32 and r["size_bits"] == weights[r["name"]] * 32
               for r in cost_table(stats, policy) if r["kept_float"])
    with pytest.warns(UserWarning, match=r"lstm \(LSTM\), gru \(GRU\)"):
        qmodel = mixbits.finetune(TwoRecurrent(), result, data, epochs=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export's own note on the float layers
        report = mixbits.export(qmodel, tmp_path, data[0][0], check_inputs=data)
    assert report["kept_float"] == ["lstm", "gru"] and report["onnx"]["float_layers"] == ["lstm", "gru"]
    assert report["onnx"]["check"]["top1_agreement"] == 100.0
    assert report["packed"]["predicted_bytes"] == size_bits(stats, policy) / 8


def _models_with_inputs():
    """Every model the any-model tests run, the recurrent ones, and the zoo's transformer and depthwise CNN."""
    from test_any_model import MODELS, _data

    from mixbits.models import create

    ids = _input((2, 10), "ids") % 20
    return {**{kind: (make(), _data(kind)[0][0]) for kind, make in MODELS.items()},
            "gru": (SequenceNet(), ids), "lstm_gru": (TwoRecurrent(), ids),
            "vit_tiny": (create("vit_tiny", num_classes=10, in_chans=1), torch.randn(2, 1, 28, 28)),
            "mobilenetv2": (create("mobilenetv2", num_classes=10, in_chans=3, width=0.25, small_input=True),
                            torch.randn(2, 3, 32, 32))}


def test_every_module_holding_a_weight_matrix_is_counted_in_bitops_and_size():
    """Whatever its parameters are named: a module with a >= 2-D parameter is profiled, called (MACs > 0, but for
    a lookup), and either in the policy or kept float at 32 bits; BitOPs and size add up layer by layer."""
    from mixbits.quant.attention import prepare_model

    for name, (model, x) in _models_with_inputs().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nn.Transformer's note on nested tensors
            prepare_model(model)
        stats = profile(model, x)
        holders = {n for n, m in model.named_modules() if any(p.dim() >= 2 for p in m.parameters(recurse=False))}
        holders -= {""}  # a model's own parameters (a ViT's position embedding) count in size, at 32 bits
        assert holders <= set(stats.layers), (name, holders - set(stats.layers))
        assert all(s.macs > 0 for s in stats.layers.values() if s.kind != "embedding"), name
        space = SearchSpace.from_model(model, example_input=x)
        policy = Policy.uniform(space, 4)
        kept = [n for n in stats.layers if n not in space.layers]
        assert kept == (["rnn"] if name == "gru" else ["lstm", "gru"] if name == "lstm_gru" else []), name
        bits = {n: policy.bits.get(n, (32, 32)) for n in stats.layers}
        assert bitops(stats, policy) == sum(s.macs * bits[n][0] * bits[n][1] for n, s in stats.layers.items())
        params = sum(p.numel() for p in model.parameters())
        assert size_bits(stats, policy) == params * 32 - sum(s.params * (32 - bits[n][0])
                                                             for n, s in stats.layers.items()), name


def test_no_weight_bearing_layer_is_left_out_of_the_stats():
    model = nn.ModuleDict({"a": nn.Conv1d(2, 2, 1), "b": nn.Bilinear(3, 3, 2), "c": nn.LSTM(2, 2),
                           "d": nn.MultiheadAttention(4, 2), "e": nn.LayerNorm(4), "f": nn.ConvTranspose3d(2, 2, 1)})
    names = weighted_layers(model)
    # every module owning a weight matrix; the attention as one (its out_proj is read, never called); no LayerNorm
    assert names == ["a", "b", "c", "d", "f"]
    with pytest.raises(MixbitsError, match="cannot quantize ConvTranspose3d; supported: nn.Conv1d/2d/3d"):
        quantized_class(model["f"])


def test_embedding_with_max_norm_is_refused_with_the_fix():
    with pytest.raises(MixbitsError, match="max_norm"):
        quantized_class(nn.Embedding(4, 2)).from_float(nn.Embedding(4, 2, max_norm=1.0), (4,), (4,))


def test_quantized_layers_are_drop_in_state_dict_compatible():
    for name, (make, _, _) in QUANTIZED_TYPES.items():
        model = Wrap(make())
        q = quantize_model(model, SearchSpace.from_model(model, fixed="none"))
        assert set(model.state_dict()) <= set(q.state_dict()), name
        assert len(quant_layers(q)) == 1


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_latency_tables_time_the_new_layer_types(runtime):
    from mixbits.export import measure_latency_table

    model, x = nn.Sequential(nn.Embedding(30, 8), Transpose(), nn.ConvTranspose1d(8, 12, 3, padding=1),
                             nn.Flatten(), nn.Linear(12 * 10, 3)), _input((1, 10), "ids")
    space = SearchSpace.from_model(model, w_bits=(4, 8), a_bits=(8,), example_input=x)
    table = measure_latency_table(model, space, input_shape=x, runtime=runtime, repeats=1, warmup=0)
    assert set(table.layers) == {"0", "2", "4"}
    assert set(table.layers["2"]) == {"w4a8", "w8a8"} and all(v > 0 for v in table.layers["2"].values())


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)
