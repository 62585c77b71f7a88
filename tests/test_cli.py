"""The command line end to end on real Fashion-MNIST: list, train (float, then QAT), eval, cost, resume."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from mixbits.__main__ import main
from mixbits.config import shipped_configs
from mixbits.cost import bitops, profile, size_bytes
from mixbits.data import DATASETS
from mixbits.models import MODELS
from mixbits.pipeline import load_trained

RUN_FILES = {"checkpoint.pt", "config.yaml", "metrics.jsonl", "result.json"}


def _listed(out: str, kind: str) -> list[str]:
    """Names listed under ``kind:`` in `mixbits list` output."""
    section = out.split(f"{kind}:\n", 1)[1].split("\n\n", 1)[0]
    names = []
    for line in section.splitlines():
        if not line.startswith("  "):
            break
        names.append(line.split()[0])
    return names


def test_list_everything(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert _listed(out, "models") == MODELS.names()
    assert _listed(out, "datasets") == DATASETS.names()
    assert _listed(out, "configs") == list(shipped_configs())
    assert {"small_cnn", "resnet20", "fashion-mnist", "fmnist-fp", "fmnist-qat"} <= set(out.split())


def test_list_models_only(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("models:\n")
    assert _listed(out, "models") == MODELS.names()
    assert "datasets:" not in out and "configs:" not in out


def test_train_float_then_qat_then_eval_and_cost(tiny_fp_run, tiny_q_run, capsys):
    for run in (tiny_fp_run, tiny_q_run):
        assert {p.name for p in run.dir.iterdir()} >= RUN_FILES
        lines = (run.dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1]

    fp = json.loads((tiny_fp_run.dir / "result.json").read_text())
    assert fp["model"] == "small_cnn" and "bitops" not in fp and 0 <= fp["test_top1"] <= 100

    result = json.loads((tiny_q_run.dir / "result.json").read_text())
    assert result["policy"] == "conv1:8/8 conv2:4/4 conv3:4/4 fc:8/8"
    _, card, _ = load_trained(tiny_q_run.dir)
    stats = profile(card.float_model(), card.input_shape)
    assert result["bitops"] == bitops(stats, card.policy) > 0
    assert result["size_bytes"] == size_bytes(stats, card.policy) > 0

    capsys.readouterr()
    assert main(["eval", str(tiny_q_run.dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1"] == result["test_top1"]
    assert evaluated["loss"] == result["test_loss"]
    assert evaluated["samples"] == 10000 and evaluated["policy"] == result["policy"]

    assert main(["cost", str(tiny_q_run.dir)]) == 0
    table = capsys.readouterr().out
    total = re.search(r"^total: .*BitOPs ([\d.eE+-]+) G", table, re.M)
    assert total, table
    assert float(total.group(1)) == float(f"{result['bitops'] / 1e9:.4g}")
    for layer, bits in (("conv1", "8  8"), ("conv2", "4  4"), ("conv3", "4  4"), ("fc", "8  8")):
        assert re.search(rf"^{layer}\s.*\s{bits}\s", table, re.M), layer


def test_resume_of_a_finished_run_keeps_its_checkpoint(tiny_fp_run, tmp_path, capsys):
    run = tmp_path / "fp"
    shutil.copytree(tiny_fp_run.dir, run)
    before = (run / "checkpoint.pt").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    assert main([*tiny_fp_run.argv, "--out", str(run), "--resume"]) == 0
    assert (run / "checkpoint.pt").read_bytes() == before
    assert (run / "metrics.jsonl").read_text() == metrics
    printed = json.loads(capsys.readouterr().out)
    original = json.loads((tiny_fp_run.dir / "result.json").read_text())
    assert printed["test_top1"] == original["test_top1"]


@pytest.mark.parametrize("reference,verdict", [("uniform:3", "OVER"), ("uniform:5", "within")])
def test_cost_budget_verdict(reference, verdict, capsys):
    budget = f"bitops<={reference}"
    assert main(["cost", "--model", "small_cnn", "--policy", "uniform:4", "--budget", budget]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("budget "))
    assert line.startswith(f"budget {budget}: {verdict} (bitops slack ")
    slack = float(line.rsplit(" ", 1)[1].rstrip(")"))
    assert (slack < 0) == (verdict == "OVER")
