"""The quantizers' compiled single-pass kernels (``set_fused``): built once per layout, called without guards.

A kernel is a plain function of tensors. It sees its operand flattened, to 1-D (one step for the whole
tensor) or to (channels, -1) (one step per channel along dim 0), and the clip bounds as tensors, so it is
traced once per layout with symbolic sizes and one compiled graph serves every shape and bit-width. The
graph is compiled by inductor on its own (``torch._inductor.standalone_compile``): a call skips dynamo's
frame and guard checks, about 15 us instead of 45, which adds up at three calls per layer per step.
Where standalone compilation is missing (torch < 2.8) the kernel is torch.compile'd instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

_CACHE: dict[tuple, Callable] = {}
# Traced sizes: small, because inductor sums a reduction longer than 4096 (by its traced size) in cascade, through
# a stack in memory, for accuracy a gradient step has no use for (on 2 cores a W4A4 training step took 1.5x the
# float step's time with it, 1.25x without); the loops are still parallel (see _build). Also unlike a count of
# candidates (2..7), which the mixture kernels specialise on: equal sizes would share one symbol.
EXAMPLE_CHANNELS, EXAMPLE_SIZE = 11, 37


def layout(x: Tensor, step_shape: tuple[int, ...]) -> str | None:
    """"tensor" (one step), "channel" (one step per index of dim 0), or None for a layout the kernels skip."""
    numel = 1
    for size in step_shape:
        numel *= size
    if numel == 1:
        return "tensor"
    if x.dim() >= 2 and step_shape[0] == x.shape[0] == numel:
        return "channel"
    return None


def flat(kind: str, x: Tensor) -> Tensor:
    """``x`` as a kernel of layout ``kind`` takes it (a view when ``x`` is contiguous)."""
    return x.reshape(-1) if kind == "tensor" else x.reshape(x.shape[0], -1)


def flat_steps(kind: str, steps: Tensor) -> Tensor:
    """A (K, ...) table of steps as (K, 1) or (K, C, 1): row k broadcasts against ``flat``'s view."""
    return steps.reshape(steps.shape[0], 1) if kind == "tensor" else steps.reshape(steps.shape[0], -1, 1)


def example(kind: str, device: torch.device) -> Tensor:
    """A traced stand-in for a flattened operand of layout ``kind``."""
    shape = (EXAMPLE_SIZE,) if kind == "tensor" else (EXAMPLE_CHANNELS, EXAMPLE_SIZE)
    return torch.randn(shape, device=device)


_SCRATCH = threading.local()


def scratch(like: Tensor) -> Tensor:
    """Memory shaped like ``like`` for a value made and dropped inside one call: a layer's quantized input, made
    just before its product in the forward and again in the backward. One block per thread, grown to the
    largest such value, serves every layer and step: a fresh activation-sized tensor each time would go back
    to the system when freed (glibc trims its heap) and be faulted in again page by page."""
    key = (like.dtype, like.device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    block = buffers.get(key)
    if block is None or block.numel() < like.numel():
        block = buffers[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return block[:like.numel()].view(like.shape)


def threads() -> int:
    """Threads a kernel is built for (torch's count when it is built; another count builds another kernel)."""
    return torch.get_num_threads()


def compiled(fn: Callable, key: tuple, example_args: Callable[[], tuple]) -> Callable:
    """``fn`` compiled for arguments like those ``example_args()`` makes (at the first call of a key; cached)."""
    key = (fn, threads(), *key)
    if key not in _CACHE:
        _CACHE[key] = _build(fn, example_args(), key[1])
    return _CACHE[key]


def _build(fn: Callable, example_args: tuple, n_threads: int) -> Callable:
    import torch._inductor
    from torch.fx.experimental.proxy_tensor import make_fx

    standalone = getattr(torch._inductor, "standalone_compile", None)
    if standalone is None:
        return torch.compile(fn, dynamic=True, fullgraph=True)
    graph = make_fx(fn, tracing_mode="symbolic")(*example_args)
    # min_chunk_size: parallelise whatever the traced size (the kernels run on at least FUSED_MIN_NUMEL elements)
    with torch._inductor.config.patch({"cpp.threads": n_threads, "cpp.min_chunk_size": 1}):
        return standalone(graph, list(example_args))
