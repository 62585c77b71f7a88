"""In-memory image datasets: Fashion-MNIST (IDX), CIFAR-10/100 (python pickles) and small image folders.

Every dataset is decoded once into a uint8 ``N x C x H x W`` tensor plus int64 labels. That is
cheap for the sets mixbits targets (tens of thousands of small images) and makes batching a
single tensor index. ImageNet-size folders would need a streaming loader, which is future work.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import MixbitsError
from ..registry import Registry

DATASETS = Registry("dataset")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist`, or pass --data-dir pointing at a "
    "directory holding the four IDX .gz files"
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

# Decoded tensors keyed by (path, mtime, extra); repeated loads in one process are then instant.
# Datasets share these tensors, so treat ImageDataset.images/labels as read-only.
_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]] = {}


@dataclass
class ImageDataset:
    """A labelled image set held in memory as uint8, with the statistics used to normalise it."""

    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    name: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise MixbitsError(
                f"dataset {self.name!r}: images must be a uint8 N x C x H x W tensor, got "
                f"{self.images.dtype} with shape {tuple(self.images.shape)}; convert them with .to(torch.uint8)."
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise MixbitsError(
                f"dataset {self.name!r}: labels must be an int64 tensor of length {self.images.shape[0]}, got "
                f"{self.labels.dtype} with shape {tuple(self.labels.shape)}."
            )
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < self.num_classes:
            raise MixbitsError(
                f"dataset {self.name!r}: labels span {int(self.labels.min())}..{int(self.labels.max())}, "
                f"expected 0..{self.num_classes - 1} for num_classes={self.num_classes}."
            )
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise MixbitsError(
                f"dataset {self.name!r}: mean/std need one value per channel ({self.in_chans}), got "
                f"mean={self.mean} std={self.std}."
            )

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices) -> ImageDataset:
        """The samples at ``indices`` (tensor, array or list of ints, or a boolean mask), with the same metadata."""
        idx = torch.as_tensor(np.asarray(indices)).reshape(-1)
        idx = idx.nonzero().squeeze(1) if idx.dtype == torch.bool else idx.to(torch.int64)
        return replace(self, images=self.images[idx], labels=self.labels[idx])


def load_dataset(name: str, split: str = "train", root: str | None = None, image_size: int | None = None):
    """Load dataset ``name`` (see ``DATASETS.names()``) for ``split`` ("train" or "test"; imagefolder also "val")."""
    factory = DATASETS.get(name)
    splits = ("train", "val", "test") if name == "imagefolder" else ("train", "test")
    if split not in splits:
        raise MixbitsError(f"unknown split {split!r} for dataset {name!r}; expected one of: {', '.join(splits)}.")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0):
        raise MixbitsError(f"image_size must be a positive integer or None, got {image_size!r}.")
    return factory(split=split, root=root, image_size=image_size)


def split_train_val(ds: ImageDataset, val_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Carve a seeded random validation set of ``val_fraction`` of ``ds`` out of it; returns (train, val)."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise MixbitsError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}; try 0.1.")
    n_val = max(1, round(len(ds) * val_fraction))
    if n_val >= len(ds):
        raise MixbitsError(
            f"val_fraction={val_fraction} leaves no training samples out of {len(ds)}; use a smaller fraction."
        )
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    # Sorted indices keep the original order inside each part (friendlier to memory and to reading).
    return ds.subset(perm[n_val:].sort().values), ds.subset(perm[:n_val].sort().values)


def take_subset(ds: ImageDataset, max_samples: int | None, seed: int) -> ImageDataset:
    """A seeded subset of at most ``max_samples``, taking classes round-robin so they stay balanced."""
    if max_samples is None:
        return ds
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples <= 0:
        raise MixbitsError(f"max_samples must be a positive integer or None, got {max_samples!r}.")
    if max_samples >= len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).numpy()
    labels = ds.labels.numpy()[perm]
    # Rank of each sample within its class (in shuffled order); taking the lowest ranks first is a round-robin.
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    first_of_class = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(perm), dtype=np.int64)
    rank[by_class] = np.arange(len(perm)) - first_of_class
    chosen = perm[np.argsort(rank, kind="stable")[:max_samples]]
    return ds.subset(np.sort(chosen))


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Parse one IDX file (gzipped or plain): a big-endian magic, the dimensions, then uint8 data."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise MixbitsError(f"cannot read IDX file {path}: {err}; re-download or reinstall it.") from None
    if len(raw) < 8:
        raise MixbitsError(f"IDX file {path} is truncated ({len(raw)} bytes); re-download or reinstall it.")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise MixbitsError(
            f"IDX file {path} has magic number {magic}, expected {expected_magic}; the file is corrupt or not "
            "the right IDX file."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + math.prod(dims):
        raise MixbitsError(
            f"IDX file {path} declares shape {dims} ({header + math.prod(dims)} bytes) but holds {len(raw)} "
            "bytes; the file is corrupt, re-download or reinstall it."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise MixbitsError(f"Fashion-MNIST file {root / (stem + '.gz')} is missing; {FASHION_MNIST_HINT}.")


@DATASETS.register("fashion-mnist")
def fashion_mnist(split: str = "train", root: str | None = None, image_size: int | None = None) -> ImageDataset:
    """Fashion-MNIST: 70k 28x28 grayscale clothing images, 10 classes (IDX files)."""
    _check_native_size("fashion-mnist", image_size, 28)
    base = Path(root or FASHION_MNIST_DIR)
    if not base.is_dir():
        raise MixbitsError(f"Fashion-MNIST directory {base} does not exist; {FASHION_MNIST_HINT}.")
    if not any(base.glob("*-ubyte*")) and (base / "fashion-mnist").is_dir():
        base = base / "fashion-mnist"  # accept the parent directory too
    prefix = "train" if split == "train" else "t10k"
    image_file = _find_idx_file(base, f"{prefix}-images-idx3-ubyte")
    label_file = _find_idx_file(base, f"{prefix}-labels-idx1-ubyte")

    def parse():
        images = read_idx(image_file, 2051)
        labels = read_idx(label_file, 2049)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise MixbitsError(
                f"Fashion-MNIST files {image_file} and {label_file} disagree: images {images.shape}, labels "
                f"{labels.shape}; expected N x 28 x 28 images and N labels. Reinstall the dataset."
            )
        if labels.max(initial=0) > 9:
            raise MixbitsError(f"Fashion-MNIST labels in {label_file} go up to {labels.max()}, expected 0..9.")
        return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), ()

    images, labels, _ = _cached((image_file, label_file), parse)
    return ImageDataset(images, labels, 10, (0.2860,), (0.3530,), "fashion-mnist")


# ----------------------------------------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a hostile file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return getattr(importlib.import_module(module), name)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise MixbitsError(
            f"cannot read CIFAR batch {path}: {type(err).__name__}: {err}; expected a python-pickle batch with "
            f"keys b'data' and {label_key!r}. Re-download the python version of the dataset."
        ) from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise MixbitsError(
            f"CIFAR batch {path} holds data {data.shape} and labels {labels.shape}; expected N x 3072 and N."
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(name, split, root, image_size, folder, files, label_key, num_classes, mean, std) -> ImageDataset:
    _check_native_size(name, image_size, 32)
    expected = f"a directory holding {folder}/ ({', '.join(files['train'] + files['test'])})"
    if root is None:
        raise MixbitsError(f"dataset {name!r} needs a root: pass --data-dir with {expected}.")
    base = Path(root)
    if (base / folder).is_dir():
        base = base / folder  # the parent was given
    paths = [base / f for f in files[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MixbitsError(f"{name} files missing: {', '.join(missing)}; expected {expected}.")

    def parse():
        parts = [_read_cifar_batch(p, label_key) for p in paths]
        labels = np.concatenate([lab for _, lab in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise MixbitsError(f"{name} labels under {base} span {labels.min()}..{labels.max()}, "
                               f"expected 0..{num_classes - 1}.")
        images = np.concatenate([img for img, _ in parts])
        return torch.from_numpy(images), torch.from_numpy(labels), ()

    images, labels, _ = _cached(tuple(paths), parse)
    return ImageDataset(images, labels, num_classes, mean, std, name)


@DATASETS.register("cifar10")
def cifar10(split: str = "train", root: str | None = None, image_size: int | None = None) -> ImageDataset:
    """CIFAR-10: 60k 32x32 colour images, 10 classes (cifar-10-batches-py pickles)."""
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _load_cifar("cifar10", split, root, image_size, "cifar-10-batches-py", files, b"labels", 10,
                       (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@DATASETS.register("cifar100")
def cifar100(split: str = "train", root: str | None = None, image_size: int | None = None) -> ImageDataset:
    """CIFAR-100: 60k 32x32 colour images, 100 fine classes (cifar-100-python pickles)."""
    files = {"train": ["train"], "test": ["test"]}
    return _load_cifar("cifar100", split, root, image_size, "cifar-100-python", files, b"fine_labels", 100,
                       (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


# ----------------------------------------------------------------------------------------------- image folder


@DATASETS.register("imagefolder")
def imagefolder(split: str = "train", root: str | None = None, image_size: int | None = None) -> ImageDataset:
    """Small image folders, root/<split>/<class>/*.jpg, resized and held in memory (default 32px)."""
    try:
        from PIL import Image
    except ImportError:
        raise MixbitsError("dataset 'imagefolder' needs Pillow: pip install 'mixbits[images]'.") from None
    if root is None:
        raise MixbitsError("dataset 'imagefolder' needs a root: pass --data-dir with root/<split>/<class>/*.jpg.")
    base, size = Path(root), image_size or 32
    alternatives = {"test": ("test", "val"), "val": ("val", "test"), "train": ("train",)}[split]
    split_dir = next((base / s for s in alternatives if (base / s).is_dir()), None)
    if split_dir is None:
        raise MixbitsError(f"image folder {base} has no {' or '.join(alternatives)} subdirectory; "
                           "expected root/<split>/<class>/*.jpg.")
    # Class indices come from the training split so train and test labels agree.
    class_source = base / "train" if (base / "train").is_dir() else split_dir
    classes = tuple(sorted(d.name for d in class_source.iterdir() if d.is_dir()))
    unknown = sorted({d.name for d in split_dir.iterdir() if d.is_dir()} - set(classes))
    if unknown:
        raise MixbitsError(
            f"classes {unknown} in {split_dir} are not in {class_source}; the splits must share their classes."
        )
    if not classes:
        raise MixbitsError(f"image folder {split_dir} holds no class subdirectories; "
                           "expected root/<split>/<class>/*.jpg.")
    missing = [cls for cls in classes if not (split_dir / cls).is_dir()]
    if missing:
        raise MixbitsError(f"classes {missing} of {class_source} have no folder in {split_dir}; the splits must share "
                           "their classes (add the folders, with images, or remove the classes from every split).")
    per_class = {cls: sorted(p for p in (split_dir / cls).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                 for cls in classes}
    empty = [cls for cls, paths in per_class.items() if not paths]
    if empty:  # a class without images would silently shrink the problem (or never be tested)
        raise MixbitsError(f"image folder {split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class "
                           f"folders {empty}; add images or remove those folders from every split.")
    files = [(p, label) for label, cls in enumerate(classes) for p in per_class[cls]]

    def decode(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                scale = size / min(w, h)  # shorter side to `size`, then a centred square crop
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                img = img.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
        except OSError as err:
            raise MixbitsError(f"cannot decode image {path}: {err}; remove or replace the file.") from None

    def parse():
        images = np.stack([decode(p) for p, _ in files]).transpose(0, 3, 1, 2).copy()
        labels = np.array([label for _, label in files], dtype=np.int64)
        return torch.from_numpy(images), torch.from_numpy(labels), classes

    images, labels, classes = _cached((split_dir, size, len(files)), parse)
    return ImageDataset(images, labels, len(classes), IMAGENET_MEAN, IMAGENET_STD, "imagefolder", classes)


# ----------------------------------------------------------------------------------------------- helpers


def _check_native_size(name: str, image_size: int | None, native: int) -> None:
    if image_size is not None and image_size != native:
        raise MixbitsError(f"dataset {name!r} images are {native}x{native}, got image_size={image_size}; "
                           "leave image_size unset (it applies to imagefolder only).")


def _cached(key_parts: tuple, parse):
    """Parse once per process; the key includes modification times so rewritten files are re-read."""
    key = tuple((str(p), os.stat(p).st_mtime_ns) if isinstance(p, Path) else p for p in key_parts)
    if key not in _CACHE:
        if len(_CACHE) >= 8:  # a handful of splits at most; drop the oldest rather than grow without bound
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = parse()
    return _CACHE[key]
