"""SDQ: the stochastic quantizer and its DBPs, progressive removal, the searcher, and EBR in the train loop."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import interrupted_and_resumed, toy_net, toy_search_context
from torch import nn

from mixbits import MixbitsError, Policy, SearchSpace
from mixbits.budget import parse_budget, parse_budgets
from mixbits.quant import QConv2d, QLinear, apply_policy, calibrate, quant_layers, quantize_model
from mixbits.quant.ebr import bin_regularizer, layer_ebr, model_ebr
from mixbits.search import SEARCHERS, run_searcher
from mixbits.search.sdq import BitParams, SdqOptions, activation_bits_for, drive, set_current_bits
from mixbits.search.sdq.dbp import logit
from mixbits.train import TrainConfig, TrainState, supervised_objective

BITS = (2, 4, 6)


def _layer_at(keep: float, current: int = 4):
    """A calibrated QLinear over BITS and its DBPs: current bit-width ``current``, kept with probability ``keep``."""
    torch.manual_seed(0)
    layer = QLinear(6, 5, w_bits=BITS, a_bits=(8,))
    calibrate(nn.Sequential(layer), torch.randn(4, 6))
    params = BitParams(["l"], BITS)
    params.levels = [BITS.index(current)]
    with torch.no_grad():
        params.dbp(0).fill_(logit(keep))
    return layer, params


# the stochastic quantizer and its DBPs --------------------------------------------------------------------------
def test_stochastic_quantizer_expectation_is_the_dbp_weighted_mix():
    p, n = 0.3, 2000
    layer, params = _layer_at(p)
    with torch.no_grad():
        q4, q2 = layer.w_quant.quantize(layer.weight, 4), layer.w_quant.quantize(layer.weight, 2)
        gen, total, highs = torch.Generator().manual_seed(0), torch.zeros_like(layer.weight), 0
        for _ in range(n):
            layer.set_mixture(params.sample(tau=1.0, generator=gen)[0], None)
            w = layer.quantized_weight()
            high = torch.equal(w, q4)
            assert high or torch.equal(w, q2)  # hard in value: exactly one of the two quantizations
            highs += high
            total += w
    # One draw per layer and step: every element shares z, so mean − expected = (p̂ − p)(Q4 − Q2) with
    # p̂ a binomial share of n draws; 4 standard deviations bound it (and p̂ itself) with probability > 0.9999.
    bound = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(highs / n - p) <= bound
    expected = p * q4 + (1 - p) * q2
    assert (total / n - expected).abs().max() <= bound * (q4 - q2).abs().max() + 1e-6
    assert (q4 - q2).abs().max() > 0


def test_dbp_gets_gradient_through_the_difference_of_the_two_quantizations():
    layer, params = _layer_at(0.6)
    g = torch.randn_like(layer.weight)
    for seed in range(4):  # hard draws of both outcomes: the gradient is there either way
        layer.zero_grad()
        params.zero_grad()
        layer.set_mixture(params.sample(tau=1.0, generator=torch.Generator().manual_seed(seed))[0], None)
        (g * layer.quantized_weight()).sum().backward()
        with torch.no_grad():
            diff = (g * (layer.w_quant.quantize(layer.weight, 4) - layer.w_quant.quantize(layer.weight, 2))).sum()
        grad = params.dbp(0).grad
        assert grad is not None and float(grad) != 0.0
        assert math.copysign(1, float(grad)) == math.copysign(1, float(diff))  # dz/dθ > 0
        assert layer.weight.grad.abs().sum() > 0


def test_layers_at_their_lowest_candidate_run_at_fixed_bits():
    params = BitParams(["a", "b"], BITS)
    params.levels = [0, 2]
    mix = params.sample(tau=1.0, generator=torch.Generator().manual_seed(0)).detach()
    assert mix[0].tolist() == [1.0, 0.0, 0.0] and params.undecided() == [1]
    assert float(mix[1, 2] + mix[1, 1]) == 1.0 and float(mix[1, 0]) == 0.0
    layers = [QLinear(3, 3, w_bits=BITS, a_bits=BITS) for _ in range(2)]
    set_current_bits(layers, params, None, 4)
    drive(layers, mix, None, params, None)
    assert layers[0].mode == "fixed" and layers[0].bits == (2, 4)
    assert layers[1].mode == "mixture" and layers[1].bits == (6, 4)


def test_progressive_removal_drops_a_bit_width_for_good():
    params = BitParams(["a", "b"], BITS, init_keep=0.9)
    assert params.bits() == [6, 6]
    with torch.no_grad():
        params.dbp(0).fill_(logit(0.1))  # layer a's 6 bits: kept with 0.1 < threshold
    drops = params.remove_below(0.2)
    assert [(d["layer"], d["from"], d["to"]) for d in drops] == [("a", 6, 4)] and params.bits() == [4, 6]
    with torch.no_grad():
        params.dbp(0, level=2).fill_(logit(0.99))  # the removed bit-width's DBP recovers: too late
    assert params.remove_below(0.2) == [] and params.bits() == [4, 6]
    assert float(params.keep_probs()[0].detach()) == pytest.approx(0.9)  # the DBP of 4 bits takes over from its start
    with torch.no_grad():
        params.dbp(0).fill_(logit(0.05))
    params.remove_below(0.2)
    assert params.bits() == [2, 6] and params.undecided() == [1]
    with torch.no_grad():
        params.dbp(1).fill_(logit(0.5))
    assert params.remove_below(0.2) == [] and params.bits() == [2, 6]  # nothing below the lowest candidate


# the searcher ------------------------------------------------------------------------------------------------
def _nonincreasing(seq) -> bool:
    return all(a >= b for a, b in zip(seq, seq[1:], strict=False))


def test_sdq_returns_a_policy_within_every_budget_and_logs_bits_over_time():
    assert "sdq" in SEARCHERS
    budgets = parse_budgets("bitops<=uniform:2,uniform:3,uniform:5")
    ctx = toy_search_context(budgets, {"epochs": 3})
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    result = run_searcher("sdq", ctx)
    assert len(result.policies) == 3
    for budget, policy in zip(budgets, result.policies, strict=True):
        assert ctx.fits(policy, budget)
    assert result.finetune == {"ebr_weight": SdqOptions.ebr_weight, "kd_alpha": SdqOptions.kd_alpha}
    for entry in result.trace:  # weights and activations are both searched, from the highest bits
        assert entry["activation_bits"] == "searched" and entry["start_bits"] == {"3": [6, 6], "6": [6, 6]}
        history = [entry["start_bits"]] + [e["bits"] for e in entry["epochs"]]
        for layer, side in itertools.product(("3", "6"), (0, 1)):
            assert _nonincreasing([bits[layer][side] for bits in history])  # removed bit-widths never come back
        assert entry["removals"] and _nonincreasing([-r["step"] for r in entry["removals"]])
        assert all(r["keep_prob"] < SdqOptions.threshold and r["to"] < r["from"] for r in entry["removals"])
        assert entry["stopped_early"] and entry["budget_met_at_step"] == entry["epochs"][-1]["step"]
        assert all(e["dbp_grad"] > 0 and math.isfinite(e["dbp_grad"]) for e in entry["epochs"])
    tight = result.trace[0]  # W2A2 everywhere is the only fit: reached by removals during training, not repair
    assert tight["repair"] == [] and tight["epochs"][-1]["bits"] == {"3": [2, 2], "6": [2, 2]}
    after = ctx.model.state_dict()  # the search leaves the weights and the bits as it found them
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.mode == "fixed" for layer in quant_layers(ctx.model).values())
    again = run_searcher("sdq", toy_search_context(budgets, {"epochs": 3}))
    assert again.policies == result.policies and again.trace == result.trace


def test_an_interrupted_sdq_search_resumes_to_the_same_result(tmp_path, monkeypatch):
    from mixbits.search.sdq.searcher import DbpStep

    budgets = parse_budgets("bitops<=uniform:3,uniform:5")
    options = {"epochs": 3, "stop_at_budget": False}
    run = interrupted_and_resumed(
        "sdq", lambda: toy_search_context(budgets, options), DbpStep, "after_step",
        lambda step, state: step.run.index == 1 and state.epoch == 1, tmp_path, monkeypatch)
    assert (tmp_path / "cut" / "supernet" / "budget1" / "checkpoint.pt").is_file()
    assert run.resumed.policies == run.expected.policies and run.resumed.trace == run.expected.trace
    assert any(entry["removals"] for entry in run.resumed.trace)


def test_sdq_options_switch_stage_2_off_and_run_every_epoch_without_stop_at_budget():
    budgets = [parse_budget("bitops<=uniform:3")]
    ctx = toy_search_context(budgets, {"epochs": 2, "ebr_weight": 0, "kd_alpha": 0, "stop_at_budget": False})
    result = run_searcher("sdq", ctx)
    assert result.finetune == {"ebr_weight": 0, "kd_alpha": 0}
    assert len(result.trace[0]["epochs"]) == 2 and not result.trace[0]["stopped_early"]


def test_sdq_searches_activations_by_default_and_fixes_them_when_asked():
    budgets = [parse_budget("bitops<=uniform:3")]
    entry = run_searcher("sdq", toy_search_context(budgets, {"epochs": 3})).trace[0]
    assert {r["side"] for r in entry["removals"]} == {"w", "a"} and "mean_keep_a" in entry["epochs"][0]
    budgets = parse_budgets("bitops<=uniform:2,uniform:3,uniform:5")
    result = run_searcher("sdq", toy_search_context(budgets, {"epochs": 3, "search_activations": False}))
    assert [e["activation_bits"] for e in result.trace] == [2, 4, 6]  # the per-budget rule (see below)
    for entry, policy, budget in zip(result.trace, result.policies, budgets, strict=True):
        assert entry["start_bits"] == {"3": [6, entry["activation_bits"]], "6": [6, entry["activation_bits"]]}
        assert {r["side"] for r in entry["removals"]} <= {"w"} and policy["3"][1] == entry["activation_bits"]
        assert toy_search_context([]).fits(policy, budget)


def test_activation_bits_follow_the_highest_fitting_uniform_policy():
    ctx = toy_search_context([])
    # uniform:5 -> W4A4 is the highest uniform fit; W4A6 still fits (24 <= 25 BitOPs per MAC)
    assert activation_bits_for(ctx, parse_budget("bitops<=uniform:5"), None) == 6
    assert activation_bits_for(ctx, parse_budget("bitops<=uniform:3"), None) == 4  # W2A2 fits, W2A4 too, W2A6 not
    assert activation_bits_for(ctx, parse_budget("size<=uniform:4"), None) == 6  # size ignores activations
    assert activation_bits_for(ctx, parse_budget("bitops<=uniform:3"), 2) == 2
    with pytest.raises(MixbitsError, match="activation_bits=6"):
        activation_bits_for(ctx, parse_budget("bitops<=uniform:2"), 6)


def test_bad_options_are_named_in_one_error():
    ctx = toy_search_context(parse_budgets("bitops<=uniform:4"),
                   {"threshold": 1.5, "tau": 0, "penalty": "cubic", "activation_bits": 3, "kd_alpha": 2,
                    "dbp_lr": None, "dbp_optimizer": "sgd"})
    with pytest.raises(MixbitsError) as err:
        run_searcher("sdq", ctx)
    message = str(err.value)
    for expected in ["threshold: must be a number strictly between 0 and init_keep, got 1.5",
                     "tau: must be a number > 0, got 0",
                     "penalty: must be one of ['hinge', 'squared', 'linear'], got 'cubic'",
                     "activation_bits: must be null or one of the activation candidates [2, 4, 6], and null "
                     "unless search_activations is false (activations are searched by default), got 3",
                     "kd_alpha: must be a number in [0, 1] (0 turns distillation off), got 2",
                     "dbp_lr: must be a number > 0, or null for the automatic rate (dbp_optimizer: adam only), "
                     "got None"]:
        assert expected in message
    assert message.count("\n") == 6  # one error, one line per bad option
    ctx.options = {"treshold": 0.1}
    with pytest.raises(MixbitsError, match="unknown option.*treshold.*Did you mean 'threshold'"):
        run_searcher("sdq", ctx)


# EBR ---------------------------------------------------------------------------------------------------------
def _ebr_by_bins(w, step, qmin, qmax):
    """The module docstring's formula, bin by bin."""
    scaled = (w / step).flatten()
    levels = scaled.round().clamp(qmin, qmax)
    total = torch.zeros((), dtype=torch.float64)
    for k in levels.unique():
        r = (scaled[levels == k] - k).double()
        share = r.numel() / scaled.numel()
        total += share * (1 - math.log(share)) * (r.mean() ** 2 + r.var(unbiased=False))
    return total


