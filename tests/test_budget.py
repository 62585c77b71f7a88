"""Budget strings, limits in internal units, satisfaction and feasibility on a hand-counted net."""

from collections import OrderedDict

import pytest
from torch import nn

from mixbits import MixbitsError, Policy, SearchSpace
from mixbits.budget import Budget, Cap, check_feasible, parse_budget, parse_budgets, reference_policy
from mixbits.cost import LatencyTable, bitops, profile, size_bits


def tiny_net() -> nn.Module:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 4, 3, padding=1), bn=nn.BatchNorm2d(4), relu=nn.ReLU(),
        conv2=nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), dw=nn.Conv2d(8, 8, 3, groups=8, padding=1),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, 10),
    ))


# per-layer MACs on a 1x8x8 input: output elements x (in_ch / groups) x kernel area
CONV1_MACS, CONV2_MACS, DW_MACS, FC_MACS = 4 * 8 * 8 * 9, 8 * 4 * 4 * (4 * 9), 8 * 4 * 4 * 9, 8 * 10
PARAMS = {"conv1": 4 * 9, "conv2": 8 * 4 * 9, "dw": 8 * 9, "fc": 8 * 10}  # weight elements
TOTAL = sum(PARAMS.values()) + 4 + 8 + 10 + (4 + 4)  # + biases of conv1, dw, fc + BatchNorm affine


@pytest.fixture
def net():
    return tiny_net()


@pytest.fixture
def stats(net):
    return profile(net, (1, 8, 8))


@pytest.fixture
def space(net):
    return SearchSpace.from_model(net)  # conv1, fc fixed at 8/8; conv2, dw search 2..6


@pytest.fixture
def table(space):
    # latency grows with w*a, except that W2A2 on dw is slow (tables need not be monotone)
    layers = {n: {f"w{w}a{a}": w * a / 100 for w in range(2, 9) for a in range(2, 9)} for n in space.layers}
    layers["dw"]["w2a2"] = 1.0
    return LatencyTable(layers, unit="ms")


def only(text) -> Cap:
    budget = parse_budget(text)
    assert len(budget.caps) == 1
    return budget.caps[0]


@pytest.mark.parametrize("text, value", [
    ("bitops<=0.35G", 0.35e9), ("bitops<=1500", 1500), ("bitops<=2.5M", 2.5e6), ("bitops<=3K", 3e3),
    ("bitops<=1T", 1e12), ("bitops<=1e9", 1e9), ("BitOPs <= 0.35g", 0.35e9),
    ("size<=1.2MB", 1.2e6 * 8), ("size<=100KB", 100e3 * 8), ("size<=2KiB", 2048 * 8), ("size<=1MiB", 2**20 * 8),
    ("size<=1GB", 1e9 * 8), ("size<=512B", 512 * 8), ("latency<=3.5", 3.5), ("latency<=3.5ms", 3.5),
])
def test_absolute_values_in_internal_units(text, value):
    cap = only(text)
    assert cap.value == pytest.approx(value) and cap.uniform is None
    assert cap.text.replace(" ", "").lower() == text.replace(" ", "").lower()


@pytest.mark.parametrize("text, bits", [
    ("bitops<=uniform:3", (3, 3)), ("bitops<=uniform:w4a8", (4, 8)), ("size<=uniform:4", (4, 4)),
    ("latency<=uniform:4", (4, 4)), ("bitops<=uniform:4/8", (4, 8)), ("bitops<=uniform:w6", (6, 6)),
    ("bitops<=uniform:2.5", (2.5, 2.5)), ("bitops<=uniform:w3a2", (3, 2)), ("size<=uniform:w2.25a3", (2.25, 3)),
    ("bitops<=uniform:3.5/2", (3.5, 2)), ("bitops<=uniform:2", (2, 2)), ("bitops<=uniform:8", (8, 8)),
])
def test_uniform_references(text, bits):
    cap = only(text)
    assert cap.uniform == bits and cap.value is None


