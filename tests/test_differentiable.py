"""The differentiable searches (DNAS, SSPS, DMPQ) and the machinery they share.

The composite convolution itself (mixture == Σ over candidate branches) is covered in test_quant.py.
"""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import interrupted_and_resumed, toy_image_loader, toy_search_context
from torch import nn

from mixbits import MixbitsError, Policy
from mixbits.budget import parse_budget, parse_budgets
from mixbits.cost import bitops
from mixbits.quant import QConv2d, calibrate
from mixbits.search import run_searcher
from mixbits.search.derive import FILL_TOLERANCE, fill, repair
from mixbits.search.differentiable import (
    ArchParams,
    ExpectedCost,
    LayerProbs,
    budget_penalty,
    cost_ratios,
    decaying_weight,
    softmax_rows,
)
from mixbits.search.dmpq import DecayingSkip
from mixbits.search.dnas import DnasOptions, cost_pull, dnas_loss
from mixbits.search.ssps import SequentialFixing, SspsOptions, fixing_steps
from mixbits.search.supernet import split_for_architecture

BITS = (2, 4, 6)
ALL_BITS = (2, 3, 4, 5, 6)
# Hand-counted MACs of _net on 1x8x8 inputs: out H·W · C_out · C_in · 3·3 (convs), in · out (linear).
MACS = {"0": 64 * 4 * 1 * 9, "3": 64 * 6 * 4 * 9, "6": 64 * 6 * 6 * 9, "10": 6 * 3}


def _arch(ctx, joint=False):
    return ArchParams(ctx.space.searchable, BITS, BITS, joint=joint)


def test_expected_bitops_matches_a_hand_computation():
    ctx = toy_search_context([])
    arch = _arch(ctx)
    assert ctx.space.searchable == ("3", "6") and list(ctx.stats.layers) == list(MACS)
    cost = ExpectedCost(ctx, arch.pairs)
    pw = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    pa = torch.tensor([[0.6, 0.4, 0.0], [0.1, 0.1, 0.8]])
    expected = cost(LayerProbs.factored(pw, pa).pairs)["bitops"]
    mean_bits = lambda p: sum(float(p[i]) * b for i, b in enumerate(BITS))  # noqa: E731
    by_hand = (MACS["0"] * 64 + MACS["10"] * 64
               + MACS["3"] * mean_bits(pw[0]) * mean_bits(pa[0]) + MACS["6"] * mean_bits(pw[1]) * mean_bits(pa[1]))
    assert float(expected) == pytest.approx(by_hand, rel=1e-6)  # float32 probabilities
    # a one-hot joint distribution costs exactly its policy
    joint = torch.zeros(2, 9)
    joint[0, 1 * 3 + 2], joint[1, 0] = 1.0, 1.0  # layer 3 at W4A6, layer 6 at W2A2
    policy = Policy({"0": (8, 8), "3": (4, 6), "6": (2, 2), "10": (8, 8)})
    assert float(cost(joint)["bitops"]) == pytest.approx(ctx.cost(policy)["bitops"], rel=1e-12)