def test_ebr_is_zero_on_the_grid_positive_off_it_and_follows_its_formula():
    gen = torch.Generator().manual_seed(0)
    step = torch.tensor([0.125, 0.25, 0.0625]).view(3, 1)  # powers of two: w / step is exact
    on_grid = torch.randint(-8, 8, (3, 20), generator=gen).float() * step
    assert float(bin_regularizer(on_grid, step, -8, 7)) == 0.0
    assert float(bin_regularizer(on_grid * 0 + 7 * step, step, -8, 7)) == 0.0  # a single full bin
    off = on_grid + 0.3 * step * torch.rand(3, 20, generator=gen)
    assert float(bin_regularizer(off, step, -8, 7)) > 0
    clipped = on_grid.clone()
    clipped[0, 0] = 9 * 0.125  # beyond the edge level 7: belongs to the edge bin, 2 steps away
    assert float(bin_regularizer(clipped, step, -8, 7)) > 0
    w = torch.randn(3, 20, generator=gen) * 0.4
    assert float(bin_regularizer(w, step, -8, 7)) == pytest.approx(float(_ebr_by_bins(w, step, -8, 7)), rel=1e-5)
    # a descent step moves every weight toward its level
    w.requires_grad_()
    bin_regularizer(w, step, -8, 7).backward()
    toward = (w.detach() / step).round().clamp(-8, 7) - w.detach() / step
    assert torch.all(-w.grad * toward >= 0) and w.grad.abs().sum() > 0


