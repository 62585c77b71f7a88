import math

import pytest
import torch
from torch import nn

from mixbits import MixbitsError, Policy, SearchSpace
from mixbits.quant import (
    STEP_FLOOR,
    LsqQuantizer,
    QConv2d,
    QLinear,
    apply_policy,
    calibrate,
    current_policy,
    fit_steps,
    integer_range,
    lsq_quantize,
    lsq_reference,
    quant_layers,
    quantization_error,
    quantize_model,
    set_fused,
    space_of,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _grads(fn, x, step, qmin, qmax, g):
    x = x.clone().requires_grad_()
    step = step.clone().requires_grad_()
    out = fn(x, step, qmin, qmax, g)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), x.grad, step.grad


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (8, False)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fast_lsq_matches_autograd_reference(bits, signed, per_channel):
    x = torch.randn(6, 4, 5, 5) * 2
    step = torch.rand(6, 1, 1, 1) * 0.5 + 0.1 if per_channel else torch.tensor([0.3])
    qmin, qmax = integer_range(bits, signed)
    fast = _grads(lsq_quantize, x, step, qmin, qmax, 0.05)
    ref = _grads(lsq_reference, x, step, qmin, qmax, 0.05)
    for a, b in zip(fast, ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lsq_output_lies_on_the_grid_and_in_range():
    x = torch.randn(1000) * 3
    out = lsq_quantize(x, torch.tensor([0.25]), -4, 3, 1.0)
    levels = out / 0.25
    assert torch.equal(levels, levels.round())
    assert levels.min() == -4 and levels.max() == 3
    # straight-through: gradient 1 inside the range, 0 where clipped
    x.requires_grad_()
    lsq_quantize(x, torch.tensor([0.25]), -4, 3, 1.0).sum().backward()
    inside = (x / 0.25 >= -4) & (x / 0.25 <= 3)
    assert torch.equal(x.grad, inside.float())


@pytest.mark.parametrize("shape,per_channel", [((16, 32, 8, 8), False), ((33001,), False), ((3, 7, 41, 43), False),
                                               ((16, 32, 8, 8), True), ((5, 7, 31, 37), True), ((40000, 1), True)])
def test_fused_kernels_match_eager(shape, per_channel):
    """One compiled kernel per layout serves every shape (all large enough for the fused path)."""
    x = torch.randn(shape) * 2
    step = torch.rand(shape[0], *[1] * (len(shape) - 1)) * 0.3 + 0.1 if per_channel else torch.tensor([0.2])
    eager = _grads(lsq_quantize, x, step, -8, 7, 0.1)
    set_fused(True)
    try:
        fused = _grads(lsq_quantize, x, step, -8, 7, 0.1)
    finally:
        set_fused(False)
    for a, b in zip(eager, fused, strict=True):  # the step's gradient is a long sum, added in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_quantizer_init_sign_and_per_bit_steps():
    q = LsqQuantizer([2, 4], signed=None)
    x = torch.rand(10, 20)  # non-negative: an activation after ReLU
    q.quantize(x, 4)
    assert not q.signed
    assert q.initialized.tolist() == [True, True]
    torch.testing.assert_close(q.steps[0], (2 * x.abs().mean() / math.sqrt(3)).reshape(1))
    torch.testing.assert_close(q.steps[1], (2 * x.abs().mean() / math.sqrt(15)).reshape(1))
    # 2-bit training never moves the 4-bit step
    q.quantize(x, 2).sum().backward()
    assert q.steps.grad[1].abs().sum() == 0 and q.steps.grad[0].abs().sum() > 0
    with pytest.raises(MixbitsError, match="expected one of \\[2, 4\\]"):
        q.quantize(x, 3)


def _run_at_step(mode: str, raw_step: float):
    """(output, the step parameter's gradient, the layer) with the 4-bit input step parameter set to ``raw_step``."""
    torch.manual_seed(0)
    layer = QLinear(6, 4, w_bits=(2, 4), a_bits=(2, 4))
    x = torch.rand(5, 6) + 0.5  # unsigned activations
    calibrate(nn.Sequential(layer), x)
    layer.set_bits(4, 4)
    with torch.no_grad():
        layer.a_quant.steps.fill_(raw_step)
    if mode == "layer":  # the layer's single autograd node
        out = layer(x)
    else:
        out = layer.a_quant(x) if mode == "fixed" else layer.a_quant.mix(x, torch.tensor([0.0, 1.0]))
    (out * torch.linspace(-1, 2, out.numel()).view(out.shape)).sum().backward()
    return out.detach(), layer.a_quant.steps.grad.clone(), layer


@pytest.mark.parametrize("mode", ["fixed", "mixture", "layer"])
def test_a_step_driven_below_zero_is_used_at_the_floor_and_its_gradient_still_flows(mode):
    """LSQ's gradient can push a step through zero; the step used stays at STEP_FLOOR (a negative one flips every
    code's sign), and the gradient reaches the parameter as if it were at the floor, so it can climb back."""
    out, grad, layer = _run_at_step(mode, -0.05)
    at_floor, grad_at_floor, _ = _run_at_step(mode, STEP_FLOOR)
    torch.testing.assert_close(out, at_floor, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_at_floor, rtol=0, atol=0)
    assert grad[1].abs().item() > 0 and grad[0].item() == 0  # the 2-bit step took no part
    x = torch.rand(5, 6) + 0.5
    floor = torch.tensor([STEP_FLOOR])  # in float32, as the steps are
    assert torch.equal(layer.a_quant.step(4, 2).detach(), floor) and torch.equal(layer.a_quant.integers(x, 4)[1], floor)
    if mode == "fixed":  # every input above the clip range: the top code (15) times the floor
        torch.testing.assert_close(out, torch.full_like(out, 15 * STEP_FLOOR))
    quantizer = layer.a_quant
    quantizer.steps.grad = None
    (-quantizer(x).sum()).backward()  # a loss that wants a larger step
    torch.optim.SGD([quantizer.steps], lr=1.0).step()
    assert quantizer.steps[1].item() > STEP_FLOOR


def test_signed_inferred_from_negative_inputs():
    q = LsqQuantizer([4])
    q(torch.randn(100))
    assert q.signed


def test_per_channel_steps_follow_each_channel():
    w = torch.randn(3, 4, 3, 3) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1, 1)
    q = LsqQuantizer([4], signed=True, channels=3)
    q(w)
    steps = q.steps[0]
    assert steps[0] < steps[1] < steps[2]
    torch.testing.assert_close(steps, 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(7))


