"""Prefix reuse while scoring neighbours: the same scores as a full forward, fewer block runs."""

import pytest
import torch
from conftest import toy_batches
from torch import nn

from mixbits import MixbitsError, Policy, SearchSpace
from mixbits.budget import parse_budgets
from mixbits.quant import calibrate, quantize_model
from mixbits.search import PolicyEvaluator, SearchContext, run_searcher
from mixbits.search.greedy import neighbours
from mixbits.search.prefix import execution_units


class InPlaceNet(nn.Module):
    """Modifies a block's output in place in its own forward: recorded and replayed outputs must be copies."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.body, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x):
        x = self.bn(self.stem(x)).mul_(2)
        x = torch.relu(self.bn2(self.body(x)))
        return self.head(torch.relu(self.conv3(x)))


class Twice(nn.Module):
    """Runs one convolution twice: its units are not each called once, so nothing is replayed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

    def forward(self, x):
        return self.head(self.conv(self.conv(x)))


def _quantized(model):
    space = SearchSpace.from_model(model, (2, 4, 6), (2, 4, 6))
    qmodel = quantize_model(model, space)
    calibrate(qmodel, toy_batches()[0][0])
    return qmodel, space


def test_units_open_containers_and_follow_the_forward():
    qmodel, _ = _quantized(InPlaceNet())
    names = [name for name, _ in execution_units(qmodel, toy_batches()[0][0])]
    assert names == ["stem", "bn", "body", "bn2", "conv3", "head.0", "head.1", "head.2"]
    assert execution_units(Twice(), torch.zeros(2, 1, 8, 8)) == []


def test_neighbour_scores_equal_full_forwards_with_fewer_block_runs():
    qmodel, space = _quantized(InPlaceNet())
    full = PolicyEvaluator(qmodel, toy_batches(seed=1), eval_batches=2, bn_mode="batch")
    reused = PolicyEvaluator(qmodel, toy_batches(seed=1), eval_batches=2, bn_mode="batch", reuse_prefix=True)
    current = Policy.uniform(space, 4)
    for _ in range(2):  # two steps of a walk: the anchor moves with it
        reused.focus(current)
        assert reused.prefix.anchor == current
        options = [p for _, p in neighbours(current, space, bidirectional=True, paired=True)]
        for policy in options:
            assert reused(policy) == full(policy)
        current = options[-1]
    anchor = reused.prefix.anchor
    assert reused.prefix.skipped > 0
    other = {2: 6, 4: 2, 6: 2}
    # a change in conv3 replays stem, bn, body and bn2; a change in body replays stem and bn
    assert reused.prefix.shared_units(anchor.replace("conv3", other[anchor["conv3"][0]], 4)) == 4
    assert reused.prefix.shared_units(anchor.replace("body", other[anchor["body"][0]], 4)) == 2
    assert reused.prefix.shared_units(anchor) == len(reused.prefix.units)


def test_a_model_whose_block_runs_twice_is_scored_without_reuse():
    model = Twice()
    space = SearchSpace.from_model(model, (2, 4), (2, 4))
    qmodel = quantize_model(model, space)
    calibrate(qmodel, toy_batches()[0][0])
    evaluator = PolicyEvaluator(qmodel, toy_batches(seed=1), eval_batches=1, bn_mode="batch", reuse_prefix=True)
    policy = Policy.uniform(space, 4)
    evaluator.focus(policy)
    score = evaluator(policy)
    assert not evaluator.prefix.active and evaluator.prefix.skipped == 0 and score["loss"] > 0
    with pytest.raises(MixbitsError, match="reuse_prefix needs bn_mode='batch'"):
        PolicyEvaluator(qmodel, toy_batches(seed=1), reuse_prefix=True)


def test_the_one_shot_walk_is_the_same_with_and_without_reuse():
    def search(reuse: bool):
        model = InPlaceNet()
        qmodel, space = _quantized(model)
        from mixbits.cost import profile

        ctx = SearchContext(model=qmodel, space=space, stats=profile(model, (1, 8, 8)),
                            budgets=parse_budgets("bitops<=uniform:3,uniform:5"), train_loader=toy_batches(),
                            val_loader=toy_batches(seed=1), float_model=model.eval(),
                            options={"epochs": 1, "eval_batches": 2, "score_bn": "batch", "reuse_prefix": reuse})
        return run_searcher("oneshot", ctx)

    with_reuse, without = search(True), search(False)
    assert [p.key() for p in with_reuse.policies] == [p.key() for p in without.policies]
    assert [s["loss"] for w in with_reuse.trace[1:] for s in w["steps"]] == \
        [s["loss"] for w in without.trace[1:] for s in w["steps"]]
