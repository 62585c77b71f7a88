"""The one-shot search: scheduler criterion and schedule, IDM, fair decay, greedy walk, and end-to-end runs."""

import itertools
import math

import pytest
import torch
from conftest import interrupted_and_resumed, toy_batches
from torch import nn

from mixbits import MixbitsError, Policy, SearchSpace
from mixbits.budget import parse_budgets
from mixbits.cost import LatencyTable, profile
from mixbits.quant import (
    QConv2d,
    apply_policy,
    calibrate,
    fused_enabled,
    kernels,
    quant_layers,
    quantize_model,
    set_fused,
)
from mixbits.quant.pair_bn import PairBatchNorm, attach_pair_bn, collapse_pair_bn, follows
from mixbits.search import PolicyEvaluator, SearchContext, run_searcher
from mixbits.search.greedy import fill_up, greedy_search, neighbours
from mixbits.search.oneshot.bit_scheduler import (
    PolicySampler,
    event_steps,
    freeze_count,
    freeze_ratio,
    layer_criterion,
    unstable_weight_criterion,
)
from mixbits.search.oneshot.idm import (
    FeatureAlignment,
    _distance_backward,
    _distance_forward,
    alignment_loss,
    alignment_loss_reference,
)
from mixbits.search.oneshot.options import OneshotOptions
from mixbits.search.oneshot.searcher import start_policy
from mixbits.search.oneshot.supernet import FairDecay

FAST = {"epochs": 2, "eval_batches": 1, "bn_batches": 1}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def _context(budgets, options=None, latency=None):
    model = _net()
    space = SearchSpace.from_model(model, (2, 4, 6), (2, 4, 6))
    qmodel = quantize_model(model, space)
    calibrate(qmodel, toy_batches()[0][0])
    return SearchContext(model=qmodel, space=space, stats=profile(model, (1, 8, 8)), budgets=budgets,
                         train_loader=toy_batches(), val_loader=toy_batches(seed=1), options=dict(options or {}),
                         float_model=model.eval(), latency=latency)


# bit-width scheduler ----------------------------------------------------------------------------------------------
def test_unstable_weight_criterion_on_a_hand_built_tensor():
    weight = torch.tensor([0.5, 0.6, 0.0, -1.45, 3.0, -0.3])
    steps = {2: torch.tensor(1.0), 3: torch.tensor(0.5)}
    # 2 bits (step 1, bounds -1.5 -0.5 0.5): 0.5, 0.6, -1.45 lie within 0.125 of a bound; 3.0 is clipped: 3/6.
    # 3 bits (step 0.5, w/γ = 1, 1.2, 0, -2.9, 6, -0.6): only -0.6 is within 0.125 of the bound -0.5: 1/6.
    assert unstable_weight_criterion(weight, steps, 0.25) == pytest.approx(0.5 / 2 + (1 / 6) / 4)
    assert unstable_weight_criterion(weight, steps, 0.25, "inverse") == pytest.approx(0.5 / 2 + (1 / 6) / 3)
    assert unstable_weight_criterion(weight, steps, 0.0) == pytest.approx(1 / 6 / 2)  # only 0.5 sits on a bound

    layer = QConv2d(1, 1, (1, 6), w_bits=(2, 3), a_bits=(8,))
    with torch.no_grad():
        layer.weight.copy_(weight.view(1, 1, 1, 6))
        layer.w_quant.steps.copy_(torch.tensor([[1.0], [0.5]]))
    assert layer_criterion(layer, 0.25) == pytest.approx(0.5 / 2 + (1 / 6) / 4)


def test_freeze_count_follows_the_cosine_from_start_to_end_ratio():
    ratios = [freeze_ratio(j, 5, 0.5, 0.2) for j in range(5)]
    expected = [0.2 + 0.3 * 0.5 * (1 + math.cos(math.pi * j / 4)) for j in range(5)]
    assert ratios == pytest.approx(expected)
    assert ratios[0] == pytest.approx(0.5) and ratios[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in itertools.pairwise(ratios))  # K never grows
    assert [freeze_count(r, 10) for r in ratios] == [5, 5, 4, 2, 2]
    assert event_steps(100, 0.1, 0.2) == [10, 30, 50, 70, 90]


def test_frozen_bit_widths_are_never_sampled():
    model = quantize_model(_net(), SearchSpace.from_model(_net(), (2, 4, 6), (2, 4, 6)))
    space = SearchSpace.from_model(model, (2, 4, 6), (2, 4, 6))
    layers = {n: dict(model.named_modules())[n] for n in space.searchable}
    sampler = PolicySampler(layers, space)
    frozen_layer, free_layer = space.searchable[0], space.searchable[1]
    sampler.frozen = {frozen_layer: 2}
    gen = torch.Generator().manual_seed(0)
    draws = [sampler.sample(gen) for _ in range(200)]
    assert all(d[frozen_layer][0] != 2 for d in draws)
    assert any(d[free_layer][0] == 2 for d in draws)  # the unfrozen layer still trains its 2 bits
    assert sampler.smallest_w(frozen_layer) == 4 and sampler.smallest_w(free_layer) == 2


