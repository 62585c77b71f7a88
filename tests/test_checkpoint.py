"""Checkpoint files, strict model loading, RNG state, and bit-identical resume of the training loop."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import Interrupt, ToyLoader
from torch import nn

from mixbits.errors import MixbitsError
from mixbits.train import (
    Hook,
    StepOutput,
    TrainConfig,
    fit,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    supervised_objective,
)


def toy_loader(n: int = 192, batch_size: int = 32, seed: int = 0) -> ToyLoader:
    """Features whose label is the sign of x0 - x2, in batches shuffled by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return ToyLoader(x, (x[:, 0] - x[:, 2] > 0).long(), batch_size, seed)


def mlp(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 2))


# --- files -------------------------------------------------------------------------------------------------------


def test_save_load_roundtrip_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    payload = {"t": torch.arange(3), "nested": {"a": [1, 2.5, None, True, "x"]}, "tup": (1, 2)}
    save_checkpoint(path, payload)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]  # no temporary left behind
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "mixbits.checkpoint/1"
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["t"], payload["t"]) and loaded["nested"] == payload["nested"]


def test_save_rejects_what_weights_only_cannot_load(tmp_path):
    with pytest.raises(MixbitsError, match=r"checkpoint\['hooks'\]\[0\]\['score'\].*numpy"):
        save_checkpoint(tmp_path / "ck.pt", {"hooks": [{"score": np.float32(1.0)}]})
    assert not (tmp_path / "ck.pt").exists()


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(MixbitsError, match="does not exist") as err:
        load_checkpoint(tmp_path / "missing.pt")
    assert "missing.pt" in str(err.value)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MixbitsError, match="corrupt or not a mixbits checkpoint"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(MixbitsError, match="expected format"):
        load_checkpoint(foreign)


def test_load_model_state_reports_every_mismatch_and_loads_nothing():
    narrow, wide = mlp(hidden=16), mlp(seed=1, hidden=32)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    state = dict(narrow.state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["4.bias"]
    with pytest.raises(MixbitsError) as err:
        load_model_state(wide, state, "runs/a/checkpoint.pt")
    msg = str(err.value)
    assert "runs/a/checkpoint.pt" in msg and "--width" in msg
    assert "0.weight (checkpoint (16, 8), model (32, 8))" in msg
    assert "1 missing keys: 4.bias" in msg and "1 unexpected keys: extra.weight" in msg
    for k, v in wide.state_dict().items():
        assert torch.equal(v, before[k]), k
    load_model_state(narrow, narrow.state_dict(), "same")  # a fitting state loads


def test_load_model_state_truncates_long_lists():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    with pytest.raises(MixbitsError, match=r"16 missing keys: .*\.\.\. and 6 more"):
        load_model_state(model, {}, "empty.pt")


def test_rng_state_roundtrip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    first = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


# --- resume ------------------------------------------------------------------------------------------------------


class Counter(Hook):
    """Counts steps; its count must survive a resume."""

    def __init__(self):
        self.steps = 0

    def after_step(self, state):
        self.steps += 1

    def on_epoch_end(self, state, metrics):
        metrics["hook_steps"] = self.steps

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def noisy_objective(state, x, y):
    """Uses the checkpointed generator, so resume must restore it too."""
    noise = torch.randn(x.shape, generator=state.generator) * 0.1
    out = supervised_objective(state, x + noise, y)
    return StepOutput(out.loss, out.logits, {"noise": noise.abs().mean().item()})


CFG = dict(epochs=4, lr=0.05, warmup_epochs=1, min_lr=0.001, seed=3)


def run(tmp_dir, hooks, model=None, resume=False, **overrides):
    cfg = TrainConfig(**{**CFG, **overrides})
    return fit(model or mlp(), toy_loader(), cfg, val_loader=toy_loader(n=64, seed=9), objective=noisy_objective,
               hooks=hooks, run_dir=tmp_dir, resume=resume)


def without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.parametrize("every,stop", [(1, 2), (2, 3)])
def test_resume_is_bit_identical(tmp_path, every, stop):
    straight = run(tmp_path / "a", [Counter(), Interrupt(None)], checkpoint_every=every)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", [Counter(), Interrupt(stop)], checkpoint_every=every)
    # Epoch 3 finished but was never checkpointed (every=2): its line is dropped on resume.
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == stop
    counter = Counter()
    resumed = run(tmp_path / "b", [counter, Interrupt(None)], model=mlp(seed=123), resume=True, checkpoint_every=every)

    a, b = straight.state.model.state_dict(), resumed.state.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert without_seconds(straight.history) == without_seconds(resumed.history)
    assert counter.steps == 4 * 6 and resumed.history[-1]["hook_steps"] == 24
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_resume_of_finished_run_returns_stored_history(tmp_path):
    first = run(tmp_path, [Counter()], epochs=2)
    model = mlp(seed=7)
    again = run(tmp_path, [Counter()], model=model, resume=True, epochs=2)
    assert again.history == first.history and again.state.step == first.state.step
    for k, v in first.state.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_refuses_to_overwrite_or_resume_nothing(tmp_path):
    with pytest.raises(MixbitsError, match="nothing to resume.*drop --resume"):
        run(tmp_path, [], resume=True, epochs=1)
    run(tmp_path, [], epochs=1)
    with pytest.raises(MixbitsError, match="already holds a checkpoint; pass --resume"):
        run(tmp_path, [], epochs=1)


def test_resume_with_other_config_names_the_field(tmp_path):
    run(tmp_path, [], epochs=1)
    with pytest.raises(MixbitsError, match=r"lr 0\.05 -> 0\.1") as err:
        run(tmp_path, [], resume=True, epochs=1, lr=0.1)
    assert "momentum" not in str(err.value)
    run(tmp_path, [], resume=True, epochs=1, checkpoint_every=5)  # bookkeeping fields may change
    with pytest.raises(MixbitsError, match="saved with 0 hooks, this run has 2"):
        run(tmp_path, [Counter(), Counter()], resume=True, epochs=1)


def test_a_setting_added_after_the_checkpoint_counts_as_its_default(tmp_path):
    run(tmp_path, [], epochs=1)
    path = tmp_path / "checkpoint.pt"
    saved = load_checkpoint(path)
    del saved["train_config"]["ebr_weight"]  # as written before the setting existed
    save_checkpoint(path, saved)
    run(tmp_path, [], resume=True, epochs=1)  # the default 0.0: same training, resumes
    with pytest.raises(MixbitsError, match=r"ebr_weight 0\.0 -> 0\.5"):
        run(tmp_path, [], resume=True, epochs=1, ebr_weight=0.5)


def test_resumed_model_of_another_width_is_refused(tmp_path):
    run(tmp_path, [], epochs=1)
    with pytest.raises(MixbitsError, match="shape mismatches"):
        run(tmp_path, [], model=mlp(hidden=32), resume=True, epochs=1)

