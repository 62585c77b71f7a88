"""Cost model against hand-computed counts (MACs, parameters, BitOPs, size) and latency tables."""

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mixbits import MixbitsError, Policy, SearchSpace
from mixbits.cost import (
    LatencyTable,
    ModelStats,
    average_bits,
    bitops,
    compression,
    cost_summary,
    cost_table,
    format_cost_table,
    fp_bitops,
    fp_size_bits,
    measure,
    profile,
    size_bits,
    size_bytes,
)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 4, 3, padding=1),
        bn=nn.BatchNorm2d(4),
        relu=nn.ReLU(),
        conv2=nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False),
        dw=nn.Conv2d(8, 8, 3, groups=8, padding=1),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        fc=nn.Linear(8, 10),
    ))


# hand counts for tiny_net on a 1x8x8 input
# conv1: out 4x8x8 = 256 elems, each 1*3*3 MACs; weight 4*1*3*3, bias 4
CONV1_MACS, CONV1_PARAMS, CONV1_BIAS = 4 * 8 * 8 * (1 * 3 * 3), 4 * 1 * 3 * 3, 4
# conv2: stride 2 -> out 8x4x4 = 128 elems, each 4*3*3 MACs; weight 8*4*3*3, no bias
CONV2_MACS, CONV2_PARAMS, CONV2_BIAS = 8 * 4 * 4 * (4 * 3 * 3), 8 * 4 * 3 * 3, 0
# dw: groups=8 -> out 8x4x4, each (8/8)*3*3 MACs; weight 8*1*3*3, bias 8
DW_MACS, DW_PARAMS, DW_BIAS = 8 * 4 * 4 * (1 * 3 * 3), 8 * 1 * 3 * 3, 8
# fc: 8 -> 10
FC_MACS, FC_PARAMS, FC_BIAS = 8 * 10, 8 * 10, 10
BN_PARAMS = 4 + 4  # weight + bias (running stats are buffers)
TOTAL = CONV1_PARAMS + CONV1_BIAS + BN_PARAMS + CONV2_PARAMS + DW_PARAMS + DW_BIAS + FC_PARAMS + FC_BIAS
MACS = {"conv1": CONV1_MACS, "conv2": CONV2_MACS, "dw": DW_MACS, "fc": FC_MACS}
PARAMS = {"conv1": CONV1_PARAMS, "conv2": CONV2_PARAMS, "dw": DW_PARAMS, "fc": FC_PARAMS}


@pytest.fixture
def net():
    return tiny_net()


@pytest.fixture
def stats(net):
    return profile(net, (1, 8, 8))


@pytest.fixture
def space(net):
    return SearchSpace.from_model(net)  # conv1 and fc fixed at 8/8


@pytest.fixture
def mixed(space):
    return Policy.from_rules(space, default=(4, 3), overrides={"dw": (2, 5)})


def test_profile_counts_by_hand(stats):
    assert list(stats.layers) == ["conv1", "conv2", "dw", "fc"]
    assert TOTAL == 506
    assert stats.total_params == TOTAL
    assert stats.input_shape == (1, 8, 8)
    c1, c2, dw, fc = stats.layers.values()
    assert (c1.kind, c1.macs, c1.params, c1.bias) == ("conv", 2304, CONV1_PARAMS, CONV1_BIAS)
    assert (c2.macs, c2.params, c2.bias) == (4608, 288, 0)
    assert (dw.macs, dw.params, dw.bias, dw.groups) == (1152, 72, 8, 8)
    assert (fc.kind, fc.macs, fc.params, fc.bias) == ("linear", 80, 80, 10)
    assert [s.macs for s in stats.layers.values()] == [CONV1_MACS, CONV2_MACS, DW_MACS, FC_MACS]
    assert (c1.in_shape, c1.out_shape) == ((1, 8, 8), (4, 8, 8))
    assert (c2.in_shape, c2.out_shape) == ((4, 8, 8), (8, 4, 4))
    assert (dw.in_shape, dw.out_shape) == ((8, 4, 4), (8, 4, 4))
    assert (fc.in_shape, fc.out_shape) == ((8,), (10,))