# information distortion mitigation ----------------------------------------------------------------------------------
def test_idm_loss_is_zero_when_outputs_agree_and_positive_otherwise():
    gen = torch.Generator().manual_seed(0)
    high = torch.randn(8, 4, 5, 5, generator=gen)
    eta, xi = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    assert float(alignment_loss(high.clone(), high, eta, xi).detach()) == pytest.approx(0.0, abs=1e-6)
    # an affine change of the low-bit output is normalised away
    assert float(alignment_loss(2 * high + 1, high, eta, xi).detach()) == pytest.approx(0.0, abs=1e-5)
    low = (high + 0.5 * torch.randn(8, 4, 5, 5, generator=gen)).requires_grad_()
    target = high.clone().requires_grad_()
    loss = alignment_loss(low, target, eta, xi)
    assert float(loss.detach()) > 0.05
    loss.backward()
    assert low.grad.abs().sum() > 0 and eta.grad.abs().sum() > 0 and xi.grad.abs().sum() > 0
    assert target.grad is None  # the high-bit output is a target, never pushed towards the low-bit one
    assert float(alignment_loss(high + 1, high, form="mse")) == pytest.approx(1.0)


def test_feature_alignment_averages_over_the_low_bit_layers_only():
    layers = {"a": QConv2d(1, 3, 1), "b": nn.Linear(2, 5)}
    align = FeatureAlignment(layers)
    assert [p.shape[0] for p in align.eta] == [3, 5]
    x = torch.randn(4, 3, 2, 2)
    assert align.loss({}, align.targets({"a": x})) is None
    assert float(align.loss({"a": x}, align.targets({"a": x})).detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(align.loss({"a": 3 * x}, align.targets({"a": x + 1})).detach()) == pytest.approx(0.0, abs=1e-5)
    # a target made once per step (for all its aligned passes) gives the loss made from the raw output, exactly
    low, high = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        align.eta[0].mul_(1.5), align.xi[0].add_(0.25)
    assert torch.equal(align.loss({"a": low}, align.targets({"a": high})),
                       alignment_loss(low, high, align.eta[0], align.xi[0]))


@pytest.mark.parametrize("shape", [(16, 6, 5, 5), (16, 7)])
@pytest.mark.parametrize("floor", [0.0, -0.5])
def test_idm_loss_and_its_gradients_equal_eq8_written_out(shape, floor):
    gen = torch.Generator().manual_seed(3)
    high = torch.randn(shape, generator=gen) * 2 + 1
    low = (high + torch.randn(shape, generator=gen)).requires_grad_()
    eta = (1 + 0.3 * torch.randn(shape[1], generator=gen)).requires_grad_()
    xi = (0.2 * torch.randn(shape[1], generator=gen)).requires_grad_()
    fast = alignment_loss(low, high, eta, xi, floor)
    plain = alignment_loss_reference(low, high, eta, xi, floor)
    assert float(fast.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    for got, want in zip(torch.autograd.grad(fast, (low, eta, xi)), torch.autograd.grad(plain, (low, eta, xi)),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 6, 9, 9), (64, 40), (8, 13, 24)])