def test_layer_ebr_uses_the_current_bits_and_step():
    conv = QConv2d(2, 3, 3, w_bits=BITS, a_bits=BITS)
    calibrate(nn.Sequential(conv), torch.randn(2, 2, 5, 5))
    conv.set_bits(4, 4)
    with torch.no_grad():
        conv.w_quant.steps.fill_(0.125)
        conv.weight.copy_(conv.w_quant.quantize(conv.weight, 4))  # on the 4-bit grid
    assert float(layer_ebr(conv).detach()) == 0.0
    conv.set_bits(2, 4)  # the same weights are mostly off (and beyond) the 2-bit grid
    assert float(layer_ebr(conv).detach()) > 0


def test_train_ebr_weight_adds_the_regulariser_to_the_loss():
    model = quantize_model(toy_net(), SearchSpace.from_model(toy_net(), BITS, BITS))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    calibrate(model, x)
    apply_policy(model, Policy.from_rules(SearchSpace.from_model(toy_net(), BITS, BITS), (4, 4)))

    def objective(ebr_weight, teacher=None):
        cfg = TrainConfig(ebr_weight=ebr_weight, kd_alpha=0.5 if teacher is not None else 0.0)
        return supervised_objective(TrainState(model, None, None, cfg, torch.device("cpu"), teacher=teacher), x, y)

    off, on = objective(0.0), objective(0.5)
    assert on.loss.requires_grad
    with torch.no_grad():
        ce, ebr = float(F.cross_entropy(model(x), y)), float(model_ebr(model))
    assert float(off.loss.detach()) == pytest.approx(ce, rel=1e-6) and off.metrics == {}  # 0: unchanged
    assert ebr > 0 and float(on.loss.detach()) == pytest.approx(ce + 0.5 * ebr, rel=1e-6)
    assert float(on.metrics["ebr"]) == pytest.approx(ebr)
    with_kd = objective(0.5, teacher=toy_net())
    assert set(with_kd.metrics) == {"ce", "kd", "ebr"}
    assert TrainConfig(ebr_weight=-1.0).problems() == ["train.ebr_weight: must be a number >= 0, got -1.0"]
    float_model = toy_net()
    with pytest.raises(MixbitsError, match="no quantized layer"):
        supervised_objective(TrainState(float_model, None, None, TrainConfig(ebr_weight=0.1), torch.device("cpu")),
                             x, y)