def test_batched_input_shape_and_bad_shapes(net, stats):
    assert profile(net, (1, 1, 8, 8)) == stats
    for bad in [(), (1, 0, 8), (1, 8, 8.0)]:
        with pytest.raises(MixbitsError, match="input_shape"):
            profile(net, bad)
    for wrong in [(8, 8), (2, 1, 8, 8)]:  # shapes of some model's samples, but not this one's: the forward says so
        with pytest.raises(MixbitsError, match=r"input shape \[.*\] failed"):
            profile(net, wrong)


def test_bitops_and_size_by_hand(stats, mixed):
    assert mixed.bits == {"conv1": (8, 8), "conv2": (4, 3), "dw": (2, 5), "fc": (8, 8)}
    want_bitops = CONV1_MACS * 8 * 8 + CONV2_MACS * 4 * 3 + DW_MACS * 2 * 5 + FC_MACS * 8 * 8
    assert bitops(stats, mixed) == want_bitops == 147456 + 55296 + 11520 + 5120
    other = CONV1_BIAS + DW_BIAS + FC_BIAS + BN_PARAMS  # stays at 32 bits
    want_size = CONV1_PARAMS * 8 + CONV2_PARAMS * 4 + DW_PARAMS * 2 + FC_PARAMS * 8 + other * 32
    assert size_bits(stats, mixed) == want_size
    assert size_bytes(stats, mixed) == want_size / 8
    assert fp_bitops(stats) == (CONV1_MACS + CONV2_MACS + DW_MACS + FC_MACS) * 32 * 32
    assert fp_size_bits(stats) == TOTAL * 32
    ratios = compression(stats, mixed)
    assert ratios["bitops"] == pytest.approx(fp_bitops(stats) / want_bitops)
    assert ratios["size"] == pytest.approx(TOTAL * 32 / want_size)
    assert measure("bitops", stats, mixed) == want_bitops
    assert measure("size", stats, mixed) == want_size


def test_average_bits_weighting(stats, mixed):
    w, a = average_bits(stats, mixed)
    params = CONV1_PARAMS + CONV2_PARAMS + DW_PARAMS + FC_PARAMS
    macs = CONV1_MACS + CONV2_MACS + DW_MACS + FC_MACS
    assert w == pytest.approx((CONV1_PARAMS * 8 + CONV2_PARAMS * 4 + DW_PARAMS * 2 + FC_PARAMS * 8) / params)
    assert a == pytest.approx((CONV1_MACS * 8 + CONV2_MACS * 3 + DW_MACS * 5 + FC_MACS * 8) / macs)


def test_unknown_layer_and_float_layers(stats, mixed):
    with pytest.raises(MixbitsError, match="'conv9'.*another model"):
        bitops(stats, mixed.replace("conv9", 4, 4))
    # a stats layer the policy leaves out is float 32/32
    partial = Policy({"conv2": (4, 4)})
    assert bitops(stats, partial) == (CONV1_MACS + DW_MACS + FC_MACS) * 1024 + CONV2_MACS * 16
    assert size_bits(stats, partial) == TOTAL * 32 - CONV2_PARAMS * (32 - 4)


def test_shared_module_doubles_macs():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    stats = profile(Twice(), (3, 4, 4))
    assert stats.layers["conv"].macs == 2 * (3 * 4 * 4 * 3)
    assert stats.layers["conv"].params == 9 and stats.total_params == 12


def test_linear_counts_tokens():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 1)
            self.proj = nn.Linear(8, 5)

        def forward(self, x):
            return self.proj(self.embed(x).flatten(2).transpose(1, 2))  # (1, 16 tokens, 8)

    stats = profile(Tokens(), (3, 4, 4))
    assert stats.layers["proj"].macs == 16 * 8 * 5
    assert stats.layers["proj"].in_shape == (16, 8)