def test_uniform_limit_by_hand(stats, space):
    # searchable layers at 3/3, first/last fixed at 8/8
    want = CONV1_MACS * 64 + CONV2_MACS * 9 + DW_MACS * 9 + FC_MACS * 64
    assert only("bitops<=uniform:3").limit(stats, space) == want == 147456 + 41472 + 10368 + 5120
    # uniform:8 is a valid reference although 8 is not a searchable candidate
    assert only("bitops<=uniform:8").limit(stats, space) == (CONV1_MACS + CONV2_MACS + DW_MACS + FC_MACS) * 64
    other = TOTAL - sum(PARAMS.values())
    want_size = PARAMS["conv1"] * 8 + PARAMS["conv2"] * 4 + PARAMS["dw"] * 4 + PARAMS["fc"] * 8 + other * 32
    assert only("size<=uniform:4").limit(stats, space) == want_size
    assert only("bitops<=uniform:w2a8").limit(stats, space) == bitops(stats, reference_policy(space, 2, 8))


def test_fractional_and_mixed_references_by_hand(stats, space, table):
    fixed = CONV1_MACS * 64 + FC_MACS * 64  # first and last layers stay at W8A8
    searchable = CONV2_MACS + DW_MACS
    # BitOPs scale with w·a: at 2.5 bits every searchable layer costs MACs · 2.5 · 2.5
    assert only("bitops<=uniform:2.5").limit(stats, space) == pytest.approx(fixed + searchable * 2.5 * 2.5)
    assert only("bitops<=uniform:w3a2").limit(stats, space) == fixed + searchable * 3 * 2
    assert only("bitops<=uniform:w2.5a4").limit(stats, space) == pytest.approx(fixed + searchable * 2.5 * 4)
    limits = [only(f"bitops<=uniform:{b}").limit(stats, space) for b in ("2", "2.25", "2.75", "3")]
    assert limits == sorted(set(limits))
    # size is linear in the weight bits: halfway between the W2 and W3 sizes
    half = only("size<=uniform:2.5").limit(stats, space)
    sizes = [size_bits(stats, Policy.uniform(space, b)) for b in (2, 3)]
    assert half == pytest.approx(sum(sizes) / 2)
    # latency: the table interpolated between the four neighbouring entries (w·a/100, dw's W2A2 slow at 1.0)
    dw = (1.0 + 0.06 + 0.06 + 0.09) / 4
    want = 2 * 0.64 + 2.5 * 2.5 / 100 + dw
    assert only("latency<=uniform:2.5").limit(stats, space, table) == pytest.approx(want)
    # a policy between the levels is judged against the fractional cap
    budget = parse_budget("bitops<=uniform:2.5")
    mixed = Policy.uniform(space, 2).replace("dw", 3, 3)  # dw has fewer MACs than conv2
    assert budget.satisfied(stats, mixed, space) and not budget.satisfied(stats, Policy.uniform(space, 3), space)


def test_lists_and_cartesian_product():
    budgets = parse_budgets("bitops<=uniform:2,uniform:3,uniform:4")
    assert [b.caps[0].uniform for b in budgets] == [(2, 2), (3, 3), (4, 4)]
    assert [b.text for b in budgets] == ["bitops<=uniform:2", "bitops<=uniform:3", "bitops<=uniform:4"]
    budgets = parse_budgets("bitops<=uniform:2,uniform:3;size<=1MB")
    assert [b.text for b in budgets] == ["bitops<=uniform:2;size<=1MB", "bitops<=uniform:3;size<=1MB"]
    assert all(b.metrics == ("bitops", "size") and b.caps[1].value == 8e6 for b in budgets)
    assert len(parse_budgets("bitops<=1G,2G;size<=1MB,2MB;latency<=3")) == 4
    assert [b.caps[0].value for b in parse_budgets("bitops<=1G,bitops<=2G")] == [1e9, 2e9]
    both = parse_budget("bitops<=uniform:3;size<=100KB")
    assert both.metrics == ("bitops", "size") and str(both) == both.text == "bitops<=uniform:3;size<=100KB"
    with pytest.raises(MixbitsError, match="describes 2"):
        parse_budget("bitops<=1G,2G")


