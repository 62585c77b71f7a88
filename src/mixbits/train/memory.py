"""Keep memory the training step frees inside the process while training, so the next step does not fault it in.

A training step allocates and frees the same activation-sized blocks every step. glibc's malloc hands
blocks above a threshold to ``mmap`` and gives freed heap space back to the system (trimming); either way
the next step's block is new memory, faulted in and zeroed by the kernel one 4 KiB page at a time. On 2
CPU cores a ResNet-20 step (batch 128) took from none to about 24,000 such faults, depending on the process,
and the W4A4 step, which allocates more than the float one, measured 1.08x to 1.32x the float step in
different processes. With every block taken from the heap and the heap never trimmed, a step reuses the
previous step's memory: no faults after the first steps, and 1.12x to 1.16x.

The setting is held only while ``fit`` trains on the CPU (:func:`retained_memory`): when the outermost
``fit`` returns, malloc's defaults come back and the heap is trimmed, so a notebook or a service that
trained once does not keep its peak heap for good. ``MIXBITS_RETAIN_MEMORY=0`` in the environment leaves
malloc alone, read when training starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from collections.abc import Iterator

from ..compiler import env_pin

# mallopt parameters (glibc malloc.h) and the defaults glibc documents for them (mallopt(3))
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_NEVER = 2**31 - 1  # the largest trim threshold mallopt takes (an int)
_STATE = {"depth": 0, "retained": False}


@contextlib.contextmanager
def retained_memory() -> Iterator[bool]:
    """Serve every allocation from the heap and never trim it, inside the block (glibc only); yields whether
    freed memory is kept. Nested blocks share the outermost one's setting; leaving the outermost restores
    malloc's defaults and gives the freed heap back to the system.

    Not kept where the C library is not glibc, or where MIXBITS_RETAIN_MEMORY=0 pins it off. glibc cannot
    switch its dynamic mmap threshold back on once a threshold has been set, so after the block large blocks
    go to mmap above the fixed default threshold (128 KiB), as a process that set ``M_TRIM_THRESHOLD`` gets.
    """
    if _STATE["depth"] == 0:
        _STATE["retained"] = _wanted() and _set(_M_MMAP_MAX, 0) and _set(_M_TRIM_THRESHOLD, _NEVER)
    _STATE["depth"] += 1
    try:
        yield _STATE["retained"]
    finally:
        _STATE["depth"] -= 1
        if _STATE["depth"] == 0 and _STATE["retained"]:
            _set(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            _set(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            _libc().malloc_trim(0)
            _STATE["retained"] = False


def memory_retained() -> bool:
    """Whether freed memory is kept in the process right now (inside :func:`retained_memory`)."""
    return _STATE["retained"]


def _wanted() -> bool:
    return env_pin("MIXBITS_RETAIN_MEMORY") is not False and platform.libc_ver()[0] == "glibc"


def _set(parameter: int, value: int) -> bool:
    return bool(_libc().mallopt(parameter, value))  # mallopt returns 1 on success


def _libc():
    return ctypes.CDLL(None)
