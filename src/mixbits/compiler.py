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


# A training run set to compile "auto" compiles when it has at least this many optimiser steps. Measured on
# ResNet-20 (batch 128, Fashion-MNIST, 2 CPU cores): compiling costs about 70 s for the float model and 130 s
# quantized, once per run, and saves 0.12-0.21 s a step (epochs of 93 steps: float 42 s against 54 s eager,
# W2A2 46 s against 65 s), so it pays off after 550-650 steps; a 2-epoch W2A2 run took 1.7x eager's time.
COMPILE_MIN_STEPS = 1000


def compile_enabled(device: torch.device | str, setting: bool | str = True, steps: int | None = None) -> bool:
    """Whether a training run of ``steps`` optimiser steps whose ``train.compile`` is ``setting`` (true, false or
    "auto") compiles its model: never when false; MIXBITS_COMPILE, when set, decides for true and "auto" alike;
    "auto" needs at least COMPILE_MIN_STEPS steps; and torch.compile must work here."""
    if setting is False:
        return False
    pinned = env_pin("MIXBITS_COMPILE")
    if pinned is not None:
        return pinned
    if setting == "auto" and steps is not None and steps < COMPILE_MIN_STEPS:
        return False
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
