"""Checkpoint files (atomic writes, weights-only loads, strict model loading, RNG state) and run directories."""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..errors import MixbitsError
from ..utils import atomic_write_bytes

if TYPE_CHECKING:  # the loop imports this module
    from .loop import Hook, TrainState

FORMAT = "mixbits.checkpoint/1"
CHECKPOINT = "checkpoint.pt"  # inside a run directory
_RESUME_IGNORES = {"checkpoint_every", "compile"}  # config fields that may change between a run and its resume
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)
_SHOWN = 10  # entries listed per kind of mismatch


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` plus the format tag; a crash mid-write leaves the previous file intact.

    The payload may hold only tensors, dicts, lists, tuples, str, int, float, bool and None, so that
    :func:`load_checkpoint` can read it with ``weights_only=True``; anything else raises here, at save
    time, naming where it sits.
    """
    payload = {**payload, "format": FORMAT}
    _check_plain(payload, "checkpoint")
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _check_plain(obj, where: str) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise MixbitsError(f"{where} has a key {k!r} of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise MixbitsError(
            f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which a weights-only load cannot read; "
            "store tensors, dicts, lists, str, int, float, bool or None (e.g. call .item() or .tolist())"
        )


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (always on CPU, never unpickling code)."""
    path = Path(path)
    if not path.is_file():
        raise MixbitsError(f"checkpoint {path} does not exist; check the path (or the run directory)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling/zip error means the same thing to the user
        raise MixbitsError(f"checkpoint {path} is corrupt or not a mixbits checkpoint ({_load_failure(e)})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise MixbitsError(
            f"checkpoint {path} is not a mixbits checkpoint: expected format {FORMAT!r}, found {found!r}; "
            "was it written by another tool or another mixbits version?"
        )
    return payload


def _load_failure(e: Exception) -> str:
    """Why a weights-only load failed, in our words: torch's own text advises turning the safe load off."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if found:
        return (f"it holds Python objects such as {found.group(1)}, which mixbits never loads because loading them "
                "can run code; mixbits checkpoints hold only tensors and plain data")
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}".rstrip(": ")[:200]


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state_dict`` into ``model``, or raise one error listing every mismatch.

    Everything is checked before anything is copied, so a failed load leaves the model untouched.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and isinstance(expected[k], torch.Tensor)
        and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [_listing("missing keys", missing), _listing("unexpected keys", unexpected),
                 _listing("shape mismatches", shapes)]
        raise MixbitsError(
            f"weights in {source} do not fit the model: " + "; ".join(p for p in parts if p)
            + ". Was it saved from another model or --width?"
        )
    model.load_state_dict(state_dict, strict=True)


def _listing(what: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f", ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {what}: " + ", ".join(items[:_SHOWN]) + more


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states in weights-only-loadable form."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"name": str(name), "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`rng_state` captured (CUDA only where it was captured and is available)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], np.asarray(npst["keys"], dtype=np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        devices = list(state["cuda"])[: torch.cuda.device_count()]
        for i, s in enumerate(devices):
            torch.cuda.set_rng_state(s, i)


# --- run directories: what fit() saves and resumes -------------------------------------------------------------


def open_run(run_dir: Path | None, resume: bool) -> dict | None:
    """The checkpoint to resume from, or None for a fresh start; refuse to overwrite or to resume nothing."""
    if run_dir is None:
        if resume:
            raise MixbitsError("resume needs a run directory (--out) that holds checkpoint.pt; none was given")
        return None
    path = run_dir / CHECKPOINT
    if resume:
        if not path.is_file():
            raise MixbitsError(f"nothing to resume: {path} does not exist; drop --resume to start a new run")
        return load_checkpoint(path)
    if path.exists():
        raise MixbitsError(f"run directory {run_dir} already holds a checkpoint; "
                           "pass --resume to continue it or choose another --out")
    return None


def restore_training(state: TrainState, hooks: list[Hook], saved: dict, path: Path) -> list[dict]:
    """Load every piece of training state from ``saved``; return the stored history."""
    _check_resumable(saved, state, len(hooks), path)
    load_model_state(state.model, saved["model"], str(path))
    try:
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise MixbitsError(f"optimizer state in {path} does not fit this run ({e}); "
                           "resume with the same method and options it was started with") from e
    set_rng_state(saved["rng"])
    state.generator.set_state(saved["generator"])
    for hook, hook_state in zip(hooks, saved["hooks"], strict=True):
        hook.load_state_dict(hook_state)
    state.epoch, state.step = int(saved["epoch"]), int(saved["step"])
    if "loss_guard" in saved:  # older checkpoints start the guard afresh
        state.loss_guard.load_state_dict(saved["loss_guard"])
    state.extra = {**saved.get("extra", {}), **state.extra}
    return list(saved["history"])


def _check_resumable(saved: dict, state: TrainState, n_hooks: int, path: Path) -> None:
    cfg = asdict(state.cfg)
    # A setting added after the checkpoint was written counts as its default (what that run trained with).
    defaults = asdict(type(state.cfg)())
    old = {**defaults, **saved.get("train_config", {})}
    diffs = [f"{k} {old.get(k, '(missing)')!r} -> {v!r}" for k, v in cfg.items()
             if k not in _RESUME_IGNORES and old.get(k, "(missing)") != v]
    if diffs:
        raise MixbitsError(f"cannot resume {path}: the training config differs (checkpoint -> now): "
                           + ", ".join(diffs) + "; resume with the original settings or choose another --out")
    if saved.get("steps_per_epoch") != state.steps_per_epoch:
        raise MixbitsError(f"cannot resume {path}: it ran {saved.get('steps_per_epoch')} steps per epoch, this data "
                           f"gives {state.steps_per_epoch}; use the same dataset and batch size")
    if len(saved.get("hooks", [])) != n_hooks:
        raise MixbitsError(f"cannot resume {path}: it was saved with {len(saved.get('hooks', []))} hooks, "
                           f"this run has {n_hooks}; resume with the same method and options")


def training_payload(state: TrainState, hooks: list[Hook], history: list[dict]) -> dict:
    """Everything :func:`restore_training` needs to continue after the epoch ``state.epoch``."""
    return {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "epoch": state.epoch + 1,  # finished epochs
        "step": state.step,
        "steps_per_epoch": state.steps_per_epoch,
        "rng": rng_state(),
        "generator": state.generator.get_state(),
        "hooks": [hook.state_dict() for hook in hooks],
        "train_config": asdict(state.cfg),
        "history": history,
        "extra": state.extra,
        "loss_guard": state.loss_guard.state_dict(),
    }
