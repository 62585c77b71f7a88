"""benchmarks/lm/train_tiny_lm.py: a run stopped by its time limit resumes to the same weights, and a finished
run is a cache hit."""

from __future__ import annotations

import importlib.util
import json
import sys
import sysconfig
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lm" / "train_tiny_lm.py"
EMAIL = Path(sysconfig.get_paths()["stdlib"]) / "email"  # a small corner of the same corpus


def run(monkeypatch, out: Path, *extra: str) -> None:
    spec = importlib.util.spec_from_file_location("train_tiny_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["train_tiny_lm.py", "--out", str(out), "--steps", "4", "--batch", "2", "--width", "48", "--layers", "1",
            "--eval-windows", "8", "--corpus-root", str(EMAIL), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()


def test_a_stopped_run_resumes_to_the_same_weights_and_a_finished_one_is_reused(tmp_path, monkeypatch, capsys):
    run(monkeypatch, tmp_path / "whole")
    run(monkeypatch, tmp_path / "split", "--max-minutes", "0")  # stops after its first step, checkpointed
    assert "run again to continue" in capsys.readouterr().out and not (tmp_path / "split" / "model.pt").exists()
    run(monkeypatch, tmp_path / "split")
    assert "resuming at step 1" in capsys.readouterr().out
    whole, split = (torch.load(tmp_path / d / "model.pt")["model"] for d in ("whole", "split"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    record = json.loads((tmp_path / "split" / "record.json").read_text())
    assert record["steps"] == 4 and 1 < record["held_out_ppl"] < 256
    run(monkeypatch, tmp_path / "split")  # finished with these settings: prints the record, trains nothing
    assert json.loads(capsys.readouterr().out) == record
