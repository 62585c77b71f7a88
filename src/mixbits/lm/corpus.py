"""A byte-level text corpus every machine has: the Python standard library's own ``.py`` files.

Files are split into train and held-out by a hash of their path relative to the library root, so the
split is the same on every run and does not move when a file is added elsewhere. Bytes are the tokens
(vocabulary 256), so there is no tokenizer to download. The library differs between Python versions:
``describe()`` records which one was read.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path

import torch

_SKIP = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Every ``.py`` file under the standard library, sorted by relative path (installed packages left out)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(relative: str, percent: int = 10) -> bool:
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 100 < percent


def load_split(root: str | Path | None = None, held_out_percent: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, held-out bytes) as uint8 tensors; files joined in path order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for path in stdlib_files(root):
        parts[is_held_out(path.relative_to(root).as_posix(), held_out_percent)].append(path.read_bytes())
    train, held = (torch.frombuffer(bytearray(b"".join(parts[k])), dtype=torch.uint8) for k in (False, True))
    return train, held


def describe(train: torch.Tensor, held: torch.Tensor) -> dict:
    return {"corpus": "python-stdlib", "python": platform.python_version(), "train_bytes": int(train.numel()),
            "held_out_bytes": int(held.numel())}


def random_windows(data: torch.Tensor, n: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` windows of ``context + 1`` bytes at random offsets (inputs and next-byte targets), as int64."""
    starts = torch.randint(0, data.numel() - context - 1, (n,), generator=generator)
    return torch.stack([data[s:s + context + 1] for s in starts.tolist()]).long()


def fixed_windows(data: torch.Tensor, n: int, context: int) -> torch.Tensor:
    """The first ``n`` non-overlapping windows of ``context + 1`` bytes: the same evaluation text every time."""
    step = context + 1
    if data.numel() < n * step:
        raise ValueError(f"held-out text has {data.numel()} bytes, fewer than {n} windows of {step}")
    return data[:n * step].view(n, step).long()
