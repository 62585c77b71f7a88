import itertools
import math

import numpy as np
import pytest
import torch
from conftest import toy_batches, toy_net
from torch import nn

from mixbits import MixbitsError, Policy, SearchSpace
from mixbits.budget import parse_budget, parse_budgets
from mixbits.cost import bitops, profile
from mixbits.quant import calibrate, quantize_model
from mixbits.search import SEARCHERS, PolicyEvaluator, SearchContext, run_searcher, solve_choice
from mixbits.search.hawq_stopping import sensitivity_errors
from mixbits.search.hutchinson import _relative_errors, batch_traces, converged_traces, hessian_traces


def _context(budgets, options=None, w_bits=(2, 4, 6), a_bits=(2, 4, 6)):
    model = toy_net()
    space = SearchSpace.from_model(model, w_bits, a_bits)
    qmodel = quantize_model(model, space)
    batches = toy_batches()
    calibrate(qmodel, batches[0][0])
    return SearchContext(model=qmodel, space=space, stats=profile(model, (1, 8, 8)), budgets=budgets,
                         train_loader=batches, val_loader=toy_batches(seed=1), options=options or {},
                         float_model=model.eval())


def test_integer_program_finds_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    n_layers, n_cands = 5, 4
    scores = rng.random((n_layers, n_cands))
    bitops_cost = rng.integers(1, 20, (n_layers, n_cands)).astype(float)
    size_cost = rng.integers(1, 20, (n_layers, n_cands)).astype(float)
    limits = {"bitops": 40.0, "size": 45.0}
    best, best_choice = np.inf, None
    for choice in itertools.product(range(n_cands), repeat=n_layers):
        rows = np.arange(n_layers)
        if bitops_cost[rows, choice].sum() <= 40 and size_cost[rows, choice].sum() <= 45:
            if scores[rows, choice].sum() < best:
                best, best_choice = scores[rows, choice].sum(), choice
    choice = solve_choice(scores, {"bitops": bitops_cost, "size": size_cost}, limits)
    assert tuple(choice) == best_choice
    with pytest.raises(MixbitsError, match="no per-layer choice meets"):
        solve_choice(scores, {"bitops": bitops_cost}, {"bitops": 1.0})


def _check_estimate(estimate: float, hessian: torch.Tensor, probes: int) -> None:
    """Rademacher Hutchinson is unbiased with per-probe variance 2·Σ_{i≠j} H_ij²: allow 4 standard errors."""
    off_diagonal = hessian - torch.diag(torch.diag(hessian))
    stderr = float((2 * off_diagonal.square().sum() / probes).sqrt())
    assert abs(estimate - float(hessian.trace())) <= 4 * stderr + 1e-6


def test_hutchinson_traces_match_the_exact_hessian_traces():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    probes = 100
    traces = hessian_traces(model, [(x, y)], ["0", "2"], probes=probes, activations=True)
    for name in ("0", "2"):
        weight = dict(model.named_modules())[name].weight

        def loss_of(w, weight=weight):
            params = {n: (w if p is weight else p) for n, p in model.named_parameters()}
            return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

        hessian = torch.autograd.functional.hessian(loss_of, weight.detach()).reshape(weight.numel(), -1)
        _check_estimate(traces[name]["weight"], hessian, probes)
    # the input of layer "2" is tanh(layer0(x)); its Hessian is that of the loss as a function of it
    hidden = torch.tanh(model[0](x)).detach()
    act_hessian = torch.autograd.functional.hessian(lambda a: nn.functional.cross_entropy(model[2](a), y), hidden)
    _check_estimate(traces["2"]["act"], act_hessian.reshape(hidden.numel(), -1), probes)
    assert traces["0"]["act"] == 0.0  # the network input carries no gradient: no activation term


def _worst_rse_by_hand(per_batch):
    worst = 0.0
    for name in per_batch[0]:
        for kind in ("weight", "act"):
            values = torch.tensor([b[name][kind] for b in per_batch], dtype=torch.float64)
            if values.std() > 0:
                worst = max(worst, float(values.std() / len(values) ** 0.5 / values.mean().abs()))
    return worst


