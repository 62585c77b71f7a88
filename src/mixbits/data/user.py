"""A user's data named on the command line: ``--data module.path:factory`` (or ``file.py:factory``).

The factory returns ``(train, test)`` or ``(train, val, test)``: each an iterable of ``(inputs, targets)``
batches (a DataLoader, or a list of pairs). The inputs are a tensor (images, token ids, vectors), a tuple of
tensors (the model called as ``model(*inputs)``) or a dict of them (``model(**inputs)``). It is given
``batch_size``, ``eval_batch_size``, ``seed`` and ``root`` (data.*) when its signature takes them. The number of
classes is the loaders' ``num_classes`` attribute (or their dataset's ``classes``), else the largest label in the
test data + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MixbitsError
from ..specs import call_with_accepted, load_factory
from .batches import Batches, first_input
from .layout import describe, first_tensor


@dataclass
class DataInfo:
    """What a model built for the data needs to know (the same fields a built-in dataset gives)."""

    num_classes: int
    in_chans: int  # of the first input tensor: its dim 1 (1 for a (B,) input)
    image_size: tuple[int, ...]  # its dims after that


def user_loaders(cfg, seed: int, rank: int = 0, world_size: int = 1):
    """(train, val or None, test, DataInfo) from the factory ``cfg.name`` names."""
    if world_size > 1:
        raise MixbitsError(f"data {cfg.name!r}: a data factory runs in one process; under torchrun use a built-in "
                           "dataset, or call mixbits.search/finetune with a DistributedSampler of your own")
    factory = load_factory(cfg.name, "data")
    offered = {"batch_size": cfg.batch_size, "eval_batch_size": cfg.eval_batch_size, "seed": seed, "root": cfg.root}
    out = call_with_accepted(factory, offered, {}, cfg.name, "data")
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise MixbitsError(f"data {cfg.name!r} returned {type(out).__name__}; expected (train, test) or "
                           "(train, val, test) iterables of (inputs, targets) batches")
    train, val, test = (out[0], None, out[1]) if len(out) == 2 else out
    train, test = Batches(train, f"{cfg.name} train"), Batches(test, f"{cfg.name} test")
    val = Batches(val, f"{cfg.name} val") if val is not None else None
    x = first_input(train)
    try:
        shape = first_tensor(describe(x))["shape"]
    except MixbitsError as e:
        raise MixbitsError(f"data {cfg.name!r}: batches must be (inputs, targets) with batched inputs; {e}") from None
    info = DataInfo(_num_classes(out, test), shape[0] if shape else 1, tuple(shape[1:]))
    return train, val, test, info


def _num_classes(loaders, test: Batches) -> int:
    for loader in loaders:
        for obj in (loader, getattr(loader, "dataset", None)):
            if isinstance(getattr(obj, "num_classes", None), int):
                return obj.num_classes
            if hasattr(obj, "classes"):
                return len(obj.classes)
    top = max(int(y.max()) for _, y in test)
    return top + 1
