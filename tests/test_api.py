"""The library verbs on a model and data that live outside the package: search, finetune, quantize, evaluate,
export, subnet; a user's loss_fn; progress lines in a log."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyLoader, toy_batches
from torch import nn

import mixbits
from mixbits.cost import bitops, profile
from mixbits.quant import quant_layers

# A few passes per method: enough to exercise each search end to end in about a second.
QUICK = {"uniform": {}, "random": {"samples": 3, "eval_batches": 1, "bn_batches": 1},
         "hawq": {"probes": 1, "batches": 1}, "oneshot": {"epochs": 1, "eval_batches": 1, "bn_batches": 1},
         "dnas": {"epochs": 1}, "ssps": {"epochs": 1}, "dmpq": {"epochs": 1}, "sdq": {"epochs": 1}}


class UserNet(nn.Module):
    """A model of the user's own: not in the zoo, with a pooling between two convolutions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 8, 3, padding=1),
                                  nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


def test_every_method_is_covered_by_the_quick_options():
    assert sorted(QUICK) == mixbits.list_methods()


@pytest.mark.parametrize("method", sorted(QUICK))
def test_search_takes_a_user_model_and_plain_batches(method):
    model = UserNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mixbits.search(model, toy_batches(3), "bitops<=uniform:4", method=method, val=toy_batches(1, seed=1),
                            options=QUICK[method], progress=False)
    (policy,) = result.policies
    stats = profile(model, (1, 8, 8))
    assert bitops(stats, policy) <= bitops(stats, mixbits.Policy.uniform(result.space, 4))
    assert set(policy.bits) == {"stem", "body.3", "body.6", "head"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "search changed the user's model"


def test_finetune_from_a_search_result_trains_the_policy_and_uses_the_methods_settings():
    model, data = UserNet(), toy_batches(3)
    result = mixbits.search(model, data, "bitops<=uniform:3", method="hawq", options=QUICK["hawq"], progress=False)
    result.finetune = {"kd_alpha": 0.5}  # as SDQ asks: distillation from the float model
    qmodel = mixbits.finetune(model, result, data, epochs=2, progress=False)
    layers = quant_layers(qmodel)
    assert {n: layer.bits for n, layer in layers.items()} == dict(result.policies[0].bits)
    assert not qmodel.training
    before = mixbits.quantize(model, result.policies[0], data[0][0], space=result.space)
    assert mixbits.evaluate(qmodel, data)["loss"] < mixbits.evaluate(before, data)["loss"]


def test_finetune_rejects_settings_that_are_not_train_settings():
    with pytest.raises(mixbits.MixbitsError, match="unknown fine-tune setting.*'kd'"):
        mixbits.finetune(UserNet(), "uniform:4", toy_batches(1), epochs=1, kd=0.5)


def test_uniform_8_trains_without_building_a_second_space_and_lr_defaults_to_the_finetune_rate(monkeypatch):
    import mixbits.api.finetuning as finetune_module

    seen = {}
    real_fit = finetune_module.fit

    def spying_fit(model, train, cfg, **kw):
        seen["lr"] = cfg.lr
        return real_fit(model, train, cfg, **kw)

    monkeypatch.setattr(finetune_module, "fit", spying_fit)
    qmodel = mixbits.finetune(UserNet(), "uniform:8", toy_batches(1), epochs=1, progress=False)
    assert {layer.bits for layer in quant_layers(qmodel).values()} == {(8, 8)}
    assert seen["lr"] == mixbits.FINETUNE_LR["sgd"] == 0.01


def test_quantize_leaves_the_float_model_alone_and_runs_at_the_policy():
    model, x = UserNet(), toy_batches(1)[0][0]
    q = mixbits.quantize(model, "uniform:w3a5", x)
    assert not quant_layers(model)
    assert quant_layers(q)["body.3"].bits == (3, 5) and quant_layers(q)["stem"].bits == (8, 8)
    assert not torch.allclose(q(x), model.eval()(x))


def test_quantize_and_finetune_start_from_fitted_steps_unless_told_lsq():
    from mixbits.quant import apply_policy, fit_steps, quantize_model
    from mixbits.space import training_space

    model, x = UserNet(), toy_batches(1)[0][0]
    fitted, lsq = mixbits.quantize(model, "uniform:3", x), mixbits.quantize(model, "uniform:3", x, init="lsq")
    # The same steps as fitting a model quantized at the policy by hand: the searches' start.
    space, policy = training_space(model, "uniform:3", None)
    by_hand = quantize_model(model, space)
    apply_policy(by_hand, policy)
    fit_steps(by_hand, x)
    for name, layer in quant_layers(fitted).items():
        assert torch.equal(layer.w_quant.steps, quant_layers(by_hand)[name].w_quant.steps), name
        assert torch.equal(layer.a_quant.steps, quant_layers(by_hand)[name].a_quant.steps), name
    assert not torch.equal(quant_layers(lsq)["body.3"].w_quant.steps, quant_layers(fitted)["body.3"].w_quant.steps)
    with pytest.raises(mixbits.MixbitsError, match="init='mse' is not a step initialisation"):
        mixbits.quantize(model, "uniform:3", x, init="mse")
    with pytest.raises(mixbits.MixbitsError, match="init='mse'"):
        mixbits.finetune(model, "uniform:3", toy_batches(1), epochs=1, init="mse")


def test_oneshot_subnet_runs_without_a_zoo_card_and_exports(tmp_path):
    model, data = UserNet(), toy_batches(3)
    result = mixbits.search(model, data, "bitops<=uniform:3,uniform:4", method="oneshot", options=QUICK["oneshot"],
                            progress=False)
    net = mixbits.subnet(result, 1, bn_data=data)
    assert {n: layer.bits for n, layer in quant_layers(net).items()} == dict(result.policies[1].bits)
    assert mixbits.evaluate(net, data)["samples"] == 48
    report = mixbits.export(net, tmp_path / "exp", data[0][0], formats=["onnx", "packed"])
    assert report["onnx"]["check"]["top1_agreement"] >= 99.0
    assert {p.name for p in (tmp_path / "exp").iterdir()} >= {"model.onnx", "model.mxb", "policy.json"}


def test_subnet_refuses_a_search_without_a_supernet():
    result = mixbits.search(UserNet(), toy_batches(1), "bitops<=uniform:4", method="uniform", progress=False)
    with pytest.raises(mixbits.MixbitsError, match="no trained supernet"):
        mixbits.subnet(result)


def _dict_batches():
    """Batches a classification loop would not understand: dicts with the image under "pixels"."""
    return [{"pixels": x, "label": y} for x, y in toy_batches(2)]


def _dict_loss(model, batch):
    return nn.functional.cross_entropy(model(batch["pixels"]), batch["label"])


def test_a_loss_fn_trains_and_evaluates_any_batch_layout():
    model, data = UserNet(), _dict_batches()
    x = data[0]["pixels"]
    start = mixbits.evaluate(mixbits.quantize(model, "uniform:4", x), data, loss_fn=_dict_loss)
    qmodel = mixbits.finetune(model, "uniform:4", data, epochs=3, example_input=x, loss_fn=_dict_loss,
                              progress=False)
    after = mixbits.evaluate(qmodel, data, loss_fn=_dict_loss)
    assert set(after) == {"loss", "samples"} and after["samples"] == 32
    assert after["loss"] < start["loss"]


@pytest.mark.parametrize("method", sorted(QUICK))
def test_every_search_method_trains_and_scores_with_a_loss_fn(method):
    calls = {"n": 0}

    def counted_loss(model, batch):
        calls["n"] += 1
        return _dict_loss(model, batch)

    data = _dict_batches()
    result = mixbits.search(UserNet(), data, "bitops<=uniform:3.5", method=method, loss_fn=counted_loss,
                            example_input=data[0]["pixels"], options=QUICK[method], progress=False)
    assert len(result.policies) == 1
    assert calls["n"] > 0 or method == "uniform", f"{method} never called the loss_fn"


def test_bad_data_and_budgets_get_one_clear_error():
    with pytest.raises(mixbits.MixbitsError, match="iterable of batches"):
        mixbits.search(UserNet(), torch.randn(4, 1, 8, 8), "bitops<=uniform:4")
    with pytest.raises(mixbits.MixbitsError, match="yields no batches"):
        mixbits.search(UserNet(), [], "bitops<=uniform:4")
    with pytest.raises(mixbits.MixbitsError, match="unknown search method"):
        mixbits.search(UserNet(), toy_batches(1), "bitops<=uniform:4", method="dnass")


def test_progress_writes_one_line_per_epoch_when_not_a_terminal(capsys):
    mixbits.finetune(UserNet(), "uniform:4", toy_batches(2), epochs=2)  # progress=None: stderr is not a tty here
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    mixbits.finetune(UserNet(), "uniform:4", toy_batches(2), epochs=1, progress=False)
    assert "epoch" not in capsys.readouterr().err


def test_a_one_pass_generator_is_read_once_and_reused_every_epoch():
    data = (batch for batch in toy_batches(2))
    qmodel = mixbits.finetune(UserNet(), "uniform:4", data, epochs=2, progress=False)
    assert quant_layers(qmodel)


def test_finetune_calibrates_on_epoch_0_whatever_epoch_the_loader_was_left_at():
    # A benchmark fine-tunes many policies on one loader; each run ends with the loader at its last epoch.
    gen = torch.Generator().manual_seed(0)
    loader = ToyLoader(torch.randn(96, 1, 8, 8, generator=gen), torch.randint(0, 3, (96,), generator=gen), 16)
    fresh = mixbits.finetune(UserNet(), "uniform:3", loader, epochs=1, progress=False)
    loader.set_epoch(5)
    after_another = mixbits.finetune(UserNet(), "uniform:3", loader, epochs=1, progress=False)
    for (name, a), b in zip(fresh.state_dict().items(), after_another.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