def test_mixture_is_probability_weighted_sum_with_grad_to_probs():
    q = LsqQuantizer([2, 3, 4], signed=True)
    x = torch.randn(50)
    probs = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    out = q.mix(x, probs)
    expected = sum(p * q.quantize(x, b) for p, b in zip(probs.detach(), [2, 3, 4], strict=True))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    with pytest.raises(MixbitsError, match="shape \\(3,\\) for bit-widths \\[2, 3, 4\\]"):
        q.mix(x, torch.ones(2))


def test_mixture_of_some_candidates_equals_the_full_mixture_with_zeros_elsewhere():
    x = torch.randn(4, 60)

    def run(subset):
        q = LsqQuantizer([2, 3, 4, 5], signed=True, channels=4)
        probs = torch.tensor([0.3, 0.7], requires_grad=True)
        full = torch.cat([torch.zeros(1), probs, torch.zeros(1)])
        out = q.mix(x, probs, bits=(3, 4)) if subset else q.mix(x, full)
        (out * torch.linspace(-1, 1, 60)).sum().backward()
        return out.detach(), probs.grad, q.steps.grad

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(MixbitsError, match="bit-width 6 is not a candidate"):
        LsqQuantizer([2, 3], signed=True).mix(x, torch.ones(1), bits=(6,))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_mixture_gradients_equal_those_of_the_sum_of_candidate_quantizations(per_channel, fused):
    """The one-pass mixture (saves only x) against autograd through Σ p_b · Q_b(x), candidate by candidate."""
    torch.manual_seed(0)
    x = torch.randn(16, 32, 8, 8) * 2  # large enough for the fused path; some values outside every clip range
    q = LsqQuantizer([2, 3, 4], signed=True, channels=16 if per_channel else 1)
    q(x)
    grad_out = torch.randn_like(x)

    def grads(mix):
        xs, probs = x.clone().requires_grad_(), torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
        q.steps.grad = None
        out = mix(xs, probs)
        (out * grad_out).sum().backward()
        return out.detach(), xs.grad, probs.grad, q.steps.grad.clone()

    reference = grads(lambda xs, probs: sum(p * q.quantize(xs, b) for p, b in zip(probs, q.candidates, strict=True)))
    set_fused(fused)
    try:
        one_pass = grads(q.mix)
    finally:
        set_fused(False)
    for a, b in zip(one_pass, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_qconv_is_conv_of_quantized_input_and_weight(groups):
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    qconv = QConv2d.from_float(conv, (2, 8), (2, 8))
    x = torch.randn(2, 8, 6, 6)
    calibrate(nn.Sequential(qconv), x)
    assert qconv.weight is conv.weight  # parameters shared, not copied
    errors = {}
    for bits in (2, 8):
        qconv.set_bits(bits, bits)
        wq = lsq_reference(conv.weight, qconv.w_quant.step(bits, 4), *integer_range(bits, True), 1.0)
        xq = lsq_reference(x, qconv.a_quant.step(bits, 4), *integer_range(bits, True), 1.0)
        expected = nn.functional.conv2d(xq, wq, conv.bias, padding=1, groups=groups)
        torch.testing.assert_close(qconv(x), expected)
        errors[bits] = (qconv(x) - conv(x)).abs().mean()
    assert errors[8] < errors[2] / 4


@pytest.mark.parametrize("kind", ["conv", "depthwise", "linear", "tokens"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_inference_runs_the_integer_form(kind, per_channel, fused):
    """Eval mode without autograd: the integer codes' product (exact, here checked in float64), one multiply by
    the two steps' product, one bias add; the same function as the fake-quant forward up to float rounding."""
    set_fused(fused)
    try:
        if kind == "linear" or kind == "tokens":
            layer = QLinear.from_float(nn.Linear(96, 12), (2, 4), (3, 8), per_channel=per_channel)
            x = torch.randn(64, 5, 96) if kind == "tokens" else torch.randn(64, 96)
        else:
            groups = 16 if kind == "depthwise" else 1
            layer = QConv2d.from_float(nn.Conv2d(16, 16, 3, padding=1, groups=groups), (2, 4), (3, 8),
                                       per_channel=per_channel)
            x = torch.randn(8, 16, 12, 12)
        calibrate(nn.Sequential(layer), x)
        layer.set_bits(4, 3)
        layer.eval()
        fake = layer(x)  # autograd on: the fake-quant forward
        with torch.no_grad():
            got = layer(x)
        x_codes = torch.clamp(x / layer.a_quant.step(3, x.dim()), *integer_range(3, layer.a_quant.signed)).round()
        w_codes, w_step = layer.w_quant.integers(layer.weight, 4)
        shape = (-1, 1, 1) if isinstance(layer, QConv2d) else (-1,)
        if isinstance(layer, QConv2d):
            exact = nn.functional.conv2d(x_codes.double(), w_codes.double(), None, 1, 1, 1, layer.groups)
        else:
            exact = nn.functional.linear(x_codes.double(), w_codes.double())
        scale = (layer.a_quant.step(3, 1).reshape(-1) * w_step.reshape(-1)).view(shape)
        assert torch.equal(got, exact.float() * scale + layer.bias.view(shape))
        fake = fake.detach() if fake.requires_grad else pytest.fail("the fake-quant forward lost its gradient")
        torch.testing.assert_close(got, fake, rtol=0, atol=1e-5 * float(fake.abs().max()))
        assert not got.requires_grad
    finally:
        set_fused(False)


def test_quantized_model_batchnorm_infers_as_multiply_then_add():
    """Two roundings, as the exported graph's Mul and Add make them; training is BatchNorm's own."""
    from mixbits.quant.batchnorm import TwoRoundingBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4))
    plain = model[1]
    qmodel = quantize_model(model, SearchSpace.from_model(model, (4,), (4,), fixed="none"))
    bn = qmodel[1]
    assert type(bn) is TwoRoundingBatchNorm2d and type(plain) is nn.BatchNorm2d  # the original is left alone
    x = torch.randn(16, 6, 6, 6) * 2 + 1
    bn.train()
    reference = nn.BatchNorm2d(6).train()
    reference.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=0, atol=0)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    reference.load_state_dict(bn.state_dict())
    bn.eval(), reference.eval()
    std = (bn.running_var + bn.eps).sqrt()
    scale = (bn.weight / std).view(1, -1, 1, 1)
    shift = (bn.bias - bn.running_mean * (bn.weight / std)).view(1, -1, 1, 1)
    assert torch.equal(bn(x), (x * scale) + shift)
    torch.testing.assert_close(bn(x), reference(x), rtol=1e-6, atol=1e-6)


