"""Every search puts bits where the sensitivity is.

The toy is a chain of four searchable 1x1 convolutions of equal width (equal MACs, so no layer is cheaper to
raise than another) between a fixed first and last layer. Its labels are its own float predictions, so
every loss it shows after quantization is the quantization's. One layer, ``SENSITIVE``, has heavy-tailed
weights (2 % of them 15x larger): any step that represents the outliers rounds the rest away, so at every
bit-width it loses far more than the others. At a BitOPs budget between two uniform levels each search must
give that layer more weight bits than the median searchable layer, at two of three seeds.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyLoader
from torch import nn

from mixbits import SearchSpace
from mixbits.budget import parse_budgets
from mixbits.cost import profile
from mixbits.quant import calibrate, quantize_model
from mixbits.search import SEARCHERS, SearchContext, run_searcher

WIDTH = 32
SEARCHABLE = ("3", "6", "9", "12")
SENSITIVE = "6"
BITS = (2, 3, 4, 5, 6)
BUDGET = "bitops<=uniform:3.5"


@pytest.fixture(autouse=True)
def _one_thread():
    """A short search's outcome turns on float rounding, which depends on how many threads sum; one thread makes
    it independent of the machine's core count (and is faster for these tiny tensors)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sensitive_toy() -> nn.Sequential:
    """Float model on 16x1x1 inputs, its BatchNorm statistics and head set so its predictions are balanced."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(16, WIDTH, 1), nn.BatchNorm2d(WIDTH), nn.ReLU()]
    for _ in SEARCHABLE:
        layers += [nn.Conv2d(WIDTH, WIDTH, 1, bias=False), nn.BatchNorm2d(WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(WIDTH, 4))
    x = torch.randn(2048, 16, 1, 1, generator=torch.Generator().manual_seed(0))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        weight = model.get_submodule(SENSITIVE).weight
        weight[torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) < 0.02] *= 15
        for bn in bns:
            bn.momentum = None  # one pass gives the exact statistics of x
        model.train()(x)
        logits = model.eval()(x)
        head = model[-1]
        head.bias -= logits.mean(0)
        head.weight *= 4 / logits.std()
        head.bias *= 4 / logits.std()
        for bn in bns:
            bn.momentum = 0.1
    return model


def toy_data(model: nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 16, 1, 1, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(-1)


def sensitive_context(options: dict, seed: int = 0) -> SearchContext:
    model = sensitive_toy()
    x, y = toy_data(model, 640, seed=2)
    space = SearchSpace.from_model(model, BITS, BITS)
    qmodel = quantize_model(model, space)
    calibrate(qmodel, x[:64])
    return SearchContext(model=qmodel, space=space, stats=profile(model, (16, 1, 1)), budgets=parse_budgets(BUDGET),
                         train_loader=ToyLoader(x[:512], y[:512], 64), val_loader=ToyLoader(x[512:], y[512:], 64),
                         options=options, float_model=model, seed=seed)


def _best_rounding_loss(model: nn.Module, name: str, bits: int, x, y) -> float:
    """The loss with only layer ``name``'s weights rounded to ``bits`` at the best of 50 steps (per tensor)."""
    layer = model.get_submodule(name)
    original = layer.weight.detach().clone()
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    steps = torch.linspace(0.02, 1.0, 50) * original.abs().max() / qmax

    def rounded(step):
        return torch.clamp(torch.round(original / step), qmin, qmax) * step

    best = min(steps, key=lambda step: float((rounded(step) - original).square().sum()))
    with torch.no_grad():
        layer.weight.copy_(rounded(best))
        loss = float(F.cross_entropy(model(x), y))
        layer.weight.copy_(original)
    return loss


def test_the_toy_has_one_layer_far_more_sensitive_than_the_others():
    model = sensitive_toy().eval()
    x, y = toy_data(model, 512, seed=5)
    assert torch.bincount(y, minlength=4).min() > 50  # every class is predicted: the labels carry information
    for bits in (3, 4, 6):
        increase = {n: _best_rounding_loss(model, n, bits, x, y) - float(F.cross_entropy(model(x), y).detach())
                    for n in SEARCHABLE}
        others = max(v for n, v in increase.items() if n != SENSITIVE)
        assert increase[SENSITIVE] > 4 * others, (bits, increase)


# Short searches: the differentiable ones take about 100 architecture steps, so their rate is raised to
# move the logits about as far as a default-length search does; the one-shot supernet needs its default
# 10 epochs (80 steps) before its scores tell the layers apart.
FAST = {
    "hawq": {"probes": 4, "batches": 2},
    "random": {"samples": 30, "eval_batches": 2, "bn_batches": 2},
    "dnas": {"epochs": 15, "arch_lr": 0.1, "samples": 4},
    "ssps": {"epochs": 15, "arch_lr": 0.1},
    "dmpq": {"epochs": 15, "arch_lr": 0.1},
    "sdq": {"epochs": 4},
    "oneshot": {"epochs": 10, "eval_batches": 2},
}
# SSPS failed here with its composite-mixture cell (now `cell: mixture`): the sensitive layer is bad at 2, 3
# and 4 bits alike, so against the mixture its 2-bit candidate looked no worse than average while the cost
# penalty lifted it, and the argmax fixed it at 2 bits at every seed. Its default is now the sampled cell.


def test_every_search_method_is_covered():
    assert set(FAST) == set(SEARCHERS.names()) - {"uniform"}


@pytest.mark.parametrize("method", list(FAST))
def test_search_gives_the_sensitive_layer_more_bits_than_the_median_layer(method):
    # Short searches on a toy are noisy: the method must get it right at two of three seeds.
    found = [run_searcher(method, sensitive_context(FAST[method], seed)).policies[0] for seed in range(3)]
    right = [p[SENSITIVE][0] > statistics.median(p[n][0] for n in SEARCHABLE) for p in found]
    assert sum(right) >= 2, [p.describe() for p in found]
