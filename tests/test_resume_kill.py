"""The real CLI as a subprocess: a run killed with SIGKILL, or stopped with SIGTERM, resumes to exactly the
result of an uninterrupted run; a diverging run exits 2 naming the step and the last checkpoint."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mixbits.rundir import MARKER
from mixbits.train import Hook, Stopped, TrainConfig, fit, load_checkpoint, stop_on_signals

EPOCHS = 3
# One thread per process: faster on a busy machine, and the same float reduction order in every run.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_fashion_mnist(root: Path, n_train: int, n_test: int) -> Path:
    """Random images in the Fashion-MNIST file format: the real reader, a few hundred samples, no download."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return root


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion-mnist"), n_train=1000, n_test=100)


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """Uniform W4A4 QAT of a narrow small_cnn for EPOCHS epochs (well under a second each)."""
    return [sys.executable, "-m", "mixbits", "train", "--model", "small_cnn", "--data-dir", str(data_dir),
            "--epochs", str(EPOCHS), "--batch-size", "32", "--policy", "uniform:4", "--out", str(out),
            "--set", "quant.fused=false", "--set", "model.kwargs.channels=8", *extra]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run, the one every interrupted-and-resumed run must reproduce.

    It runs in the background while the first test interrupts its own run; call the fixture's value
    to wait for it and get its directory.
    """
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.Popen(train_args(data_dir, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def finished() -> Path:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        return out

    yield finished
    proc.kill()
    proc.communicate()


def start_and_wait_for_checkpoint(data_dir: Path, out: Path) -> subprocess.Popen:
    """Start a run and return once epoch 1 is logged and checkpointed (the process is then in epoch 2)."""
    proc = subprocess.Popen(train_args(data_dir, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics, checkpoint = out / "metrics.jsonl", out / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not (checkpoint.exists() and metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never checkpointed epoch 1 (exit {proc.poll()}): {proc.communicate()[1][-2000:]}")
        time.sleep(0.01)
    return proc


def finished_epochs(out: Path) -> int:
    return int(torch.load(out / "checkpoint.pt", weights_only=True)["epoch"])


def assert_same_run(expected: Path, actual: Path) -> None:
    """Same test accuracy, bit-identical weights and the same metric history (timings aside)."""
    want, got = (json.loads((d / "result.json").read_text()) for d in (expected, actual))
    assert got["test_top1"] == want["test_top1"] and got["test_loss"] == want["test_loss"]
    want_model, got_model = (torch.load(d / "checkpoint.pt", weights_only=True)["model"] for d in (expected, actual))
    assert want_model.keys() == got_model.keys()
    for name, tensor in want_model.items():
        assert torch.equal(tensor, got_model[name]), name
    strip = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for d in (expected, actual) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert strip[:EPOCHS] == strip[EPOCHS:]


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_and_wait_for_checkpoint(data_dir, out)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= finished_epochs(out) < EPOCHS and not (out / "result.json").exists()

    resumed = run_cli(train_args(data_dir, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference(), out)


def test_sigterm_stops_at_a_step_with_exit_143_and_resumes_to_the_same_result(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_and_wait_for_checkpoint(data_dir, out)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "continue with --resume" in stderr
    assert "Traceback" not in stderr
    assert 1 <= finished_epochs(out) < EPOCHS and not (out / "result.json").exists()
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != MARKER]
    assert not leftovers, "a half-written temporary file was left"

    resumed = run_cli(train_args(data_dir, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference(), out)


def test_diverging_run_exits_2_naming_the_step_and_the_checkpoint(data_dir, tmp_path):
    done = run_cli(train_args(data_dir, tmp_path / "run", "--lr", "1e6"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("mixbits train: error: training diverged: loss ")  # finite, but far above 2.3
    assert "at epoch 1/3, step " in message and "last good checkpoint: none yet" in message
    assert "train.lr is 1000000.0" in message
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


class SignalAt(Hook):
    """Sends this process SIGTERM right after optimiser step ``at``; counts the steps that ran."""

    def __init__(self, at: int):
        self.at, self.steps = at, 0

    def after_step(self, state) -> None:
        self.steps = state.step
        if state.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_inside_fit_stops_at_the_next_step_boundary_keeping_the_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)]
    hook = SignalAt(6)  # the second step of epoch 2
    with stop_on_signals(), pytest.raises(Stopped) as stopped:
        fit(nn.Linear(4, 2), batches, TrainConfig(epochs=3, lr=0.1), hooks=[hook], run_dir=tmp_path)
    assert stopped.value.exit_code == 143 and "SIGTERM" in str(stopped.value)
    assert hook.steps == 6  # the step in flight finished; no further optimiser step ran
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_sigterm_outside_fit_stops_at_once():
    with stop_on_signals(), pytest.raises(Stopped):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
