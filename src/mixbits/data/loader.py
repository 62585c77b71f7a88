"""Batches over an in-memory ``ImageDataset``: seeded shuffling, batched augmentation, rank slicing."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import MixbitsError
from .augment import normalize, random_crop, random_flip
from .datasets import ImageDataset

_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def _generator(*key: int) -> torch.Generator:
    """A generator seeded from a tuple of ints (well mixed, so nearby seeds and epochs give unrelated streams)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MixbitsError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


class BatchLoader:
    """Iterates (images float32 normalised N,C,H,W, labels int64 N) over an in-memory ImageDataset.

    The order and augmentation of epoch ``e`` derive from ``(seed, e)`` only, so a run is reproducible
    and resumable at epoch boundaries. Call ``set_epoch`` before each epoch (as with torch's
    DistributedSampler); iterating twice without it repeats the same epoch.

    With ``world_size > 1`` every rank draws the same permutation, pads it by repeating its start to a
    multiple of ``world_size``, and takes every ``world_size``-th index from ``rank`` on: the ranks' slices
    are disjoint, equally long, and together cover the epoch. ``batch_size`` is per rank. As with
    DistributedSampler, the padding means a few samples may be seen twice when N is not divisible.
    """

    def __init__(self, ds: ImageDataset, batch_size: int, train: bool, seed: int = 0, augment: bool | None = None,
                 drop_last: bool | None = None, rank: int = 0, world_size: int = 1):
        if len(ds) == 0:
            raise MixbitsError(f"dataset {ds.name!r} is empty; a loader needs at least one sample.")
        self.world_size = _check_int(world_size, "world_size", 1)
        self.rank = _check_int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise MixbitsError(f"rank must be in 0..{self.world_size - 1} for world_size={self.world_size}, "
                               f"got {rank!r}.")
        self.seed = _check_int(seed, "seed", 0)
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.dataset = ds
        self.train = bool(train)
        self.augment = self.train if augment is None else bool(augment)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.num_samples = math.ceil(len(ds) / self.world_size)  # per rank, after padding
        if self.drop_last and self.batch_size > self.num_samples:
            raise MixbitsError(
                f"batch_size={batch_size} is larger than the {self.num_samples} samples per rank of dataset "
                f"{ds.name!r} with drop_last, so there would be no batches; use a smaller batch_size."
            )
        self.crop_padding = max(1, ds.image_size[0] // 8)  # 4 px at 32x32, 3 px at 28x28
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        self.epoch = _check_int(epoch, "epoch", 0)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in the order they are batched."""
        n = len(self.dataset)
        if self.train:
            order = torch.randperm(n, generator=_generator(self.seed, self.epoch, _ORDER_STREAM))
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            order = order.repeat(math.ceil(total / n))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices()
        # Augmentation differs between ranks (each sees different images anyway) but not between runs.
        gen = _generator(self.seed, self.epoch, _AUGMENT_STREAM, self.rank)
        ds = self.dataset
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = ds.images.index_select(0, idx)  # faster than advanced indexing for uint8 rows
            if self.augment:
                images = random_flip(random_crop(images, self.crop_padding, gen), gen)
            yield normalize(images, ds.mean, ds.std), ds.labels.index_select(0, idx)
