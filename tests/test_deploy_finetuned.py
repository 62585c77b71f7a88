"""benchmarks/deploy_finetuned.py: a fine-tuned model is kept in its cache and comes back from it unchanged,
without training again; a fine-tune stopped before its first checkpoint starts again; the McNemar p-value."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCHMARKS)]
import deploy_finetuned  # noqa: E402

from mixbits import SearchSpace  # noqa: E402
from mixbits.models import create  # noqa: E402


def test_a_cached_fine_tune_loads_the_same_model_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(deploy_finetuned, "CACHE", tmp_path)
    monkeypatch.setattr(deploy_finetuned, "MEDIUM", {**deploy_finetuned.MEDIUM, "finetune_epochs": 1})
    torch.manual_seed(0)
    float_model = create("resnet20", num_classes=10, in_chans=1, width=0.25).eval()
    train = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    space = SearchSpace.from_model(float_model, range(2, 9), range(2, 9))
    policy = deploy_finetuned.policies(space)["mixed 2/2,4/4,3/8"]
    deploy_finetuned.finetuned("resnet20", float_model, space, policy, train)
    (kept,) = tmp_path.glob("resnet20-*/model.pt")
    kept.unlink()  # as if stopped before its first epoch ended: the run directory holds only its settings
    (kept.parent / "run" / "checkpoint.pt").unlink()
    trained = deploy_finetuned.finetuned("resnet20", float_model, space, policy, train)
    assert kept.is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached fine-tune was trained again")

    monkeypatch.setattr(deploy_finetuned.mixbits, "finetune", no_training)
    loaded = deploy_finetuned.finetuned("resnet20", float_model, space, policy, train)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    for layer, name in ((loaded, "loaded"), (trained, "trained")):
        assert not layer.training, f"the {name} model is returned in training mode"


def test_mcnemar_p_is_one_for_an_even_split_and_small_for_a_one_sided_one():
    assert deploy_finetuned.mcnemar_p(0, 0) == 1.0
    assert deploy_finetuned.mcnemar_p(7, 7) == 1.0
    assert deploy_finetuned.mcnemar_p(10, 0) == pytest.approx(2 / 1024)  # ten fair coins all one way, both tails
    assert deploy_finetuned.mcnemar_p(3, 9) == deploy_finetuned.mcnemar_p(9, 3) == pytest.approx(2 * 299 / 4096)
