"""Can torch.compile run here? A C compiler for inductor's CPU kernels, and the environment pins.

Two things compile: the quantizers' single-pass kernels in eager mode (``quant.fused``) and, for
fixed-policy training, the whole model (``train.compile``). Each is on by default where it works;
``MIXBITS_FUSED`` and ``MIXBITS_COMPILE`` (0 or 1) pin them whatever the configuration says: 0 turns
them off (the test suite runs so, fast and deterministic), 1 skips the checks.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings

import torch

from .errors import MixbitsError


def env_pin(name: str) -> bool | None:
    """The 0/1 value of environment variable ``name``; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise MixbitsError(f"environment variable {name} must be 0 or 1, got {value!r}")
    return value == "1"


@functools.cache
def c_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with, or None when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def fused_default() -> bool:
    """The quantizers' compiled kernels: MIXBITS_FUSED, else on where a C compiler is found."""
    pinned = env_pin("MIXBITS_FUSED")
    return c_compiler() is not None if pinned is None else pinned


def fused_setting(requested: bool) -> bool:
    """A configuration's ``quant.fused``, unless MIXBITS_FUSED pins it."""
    pinned = env_pin("MIXBITS_FUSED")
    return requested if pinned is None else pinned


@functools.cache
def _compiles(device_type: str) -> bool:
    """One tiny forward and backward through torch.compile on ``device_type``: does the toolchain work?"""
    try:
        layer = torch.nn.Linear(4, 2).to(device_type)
        loss = torch.compile(layer)(torch.ones(3, 4, device=device_type)).relu().sum()
        loss.backward()
        return True
    except Exception as e:  # no compiler, no triton, a broken toolchain: train eager instead
        warnings.warn(f"torch.compile does not work here ({type(e).__name__}: {e}); training runs eager",
                      stacklevel=3)
        return False


def compile_enabled(device: torch.device | str) -> bool:
    """Whole-model compilation where a configuration asks for it: MIXBITS_COMPILE, else whether it works here."""
    pinned = env_pin("MIXBITS_COMPILE")
    if pinned is not None:
        return pinned
    device_type = torch.device(device).type
    if device_type == "cpu" and c_compiler() is None:
        _warn_once("no C compiler found (g++, c++ or clang++, or $CXX): training runs eager, without torch.compile")
        return False
    return _compiles(device_type)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


BACKEND = "inductor"  # what compile_model compiles with (a test may count compilations with its own)


def compile_model(model: torch.nn.Module) -> None:
    """torch.compile ``model`` in place (state-dict keys and checkpoints stay those of the plain module).

    Each policy (and train/eval mode) compiles one graph the first time it runs and finds it again
    afterwards; the limit on graphs per function is raised so a process that trains many policies
    keeps them all instead of falling back to eager.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model.compile(backend=BACKEND)
