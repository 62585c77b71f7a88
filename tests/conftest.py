"""Shared fixtures: one tiny float run and one uniform-W4A4 run of small_cnn, trained once per test session."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

# Eager quantizers and eager models: no kernel compilation inside the suite (before mixbits is imported, which
# reads them); set either to 1 in the environment to run the tests compiled.
os.environ.setdefault("MIXBITS_FUSED", "0")
os.environ.setdefault("MIXBITS_COMPILE", "0")

from mixbits.train import Hook  # noqa: E402  (after the pins above)

# Settings every CLI run in the tests shares: small_cnn, 1 epoch on 512 images, eager quantizers (no compiler).
TINY_RUN = ["--model", "small_cnn", "--epochs", "1", "--set", "data.max_train_samples=512",
            "--set", "quant.fused=false"]


@pytest.fixture(scope="session")
def tiny_fp_run(tmp_path_factory) -> SimpleNamespace:
    """A finished float run (``mixbits train``); ``argv`` re-creates it given ``--out``. Treat it as read-only."""
    from mixbits.__main__ import main

    out = tmp_path_factory.mktemp("runs") / "fp"
    assert main(["train", *TINY_RUN, "--out", str(out)]) == 0
    return SimpleNamespace(dir=out, argv=["train", *TINY_RUN])


@pytest.fixture(scope="session")
def tiny_q_run(tiny_fp_run) -> SimpleNamespace:
    """A finished uniform:4 QAT run started from ``tiny_fp_run``. Treat it as read-only."""
    from mixbits.__main__ import main

    out = Path(tiny_fp_run.dir).parent / "w4a4"
    argv = ["train", *TINY_RUN, "--policy", "uniform:4", "--init", str(tiny_fp_run.dir), "--lr", "0.01"]
    assert main([*argv, "--out", str(out)]) == 0
    return SimpleNamespace(dir=out, argv=argv)


@pytest.fixture
def fp_copy(tiny_fp_run, tmp_path) -> Path:
    """A copy of ``tiny_fp_run``'s directory that a test may change."""
    run = tmp_path / "fp"
    shutil.copytree(tiny_fp_run.dir, run)
    return run


@pytest.fixture
def q_copy(tiny_q_run, tmp_path) -> Path:
    """A copy of ``tiny_q_run``'s directory that a test may change."""
    run = tmp_path / "w4a4"
    shutil.copytree(tiny_q_run.dir, run)
    return run


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``directory``."""
    return {p.relative_to(directory).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def cli_fails(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit code 2 and a one-command error prefix; return stderr."""
    from mixbits.__main__ import main

    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"mixbits {argv[0]}: error: "), captured.err
    return captured.err


def toy_net() -> nn.Sequential:
    """Three convolutions (two with BatchNorm) and a linear head on 1x8x8 inputs, 3 classes: the searches' toy model.

    Its quantizable layers are named "0", "3", "6" and "10"; the first and the last are fixed by default.
    """
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def toy_batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded batches of 16 random 1x8x8 inputs with labels in 0..2: a loader for toy_net."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


class Interrupt(Hook):
    """A training hook that stops a run at the start of epoch ``at_epoch`` (None: never), as Ctrl-C would."""

    def __init__(self, at_epoch: int | None):
        self.at_epoch = at_epoch

    def on_epoch_start(self, state):
        if state.epoch == self.at_epoch:
            raise KeyboardInterrupt


class ToyLoader:
    """Shuffled mini-batches whose order depends only on (seed, epoch)."""

    def __init__(self, x, y, batch_size: int = 32, seed: int = 0):
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def toy_image_loader(n: int = 96, seed: int = 0):
    """A real BatchLoader over random 8x8 one-channel images of 3 classes (the differentiable searches' data)."""
    from mixbits.data import BatchLoader, ImageDataset

    gen = torch.Generator().manual_seed(seed)
    ds = ImageDataset(torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8),
                      torch.randint(0, 3, (n,), generator=gen), 3, (0.5,), (0.25,), "toy")
    return BatchLoader(ds, 16, train=True, seed=seed)


def toy_search_context(budgets, options=None, bits=(2, 4, 6)):
    """A search context over ``toy_net`` quantized to ``bits``, calibrated, with toy image loaders."""
    from mixbits import SearchSpace
    from mixbits.cost import profile
    from mixbits.quant import calibrate, quantize_model
    from mixbits.search import SearchContext

    model = toy_net()
    space = SearchSpace.from_model(model, bits, bits)
    qmodel = quantize_model(model, space)
    train = toy_image_loader()
    calibrate(qmodel, next(iter(train))[0])
    return SearchContext(model=qmodel, space=space, stats=profile(model, (1, 8, 8)), budgets=budgets,
                         train_loader=train, val_loader=toy_image_loader(32, seed=1), options=options or {},
                         float_model=model.eval())


def interrupted_and_resumed(method, make_context, owner, name, crash_when, tmp_path, monkeypatch):
    """``method`` run whole, and run again with ``owner.name(self, state)`` raising KeyboardInterrupt once
    ``crash_when(self, state)`` holds, then resumed from its run directory. ``make_context()`` builds a fresh
    search context each time. Returns the contexts and results: ``whole``, ``expected``, ``again``, ``resumed``."""
    from mixbits.search import run_searcher

    whole = make_context()
    whole.run_dir = tmp_path / "whole"
    expected = run_searcher(method, whole)
    original = getattr(owner, name)

    def crashing(self, state, *args):
        if crash_when(self, state):
            raise KeyboardInterrupt
        return original(self, state, *args)

    cut = make_context()
    cut.run_dir = tmp_path / "cut"
    monkeypatch.setattr(owner, name, crashing)
    with pytest.raises(KeyboardInterrupt):
        run_searcher(method, cut)
    monkeypatch.setattr(owner, name, original)
    again = make_context()
    again.run_dir, again.resume = tmp_path / "cut", True
    return SimpleNamespace(whole=whole, expected=expected, again=again, resumed=run_searcher(method, again))