@pytest.mark.parametrize("text, match", [
    ("", "empty"), ("bitops", "<metric><=<limit>"), ("bitops<0.3G", "<metric><=<limit>"),
    ("flops<=1G", "unknown metric 'flops'.*bitops, size, latency"), ("bitops<=0", "positive"),
    ("bitops<=-1G", "positive"), ("bitops<=1X", "suffix 'X'"), ("size<=100", "size needs a unit"),
    ("size<=1Mb", "size needs a unit"), ("bitops<=uniform:0", "2..8.*W0A0"), ("bitops<=uniform:9", "2..8.*W9A9"),
    ("bitops<=uniform:1.5", "2..8.*W1.5A1.5"), ("bitops<=uniform:w4a8.5", "2..8.*W4A8.5"),
    ("bitops<=uniform:x", "neither a number"), ("bitops<=1G;bitops<=2G", "capped twice"),
    ("bitops<=1G,size<=1MB", "';'"), ("bitops<=1G;", "<metric><=<limit>"), ("bitops<=1G,", "empty limit"),
    ("bitops<=nan", "neither a number"),
])
def test_bad_strings(text, match):
    with pytest.raises(MixbitsError, match=match) as e:
        parse_budgets(text)
    assert repr(text) in str(e.value) and "bitops<=uniform:2.5, bitops<=uniform:w3a2" in str(e.value)


def test_satisfied_and_slack(stats, space):
    budget = parse_budget("bitops<=uniform:3;size<=uniform:4")
    at3 = Policy.uniform(space, 3)
    assert budget.satisfied(stats, at3, space)  # the reference meets its own cap exactly
    slack = budget.slack(stats, at3, space)
    assert slack["bitops"] == 0 and slack["size"] == size_bits(stats, Policy.uniform(space, 4)) - size_bits(stats, at3)
    at4 = Policy.uniform(space, 4)
    assert not budget.satisfied(stats, at4, space)
    assert budget.slack(stats, at4, space)["bitops"] == -(CONV2_MACS + DW_MACS) * (16 - 9)
    assert budget.limits(stats, space) == {"bitops": bitops(stats, at3), "size": size_bits(stats, at4)}


def test_check_feasible(stats, space):
    check_feasible(parse_budget("bitops<=uniform:2"), stats, space)  # the cheapest policy itself
    check_feasible(parse_budget("bitops<=1G;size<=1MB"), stats, space)
    cheapest = CONV1_MACS * 64 + CONV2_MACS * 4 + DW_MACS * 4 + FC_MACS * 64  # 175616
    with pytest.raises(MixbitsError) as e:
        check_feasible(parse_budget("bitops<=0.0001G"), stats, space)
    msg = str(e.value)
    assert "bitops<=0.0001G is infeasible" in msg and "W2A2 on every searchable layer" in msg
    assert f"{cheapest / 1e9:.3g} G BitOPs" in msg and "0.000176 G" in msg
    with pytest.raises(MixbitsError, match="size<=100B.*KB"):
        check_feasible(parse_budget("bitops<=1G;size<=100B"), stats, space)


def test_latency_caps(stats, space, table):
    with pytest.raises(MixbitsError, match="--latency-table"):
        only("latency<=3ms").limit(stats, space)
    assert only("latency<=3ms").limit(stats, space, table) == 3
    assert only("latency<=3000us").limit(stats, space, table) == pytest.approx(3)
    with pytest.raises(MixbitsError, match="'mJ'.*'ms'"):
        only("latency<=3mJ").limit(stats, space, table)
    budget = parse_budget("latency<=uniform:4")
    assert budget.limits(stats, space, table)["latency"] == pytest.approx((64 + 16 + 16 + 64) / 100)
    assert budget.satisfied(stats, Policy.uniform(space, 4), space, table)
    assert not budget.satisfied(stats, Policy.uniform(space, 5), space, table)


def test_latency_feasibility_uses_fastest_entries(stats, space, table):
    # fastest: conv2 at w2a2 (0.04), dw at w2a3 (0.06, since w2a2 is 1.0); fixed layers 0.64 each
    fastest = 0.64 + 0.04 + 0.06 + 0.64
    check_feasible(Budget((Cap("latency", fastest, None, "latency<=1.38"),)), stats, space, table)
    with pytest.raises(MixbitsError, match="fastest policy.*1.38 ms"):
        check_feasible(parse_budget("latency<=1.3"), stats, space, table)
