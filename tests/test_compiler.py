"""When training compiles: the environment pins, the fallback to eager, one graph per policy, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import Interrupt, toy_batches, toy_net
from torch._dynamo.testing import CompileCounter

from mixbits import MixbitsError, Policy, SearchSpace, compiler
from mixbits.quant import apply_policy, calibrate, quantize_model
from mixbits.train import TrainConfig, fit


def test_environment_pins_compilation(monkeypatch):
    monkeypatch.setenv("MIXBITS_COMPILE", "0")
    assert not compiler.compile_enabled("cpu")
    monkeypatch.setenv("MIXBITS_COMPILE", "1")
    assert compiler.compile_enabled("cpu")
    monkeypatch.setenv("MIXBITS_FUSED", "1")
    assert compiler.fused_setting(False) and compiler.fused_default()
    monkeypatch.setenv("MIXBITS_FUSED", "")
    assert not compiler.fused_setting(False) and compiler.fused_setting(True)
    monkeypatch.setenv("MIXBITS_COMPILE", "yes")
    with pytest.raises(MixbitsError, match="MIXBITS_COMPILE must be 0 or 1, got 'yes'"):
        compiler.compile_enabled("cpu")


def test_without_a_c_compiler_training_warns_and_runs_eager(monkeypatch):
    monkeypatch.delenv("MIXBITS_COMPILE")
    monkeypatch.setattr(compiler, "c_compiler", lambda: None)
    compiler._warn_once.cache_clear()
    model = toy_net()
    with pytest.warns(UserWarning, match="no C compiler found"):
        fit(model, toy_batches(2), TrainConfig(epochs=1, lr=0.01, compile=True))
    assert getattr(model, "_compiled_call_impl", None) is None


def test_auto_compiles_only_runs_long_enough_to_repay_it(monkeypatch):
    monkeypatch.delenv("MIXBITS_COMPILE")
    monkeypatch.setattr(compiler, "_compiles", lambda device_type: True)
    monkeypatch.setattr(compiler, "c_compiler", lambda: "/usr/bin/c++")
    least = compiler.COMPILE_MIN_STEPS
    assert not compiler.compile_enabled("cpu", "auto", least - 1)
    assert compiler.compile_enabled("cpu", "auto", least)
    assert compiler.compile_enabled("cpu", True, 1) and not compiler.compile_enabled("cpu", False, 10 * least)
    monkeypatch.setenv("MIXBITS_COMPILE", "1")  # the pin decides for "auto" too, but never overrides false
    assert compiler.compile_enabled("cpu", "auto", 1) and not compiler.compile_enabled("cpu", False, 1)
    assert TrainConfig().compile == "auto"
    assert "train.compile: must be true, false or \"auto\", got 'yes'" in TrainConfig(compile="yes").problems()


def _quantized_toy():
    model = toy_net()
    space = SearchSpace.from_model(model, (2, 4), (2, 4))
    qmodel = quantize_model(model, space)
    calibrate(qmodel, toy_batches(1)[0][0])
    return qmodel, space


@pytest.fixture
def counted(monkeypatch) -> CompileCounter:
    """Training compiles (by default), with a backend that counts the graphs it is given and runs them eager."""
    monkeypatch.setenv("MIXBITS_COMPILE", "1")
    counter = CompileCounter()
    monkeypatch.setattr(compiler, "BACKEND", counter)
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def test_a_policy_compiles_once_however_often_it_comes_back(counted):
    qmodel, space = _quantized_toy()
    graphs = []
    for bits in (4, 2, 4, 2, 4):
        apply_policy(qmodel, Policy.uniform(space, bits))
        fit(qmodel, toy_batches(3), TrainConfig(epochs=1, lr=0.01))
        graphs.append(counted.frame_count)
    assert 0 < graphs[0] < graphs[1]  # a new policy compiles (the searchable layers' graphs) ...
    assert graphs[1:] == [graphs[1]] * 4  # ... once: coming back to it, or to the first, compiles nothing


def test_compiled_run_checkpoints_the_plain_module_and_resumes_exactly(counted, tmp_path):
    def run(run_dir, stop_at=None, resume=False):
        qmodel, space = _quantized_toy()
        apply_policy(qmodel, Policy.uniform(space, 4))
        return fit(qmodel, toy_batches(3), TrainConfig(epochs=2, lr=0.01), hooks=[Interrupt(stop_at)], run_dir=run_dir,
                   resume=resume)

    straight = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_at=1)
    resumed = run(tmp_path / "cut", resume=True)
    assert counted.frame_count >= 1
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert set(saved) == set(straight.state.module.state_dict())  # no wrapper prefix in the keys
    for name, value in straight.state.module.state_dict().items():
        assert torch.equal(value, resumed.state.module.state_dict()[name]), name
    assert [m["train_loss"] for m in straight.history] == [m["train_loss"] for m in resumed.history]