def test_cost_penalty_gradient_moves_probability_to_cheaper_bits():
    ctx = toy_search_context([])
    arch = _arch(ctx)
    cost = ExpectedCost(ctx, arch.pairs)
    tight = parse_budget("bitops<=uniform:2").limits(ctx.stats, ctx.space)
    opt = torch.optim.SGD(arch.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        budget_penalty(cost_ratios(cost(arch.probs(softmax_rows).pairs), tight), "hinge").backward()
        opt.step()
    probs = arch.probs(softmax_rows)
    for side in (probs.w, probs.a):  # every layer: strictly more mass on fewer bits
        assert torch.all(side[:, 0] > side[:, 1]) and torch.all(side[:, 1] > side[:, 2])
        assert torch.all(side[:, 0] > 1 / 3 + 0.01)
    # a budget the distribution already meets exerts no pull at all (hinge)
    loose = parse_budget("bitops<=uniform:8").limits(ctx.stats, ctx.space)
    arch.zero_grad()
    budget_penalty(cost_ratios(cost(arch.probs(softmax_rows).pairs), loose), "hinge").backward()
    assert float(arch.w.grad.abs().sum()) == 0.0


def test_dnas_loss_grows_with_cost_and_scales_cross_entropy():
    opts = DnasOptions()
    ce = torch.tensor(2.0)
    low, high = dnas_loss(ce, torch.tensor(0.5), opts), dnas_loss(ce, torch.tensor(2.0), opts)
    assert float(low) < float(high)
    expected = 2.0 * opts.beta * math.log(opts.cost_scale * 2.0) ** opts.gamma
    assert float(high) == pytest.approx(expected, rel=1e-6)


def test_dnas_cost_term_outweighs_the_task_at_the_cap_and_stops_pulling_just_under_it():
    opts = DnasOptions()
    ce = torch.tensor(1.0)

    def elasticity(r):  # d log loss / d log cost: how much a share of cost saved is worth in shares of CE
        ratio = torch.tensor(r, dtype=torch.float64, requires_grad=True)
        loss = dnas_loss(ce, ratio, opts)
        (grad,) = torch.autograd.grad(loss, ratio)
        return float(grad * ratio / loss)

    assert elasticity(1.0) > 1.0  # cost_scale 10, γ 0.6 gave 0.26: the search settled at 1.9-2.2x the cap
    assert elasticity(1.0) == pytest.approx(cost_pull(1.0, opts), rel=1e-4)
    assert elasticity(0.9) == 0.0 and cost_pull(0.9, opts) == 0.0  # under cap·e^0.01/cost_scale: no pull


def test_dnas_expected_cost_ends_nearer_its_cap_than_at_the_former_constants():
    def expected_over_cap(extra):
        ctx = toy_search_context(parse_budgets("bitops<=uniform:3"), {"epochs": 2, "samples": 0, **extra},
                                 bits=(2, 3, 4, 5, 6))
        return run_searcher("dnas", ctx).trace[0]["epochs"][-1]["expected_bitops_over_cap"]

    now, before = expected_over_cap({}), expected_over_cap({"cost_scale": 10.0, "gamma": 0.6})
    assert abs(now - 1.0) < abs(before - 1.0) and 0.8 < now <= 1.0


def test_sequential_fixing_takes_the_most_certain_layer_and_pins_it():
    arch = ArchParams(["a", "b", "c"], BITS, BITS)
    with torch.no_grad():
        arch.w[1] = torch.tensor([0.0, 0.0, 4.0])  # layer b: almost surely W6, A uniform
        arch.a[1] = torch.tensor([0.0, 3.0, 0.0])  # ... and A4: the most certain
        arch.w[2] = torch.tensor([2.0, 0.0, 0.0])  # layer c: fairly sure of W2
    fixing = SequentialFixing(SimpleNamespace(arch=arch), SspsOptions())
    fixing.fix_most_certain(step=5)
    fixing.fix_most_certain(step=9)
    assert [e["layer"] for e in fixing.order] == ["b", "c"]
    assert fixing.order[0]["bits"] == [6, 4] and fixing.order[1]["bits"][0] == 2
    probs = arch.probs(softmax_rows)
    assert probs.pairs[1, arch.pairs.index((6, 4))] == 1.0  # pinned one-hot
    (probs.pairs * torch.arange(9.0)).sum().backward()
    assert arch.w.grad[1].abs().sum() == 0 and arch.a.grad[2].abs().sum() == 0  # decided rows get no gradient
    assert arch.w.grad[0].abs().sum() > 0  # the undecided layer still does
    assert fixing_steps(4, 100, 0.3, 0.9) == [30, 50, 70, 90]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dmpq_skip_weight_follows_its_schedule(schedule):
    for p, linear, cosine in [(0.0, 1.0, 1.0), (0.25, 0.75, 0.5 * (1 + math.cos(math.pi / 4))), (0.5, 0.5, 0.5),
                              (1.0, 0.0, 0.0)]:
        assert decaying_weight(p, schedule, 1.0) == pytest.approx(linear if schedule == "linear" else cosine)
    options = {"epochs": 4, "skip_schedule": schedule, "skip_init": 0.8}
    ctx = toy_search_context(parse_budgets("bitops<=uniform:4"), options)
    result = run_searcher("dmpq", ctx)
    weights = [e["skip_weight"] for e in result.trace[0]["epochs"]]
    assert weights == pytest.approx([decaying_weight(e / 4, schedule, 0.8) for e in (1, 2, 3, 4)])
    assert weights[-1] == 0.0
    assert all(not layer._forward_hooks for layer in ctx.model.modules())  # the skip is gone after the search


def test_decaying_skip_adds_the_shortcut_to_the_convolution():
    conv = QConv2d(4, 6, 3, stride=2, padding=1, w_bits=BITS, a_bits=BITS)
    x = torch.randn(2, 4, 8, 8)
    calibrate(nn.Sequential(conv), x)
    plain = conv(x)
    skip = DecayingSkip([conv], "linear", 0.5, scale="raw")
    shortcut = torch.cat([nn.functional.avg_pool2d(x, 2), torch.zeros(2, 2, 4, 4)], dim=1)
    torch.testing.assert_close(conv(x), plain + 0.5 * shortcut)
    skip.remove()
    torch.testing.assert_close(conv(x), plain)


def test_matched_skip_is_as_large_as_the_convolution_output_at_weight_one():
    conv = QConv2d(4, 4, 3, padding=1, w_bits=BITS, a_bits=BITS)
    x = 100.0 * torch.randn(2, 4, 8, 8)  # an input far larger than what the convolution makes of it
    calibrate(nn.Sequential(conv), x)
    with torch.no_grad():
        conv.weight.mul_(1e-3)
    plain = conv(x)
    skip = DecayingSkip([conv], "none", 1.0)  # matched is the default
    added = conv(x) - plain
    skip.remove()
    torch.testing.assert_close(added.std(), plain.std(), rtol=1e-4, atol=0.0)
    torch.testing.assert_close(added / added.std(), x / x.std(), rtol=1e-4, atol=1e-5)


def test_repair_lowers_the_least_certain_layer_first():
    ctx = toy_search_context([])
    arch = _arch(ctx)
    budget = parse_budget("bitops<=uniform:5")
    policy = Policy.uniform(ctx.space, 6)
    pair_probs = torch.full((2, 9), 0.05)
    pair_probs[0, 8] = 0.9  # layer 3 is sure of W6A6, layer 6 is not
    fixed, steps = repair(ctx, arch, policy, budget, pair_probs)
    assert ctx.fits(fixed, budget) and not ctx.fits(policy, budget)
    assert steps and all(step["layer"] == "6" for step in steps) and fixed["3"] == (6, 6)


def _raises_that_fit(ctx, floor: Policy, budget):
    """Every policy whose bits are at least ``floor``'s on every searchable layer, and that fits ``budget``."""
    pairs = [(w, a) for w in ctx.space.w_bits for a in ctx.space.a_bits]
    out = []
    for combo in itertools.product(pairs, repeat=len(ctx.space.searchable)):
        overrides = dict(zip(ctx.space.searchable, combo, strict=True))
        policy = Policy.from_rules(ctx.space, default=pairs[0], overrides=overrides)
        raised = all(policy[n][0] >= floor[n][0] and policy[n][1] >= floor[n][1] for n in ctx.space.searchable)
        if raised and ctx.fits(policy, budget):
            out.append(policy)
    return out


def test_fill_spends_the_budget_as_fully_as_any_raise_then_takes_the_most_probable():
    ctx = toy_search_context([], bits=ALL_BITS)  # two layers of unequal MACs (13824 and 20736)
    arch = ArchParams(ctx.space.searchable, ALL_BITS, ALL_BITS)
    budget = parse_budget("bitops<=uniform:3.5")
    cap = budget.limits(ctx.stats, ctx.space)["bitops"]
    start = Policy.uniform(ctx.space, 2).replace("6", 3, 2)
    pair_probs = torch.rand(2, 25, generator=torch.Generator().manual_seed(0))
    filled, steps = fill(ctx, arch, start, budget, pair_probs)
    assert ctx.fits(filled, budget) and {s["layer"] for s in steps} == {n for n in "36" if filled[n] != start[n]}
    raises = _raises_that_fit(ctx, start, budget)
    most = max(bitops(ctx.stats, p) for p in raises)
    full = [p for p in raises if bitops(ctx.stats, p) >= most - FILL_TOLERANCE * cap]
    assert filled in full

    def log_p(policy):
        return sum(math.log(pair_probs[i, arch.pairs.index(policy[n])]) for i, n in enumerate("36"))

    assert log_p(filled) == pytest.approx(max(log_p(p) for p in full))
    # one step at a time, most probable first, stops short here: every single raise from there overshoots
    greedy = start
    while True:
        ups = [greedy.replace(n, *up) for n in "36" for up in ((greedy[n][0] + 1, greedy[n][1]),
                                                             (greedy[n][0], greedy[n][1] + 1))
               if max(up) <= 6 and ctx.fits(greedy.replace(n, *up), budget)]
        if not ups:
            break
        greedy = max(ups, key=log_p)
    assert bitops(ctx.stats, greedy) < most - FILL_TOLERANCE * cap


@pytest.mark.parametrize("method", ["dnas", "ssps"])
def test_dnas_and_ssps_spend_the_budget_on_layers_of_unequal_macs(method):
    budget = parse_budget("bitops<=uniform:2.5")
    ctx = toy_search_context([budget], {"epochs": 2, "samples": 2} if method == "dnas" else {"epochs": 2},
                             bits=ALL_BITS)
    result = run_searcher(method, ctx)
    policy, trace = result.policies[0], result.trace[0]
    before_fill = policy
    for step in trace["fill"]:
        before_fill = before_fill.replace(step["layer"], *step["from"])
    cap = budget.limits(ctx.stats, ctx.space)["bitops"]
    most = max(bitops(ctx.stats, p) for p in _raises_that_fit(ctx, before_fill, budget))
    assert most - FILL_TOLERANCE * cap <= bitops(ctx.stats, policy) <= cap


def test_dnas_anneals_the_temperature_per_step_after_a_weight_warm_up():
    options = {"epochs": 5, "arch_warmup": 0.4, "tau_start": 4.0, "tau_end": 0.25, "samples": 1}
    result = run_searcher("dnas", toy_search_context(parse_budgets("bitops<=uniform:4"), options))
    epochs = result.trace[0]["epochs"]
    taus = [e["tau"] for e in epochs]
    assert taus[:2] == [4.0, 4.0] and taus[-1] == pytest.approx(0.25)  # two warm-up epochs, then down to the end
    assert taus[2] == pytest.approx(4.0 * (0.25 / 4.0) ** (1 / 3))  # geometric: a third of the way after warm-up
    # the architecture stays uniform during the warm-up (9 pairs), then the search becomes more decided
    assert [e["p_max"] for e in epochs[:2]] == pytest.approx([1 / 9, 1 / 9])
    assert epochs[-1]["p_max"] > 1 / 9 and "grad_lowest_w" not in epochs[0]


@pytest.mark.parametrize(("method", "extra"), [("dnas", {"samples": 1}), ("ssps", {}), ("dmpq", {}),
                                               ("dnas", {"samples": 1, "weights": "separate"})])
def test_searched_weights_are_kept_as_the_fine_tunes_start(method, extra, tmp_path):
    from conftest import toy_net

    from mixbits.train import load_checkpoint, load_model_state

    budgets = parse_budgets("bitops<=uniform:3,uniform:5")
    ctx = toy_search_context(budgets, {"epochs": 2, "keep_weights": True, **extra})
    ctx.run_dir = tmp_path
    result = run_searcher(method, ctx)
    paths = result.info["finetune_init"]
    assert paths == [str(tmp_path / "searched" / f"budget{i}.pt") for i in range(2)]
    for path, policy in zip(paths, result.policies, strict=True):
        saved = load_checkpoint(path)
        assert Policy.from_dict(saved["policy"]) == policy
        start = toy_net()  # an --init float run's checkpoint loads the same way, strictly
        load_model_state(start, saved["model"], path)
        assert not torch.equal(start[3].weight, toy_net()[3].weight)  # trained by the search, not the float start
    ctx.run_dir = None
    with pytest.raises(MixbitsError, match="keep_weights.*run directory"):
        run_searcher(method, ctx)


def test_position_split_is_disjoint_and_covers_every_batch():
    batches = [(torch.full((2, 1), float(i)), torch.zeros(2, dtype=torch.long)) for i in range(10)]
    weights, arch = split_for_architecture(batches, 0.2, seed=0)
    seen_w = [int(x[0, 0]) for x, _ in weights]
    seen_a = [int(x[0, 0]) for x, _ in arch]
    assert len(weights) == 8 and len(arch) == 2 and sorted(seen_w + seen_a) == list(range(10))
    loader_w, loader_a = split_for_architecture(toy_image_loader(), 0.25, seed=0)
    assert len(loader_w.dataset) == 72 and len(loader_a.dataset) == 24


CASES = [
    ("dnas", {"epochs": 2, "samples": 3, "eval_batches": 1, "bn_batches": 1}),
    ("dnas", {"epochs": 2, "samples": 2, "updates": "single", "joint": True, "hard": True}),
    ("ssps", {"epochs": 3}),
    ("ssps", {"epochs": 2, "cell": "mixture", "certainty": "entropy", "updates": "single"}),
    ("dmpq", {"epochs": 2}),
    ("dmpq", {"epochs": 2, "regularizer": "l2", "skip_schedule": "linear", "updates": "single", "joint": True}),
]


@pytest.mark.parametrize("method,options", CASES)
def test_each_method_returns_policies_within_every_budget(method, options):
    budgets = parse_budgets("bitops<=uniform:3,uniform:5;size<=uniform:4")
    ctx = toy_search_context(budgets, options)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    result = run_searcher(method, ctx)
    assert len(result.policies) == 2
    for budget, policy in zip(budgets, result.policies, strict=True):
        assert ctx.fits(policy, budget)
    for entry in result.trace:
        assert len(entry["epochs"]) == options["epochs"]
        grads = [v for e in entry["epochs"] for k, v in e.items() if k.startswith("grad_lowest_")]
        assert grads and all(math.isfinite(g) for g in grads)
    after = ctx.model.state_dict()  # the search leaves the model's weights as it found them
    assert all(torch.equal(before[k], after[k]) for k in before)
    if method == "ssps":
        for entry in result.trace:
            assert sorted(e["layer"] for e in entry["fixing_order"]) == ["3", "6"]
            # fixed on schedule during training (one after the first epoch, both by the last), not at the end
            assert [entry["epochs"][0]["decided"], entry["epochs"][-1]["decided"]] == [1, 2]
    if method == "dnas":
        front = [p for p in result.front if p["budget"] == budgets[0].text]
        best = min(front, key=lambda p: p["loss"])
        assert Policy.from_dict(best["policy"]) == result.policies[0]


def test_dmpq_low_bit_candidates_keep_receiving_gradient_and_runs_are_deterministic():
    budgets = [parse_budget("bitops<=uniform:4")]
    first = run_searcher("dmpq", toy_search_context(budgets, {"epochs": 3}))
    second = run_searcher("dmpq", toy_search_context(budgets, {"epochs": 3}))
    assert first.policies == second.policies and first.trace[0]["epochs"] == second.trace[0]["epochs"]
    for epoch in first.trace[0]["epochs"]:
        assert epoch["grad_lowest_w"] > 0 and epoch["grad_lowest_a"] > 0


def test_bad_options_are_named_with_their_values():
    ctx = toy_search_context(parse_budgets("bitops<=uniform:4"), {"updates": "both", "epochs": 0})
    with pytest.raises(MixbitsError, match=r"updates: must be one of \['alternating', 'single'\], got 'both'"):
        run_searcher("dnas", ctx)
    ctx.options = {"skip_schedule": "step"}
    with pytest.raises(MixbitsError, match="skip_schedule: must be one of .*got 'step'"):
        run_searcher("dmpq", ctx)
    ctx.options = {"fix_start": 0.8, "fix_end": 0.5}
    with pytest.raises(MixbitsError, match="fix_end: must be a number in \\[fix_start, 1\\], got 0.5"):
        run_searcher("ssps", ctx)


@pytest.mark.parametrize(("method", "extra"), [("dnas", {"samples": 2}),
                                               ("dnas", {"samples": 2, "weights": "separate"}),
                                               ("ssps", {}), ("dmpq", {})])
def test_an_interrupted_search_resumes_to_the_same_result(method, extra, tmp_path, monkeypatch):
    from mixbits.search.supernet import ArchitectureStep

    budgets = parse_budgets("bitops<=uniform:3,uniform:5")
    options = {"epochs": 2, **extra}
    run = interrupted_and_resumed(
        method, lambda: toy_search_context(budgets, options), ArchitectureStep, "after_step",
        lambda step, state: step.search.index == 1 and state.epoch == 1, tmp_path, monkeypatch)
    assert (tmp_path / "cut" / "supernet" / "budget1" / "checkpoint.pt").is_file()
    assert [p.key() for p in run.resumed.policies] == [p.key() for p in run.expected.policies]
    for got, want in zip(run.resumed.trace, run.expected.trace, strict=True):
        assert got["epochs"] == want["epochs"] and got.get("fixing_order") == want.get("fixing_order")


def test_dnas_with_separate_weights_trains_one_weight_per_bit_width_and_drops_them(monkeypatch):
    from mixbits.search.supernet import ArchitectureStep

    seen = []
    original = ArchitectureStep.after_step

    def spy(self, state):
        original(self, state)
        own = [layer.candidate_weights for layer in self.search.layers]
        seen.append(all(w is not None for w in own) and float((own[0][0] - own[0][-1]).detach().abs().max()))

    monkeypatch.setattr(ArchitectureStep, "after_step", spy)
    budgets = parse_budgets("bitops<=uniform:3,uniform:5")
    ctx = toy_search_context(budgets, {"epochs": 2, "samples": 2, "weights": "separate"})
    keys = set(ctx.model.state_dict())
    result = run_searcher("dnas", ctx)
    assert all(ctx.fits(p, b) for p, b in zip(result.policies, budgets, strict=True))
    assert seen and all(seen) and seen[-1] > 0  # the 2-bit and 6-bit weights moved apart
    assert set(ctx.model.state_dict()) == keys  # the copies are gone after the search
    ctx.options = {"weights": "per-pair"}
    with pytest.raises(MixbitsError, match="weights: must be one of"):
        run_searcher("dnas", ctx)
