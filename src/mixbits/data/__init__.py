"""Datasets held in memory as uint8 tensors, and seeded batch loaders over them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MixbitsError, did_you_mean
from ..specs import is_spec, spec_problems
from .datasets import DATASETS, ImageDataset, load_dataset, split_train_val, take_subset
from .loader import BatchLoader
from .user import DataInfo, user_loaders

# Native sizes of the fixed-size sets: image_size may only repeat them.
_NATIVE_SIZE = {"fashion-mnist": 28, "cifar10": 32, "cifar100": 32}
_NEEDS_ROOT = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/", "imagefolder": "<split>/<class>/"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DataConfig:
    """Which dataset to load (a registered name, or a user's ``module.path:factory``) and how to batch it."""

    name: str = "fashion-mnist"
    root: str | None = None  # dataset directory; fashion-mnist defaults to the Debian package's
    batch_size: int = 128
    eval_batch_size: int = 512
    val_fraction: float = 0.1  # held out of the training split for search/validation
    # The seed of that split; null: the run's seed. Fix it to compare seeds on one validation set, disjoint from
    # the data a shared float model was trained on (trained at that seed).
    split_seed: int | None = None
    max_train_samples: int | None = None  # subset for quick runs
    augment: bool = True
    image_size: int | None = None  # imagefolder only

    def problems(self, prefix: str = "data") -> list[str]:
        """Every invalid field as ``"data.batch_size: must be > 0, got 0"``; empty when the config is valid."""
        out = []
        if is_spec(self.name):
            out += spec_problems(self.name, "data", f"{prefix}.name")
        elif self.name not in DATASETS:
            out.append(f"{prefix}.name: unknown dataset {self.name!r}; expected one of: "
                       f"{', '.join(DATASETS.names())}.{did_you_mean(self.name, DATASETS.names())}")
        elif self.name in _NEEDS_ROOT and not self.root:
            out.append(f"{prefix}.root: required for {self.name} (a directory holding {_NEEDS_ROOT[self.name]}), "
                       f"got {self.root!r}")
        if self.root is not None and not isinstance(self.root, str):
            out.append(f"{prefix}.root: must be a path string or null, got {self.root!r}")
        for field in ("batch_size", "eval_batch_size"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                out.append(f"{prefix}.{field}: must be an integer > 0, got {value!r}")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
            out.append(f"{prefix}.val_fraction: must be strictly between 0 and 1, got {vf!r}")
        if self.split_seed is not None and not _is_int(self.split_seed):
            out.append(f"{prefix}.split_seed: must be an integer or null, got {self.split_seed!r}")
        mts = self.max_train_samples
        if mts is not None and (not _is_int(mts) or mts <= 0):
            out.append(f"{prefix}.max_train_samples: must be an integer > 0 or null, got {mts!r}")
        if not isinstance(self.augment, bool):
            out.append(f"{prefix}.augment: must be true or false, got {self.augment!r}")
        size = self.image_size
        if size is not None and (not _is_int(size) or size <= 0):
            out.append(f"{prefix}.image_size: must be an integer > 0 or null, got {size!r}")
        elif size is not None and self.name in _NATIVE_SIZE and size != _NATIVE_SIZE[self.name]:
            out.append(f"{prefix}.image_size: {self.name} images are {_NATIVE_SIZE[self.name]}px and are not "
                       f"resized (image_size is for imagefolder), got {size!r}")
        return out


def build_loaders(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1):
    """(train, val, test, train_dataset) loaders; val is carved out of the training split with ``val_fraction``.

    A user's ``module:factory`` gives its own loaders (val may be None) and a DataInfo for the dataset.

    ``max_train_samples`` shrinks the training part only, after the split, so the validation set does not
    depend on it. The split is drawn with ``split_seed`` when set, else with ``seed``.
    """
    problems = cfg.problems()
    if problems:
        raise MixbitsError("invalid data config: " + "; ".join(problems))
    if is_spec(cfg.name):
        return user_loaders(cfg, seed, rank, world_size)
    full_train = load_dataset(cfg.name, "train", cfg.root, cfg.image_size)
    test = load_dataset(cfg.name, "test", cfg.root, cfg.image_size)
    train, val = split_train_val(full_train, cfg.val_fraction, seed if cfg.split_seed is None else cfg.split_seed)
    train = take_subset(train, cfg.max_train_samples, seed)
    dist = {"rank": rank, "world_size": world_size}
    return (
        BatchLoader(train, cfg.batch_size, train=True, seed=seed, augment=cfg.augment, **dist),
        BatchLoader(val, cfg.eval_batch_size, train=False, seed=seed, **dist),
        BatchLoader(test, cfg.eval_batch_size, train=False, seed=seed, **dist),
        train,
    )


__all__ = [
    "DATASETS",
    "DataInfo",
    "BatchLoader",
    "DataConfig",
    "ImageDataset",
    "build_loaders",
    "load_dataset",
    "split_train_val",
    "take_subset",
]