def test_hutchinson_adds_batches_until_every_trace_is_steady():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(8)]
    gen = torch.Generator().manual_seed(3)  # the same probes converged_traces draws with seed 3
    per_batch = [batch_traces(model, b, ["0", "2"], 4, True, gen) for b in batches]
    worst = [_worst_rse_by_hand(per_batch[:n]) for n in range(2, 9)]  # after 2, 3, ... 8 batches
    bound = sorted(worst)[3]
    got = converged_traces(model, iter(batches), ["0", "2"], probes=4, seed=3, min_batches=2, max_batches=8,
                           bound=bound)
    n = got["batches"]  # the first count of batches at which every error is within the bound
    assert worst[n - 2] <= bound and all(w > bound for w in worst[: n - 2]) and got["converged"]
    assert got["probes"] == 4 * n
    mean = sum(b["2"]["weight"] for b in per_batch[:n]) / n
    assert got["traces"]["2"]["weight"] == pytest.approx(mean)
    assert got["rse"]["0"]["act"] == 0.0  # the network input carries no gradient: an exact zero
    capped = converged_traces(model, iter(batches), ["0", "2"], probes=4, seed=3, max_batches=5, bound=1e-9)
    assert capped["batches"] == 5 and not capped["converged"] and capped["above_bound"] == ["0", "2"]
    worst_capped = max(v for r in capped["rse"].values() for v in r.values())
    assert worst_capped == pytest.approx(_worst_rse_by_hand(per_batch[:5]))


def _batches_of(traces):
    """Per-batch traces in ``batch_traces``' layout from {layer: ([weight per batch], [act per batch])}."""
    count = len(next(iter(traces.values()))[0])
    return [{n: {"weight": w[i], "act": a[i]} for n, (w, a) in traces.items()} for i in range(count)]


def test_hawq_stops_on_the_sensitivities_shares_not_on_each_trace():
    units = {n: {"weight": {2: 1.0, 4: 0.1}, "act": {2: 1.0, 4: 0.1}} for n in ("big", "other", "tiny")}
    pairs = [(2, 2), (2, 4), (4, 2), (4, 4)]
    hard = [1.0, 3.0, 0.5, 2.0]  # how hard each batch is: every layer's curvature scales with it
    per_batch = _batches_of({
        "big": ([10.0 * f for f in hard], [0.01, -0.02, 0.015, -0.004]),  # its activation trace is ~0
        "other": ([5.0 * f for f in hard], [2.0 * f for f in hard]),
        "tiny": ([0.01, 0.03, -0.01, 0.02], [0.0, 0.01, -0.01, 0.0])})  # both traces noise, Ω negligible
    traces = _relative_errors(per_batch, list(units))
    assert all(max(traces[n].values()) > 0.3 for n in units)  # the trace rule would take batch after batch
    assert max(sensitivity_errors(per_batch, units, pairs).values()) < 0.02
    per_batch[1]["other"]["weight"] = 1.0  # one layer's curvature moves on its own: its share is unsteady
    assert sensitivity_errors(per_batch, units, pairs)["other"] > 0.2
    assert sensitivity_errors(per_batch[:1], units, pairs)["big"] == math.inf  # one batch: no spread


def test_hutchinson_holds_the_bound_to_the_errors_it_is_given():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(6)]
    calls = []

    def errors(per_batch):  # within the bound from the fourth batch on
        calls.append(len(per_batch))
        return {"0": 0.5 if len(per_batch) < 4 else 0.1, "2": 0.0}

    got = converged_traces(model, iter(batches), ["0", "2"], probes=2, max_batches=6, bound=0.2, errors=errors)
    assert got["batches"] == 4 and got["converged"] and got["errors"] == {"0": 0.1, "2": 0.0}
    assert calls[:3] == [2, 3, 4]


def test_hawq_records_how_steady_its_traces_are_and_warns_when_capped():
    budgets = [parse_budget("bitops<=uniform:4")]
    ctx = _context(budgets, {"probes": 2, "batches": 2, "trace_rse": 1e-6, "max_batches": 3})
    with pytest.warns(UserWarning, match=r"after 3 batches \(6 probes\).*trace_rse=1e-06.*raise max_batches"):
        result = run_searcher("hawq", ctx)
    info = result.info["traces"]
    assert info["batches"] == 3 and info["probes"] == 6 and not info["converged"] and info["bound"] == 1e-6
    assert info["rse_of"] == "trace" and info["max_rse"] == max(r["rse_held"] for r in result.front)
    assert info["max_rse"] == max(max(r["rse_weight"], r["rse_act"] or 0) for r in result.front)
    ctx.options = {**ctx.options, "rse_of": "sensitivity"}
    with pytest.warns(UserWarning, match=r"give their sensitivity shares a relative standard error"):
        shares = run_searcher("hawq", ctx)
    assert shares.info["traces"]["rse_of"] == "sensitivity" and shares.info["traces"]["batches"] == 3
    fixed = run_searcher("hawq", _context(budgets, {"probes": 2, "batches": 1, "trace_rse": None}))
    assert fixed.info["traces"]["batches"] == 1 and fixed.info["traces"]["converged"]
    assert all(r["rse_weight"] is None for r in fixed.front)  # one batch: no spread to measure
    ctx.options = {"trace_rse": 0, "max_batches": 1, "batches": 2}
    with pytest.raises(MixbitsError, match=r"trace_rse: must be a number > 0.*got 0\n.*max_batches: must be a whole "
                                           r"number >= batches, got 1"):
        run_searcher("hawq", ctx)


