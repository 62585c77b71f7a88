"""The shared training loop: fitting, schedule, parameter groups, distillation, objectives, hooks, BN, evaluation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyLoader
from torch import nn

from mixbits.errors import MixbitsError
from mixbits.train import (
    Hook,
    StepOutput,
    TrainConfig,
    TrainState,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
    kd_loss,
    load_checkpoint,
    param_groups,
    recalibrate_bn,
    supervised_objective,
)

EXPECTED_KEYS = {"epoch", "step", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "seconds"}


def toy_data(n: int = 256, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two linearly separable classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def mlp(seed: int = 0, dim: int = 8, hidden: int = 16, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(dim, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.ReLU(), nn.Linear(hidden, 2)]
    return nn.Sequential(*layers)


def test_fit_learns_separable_problem_and_logs(tmp_path):
    x, y = toy_data()
    cfg = TrainConfig(epochs=5, lr=0.1, warmup_epochs=1)
    result = fit(mlp(), ToyLoader(x, y), cfg, val_loader=ToyLoader(x, y, batch_size=128), run_dir=tmp_path)

    assert result.history[-1]["train_top1"] > 90
    assert result.history[-1]["val_top1"] > 90
    assert result.state.step == 5 * 8 and result.state.epoch == 5
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    for i, line in enumerate(lines):
        entry = json.loads(line)
        assert EXPECTED_KEYS <= entry.keys()
        assert entry["epoch"] == i + 1 and entry["step"] == (i + 1) * 8
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 5 and ckpt["format"] == "mixbits.checkpoint/1"
    assert len(ckpt["history"]) == 5


def test_warmup_cosine_schedule_matches_formula():
    cfg = TrainConfig(epochs=10, lr=0.1, min_lr=0.01, warmup_epochs=2)
    steps_per_epoch, warmup, total = 5, 10, 50
    opt = build_optimizer([nn.Parameter(torch.zeros(3))], cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])  # the lr the step uses
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])

    def expected(s):
        if s < warmup:
            return 0.1 * s / warmup
        return 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    for s in (0, 5, warmup - 1, warmup, 30, 49, total):
        assert lrs[s] == pytest.approx(expected(s), abs=1e-12), s
    assert lrs[0] == 0 and lrs[warmup] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.055)
    assert lrs[total] == pytest.approx(0.01)


class QuantNet(nn.Module):
    no_weight_decay = {"head.weight"}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.w_steps = nn.Parameter(torch.ones(4, 1))  # a quantizer step size with ndim 2
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_split_decay():
    groups = param_groups(QuantNet(), weight_decay=1e-4)
    by_decay = {g["weight_decay"]: set(g["names"]) for g in groups}
    assert by_decay[1e-4] == {"conv.weight"}
    assert by_decay[0.0] == {"conv.bias", "bn.weight", "bn.bias", "w_steps", "head.weight", "head.bias"}
    for g in groups:
        assert len(g["params"]) == len(g["names"])
    opt = build_optimizer(groups, TrainConfig(weight_decay=1e-4))
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


def test_config_problems_name_every_bad_field():
    assert TrainConfig().problems() == []
    problems = TrainConfig(lr=-1, optimizer="sgdd", min_lr="1e-3", epochs=0, grad_clip=0).problems()
    text = "\n".join(problems)
    assert "train.lr: must be a number > 0, got -1" in text
    assert "Did you mean 'sgd'?" in text
    assert "train.min_lr" in text and "1.0e-3" in text
    assert "train.epochs" in text and "train.grad_clip" in text
    with pytest.raises(MixbitsError, match="train.lr"):
        x, y = toy_data(32)
        fit(mlp(), ToyLoader(x, y), TrainConfig(lr=-1))


def test_kd_loss():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    assert kd_loss(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, t, 4.0).item() > 0
    p_t = F.softmax(t / 2, -1)
    manual = 4 * (p_t * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean()
    assert kd_loss(s, t, 2.0).item() == pytest.approx(manual.item(), rel=1e-5)


def test_supervised_objective_with_self_teacher_is_zero():
    model = mlp(bn=False)
    x, y = toy_data(16)
    cfg = TrainConfig(kd_alpha=1.0)
    state = TrainState(model, None, None, cfg, torch.device("cpu"), teacher=model)
    out = supervised_objective(state, x, y)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert out.loss.requires_grad and out.logits.shape == (16, 2) and "kd" in out.metrics


class Recorder(Hook):
    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    def on_train_start(self, state):
        self.log.append((self.tag, "train_start", state.epoch, state.step))

    def on_epoch_start(self, state):
        self.log.append((self.tag, "epoch_start", state.epoch, state.step))

    def after_backward(self, state):
        assert all(p.grad is not None for p in state.model.parameters())
        self.log.append((self.tag, "after_backward", state.epoch, state.step))

    def after_step(self, state):
        self.log.append((self.tag, "after_step", state.epoch, state.step))

    def on_epoch_end(self, state, metrics):
        metrics[f"{self.tag}_calls"] = len(self.log)
        self.log.append((self.tag, "epoch_end", state.epoch, state.step))


def test_hooks_called_in_order():
    x, y = toy_data(96)
    log = []
    result = fit(mlp(), ToyLoader(x, y), TrainConfig(epochs=2), hooks=[Recorder("a", log), Recorder("b", log)])
    expected = [("train_start", 0, 0)]
    step = 0
    for epoch in range(2):
        expected.append(("epoch_start", epoch, step))
        for _ in range(3):
            expected.append(("after_backward", epoch, step))
            step += 1
            expected.append(("after_step", epoch, step))
        expected.append(("epoch_end", epoch, step))
    assert log == [(tag, *e) for e in expected for tag in ("a", "b")]
    assert "a_calls" in result.history[0] and "b_calls" in result.history[1]


def test_objective_with_own_backward_is_not_backpropagated_twice():
    x, y = toy_data(32)
    model = mlp(bn=False)
    reference = copy.deepcopy(model)
    seen = {}

    def accumulate(state, xb, yb):
        total = 0.0
        for half in (slice(0, 16), slice(16, 32)):
            loss = F.cross_entropy(state.model(xb[half]), yb[half]) / 2
            loss.backward()
            total += loss.detach()
        return StepOutput(total, None, {"halves": 2.0})

    class Grab(Hook):
        def after_backward(self, state):
            seen.update({n: p.grad.clone() for n, p in state.model.named_parameters()})

    result = fit(model, ToyLoader(x, y, batch_size=32), TrainConfig(epochs=1), objective=accumulate, hooks=[Grab()])
    # The loader's only batch, in its (seed, epoch) order.
    xb, yb = next(iter(ToyLoader(x, y, batch_size=32)))
    F.cross_entropy(reference(xb), yb).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(seen[name], p.grad)
    assert result.history[0]["halves"] == 2.0 and result.history[0]["train_top1"] is None


def test_nan_loss_names_step_and_checkpoint(tmp_path):
    x, y = toy_data(128)

    def poisoned(state, xb, yb):
        out = supervised_objective(state, xb, yb)
        return StepOutput(out.loss * math.nan, out.logits) if state.step == 5 else out

    with pytest.raises(MixbitsError, match="step 6") as err:
        fit(mlp(), ToyLoader(x, y), TrainConfig(epochs=3), objective=poisoned, run_dir=tmp_path)
    assert "epoch 2/3" in str(err.value) and str(tmp_path / "checkpoint.pt") in str(err.value)
    assert "learning rate" in str(err.value)
    with pytest.raises(MixbitsError, match="none yet"):
        fit(mlp(), ToyLoader(x, y), TrainConfig(epochs=3), objective=poisoned)


def test_recalibrate_bn_matches_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=0.1), nn.Dropout(0.5))
    model.eval()
    batches = [(torch.randn(32, 4) * 2 + 3, torch.zeros(32)) for _ in range(5)]
    with torch.no_grad():
        feats = [model[0](b[0]) for b in batches]
    used = recalibrate_bn(model, batches)
    bn = model[1]
    assert used == 5
    torch.testing.assert_close(bn.running_mean, torch.cat(feats).mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, torch.stack([f.var(0) for f in feats]).mean(0), rtol=1e-4, atol=1e-4)
    assert bn.momentum == 0.1 and not model.training and not bn.training and not model[2].training
    assert recalibrate_bn(model, batches, num_batches=2) == 2
    torch.testing.assert_close(bn.running_mean, torch.cat(feats[:2]).mean(0), rtol=1e-5, atol=1e-5)
    # Nothing to use: statistics stay as they were.
    before = bn.running_mean.clone()
    assert recalibrate_bn(model, iter(())) == 0
    assert torch.equal(bn.running_mean, before)


def test_recalibrate_bn_without_bn_consumes_nothing():
    model = mlp(bn=False)
    it = iter([(torch.randn(4, 8), None)] * 3)
    assert recalibrate_bn(model, it) == 0
    assert len(list(it)) == 3


class Identity(nn.Module):
    """Returns its input, so the 'images' are the logits."""

    def forward(self, x):
        return x


def test_evaluate_known_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])  # three of four right
    model = Identity().train()
    out = evaluate(model, [(logits[:2], labels[:2]), (logits[2:], labels[2:])])
    assert out["top1"] == pytest.approx(75.0) and out["samples"] == 4
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert model.training
    assert evaluate(model, [(logits[:2], labels[:2]), (logits[2:], labels[2:])], max_batches=1)["top1"] == 100.0
    with pytest.raises(MixbitsError, match="no samples"):
        evaluate(model, [])


def test_checkpoint_written_by_fit_loads_weights_only(tmp_path):
    x, y = toy_data(64)
    fit(mlp(), ToyLoader(x, y), TrainConfig(epochs=1), run_dir=tmp_path, extra_state={"method": "toy"})
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["extra"] == {"method": "toy"} and ckpt["train_config"]["epochs"] == 1
    assert isinstance(ckpt["generator"], torch.Tensor) and isinstance(ckpt["rng"]["torch"], torch.Tensor)