def test_unused_layer_and_step_params_excluded():
    class Quantish(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.fc.steps = nn.Parameter(torch.ones(2))  # quantizer step sizes are not model weights
            self.spare = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.flatten(1))

    stats = profile(Quantish(), (1, 2, 2))
    assert stats.total_params == (4 * 2 + 2) + (4 * 4 + 4)
    assert stats.layers["spare"].macs == 0


def test_profile_restores_mode_and_hooks(net):
    net.train()
    net.bn.eval()  # a per-module flag that must survive too
    profile(net, (1, 8, 8))
    assert net.training and not net.bn.training and net.conv1.training
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(MixbitsError, match=r"\[3, 8, 8\].*RuntimeError"):
        profile(net, (3, 8, 8))
    assert net.training and not net.bn.training
    assert all(not m._forward_hooks for m in net.modules())


def test_stats_round_trip(stats):
    again = ModelStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    with pytest.raises(MixbitsError, match="stats"):
        ModelStats.from_dict({"layers": []})


def test_cost_table(stats, mixed):
    rows = cost_table(stats, mixed)
    assert [r["name"] for r in rows] == ["conv1", "conv2", "dw", "fc"]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    dw = rows[2]
    assert (dw["w"], dw["a"], dw["bitops"], dw["size_bits"]) == (2, 5, DW_MACS * 10, DW_PARAMS * 2 + DW_BIAS * 32)
    text = format_cost_table(rows)
    assert "conv2" in text and "total:" in text and "BitOPs" in text
    lines = text.splitlines()
    assert len({len(line) for line in lines[:-1]}) == 1  # aligned columns
    assert "total:" not in format_cost_table(rows, totals=False)
    whole = format_cost_table(rows, totals=cost_summary(stats, mixed))
    assert f"size {size_bits(stats, mixed) / 8e3:.2f} KB" in whole


def write_table(path, space, ms=lambda w, a: w * a / 100, drop=()):
    layers = {n: {f"w{w}a{a}": ms(w, a) for w in range(2, 9) for a in range(2, 9) if (n, w, a) not in drop}
              for n in space.layers}
    path.write_text(json.dumps({"format": "mixbits.latency/1", "unit": "ms", "device": "cpu", "layers": layers}))
    return LatencyTable.load(path)


def test_latency_table(tmp_path, stats, space, mixed):
    table = write_table(tmp_path / "lat.json", space)
    assert table.unit == "ms" and table.device == "cpu"
    assert table.cost(mixed) == pytest.approx((64 + 12 + 10 + 64) / 100)
    assert measure("latency", stats, mixed, table) == pytest.approx(1.5)
    table.save(tmp_path / "copy.json")
    assert LatencyTable.load(tmp_path / "copy.json") == table
    table.check_covers(space)


def test_latency_missing_entries(tmp_path, space, mixed):
    table = write_table(tmp_path / "lat.json", space, drop={("dw", 2, 5), ("conv2", 3, 3)})
    with pytest.raises(MixbitsError, match="'w2a5' for layer 'dw'"):
        table.cost(mixed)
    with pytest.raises(MixbitsError, match="no layer 'conv3'.*conv1"):
        table.entry("conv3", 4, 4)
    with pytest.raises(MixbitsError) as e:
        table.check_covers(space)
    assert "conv2: w3a3" in str(e.value) and "dw: w2a5" in str(e.value)


def test_latency_bad_files(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{")
    with pytest.raises(MixbitsError, match="not valid JSON"):
        LatencyTable.load(path)
    path.write_text(json.dumps({"format": "mixbits.latency/1", "layers": {"fc": {"4bit": 1.0}}}))
    with pytest.raises(MixbitsError, match="'4bit'"):
        LatencyTable.load(path)
    with pytest.raises(MixbitsError, match="does not exist"):
        LatencyTable.load(tmp_path / "none.json")


def test_measure_errors(stats, mixed):
    with pytest.raises(MixbitsError, match="--latency-table"):
        measure("latency", stats, mixed)
    with pytest.raises(MixbitsError, match="bitops, size, latency"):
        measure("energy", stats, mixed)