def test_every_searcher_returns_one_policy_per_budget_within_it():
    budgets = parse_budgets("bitops<=uniform:2,uniform:4,uniform:6")
    for method in SEARCHERS.names():
        options = {"samples": 6, "eval_batches": 1, "bn_batches": 1} if method == "random" else {}
        if method == "hawq":
            options = {"probes": 2, "batches": 1}
        ctx = _context(budgets, options)
        result = run_searcher(method, ctx)
        assert len(result.policies) == 3
        for budget, policy in zip(budgets, result.policies, strict=True):
            assert budget.satisfied(ctx.stats, policy, ctx.space)
        # a looser budget never gets a cheaper-or-equal policy with worse bits everywhere
        assert bitops(ctx.stats, result.policies[0]) <= bitops(ctx.stats, result.policies[2])


def test_uniform_search_takes_the_highest_uniform_bits_that_fit():
    ctx = _context(parse_budgets("bitops<=uniform:5"))
    result = run_searcher("uniform", ctx)
    assert result.policies[0] == Policy.uniform(ctx.space, 4)


def test_hawq_spends_bits_where_the_sensitivity_is():
    ctx = _context([parse_budget("bitops<=uniform:4")], {"probes": 4, "batches": 2})
    result = run_searcher("hawq", ctx)
    sens = {row["layer"]: row["sensitivity"] for row in result.front}
    # the chosen policy's total sensitivity is no worse than uniform W4A4's, which also fits
    chosen = sum(sens[n][f"w{w}a{a}"] for n, (w, a) in result.policies[0].bits.items() if n in sens)
    uniform = sum(s["w4a4"] for s in sens.values())
    assert chosen <= uniform + 1e-12
    for s in sens.values():  # more bits never increases the estimated loss
        assert s["w6a6"] <= s["w4a4"] <= s["w2a2"]


def test_hawq_measures_quantization_error_at_fitted_steps():
    from mixbits.quant import quant_layers, quantization_error

    ctx = _context([parse_budget("bitops<=uniform:4")], {"probes": 2, "batches": 1, "activations": False})
    sens = {row["layer"]: row["sensitivity"] for row in run_searcher("hawq", ctx).front}
    weight = quant_layers(ctx.model)["3"].weight.detach()
    fitted = quantization_error(weight, 2, True) / quantization_error(weight, 6, True)
    assert sens["3"]["w2a2"] / sens["3"]["w6a6"] == pytest.approx(fitted, rel=1e-6)
    lsq = quant_layers(ctx.model)["3"].w_quant  # the calibrated (initial) steps give a flatter ratio
    initial = [float((lsq.quantize(weight, b).detach() - weight).square().sum()) for b in (2, 6)]
    assert fitted > 2 * initial[0] / initial[1]


def test_random_search_is_deterministic_and_keeps_the_best_score():
    budgets = [parse_budget("bitops<=uniform:4")]
    opts = {"samples": 5, "eval_batches": 1, "bn_batches": 1}
    first = run_searcher("random", _context(budgets, opts))
    second = run_searcher("random", _context(budgets, opts))
    assert first.policies == second.policies
    losses = [p["loss"] for p in first.front]
    best = first.front[int(np.argmin(losses))]
    assert Policy.from_dict(best["policy"]) == first.policies[0]


def test_unknown_method_and_option_are_clear_errors():
    ctx = _context([parse_budget("bitops<=uniform:4")], {"samplez": 3})
    with pytest.raises(MixbitsError, match="unknown option.*samplez.*Did you mean 'samples'"):
        run_searcher("random", ctx)
    with pytest.raises(MixbitsError, match="unknown search method 'hawk'.*hawq"):
        run_searcher("hawk", ctx)


def test_policy_evaluator_caches_and_restores_nothing_it_should_not():
    ctx = _context([parse_budget("bitops<=uniform:4")])
    evaluator = PolicyEvaluator(ctx.model, ctx.val_loader, ctx.train_loader, eval_batches=2, bn_batches=1)
    policy = Policy.uniform(ctx.space, 2)
    first = evaluator(policy)
    again = evaluator(policy)
    assert first == again and evaluator.evaluations == 1 and evaluator.calls == 2
    assert evaluator(Policy.uniform(ctx.space, 6))["loss"] != first["loss"]
