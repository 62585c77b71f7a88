import itertools

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
from mixbits.search.hutchinson import batch_traces, converged_traces, hessian_traces


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


def test_hawq_records_how_steady_its_traces_are_and_warns_when_capped():
    budgets = [parse_budget("bitops<=uniform:4")]
    ctx = _context(budgets, {"probes": 2, "batches": 2, "trace_rse": 1e-6, "max_batches": 3})
    with pytest.warns(UserWarning, match=r"after 3 batches \(6 probes\).*trace_rse=1e-06.*raise max_batches"):
        result = run_searcher("hawq", ctx)
    info = result.info["traces"]
    assert info["batches"] == 3 and info["probes"] == 6 and not info["converged"] and info["bound"] == 1e-6
    assert info["max_rse"] == max(max(r["rse_weight"], r["rse_act"] or 0) for r in result.front)
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
