"""The differentiable searches' automatic architecture rate and the record of how far their distributions moved."""

import math
import warnings

import pytest
import torch
from conftest import toy_search_context

from mixbits import MixbitsError
from mixbits.budget import parse_budgets
from mixbits.search import run_searcher
from mixbits.search.convergence import (
    DECIDED,
    NEAR_START,
    UnmovedSearchWarning,
    dirichlet_walk,
    distribution_movement,
    softmax_walk,
)
from mixbits.search.dmpq import concentration
from mixbits.search.supernet import split_for_architecture


@pytest.mark.parametrize("candidates", [3, 5, 25])
def test_the_decisive_walks_give_the_decided_probability(candidates):
    d = softmax_walk(candidates)
    logits = torch.tensor([d] + [-d] * (candidates - 1), dtype=torch.float64)
    assert float(torch.softmax(logits, 0)[0]) == pytest.approx(DECIDED)
    d = dirichlet_walk(candidates)
    conc = concentration(torch.tensor([d] + [-d] * (candidates - 1), dtype=torch.float64))
    assert float(conc[0] / conc.sum()) == pytest.approx(DECIDED)


def test_movement_is_zero_at_the_uniform_start_and_one_when_decided():
    uniform = distribution_movement(["a", "b"], torch.full((2, 4), 0.25))
    assert uniform["entropy_drop"] == pytest.approx(0.0, abs=1e-12) and uniform["near_start"]
    assert uniform["layers"]["a"]["entropy_start"] == pytest.approx(math.log(4))
    pairs = [(2, 2), (2, 4), (4, 2), (4, 4)]
    decided = distribution_movement(["a", "b"], torch.tensor([[1.0, 0, 0, 0], [0, 0.1, 0.6, 0.3]]), pairs)
    assert decided["layers"]["a"] == {"entropy_start": pytest.approx(math.log(4)), "entropy_end": pytest.approx(0.0),
                                      "p_max_end": 1.0, "argmax": [2, 2]}
    assert decided["layers"]["b"]["argmax"] == [4, 2]
    decided = distribution_movement(["a", "b"], torch.tensor([[1.0, 0, 0, 0], [0, 0, 0.5, 0.5]]))
    # layer b kept half its entropy: the mean drop is (1 + 0.5) / 2
    assert decided["entropy_drop"] == pytest.approx(0.75) and not decided["near_start"]
    assert decided["p_max_mean"] == pytest.approx(0.75) and decided["p_uniform"] == 0.25


def _search(method, options):
    budgets = parse_budgets("bitops<=uniform:2.5")
    ctx = toy_search_context(budgets, {"epochs": 2, **options}, bits=(2, 3, 4, 5, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_searcher(method, ctx)
    return result, [w for w in caught if issubclass(w.category, UnmovedSearchWarning)], ctx


@pytest.mark.parametrize(("method", "extra", "walk"), [("dnas", {"samples": 0}, softmax_walk),
                                                       ("dmpq", {}, dirichlet_walk)])
def test_the_automatic_rate_follows_the_search_length_and_moves_the_distributions(method, extra, walk):
    auto, auto_warnings, ctx = _search(method, extra)
    fixed, fixed_warnings, _ = _search(method, {**extra, "arch_lr": 0.01})
    weight_steps = 2 * len(split_for_architecture(ctx.train_loader, 0.2, ctx.seed)[0])
    warmup = 0.2 if method == "dnas" else 0.0
    expected = walk(5) / (0.5 * weight_steps * (1 - warmup))  # decided within half the architecture steps
    epochs = auto.trace[0]["epochs"]
    assert [e["arch_lr"] for e in epochs] == pytest.approx([expected, expected])
    assert fixed.trace[0]["epochs"][-1]["arch_lr"] == 0.01
    # a 2-epoch search at 0.01 barely moves, and says so; the automatic rate moves and is silent
    moved, stayed = auto.trace[0]["distribution"], fixed.trace[0]["distribution"]
    assert stayed["entropy_drop"] < NEAR_START and fixed.trace[0]["near_start"]
    assert fixed.info["near_start"] == ["bitops<=uniform:2.5"] and len(fixed_warnings) == 1
    assert "ended near their uniform start" in str(fixed_warnings[0].message)
    assert "arch_lr 0.01" in str(fixed_warnings[0].message)
    assert moved["entropy_drop"] > NEAR_START and moved["p_max_mean"] > 2 * stayed["p_max_mean"]
    assert not auto.trace[0]["near_start"] and auto.info["near_start"] == [] and not auto_warnings
    assert set(moved["layers"]) == set(ctx.space.searchable)
    assert all(tuple(layer["argmax"]) in [(w, a) for w in ctx.space.w_bits for a in ctx.space.a_bits]
               for layer in moved["layers"].values())


def test_ssps_records_movement_at_the_time_each_layer_was_fixed():
    result, _, ctx = _search("ssps", {"arch_lr": 1e-6})
    entry = result.trace[0]
    # the layers were pinned one-hot when fixed; the record is of what they had learned by then (nearly nothing)
    assert entry["near_start"] and entry["distribution"]["entropy_drop"] < 0.01
    assert [e["layer"] for e in entry["fixing_order"]] and set(entry["distribution"]["layers"]) == {"3", "6"}


def test_bad_rate_options_are_named():
    ctx = toy_search_context(parse_budgets("bitops<=uniform:4"), {"arch_lr": None, "arch_optimizer": "sgd"})
    with pytest.raises(MixbitsError, match=r"arch_lr: must be a number > 0, or null .*adam only.*got None"):
        run_searcher("dnas", ctx)
    ctx.options = {"decide_fraction": 0}
    with pytest.raises(MixbitsError, match=r"decide_fraction: must be a number in \(0, 1\], got 0"):
        run_searcher("dmpq", ctx)