def _layer_grads(layer, x, forward, probs=None, input_grad=True):
    """Output and every gradient of ``forward(layer, x)`` (the input's, the steps', the weight's, the bias')."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(input_grad)
    if probs is not None:
        probs = [p.detach().clone().requires_grad_() for p in probs]
        layer.set_mixture(*probs)
    out = forward(layer, x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    grads = [out.detach(), x.grad, layer.a_quant.steps.grad, layer.w_quant.steps.grad, layer.weight.grad,
             layer.bias.grad]
    return grads + ([p.grad for p in probs] if probs is not None else [])


def _two_nodes(layer, x):
    """The quantized input and weight as separate autograd nodes, then the float op: the reference."""
    if isinstance(layer, QConv2d):
        return layer._conv_forward(layer.quantized_input(x), layer.quantized_weight(), layer.bias)
    return nn.functional.linear(layer.quantized_input(x), layer.quantized_weight(), layer.bias)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "linear"])
@pytest.mark.parametrize("bits,signed", [(2, False), (3, True), (4, True), (8, False)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", ["fixed", "mixture"])
def test_one_node_layer_matches_quantizers_then_layer(kind, bits, signed, per_channel, mode):
    """The layer's single autograd node (saves the float input only, recomputes the quantized one) gives the
    output and gradients of the quantizers and the float op as separate nodes."""
    if kind == "linear":
        layer = QLinear(12, 5, w_bits=(2, 3, 4, 8), a_bits=(2, 3, 4, 8), per_channel=per_channel)
        x = torch.randn(3, 7, 12) * 2  # leading dimensions beyond the batch, as in a transformer
    else:
        groups = 4 if kind == "depthwise" else 1
        layer = QConv2d(4, 8, 3, stride=2, padding=1, groups=groups, w_bits=(2, 3, 4, 8), a_bits=(2, 3, 4, 8),
                        per_channel=per_channel)
        x = torch.randn(3, 4, 9, 9) * 2  # some values outside every clip range
    x = x if signed else x.abs()  # the activation quantizer's sign follows the first data it sees
    calibrate(nn.Sequential(layer), x)
    assert layer.a_quant.signed == signed
    layer.set_bits(bits, bits)
    probs = None
    if mode == "mixture":
        probs = (torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.4, 0.1, 0.3, 0.2]))
    fused = _layer_grads(layer, x, lambda m, xs: m(xs), probs)
    reference = _layer_grads(layer, x, _two_nodes, probs)
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["fixed", "mixture"])
def test_one_node_layer_with_fused_kernels_matches_quantizers_then_layer(mode):
    layer = QConv2d(32, 16, 3, padding=1, w_bits=(2, 4), a_bits=(2, 4), per_channel=True)
    x = torch.randn(16, 32, 8, 8)  # large enough for the compiled kernels
    calibrate(nn.Sequential(layer), x)
    layer.set_bits(4, 2)
    probs = (torch.tensor([0.3, 0.7]), torch.tensor([0.6, 0.4])) if mode == "mixture" else None
    reference = _layer_grads(layer, x, _two_nodes, probs)
    set_fused(True)
    try:
        fused = _layer_grads(layer, x, lambda m, xs: m(xs), probs)
    finally:
        set_fused(False)
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,per_channel", [(1, False), (1, True), (3, False)])
def test_input_needing_no_gradient_gives_the_same_step_gradient(groups, per_channel):
    """The network's input needs no gradient: the step's comes through the adjoint of the convolution."""
    layer = QConv2d(3, 6, 3, stride=2, padding=1, groups=groups, w_bits=(8,), a_bits=(8,), per_channel=per_channel)
    x = torch.randn(4, 3, 9, 9) * 3
    calibrate(nn.Sequential(layer), x)
    fused = _layer_grads(layer, x, lambda m, xs: m(xs), input_grad=False)
    reference = _layer_grads(layer, x, _two_nodes, input_grad=False)
    assert fused[1] is None and reference[1] is None
    for got, want in zip(fused[:1] + fused[2:], reference[:1] + reference[2:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_node_layer_saves_the_input_only():
    """Float conv training keeps one copy of the activation for backward; the quantized layer adds no second one."""
    layer = QConv2d(8, 8, 3, padding=1, w_bits=(4,), a_bits=(4,))
    x = torch.randn(4, 8, 16, 16).relu().requires_grad_()
    calibrate(nn.Sequential(layer), x.detach())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


def test_qat_loss_curve_is_that_of_the_two_node_layers(monkeypatch):
    """A fixed-seed QAT run gives the same losses and weights as the quantizers and float ops as separate nodes."""
    from conftest import toy_batches, toy_net

    from mixbits.train import TrainConfig, fit

    def run():
        model = toy_net()
        space = SearchSpace.from_model(model, (2, 4), (2, 4))
        qmodel = quantize_model(model, space)
        calibrate(qmodel, toy_batches(1)[0][0])
        apply_policy(qmodel, Policy.from_rules(space, (4, 2), {"6": (2, 4)}))
        history = fit(qmodel, toy_batches(4), TrainConfig(epochs=3, lr=0.05, compile=False)).history
        return [m["train_loss"] for m in history], qmodel.state_dict()

    losses, weights = run()
    for cls in (QConv2d, QLinear):
        monkeypatch.setattr(cls, "forward", lambda self, x: (self._apply_sampler(), _two_nodes(self, x))[1])
    ref_losses, ref_weights = run()
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for name, value in ref_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)


def test_composite_convolution_equals_sum_over_candidate_branches():
    conv = QConv2d(4, 6, 3, padding=1, w_bits=(2, 3, 4), a_bits=(2, 4))
    x = torch.randn(2, 4, 7, 7)
    calibrate(nn.Sequential(conv), x)
    pw = torch.tensor([0.1, 0.6, 0.3])
    pa = torch.tensor([0.7, 0.3])
    conv.set_mixture(pw, pa)
    mixed = conv(x)
    branches = 0
    for i, wb in enumerate((2, 3, 4)):
        for j, ab in enumerate((2, 4)):
            conv.set_bits(wb, ab)
            branches = branches + pw[i] * pa[j] * conv(x)
    torch.testing.assert_close(mixed, branches, rtol=1e-4, atol=1e-5)


def test_separate_candidate_weights_run_each_bit_width_on_its_own_weights():
    conv = QConv2d(4, 6, 3, padding=1, w_bits=(2, 3, 4), a_bits=(2, 4))
    x = torch.randn(2, 4, 7, 7)
    calibrate(nn.Sequential(conv), x)
    torch.manual_seed(1)
    own = nn.ParameterList(nn.Parameter(torch.randn_like(conv.weight) * 0.2) for _ in range(3))
    conv.set_candidate_weights(own)
    assert {k for k in conv.state_dict() if k.startswith("candidate_weights.")} == {
        "candidate_weights.0", "candidate_weights.1", "candidate_weights.2"}
    branches = {}
    for i, wb in enumerate((2, 3, 4)):  # fixed bits: candidate wb's own weights at wb bits
        conv.set_bits(wb, 4)
        expected = nn.functional.conv2d(conv.a_quant(x), conv.w_quant.quantize(own[i], wb), conv.bias, padding=1)
        branches[wb] = conv(x)
        torch.testing.assert_close(branches[wb], expected)
    pw = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    conv.set_mixture(pw, torch.tensor([0.0, 1.0]))
    mixed = conv(x)  # still one convolution, equal to the weighted branches (bilinearity)
    torch.testing.assert_close(mixed, sum(p * branches[b] for p, b in zip(pw.detach(), (2, 3, 4), strict=True)),
                               rtol=1e-4, atol=1e-5)
    mixed.sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in own) and conv.weight.grad is None
    conv.set_candidate_weights(None)
    conv.set_bits(4, 4)
    assert "candidate_weights.0" not in conv.state_dict()
    torch.testing.assert_close(conv(x), nn.functional.conv2d(conv.a_quant(x), conv.w_quant(conv.weight),
                                                             conv.bias, padding=1))
    with pytest.raises(MixbitsError, match="one per candidate"):
        conv.set_candidate_weights(nn.ParameterList([nn.Parameter(conv.weight.detach().clone())]))


def test_sampler_is_asked_at_every_forward():
    lin = QLinear(5, 3, w_bits=(2, 4), a_bits=(2, 4))
    calibrate(nn.Sequential(lin), torch.randn(4, 5))
    choices = iter([(2, 4), (4, 2)])
    seen = []

    def sampler():
        bits = next(choices)
        seen.append(bits)
        return bits

    lin.set_sampler(sampler)
    lin(torch.randn(4, 5))
    assert lin.bits == (2, 4)
    lin(torch.randn(4, 5))
    assert lin.bits == (4, 2) and seen == [(2, 4), (4, 2)]
    lin.set_bits(2, 2)
    assert lin.mode == "fixed"


def _tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_quantize_model_keeps_names_and_leaves_the_original_alone():
    model = _tiny()
    space = SearchSpace.from_model(model, w_bits=(2, 4), a_bits=(4, 8))
    qmodel = quantize_model(model, space)
    assert list(quant_layers(qmodel)) == ["0", "2", "5"]
    assert not any(isinstance(m, QConv2d) for m in model.modules())
    assert quant_layers(qmodel)["0"].candidates == ((8,), (8,))  # first and last fixed at 8/8
    assert quant_layers(qmodel)["2"].candidates == ((2, 4), (4, 8))
    assert space_of(qmodel) == space
    # float weights load into the quantized model's float keys unchanged
    fp_keys = set(model.state_dict())
    assert fp_keys <= set(qmodel.state_dict())


def test_apply_policy_and_calibrate_every_candidate():
    model = _tiny()
    space = SearchSpace.from_model(model, w_bits=(2, 4), a_bits=(4, 8))
    qmodel = quantize_model(model, space)
    calibrate(qmodel, torch.randn(3, 1, 8, 8))
    for layer in quant_layers(qmodel).values():
        assert layer.w_quant.initialized.all() and layer.a_quant.initialized.all()
    assert not quant_layers(qmodel)["2"].a_quant.signed  # after a ReLU
    policy = Policy.from_rules(space, default=(4, 8), overrides={"2": (2, 4)})
    apply_policy(qmodel, policy)
    assert current_policy(qmodel) == policy
    out = qmodel(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 3) and torch.isfinite(out).all()


def _rounding_error(x, step, bits, signed):
    qmin, qmax = integer_range(bits, signed)
    return float((torch.clamp(torch.round(x / step), qmin, qmax) * step - x).square().sum())


@pytest.mark.parametrize("bits, lsq_over_best", [(2, 1.5), (6, 6.5)])
def test_fitted_step_has_the_least_rounding_error(bits, lsq_over_best):
    from mixbits.quant.fit import mse_steps

    w = torch.randn(64, 32, 3, 3)
    step, error = mse_steps(w, bits, signed=True)
    brute = min(_rounding_error(w, s, bits, True) for s in torch.linspace(0.005, 1.5, 1500))
    assert error.item() == pytest.approx(_rounding_error(w, step, bits, True)) and error.item() <= brute * 1.001
    assert quantization_error(w, bits, signed=True) == pytest.approx(error.item())
    # LSQ's initial step is far from it, more so at more bits (the sensitivity ratios it would flatten)
    lsq_step = 2 * w.abs().mean() / math.sqrt(integer_range(bits, True)[1])
    assert _rounding_error(w, lsq_step, bits, True) / error.item() == pytest.approx(lsq_over_best, rel=0.05)
    per_channel, errors = mse_steps(w, bits, signed=True, channel_dim=0)
    assert per_channel.shape == (64,) and errors.sum() <= error * 1.0001  # a step per channel fits at least as well


def test_fit_steps_sets_every_candidate_of_weights_and_activations():
    model = _tiny()
    space = SearchSpace.from_model(model, w_bits=(2, 4), a_bits=(2, 4))
    qmodel = quantize_model(model, space, per_channel=True)
    x = torch.randn(16, 1, 8, 8)
    fit_steps(qmodel, (x, torch.zeros(16)))  # a batch, a pair or a loader
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in quant_layers(qmodel).items()]
    with torch.no_grad():
        qmodel.eval()(x)
    for h in hooks:
        h.remove()
    for name, layer in quant_layers(qmodel).items():
        for bits in layer.w_quant.candidates:  # per channel: no other step of a channel does better
            step = layer.w_quant.step(bits, layer.weight.dim()).detach()
            fitted = _rounding_error(layer.weight.detach(), step, bits, True)
            assert fitted <= _rounding_error(layer.weight.detach(), step * 1.1, bits, True)
            assert fitted <= _rounding_error(layer.weight.detach(), step * 0.9, bits, True)
        for bits in layer.a_quant.candidates:
            step = layer.a_quant.step(bits, 4).detach()
            signed = layer.a_quant.signed
            assert _rounding_error(inputs[name], step, bits, signed) == pytest.approx(
                quantization_error(inputs[name], bits, signed), rel=1e-5)


def test_bad_bits_change_nothing():
    layer = QConv2d(2, 2, 1, w_bits=(2, 4), a_bits=(2, 4))
    layer.set_bits(2, 2)
    with pytest.raises(MixbitsError, match="not a candidate"):
        layer.set_bits(4, 3)
    assert layer.bits == (2, 2)
    model = _tiny()
    qmodel = quantize_model(model, SearchSpace.from_model(model))
    with pytest.raises(MixbitsError, match="unknown layers \\['nope'\\]"):
        apply_policy(qmodel, Policy({**{n: (8, 8) for n in quant_layers(qmodel)}, "nope": (4, 4)}))
    with pytest.raises(MixbitsError, match="quantize_model"):
        apply_policy(model, Policy({"0": (8, 8)}))


def test_training_a_quantized_model_reaches_every_step_and_weight():
    model = _tiny()
    space = SearchSpace.from_model(model, w_bits=(2, 3), a_bits=(2, 3))
    qmodel = quantize_model(model, space)
    x = torch.randn(5, 1, 8, 8)
    calibrate(qmodel, x)
    layer = quant_layers(qmodel)["2"]
    layer.set_mixture(torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75]))
    qmodel(x).square().sum().backward()
    assert layer.w_quant.steps.grad.abs().min() > 0 and layer.a_quant.steps.grad.abs().min() > 0
    assert all(p.grad is not None for p in qmodel.parameters())