def test_idm_compiled_kernels_match_eq8_written_out(shape):
    """One compiled kernel per layout (convolution or linear outputs) serves every shape, with the same gradients."""
    gen = torch.Generator().manual_seed(5)
    high = torch.randn(shape, generator=gen) * 2 + 1
    low = (high + torch.randn(shape, generator=gen)).requires_grad_()
    channels = shape[1] if len(shape) == 4 else shape[-1]
    eta = (1 + 0.3 * torch.randn(channels, generator=gen)).requires_grad_()
    xi = (0.2 * torch.randn(channels, generator=gen)).requires_grad_()
    plain = alignment_loss_reference(low, high, eta, xi, -0.5)
    set_fused(True)
    try:
        fused = alignment_loss(low, high, eta, xi, -0.5)
        grads = torch.autograd.grad(fused, (low, eta, xi))
    finally:
        set_fused(False)
    cdim = 1 if len(shape) == 4 else 2  # the kernels ran (built now, or for an earlier shape of this layout)
    assert {fn for fn in (_distance_forward, _distance_backward) if any(
        getattr(key[0], "func", None) is fn and key[0].keywords == {"cdim": cdim} for key in kernels._CACHE)} == {
        _distance_forward, _distance_backward}
    assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    for got, want in zip(grads, torch.autograd.grad(plain, (low, eta, xi)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_idm_falls_back_to_eager_ops_with_a_warning_where_kernels_cannot_be_built(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(kernels, "compiled", no_compiler)
    gen = torch.Generator().manual_seed(6)
    high, low = torch.randn(16, 6, 9, 9, generator=gen), torch.randn(16, 6, 9, 9, generator=gen)
    set_fused(True)
    try:
        with pytest.warns(UserWarning, match="fused IDM kernels unavailable.*no C compiler"):
            loss = alignment_loss(low, high)
        assert not fused_enabled()  # one warning, then eager ops for the rest of the run
    finally:
        set_fused(False)
    assert float(loss) == pytest.approx(float(alignment_loss_reference(low, high)), rel=1e-5)


# fairness weight regularisation -------------------------------------------------------------------------------------
def test_fair_decay_skips_low_bit_passes():
    layer = QConv2d(1, 2, 3, w_bits=(2, 4), a_bits=(4,))
    fair = FairDecay({"l": layer}, lowest_w=2, weight_decay=0.1)
    for passes, expected_share in (([(2, 4)], 0.0), ([(4, 4)], 1.0), ([(2, 4), (4, 4), (4, 4), (2, 4)], 0.5)):
        layer.weight.grad = torch.zeros_like(layer.weight)
        fair.start_step()
        for bits in passes:
            fair.record({"l": bits})
        fair.after_backward(None)
        assert torch.allclose(layer.weight.grad, 0.1 * expected_share * layer.weight.detach())


# bidirectional greedy search ------------------------------------------------------------------------------------------
def _toy_space():
    return SearchSpace(("first", "b", "c", "last"), (2, 4, 6), (2, 4, 6), {"first": (8, 8), "last": (8, 8)})


def _toy_loss(policy):  # layer b is very sensitive, layer c barely
    (wb, ab), (wc, ac) = policy["b"], policy["c"]
    return {"loss": 10.0 * (12 - wb - ab) + 0.1 * (12 - wc - ac), "top1": 0.0}


def _toy_cost(policy):
    return sum(policy[n][0] * policy[n][1] for n in ("b", "c"))


def test_greedy_finds_the_known_optimum_of_a_toy_problem():
    space = _toy_space()
    calls = []

    def evaluate(policy):
        calls.append(policy)
        return _toy_loss(policy)

    start = Policy.from_rules(space, default=(6, 6))
    assert len(neighbours(start, space, paired=False)) == 4  # at the top: each layer's w or a one step down
    assert len(neighbours(Policy.uniform(space, 4), space, paired=False)) == 8  # and one step up
    result = greedy_search(start, space, evaluate, _toy_cost, lambda p: _toy_cost(p) <= 40, lam=0.5, paired=False)
    feasible = [Policy.from_rules(space, (6, 6), {"b": (wb, ab), "c": (wc, ac)})
                for wb, ab, wc, ac in itertools.product((2, 4, 6), repeat=4)]
    optimum = min((p for p in feasible if _toy_cost(p) <= 40), key=lambda p: _toy_loss(p)["loss"])
    assert optimum["b"] == (6, 6) and optimum["c"] == (2, 2)
    assert result.policy == optimum
    assert result.path[0] == start and len(result.steps) == len(result.path) - 1
    assert len({p.key() for p in result.path}) == len(result.path)  # no policy visited twice
    assert all(any(p == q for q in calls) for p in result.path[1:])  # every move was scored first


def test_greedy_takes_an_ascending_move_only_when_bidirectional():
    space = _toy_space()
    start = Policy.from_rules(space, (6, 6), {"b": (4, 6)})

    def loss(policy):  # every bit counts; b's lowered weight bits are the cheapest loss to win back
        (wb, ab), (wc, ac) = policy["b"], policy["c"]
        return {"loss": 100.0 * (12 - wb - ab) + 100.0 * (12 - wc - ac)}

    fits = lambda p: _toy_cost(p) <= 40  # noqa: E731
    both = greedy_search(start, space, loss, _toy_cost, fits, lam=0.5, paired=False)
    down = greedy_search(start, space, loss, _toy_cost, fits, lam=0.5, bidirectional=False, paired=False)
    assert both.steps[0]["direction"] == 1 and both.path[1]["b"] == (6, 6)  # J_up = 0 + 0.5 beats J_down >= 1
    assert all(s["direction"] == -1 for s in down.steps)
    assert fits(both.policy) and fits(down.policy)
    assert len({p.key() for p in both.path}) == len(both.path)


def test_paired_moves_shift_a_layers_weight_and_activation_bits_together():
    space = _toy_space()
    top = Policy.from_rules(space, default=(6, 6))
    assert [(m, p["b"], p["c"]) for m, p in neighbours(top, space)] == [
        (("b", "wa", -1), (4, 4), (6, 6)), (("c", "wa", -1), (6, 6), (4, 4))]  # the paper's 2L: down only at the top
    assert len(neighbours(Policy.uniform(space, 4), space)) == 4
    # a side already at its end stays; the other still moves
    assert neighbours(Policy.from_rules(space, (6, 6), {"b": (2, 4), "c": (2, 2)}), space, bidirectional=False) == [
        (("b", "wa", -1), Policy.from_rules(space, (6, 6), {"b": (2, 2), "c": (2, 2)}))]
    feasible = [Policy.from_rules(space, (6, 6), {"b": (wb, wb), "c": (wc, wc)})
                for wb, wc in itertools.product((2, 4, 6), repeat=2)]
    fits = lambda p: _toy_cost(p) <= 40  # noqa: E731
    optimum = min((p for p in feasible if fits(p)), key=lambda p: _toy_loss(p)["loss"])
    result = greedy_search(top, space, _toy_loss, _toy_cost, fits, lam=0.5)
    assert result.policy == optimum and all(s["side"] == "wa" for s in result.steps)


def test_a_walk_with_several_moves_a_step_scores_fewer_policies_and_still_protects_the_sensitive_layers():
    names = tuple(f"l{i}" for i in range(12))
    space = SearchSpace(("first", *names, "last"), (2, 4, 6), (2, 4, 6), {"first": (8, 8), "last": (8, 8)})
    sensitivity = {n: 100.0 if i < 3 else 1.0 + 0.01 * i for i, n in enumerate(names)}  # l0-l2 far more sensitive

    def loss(policy):
        return {"loss": sum(s * (12 - sum(policy[n])) for n, s in sensitivity.items())}

    def cost(policy):
        return sum(policy[n][0] * policy[n][1] for n in names)

    fits = lambda p: cost(p) <= 12 * 16  # noqa: E731  (uniform W4A4)
    top = Policy.from_rules(space, default=(6, 6))
    scored = {1: [], 4: []}
    one, four = (greedy_search(top, space, lambda p, k=k: scored[k].append(p) or loss(p), cost, fits, lam=0.5,
                               moves_per_step=k) for k in (1, 4))
    assert fits(one.policy) and fits(four.policy)
    assert len(scored[4]) * 2 < len(scored[1]) and len(four.steps) * 2 < len(one.steps)
    for walk in (one, four):  # the sensitive layers keep their 6 bits; the cheap ones pay for the budget
        assert all(walk.policy[n] == (6, 6) for n in names[:3])
    for step in four.steps[:-1]:  # a step moves up to 4 distinct layers, all down, and stops once the policy fits
        moved = [step["layer"]] + [m["layer"] for m in step.get("also", [])]
        assert len(moved) == len(set(moved)) <= 4
    assert any(len(s.get("also", [])) == 3 for s in four.steps)
    assert all(not fits(p) for p in four.path[:-1])
    assert abs(loss(four.policy)["loss"] - loss(one.policy)["loss"]) <= 0.1  # the same quality on an additive loss


def test_a_screened_walk_rescores_a_share_of_each_step_and_moves_only_to_rescored_neighbours():
    names = tuple(f"l{i}" for i in range(12))
    space = SearchSpace(names, (2, 4, 6), (2, 4, 6))
    sensitivity = {n: 100.0 if i < 3 else 1.0 + 0.01 * i for i, n in enumerate(names)}

    def loss(policy):
        return {"loss": sum(s * (12 - sum(policy[n])) for n, s in sensitivity.items())}

    def cost(policy):
        return sum(policy[n][0] * policy[n][1] for n in names)

    fits = lambda p: cost(p) <= 12 * 16  # noqa: E731
    top = Policy.from_rules(space, default=(6, 6))
    exact, rough = [], []
    plain = greedy_search(top, space, loss, cost, fits, lam=0.5, paired=False)
    # a cheap scorer on another image set: the same ranking, another loss level
    screened = greedy_search(top, space, lambda p: exact.append(p) or loss(p), cost, fits, lam=0.5, paired=False,
                             screen=lambda p: rough.append(p) or {"loss": loss(p)["loss"] + 7.0}, keep=0.25)
    assert screened.policy == plain.policy and screened.path == plain.path  # the offset is taken out
    rescored = [s.get("rescored", s["candidates"]) for s in screened.steps]
    assert rescored == [min(s["candidates"], max(3, math.ceil(0.25 * s["candidates"]))) for s in screened.steps]
    assert len(exact) == sum(rescored) and len(rough) > 3 * len(exact)
    assert all(any(p == q for q in exact) for p in screened.path[1:])  # every move taken was re-scored

    # a scorer that ranks the moves backwards: the walk still moves only to re-scored neighbours, and still fits
    exact.clear()
    misled = greedy_search(top, space, lambda p: exact.append(p) or loss(p), cost, fits, lam=0.5, paired=False,
                           screen=lambda p: {"loss": -loss(p)["loss"]}, keep=0.25)
    assert fits(misled.policy) and all(any(p == q for q in exact) for p in misled.path[1:])
    assert loss(misled.policy)["loss"] > loss(plain.policy)["loss"]  # and it can be misled: what --screen measures


# end to end ---------------------------------------------------------------------------------------------------------
def _latency_table(ctx):
    return LatencyTable({n: {LatencyTable.key(w, a): 0.01 * w * a for w in (2, 4, 6, 8) for a in (2, 4, 6, 8)}
                         for n in ctx.space.layers}, unit="ms")


def test_end_to_end_several_budgets_from_one_supernet():
    budgets = parse_budgets("bitops<=uniform:2,uniform:3,uniform:5")
    budgets += parse_budgets("size<=uniform:3") + parse_budgets("latency<=uniform:4")
    ctx = _context(budgets, FAST)
    ctx.latency = _latency_table(ctx)
    result = run_searcher("oneshot", ctx)
    assert result.retraining_free and len(result.policies) == len(budgets)
    for budget, policy in zip(budgets, result.policies, strict=True):
        assert ctx.fits(policy, budget)
    supernet, walks = result.trace[0], result.trace[1:]
    assert len(supernet["epochs"]) == 2 and "idm" in supernet["epochs"][0]
    # only all-2-bit fits uniform:2, so it is not walked; the nested BitOPs budgets share one walk
    assert walks[0]["shortcut"] and walks[0]["steps"] == [] and result.policies[0] == Policy.uniform(ctx.space, 2)
    assert [w["continued_from"] for w in walks[:3]] == [None, None, "bitops<=uniform:3"]
    assert walks[3]["continued_from"] is None and walks[4]["continued_from"] is None
    # every evaluated point is on the front, once, with its costs and scores
    assert len(result.front) == result.info["evaluations"]
    assert all({"policy", "bitops", "size", "latency", "loss", "top1", "fits"} <= set(p) for p in result.front)
    # the frozen bit-widths of each period were never drawn during it, and some period froze something
    periods = supernet["frozen_periods"]
    assert any(p["frozen"] for p in periods)
    layers = len(ctx.space.searchable)
    for p in periods[1:]:
        assert p["k"] == freeze_count(p["ratio"], layers) == len(p["frozen"])
        for name, bits in p["frozen"].items():
            assert str(bits) not in p["sampled_w"].get(name, {})
    again = run_searcher("oneshot", _context(budgets, FAST, latency=ctx.latency))
    assert [p.key() for p in again.policies] == [p.key() for p in result.policies]  # deterministic given the seed


def test_an_auto_start_is_the_lowest_uniform_level_above_every_budget_and_scores_less():
    budgets = parse_budgets("bitops<=uniform:2.5,uniform:3")  # uniform 2 fits both, 4 neither (space 2, 4, 6)
    auto_ctx = _context(budgets, {**FAST, "start": "auto"})
    assert start_policy(auto_ctx, OneshotOptions(start="auto")) == Policy.uniform(auto_ctx.space, 4)
    loose = _context(parse_budgets("bitops<=uniform:5"))  # uniform 4 fits: a walk from there would not walk
    assert start_policy(loose, OneshotOptions(start="auto")) == Policy.uniform(loose.space, 6)
    timed = _context(parse_budgets("bitops<=uniform:3") + parse_budgets("latency<=uniform:2"))
    timed.latency = _latency_table(timed)  # a table need not grow with the bits: no level is safely above it
    assert start_policy(timed, OneshotOptions(start="auto")) == Policy.uniform(timed.space, 6)
    auto = run_searcher("oneshot", auto_ctx)
    highest = run_searcher("oneshot", _context(budgets, {**FAST, "start": "highest"}))
    assert auto.trace[1]["start"] == Policy.uniform(auto_ctx.space, 4).describe()
    assert all(auto_ctx.fits(p, b) for p, b in zip(auto.policies, budgets, strict=True))
    assert auto.info["evaluations"] < highest.info["evaluations"]


def test_the_walk_screens_on_the_first_images_and_rescores_the_best_on_all():
    budgets = parse_budgets("bitops<=uniform:3")
    options = {**FAST, "fill": False, "eval_batches": 2, "screen_keep": 0.25, "moves": "separate"}  # 4L moves
    plain = run_searcher("oneshot", _context(budgets, {**options, "screen_samples": None}))
    ctx = _context(budgets, {**options, "screen_samples": 8})  # of the 2 x 16 scored images
    screened = run_searcher("oneshot", ctx)
    assert ctx.fits(screened.policies[0], budgets[0])
    steps = screened.trace[1]["steps"]
    assert steps and all(s["rescored"] == max(3, math.ceil(0.25 * s["candidates"])) for s in steps)
    assert screened.info["evaluations"] < plain.info["evaluations"]  # fewer policies scored on all the images
    assert screened.info["screen_evaluations"] >= sum(s["candidates"] for s in steps) - len(steps)
    assert plain.info["screen_evaluations"] == 0 and "rescored" not in plain.trace[1]["steps"][0]


def test_every_feature_can_be_switched_off():
    options = {**FAST, "scheduler": False, "idm": False, "fairness": False, "bidirectional": False,
               "largest": "off", "train_smallest": False, "continue_path": False, "cost_term": "bitops"}
    budgets = parse_budgets("bitops<=uniform:3,uniform:4")
    result = run_searcher("oneshot", _context(budgets, options))
    supernet = result.trace[0]
    assert supernet["frozen_periods"] == []
    assert "idm" not in supernet["epochs"][0] and "decay_share" not in supernet["epochs"][0]
    assert all(s["direction"] == -1 for w in result.trace[1:] for s in w["steps"])
    assert [w["continued_from"] for w in result.trace[1:]] == [None, None]


def test_the_supernet_clips_each_steps_gradient_norm():
    """The clip reaches the supernet's loop: at a tiny norm the latent weights hardly move, without a clip they do."""
    moved = {}
    for clip in (1e-6, None):
        ctx = _context(parse_budgets("bitops<=uniform:4"), {**FAST, "grad_clip": clip, "epochs": 1})
        before = ctx.model[3].weight.detach().clone()
        run_searcher("oneshot", ctx)
        moved[clip] = float((ctx.model[3].weight.detach() - before).abs().max())
    assert moved[1e-6] < 1e-5 < moved[None]


def test_bad_options_are_named():
    ctx = _context(parse_budgets("bitops<=uniform:4"), {"epsilon": 2.0, "idm_form": "l2", "start": 3,
                                                        "grad_clip": 0})
    with pytest.raises(MixbitsError) as err:
        run_searcher("oneshot", ctx)
    message = str(err.value)
    assert "epsilon: must be a number in [0, 1], got 2.0" in message
    assert "idm_form" in message and "'l2'" in message and "start" in message
    assert "grad_clip: must be a number > 0, or null for no clip, got 0" in message
    with pytest.raises(MixbitsError, match="unknown option.*epsilom.*Did you mean 'epsilon'"):
        run_searcher("oneshot", _context(parse_budgets("bitops<=uniform:4"), {"epsilom": 0.1}))


def test_an_interrupted_supernet_resumes_to_the_same_search(tmp_path, monkeypatch):
    from mixbits.search.oneshot.supernet import SupernetObjective

    budgets = parse_budgets("bitops<=uniform:3,uniform:5")
    run = interrupted_and_resumed(
        "oneshot", lambda: _context(budgets, FAST), SupernetObjective, "__call__",
        lambda objective, state: state.epoch == 1, tmp_path, monkeypatch)
    assert [p.key() for p in run.resumed.policies] == [p.key() for p in run.expected.policies]
    assert run.resumed.trace[0]["frozen_periods"] == run.expected.trace[0]["frozen_periods"]
    for key, value in run.whole.model.state_dict().items():
        assert torch.equal(run.again.model.state_dict()[key], value), key


def test_each_step_trains_the_largest_the_smallest_and_k_sampled_policies(monkeypatch):
    applied = []
    original = PolicySampler.apply
    monkeypatch.setattr(PolicySampler, "apply", lambda self, bits: (applied.append(dict(bits)), original(self, bits)))
    ctx = _context(parse_budgets("bitops<=uniform:4"), {**FAST, "epochs": 1, "scheduler": False, "idm": False,
                                                         "policies_per_step": 2, "sandwich_every": 1})
    run_searcher("oneshot", ctx)
    steps = len(toy_batches())
    training = applied[: 4 * steps]  # then the greedy walk applies its own policies
    lowest, highest = (2, 2), (6, 6)
    for i in range(steps):  # largest, smallest, then policies_per_step = 2 sampled ones
        assert set(training[4 * i].values()) == {highest} and set(training[4 * i + 1].values()) == {lowest}


def test_sandwich_every_k_trains_the_largest_and_smallest_on_one_step_in_k(monkeypatch):
    applied = []
    original = PolicySampler.apply
    monkeypatch.setattr(PolicySampler, "apply", lambda self, bits: (applied.append(dict(bits)), original(self, bits)))
    options = {**FAST, "epochs": 1, "scheduler": False, "sandwich_every": 2, "policies_per_step": 1}
    run_searcher("oneshot", _context(parse_budgets("bitops<=uniform:4"), options))  # IDM on: skipped off-sandwich
    lowest, highest = {(2, 2)}, {(6, 6)}
    # three steps: 0 and 2 train largest, smallest, one sampled (3 passes); step 1 only the sampled one
    training = [set(bits.values()) for bits in applied[:7]]
    assert training[0] == highest and training[1] == lowest
    assert training[4] == highest and training[5] == lowest
    assert training[3] != highest  # step 1 has no largest pass (every step would: largest at 3, smallest at 4)


@pytest.mark.parametrize("largest, grads, distilled", [("train", [True, True, True], 2),
                                                      ("teach", [False, True, True], 2),
                                                      ("off", [True, True], 0)])
def test_the_largest_policy_trains_teaches_forward_only_or_is_left_out(monkeypatch, largest, grads, distilled):
    """Per step (sandwich every step, one sampled policy): whether each forward builds a graph, and how many
    passes learn from the largest policy's output. "teach" runs the largest without autograd and still teaches."""
    from mixbits.search.oneshot import supernet

    forwards, teachings = [], []
    task_loss, kd_loss = supernet.task_loss, supernet.kd_loss
    monkeypatch.setattr(supernet, "task_loss", lambda *a: (forwards.append(torch.is_grad_enabled()), task_loss(*a))[1])
    monkeypatch.setattr(supernet, "kd_loss", lambda *a: (teachings.append(1), kd_loss(*a))[1])
    options = {**FAST, "epochs": 1, "scheduler": False, "idm": False, "sandwich_every": 1, "policies_per_step": 1,
               "largest": largest}
    result = run_searcher("oneshot", _context(parse_budgets("bitops<=uniform:4"), options))
    steps = len(toy_batches())
    assert forwards == grads * steps and len(teachings) == distilled * steps
    assert ("ce_largest" in result.trace[0]["epochs"][0]) == (largest != "off")


def test_kept_supernet_weights_load_into_the_float_model_and_start_the_fine_tune(tmp_path):
    from mixbits import finetune
    from mixbits.train import load_checkpoint, load_model_state

    ctx = _context(parse_budgets("bitops<=uniform:3,uniform:5"), {**FAST, "keep_weights": True})
    ctx.run_dir = tmp_path
    result = run_searcher("oneshot", ctx)
    paths = result.info["finetune_init"]
    assert paths == [str(tmp_path / "searched" / f"budget{i}.pt") for i in range(2)]
    start = _net()
    load_model_state(start, load_checkpoint(paths[0])["model"], paths[0])  # strict: every float name, no other
    assert not torch.equal(start[3].weight, _net()[3].weight)  # the supernet's training, not the float start
    result.space = ctx.space
    tuned = finetune(_net(), result, toy_batches(), epochs=1, lr=1e-12, index=1)  # a rate that moves nothing
    assert torch.allclose(dict(tuned.named_parameters())["3.weight"], start[3].weight, atol=1e-9)
    # the supernet's BatchNorm statistics are re-estimated by the float model before its quantizers calibrate
    saved = load_checkpoint(paths[1])
    saved["model"]["4.running_mean"] += 100.0
    torch.save(saved, paths[1])
    again = finetune(_net(), result, toy_batches(), epochs=1, lr=1e-12, index=1)
    for key, value in tuned.state_dict().items():
        if "a_quant" in key or "running_" in key:
            assert torch.allclose(again.state_dict()[key], value, atol=1e-5), key
    ctx.run_dir = None
    with pytest.raises(MixbitsError, match="keep_weights.*run directory"):
        run_searcher("oneshot", ctx)
    with pytest.raises(MixbitsError, match="keep_weights.*score_bn 'pair'"):
        run_searcher("oneshot", _context([], {"keep_weights": True, "score_bn": "pair"}))


def test_batch_statistics_scoring_leaves_the_stored_statistics_alone():
    ctx = _context(parse_budgets("bitops<=uniform:4"))
    bn = ctx.model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    batch = PolicyEvaluator(ctx.model, ctx.val_loader, eval_batches=1, bn_mode="batch")
    policy = Policy.uniform(ctx.space, 4)
    score = batch(policy)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the same as a forward with every BatchNorm in training mode on the scored batch
    x, y = ctx.val_loader[0]
    ctx.model.eval()
    for m in ctx.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
    with torch.no_grad():
        expected = nn.functional.cross_entropy(ctx.model(x), y).item()
    assert score["loss"] == pytest.approx(expected, rel=1e-5)
    capped = PolicyEvaluator(ctx.model, toy_batches(3), eval_batches=3, eval_samples=40)  # batches of 16
    assert [len(y) for _, y in capped.batches] == [16, 16, 8]
    with pytest.raises(MixbitsError, match="bn_mode must be one of"):
        PolicyEvaluator(ctx.model, ctx.val_loader, bn_mode="stored")


def test_fill_raises_the_lowest_loss_step_until_nothing_more_fits():
    space = _toy_space()
    start = Policy.uniform(space, 2)
    fits = lambda p: _toy_cost(p) <= 40  # noqa: E731
    result = fill_up(start, space, _toy_loss, fits)
    assert fits(result.policy) and all(s["direction"] == 1 and s["side"] in ("w", "a") for s in result.steps)
    assert result.policy["b"] == (6, 6)  # the sensitive layer is raised first, w and a one at a time
    for _, up in neighbours(result.policy, space, paired=False):  # every raise left breaks the budget
        if _toy_cost(up) > _toy_cost(result.policy):
            assert not fits(up)


def test_a_screened_fill_rescores_the_best_raises_and_takes_one_of_them():
    space = _toy_space()
    start = Policy.uniform(space, 2)
    fits = lambda p: _toy_cost(p) <= 40  # noqa: E731
    plain = fill_up(start, space, _toy_loss, fits)
    exact = []
    screened = fill_up(start, space, lambda p: exact.append(p) or _toy_loss(p), fits,
                       screen=lambda p: {"loss": _toy_loss(p)["loss"] + 3.0}, keep=0.25)
    assert screened.path == plain.path  # a screen that ranks alike changes nothing
    assert any(s.get("rescored") == 3 for s in screened.steps)  # four raises at the start: three re-scored
    assert len(exact) == sum(s.get("rescored", s["candidates"]) for s in screened.steps)
    exact.clear()
    misled = fill_up(start, space, lambda p: exact.append(p) or _toy_loss(p), fits,
                     screen=lambda p: {"loss": -_toy_loss(p)["loss"]}, keep=0.25)
    assert fits(misled.policy) and all(any(p == q for q in exact) for p in misled.path[1:])


def test_a_fill_round_takes_several_raises_on_different_layers_while_the_budget_holds():
    space = SearchSpace(("first", "b", "c", "d", "e", "last"), (2, 4, 6), (2, 4, 6), {"first": (8, 8), "last": (8, 8)})
    cost = lambda p: sum(p[n][0] * p[n][1] for n in "bcde")  # noqa: E731
    fits = lambda p: cost(p) <= 70  # noqa: E731
    weights = {"b": 8, "c": 4, "d": 2, "e": 1}  # how much each layer's lost bits cost in loss

    def loss(p):
        return {"loss": sum(k * (12 - sum(p[n])) for n, k in weights.items()), "top1": 0.0}

    start = Policy.uniform(space, 2)
    scored = []
    one = fill_up(start, space, lambda p: scored.append(p) or loss(p), fits)
    single_scores = len(scored)
    scored.clear()
    several = fill_up(start, space, lambda p: scored.append(p) or loss(p), fits, raises_per_round=3)
    assert fits(several.policy) and len(scored) < single_scores and len(several.steps) < len(one.steps)
    first = several.steps[0]  # the best raise, then the next-ranked on other layers: c and d, never b twice
    assert first["layer"] == "b" and [r["layer"] for r in first["also"]] == ["c", "d"]
    for _, up in neighbours(several.policy, space, paired=False):  # the budget is still spent
        if cost(up) > cost(several.policy):
            assert not fits(up)
    assert fill_up(start, space, loss, fits, raises_per_round=1).path == one.path  # one a round: as before


def test_walk_is_followed_by_a_fill_of_the_budget():
    budgets = parse_budgets("bitops<=uniform:4.5")
    result = run_searcher("oneshot", _context(budgets, FAST))
    walk = result.trace[1]
    assert walk["walked_to"] != walk["policy"] and walk["fill"]
    ctx = _context(budgets, {**FAST, "fill": False})
    unfilled = run_searcher("oneshot", ctx)
    assert unfilled.trace[1]["fill"] == [] and unfilled.policies[0].describe() == walk["walked_to"]
    assert ctx.cost(result.policies[0])["bitops"] > ctx.cost(unfilled.policies[0])["bitops"]


def test_pair_batchnorm_follows_its_layer_and_collapses_to_a_plain_one():
    ctx = _context([])
    x = toy_batches()[0][0]
    mapping = follows(ctx.model, x)
    assert mapping == {"4": "3", "7": "6"}  # the first conv's BatchNorm follows a fixed layer: left alone
    attach_pair_bn(ctx.model, mapping)
    pair = ctx.model[4]
    assert isinstance(pair, PairBatchNorm) and len(pair.norms) == 9
    policy = Policy.uniform(ctx.space, 4).replace("3", 2, 6)
    apply_policy(ctx.model, policy)
    ctx.model.train()(x)  # only the pair the layer runs at learns statistics
    moved = [k for k, bn in pair.norms.items() if bn.num_batches_tracked.item() > 0]
    assert moved == ["w2a6"]
    out = ctx.model.eval()(x)
    plain = collapse_pair_bn(ctx.model)
    assert isinstance(plain[4], nn.BatchNorm2d) and torch.equal(plain(x), out)


def test_pair_batchnorm_supernet_scores_with_its_own_statistics_and_writes_plain_subnets(tmp_path):
    from dataclasses import dataclass

    from mixbits.pipeline import ModelCard
    from mixbits.runs.subnets import evaluate_subnets

    @dataclass
    class ToyCard(ModelCard):
        def float_model(self):
            return _net()

    budgets = parse_budgets("bitops<=uniform:4")
    ctx = _context(budgets, {**FAST, "score_bn": "pair"})
    ctx.run_dir = tmp_path
    result = run_searcher("oneshot", ctx)
    assert any(isinstance(m, PairBatchNorm) for m in ctx.model.modules())
    card = ToyCard("toy", 3, 1, {}, (1, 8, 8))
    rows = evaluate_subnets(result.info["supernet"], card, False, result.policies, toy_batches(), toy_batches(seed=1),
                            [tmp_path / "subnet"])
    assert rows[0]["bn_batches"] == 0  # the pair's own statistics, no recalibration
    saved = torch.load(tmp_path / "subnet" / "checkpoint.pt", weights_only=False)["model"]
    assert not any(".norms." in k for k in saved)  # an ordinary quantized model


def test_random_baseline_scores_random_policies_on_the_supernet_with_the_walks_compute():
    import mixbits
    from mixbits.search.random_search import repair, sample_policy

    budgets = parse_budgets("bitops<=uniform:3,uniform:5")
    options = {**FAST, "eval_batches": 2, "screen_samples": 8}  # a screening score: 8 of the 2 x 16 images
    ctx = _context(budgets, {**options, "random_baseline": True})
    result = run_searcher("oneshot", ctx)
    walks_only = run_searcher("oneshot", _context(budgets, options))
    assert result.policies == walks_only.policies  # the baseline runs after the walks and changes nothing of them
    baseline, info = result.info["random_baseline"], result.info
    compute = info["evaluations"] + info["screen_evaluations"] * 8 / 32
    assert baseline["walk_scores"] == pytest.approx(compute)
    samples = math.ceil(compute / 2)
    assert baseline["samples_per_budget"] == samples > 1
    assert baseline["evaluations"] <= 2 * samples and baseline["forward_samples"] == 32 * baseline["evaluations"]
    assert info["evaluations"] == walks_only.info["evaluations"]  # the search's own count leaves the baseline out
    # the same draws, scored again with a fresh scorer of the same kind on the search's supernet: the best per budget
    gen = torch.Generator().manual_seed(ctx.seed)
    scorer = PolicyEvaluator(result.model, ctx.val_loader, None, 2, 0, bn_mode="batch")
    for i, budget in enumerate(budgets):
        drawn = [repair(ctx, sample_policy(ctx, gen), budget, gen) for _ in range(samples)]
        best = min(drawn, key=lambda p: scorer(p)["loss"])
        assert Policy.from_dict(baseline["policies"][i]) == best and ctx.fits(best, budget)
        assert baseline["scores"][i]["loss"] == pytest.approx(scorer(best)["loss"])
    entries = [t for t in result.trace if t.get("stage") == "random"]
    assert [t["budget"] for t in entries] == [b.text for b in budgets]
    # the baseline's policy runs on the supernet's weights like the walk's
    rival = Policy.from_dict(baseline["policies"][0])
    net = mixbits.subnet(result, 0, policy=rival)
    assert {n: layer.bits for n, layer in quant_layers(net).items()} == dict(rival.bits)
    with pytest.raises(MixbitsError, match="not in the model"):
        mixbits.subnet(result, 0, policy=Policy({**rival.bits, "nope": (2, 2)}))
