"""A user's data, model and arguments checked where they enter: each mistake is one MixbitsError naming the value
and the fix (never a torch traceback from three calls deeper); JSON a user hands in is read strictly; environment
pins are read when used, never at import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_RUN, cli_fails, toy_batches, toy_net
from torch import nn

import mixbits
from mixbits.space import POLICY_FORMAT, Policy


def _finetune(model=None, data=None, **kw):
    return mixbits.finetune(model if model is not None else toy_net(), "uniform:4",
                            data if data is not None else toy_batches(2), epochs=1, progress=False, **kw)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = toy_net()

    def forward(self, x):
        return self.net(x), x


def _mlp_with_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def _relabel(fn):
    return [(x, fn(y)) for x, y in toy_batches(2)]


@pytest.mark.parametrize("data,message", [
    (lambda: _relabel(lambda y: y + 3), "label [3-5] is outside the 3 classes the model outputs \\(0..2\\)"),
    (lambda: _relabel(lambda y: y - 3), "label -[1-3] is outside the 3 classes"),
    (lambda: _relabel(lambda y: y.float()), "labels of a batch are float32; cross-entropy needs class indices"),
    (lambda: _relabel(lambda y: y.int()), "labels of a batch are int32"),
    (lambda: _relabel(lambda y: y.tolist()), "labels of a batch are a list; give a tensor of class indices"),
    (lambda: [(x * float("nan"), y) for x, y in toy_batches(2)], "inputs hold 1024 NaN or infinite values: clean"),
])
def test_bad_labels_and_inputs(data, message):
    with pytest.raises(mixbits.MixbitsError, match=message) as caught:
        _finetune(data=data())
    assert "learning rate" not in str(caught.value)


def test_soft_labels_shaped_like_the_logits_still_train():
    soft = _relabel(lambda y: nn.functional.one_hot(y, 3).float())
    assert not _finetune(data=soft).training


@pytest.mark.parametrize("model,data,message", [
    (TupleOut, None, "the model returned a tuple, not a tensor of logits"),
    (lambda: toy_net().half(), None, "model holds float16 tensors \\('0.weight'\\).*model.float\\(\\)"),
    (lambda: toy_net().bfloat16(), None, "model holds bfloat16 tensors"),
    (_mlp_with_batchnorm, lambda: toy_batches(2) + [(toy_batches(1)[0][0][:1], toy_batches(1)[0][1][:1])],
     "batch 3 of the epoch holds 1 sample, too few for BatchNorm to train on.*drop_last=True"),
])
def test_model_mistakes(model, data, message):
    with pytest.raises(mixbits.MixbitsError, match=message):
        _finetune(model=model(), data=data() if data else None)


def test_a_batch_of_one_image_trains_batchnorm_over_its_pixels():
    one = [(x[:1], y[:1]) for x, y in toy_batches(2)]  # BatchNorm2d sees 64 values per channel: fine
    assert not _finetune(data=one).training


def test_custom_loss_and_teacher_mistakes():
    with pytest.raises(mixbits.MixbitsError, match=r"loss_fn returned a tensor of shape \(16, 3\); it must return"):
        _finetune(loss_fn=lambda model, batch: model(batch[0]))
    with pytest.raises(mixbits.MixbitsError, match=r"the teacher returned \(16, 5\) where the model returns \(16, 3\)"):
        _finetune(teacher=nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), kd_alpha=0.5)
    with pytest.raises(mixbits.MixbitsError, match="loss_fn returned a tensor of shape"):
        mixbits.search(toy_net(), toy_batches(2), "bitops<=uniform:4", method="oneshot",
                       options={"epochs": 1, "eval_batches": 1, "bn_batches": 1},
                       loss_fn=lambda model, batch: model(batch[0]), progress=False)


def test_evaluate_of_dict_batches_without_a_loss_fn_names_loss_fn():
    batches = [{"x": x, "y": y} for x, y in toy_batches(1)]
    with pytest.raises(mixbits.MixbitsError, match=r"reads \(inputs, targets\) tensor batches, got a dict; pass"):
        mixbits.evaluate(toy_net(), batches)


def test_hawq_refuses_frozen_weights_by_name():
    model = toy_net()
    model[3].weight.requires_grad_(False)
    with pytest.raises(mixbits.MixbitsError, match="layer\\(s\\) '3' have requires_grad=False"):
        mixbits.search(model, toy_batches(2), "bitops<=uniform:4", method="hawq", options={"probes": 1, "batches": 1})
    result = mixbits.search(model, toy_batches(2), "bitops<=uniform:4", method="uniform")  # what trains, trains
    assert result.policies


@pytest.mark.parametrize("call,message", [
    (lambda: mixbits.search("resnet20", toy_batches(1), "bitops<=uniform:4"),
     "model must be a torch.nn.Module, got str 'resnet20'; build it first"),
    (lambda: mixbits.search(toy_net(), toy_batches(1), None), "budget must be a budget string .* got None"),
    (lambda: mixbits.search(toy_net(), toy_batches(1), "bitops<=uniform:4", seed="abc"),
     "seed must be a whole number, got str 'abc'"),
    (lambda: mixbits.search(toy_net(), toy_batches(1), "bitops<=uniform:4", loss_fn=3), "loss_fn must be a function"),
    (lambda: mixbits.finetune(toy_net(), "uniform:4", toy_batches(1), epochs="3"),
     "epochs must be a whole number >= 1, got str '3'"),
    (lambda: mixbits.quantize(None, "uniform:4", toy_batches(1)[0][0]), "model must be a torch.nn.Module, got None"),
    (lambda: mixbits.evaluate(toy_net(), toy_batches(1), device=0), "device must be a string such as 'cpu'"),
    (lambda: mixbits.export(toy_net(), 7, toy_batches(1)[0][0]), "out_dir must be a directory path"),
    (lambda: mixbits.subnet("result"), "result must be the SearchResult mixbits.search returned"),
])
def test_argument_types_of_the_verbs(call, message):
    with pytest.raises(mixbits.MixbitsError, match=message):
        call()


# JSON a user hands in ---------------------------------------------------------------------------------------------
def test_policy_json_with_a_duplicate_key_or_absurd_nesting(tmp_path):
    dup = tmp_path / "dup.json"
    dup.write_text(f'{{"format": "{POLICY_FORMAT}", "layers": {{"conv1": {{"w": 4, "w": 2, "a": 4}}}}}}')
    with pytest.raises(mixbits.MixbitsError, match="gives the key 'w' twice in one object"):
        Policy.load(dup)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(mixbits.MixbitsError, match="is nested too deeply to read"):
        Policy.load(deep)


# user factories and environment pins --------------------------------------------------------------------------------
def test_a_user_factory_that_raises_is_one_message(tmp_path, capsys):
    factory = tmp_path / "mynet.py"
    factory.write_text("def build(num_classes):\n    raise ValueError('width must be even')\n")
    err = cli_fails(["train", *TINY_RUN, "--model", f"{factory}:build", "--out", str(tmp_path / "run")], capsys)
    assert f"model '{factory}:build' raised ValueError: width must be even; fix the factory" in err
    assert not (tmp_path / "run").exists()


def test_a_bad_environment_pin_fails_only_where_it_is_used(tmp_path):
    env = {**os.environ, "MIXBITS_FUSED": "banana", "OMP_NUM_THREADS": "1"}
    version = subprocess.run([sys.executable, "-m", "mixbits", "--version"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("mixbits "), version.stderr
    code = ("import mixbits, torch\nfrom conftest import toy_net, toy_batches\n"
            "mixbits.quantize(toy_net(), 'uniform:4', toy_batches(1)[0][0])")
    used = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(__file__))
    assert used.returncode != 0
    assert "environment variable MIXBITS_FUSED must be 0 or 1, got 'banana'" in used.stderr
