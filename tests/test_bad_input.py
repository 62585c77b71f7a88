"""Bad input on the command line: exit code 2, one message naming the value and the fix, and no file touched."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixbits.__main__ import COMMANDS, main
from mixbits.budget import cheapest_policy
from mixbits.config import QuantConfig
from mixbits.cost import bitops, profile
from mixbits.data import DATASETS
from mixbits.models import MODELS, create
from mixbits.pipeline import search_space
from mixbits.space import POLICY_FORMAT

SMALL_CNN_LAYERS = ("conv1", "conv2", "conv3", "fc")
ALLOWED_BITS = "[2, 3, 4, 5, 6, 7, 8]"


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``directory``."""
    return {p.relative_to(directory).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _fails(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit code 2 and a one-command error prefix; return stderr."""
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"mixbits {argv[0]}: error: "), captured.err
    return captured.err


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An --out directory already holding files of an earlier run (no checkpoint, so train may use it)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("# notes of an earlier run\n")
    (out / "result.json").write_text('{"test_top1": 12.5}\n')
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return out


@pytest.fixture
def fp_copy(tiny_fp_run, tmp_path) -> Path:
    run = tmp_path / "fp"
    shutil.copytree(tiny_fp_run.dir, run)
    return run


def _train_fails(argv: list[str], out: Path, capsys) -> str:
    """``train ... --out out`` must fail without creating, changing or removing any file in ``out``."""
    before = _snapshot(out) if out.exists() else None
    err = _fails([*argv, "--out", str(out)], capsys)
    if before is None:
        assert not out.exists()
    else:
        assert _snapshot(out) == before
    return err


def _policy_file(path: Path, bits: dict[str, tuple[int, int]]) -> Path:
    layers = {name: {"w": w, "a": a} for name, (w, a) in bits.items()}
    path.write_text(json.dumps({"format": POLICY_FORMAT, "layers": layers}))
    return path


# 1. model name -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hint", [("resnet21", "Did you mean 'resnet"),
                                       ("small-cnn", "Did you mean 'small_cnn'?")])
def test_unknown_model(name, hint, tiny_fp_run, out_dir, capsys):
    argv = [*tiny_fp_run.argv, "--model", name]
    err = _train_fails(argv, out_dir, capsys)
    assert f"unknown model {name!r}; expected one of: {', '.join(MODELS.names())}." in err
    assert hint in err


# 2. dataset name -----------------------------------------------------------------------------------------------
def test_unknown_dataset(tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--data", "fashion_mnist"], out_dir, capsys)
    assert f"unknown dataset 'fashion_mnist'; expected one of: {', '.join(DATASETS.names())}." in err
    assert "Did you mean 'fashion-mnist'?" in err


# 3. policies ---------------------------------------------------------------------------------------------------
def test_policy_naming_a_layer_the_model_lacks(tiny_fp_run, out_dir, tmp_path, capsys):
    bits = {**{name: (8, 8) for name in SMALL_CNN_LAYERS}, "conv4": (4, 4)}
    policy = _policy_file(tmp_path / "policy.json", bits)
    err = _train_fails([*tiny_fp_run.argv, "--policy", str(policy)], out_dir, capsys)
    assert "layer 'conv4' is not in the model" in err


def test_policy_file_with_bits_out_of_range(tiny_fp_run, out_dir, tmp_path, capsys):
    bits = {name: (8, 8) for name in SMALL_CNN_LAYERS} | {"conv2": (9, 4)}
    policy = _policy_file(tmp_path / "policy.json", bits)
    err = _train_fails([*tiny_fp_run.argv, "--policy", str(policy)], out_dir, capsys)
    assert f"layer 'conv2': weight bits 9 not allowed, expected one of {ALLOWED_BITS}" in err


def test_uniform_policy_with_bits_out_of_range(tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--policy", "uniform:9"], out_dir, capsys)
    assert f"policy 'uniform:9': 9 bits is not a candidate; expected one of {ALLOWED_BITS}" in err
    err = _fails(["cost", "--model", "small_cnn", "--policy", "uniform:9"], capsys)
    assert f"9 bits is not a candidate; expected one of {ALLOWED_BITS}" in err


# 4. budgets ----------------------------------------------------------------------------------------------------
def test_infeasible_budget_names_the_cheapest_cost(capsys):
    model = create("small_cnn", num_classes=10, in_chans=1)
    cheapest = bitops(profile(model, (1, 28, 28)), cheapest_policy(search_space(model, QuantConfig())))
    capsys.readouterr()
    assert main(["cost", "--model", "small_cnn", "--budget", "bitops<=0.001G"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the budget check
    assert "budget bitops<=0.001G is infeasible" in captured.err
    assert f"needs {cheapest / 1e9:.3g} G BitOPs but bitops<=0.001G allows 0.001 G BitOPs" in captured.err
    assert "raise the budget or allow lower bit-widths" in captured.err


@pytest.mark.parametrize("budget,why", [
    ("bitops<0.3G", "has no '<metric><=<limit>'"),
    ("bitops<=0.3Q", "BitOPs suffix 'Q' unknown; use K, M, G, T or none"),
])
def test_malformed_budget(budget, why, capsys):
    err = _fails(["cost", "--model", "small_cnn", "--budget", budget], capsys)
    assert f"budget {budget!r} is not understood: " in err
    assert why in err and "accepted forms: bitops<=0.35G" in err


# 5. checkpoints ------------------------------------------------------------------------------------------------
@pytest.fixture
def corrupt_run(tmp_path) -> Path:
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(bytes((i * 7 + 3) % 256 for i in range(4096)))
    return run


def test_corrupt_checkpoint_given_to_eval(corrupt_run, capsys):
    before = _snapshot(corrupt_run)
    err = _fails(["eval", str(corrupt_run)], capsys)
    assert f"checkpoint {corrupt_run / 'checkpoint.pt'} is corrupt or not a mixbits checkpoint" in err
    assert _snapshot(corrupt_run) == before


def test_corrupt_checkpoint_given_as_init(corrupt_run, tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--init", str(corrupt_run)], out_dir, capsys)
    assert f"checkpoint {corrupt_run / 'checkpoint.pt'} is corrupt" in err


def test_checkpoint_of_another_model_given_as_init(tiny_fp_run, tmp_path, capsys):
    before = _snapshot(tiny_fp_run.dir)
    err = _train_fails([*tiny_fp_run.argv, "--model", "resnet20", "--init", str(tiny_fp_run.dir)],
                       tmp_path / "resnet20", capsys)
    assert f"weights in {tiny_fp_run.dir / 'checkpoint.pt'} do not fit the model" in err
    assert "missing keys" in err and "unexpected keys: " in err and "bn2.weight" in err
    assert _snapshot(tiny_fp_run.dir) == before


def test_quantized_checkpoint_given_as_init(tiny_q_run, tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--policy", "uniform:4", "--init", str(tiny_q_run.dir)], out_dir, capsys)
    assert f"--init {tiny_q_run.dir} is a quantized checkpoint; start from a float (pre-trained) one" in err


# 6. data directory ---------------------------------------------------------------------------------------------
def test_missing_data_directory(tiny_fp_run, out_dir, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--data-dir", "/nonexistent/fmnist"], out_dir, capsys)
    assert "Fashion-MNIST directory /nonexistent/fmnist does not exist" in err
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err


# 7-8. existing runs --------------------------------------------------------------------------------------------
def test_train_into_a_finished_run_without_resume(tiny_fp_run, fp_copy, capsys):
    err = _train_fails(tiny_fp_run.argv, fp_copy, capsys)
    assert "already holds a checkpoint; pass --resume to continue it or choose another --out" in err


def test_resume_with_another_learning_rate(tiny_fp_run, fp_copy, capsys):
    err = _train_fails([*tiny_fp_run.argv, "--resume", "--lr", "0.05"], fp_copy, capsys)
    assert "the training config differs (checkpoint -> now): lr 0.1 -> 0.05" in err
    assert "resume with the original settings" in err


# the module entry point ----------------------------------------------------------------------------------------
def test_python_dash_m_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "mixbits", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: mixbits ")
    for name, (_, help_text) in COMMANDS.items():
        assert name in done.stdout and help_text.split(",")[0] in done.stdout
