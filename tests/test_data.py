"""Datasets (real Fashion-MNIST, IDX/CIFAR/image-folder readers), augmentation and batch loaders."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbits.data import (
    DATASETS,
    BatchLoader,
    DataConfig,
    ImageDataset,
    build_loaders,
    load_dataset,
    split_train_val,
    take_subset,
)
from mixbits.data.augment import normalize, random_crop, random_flip
from mixbits.data.datasets import FASHION_MNIST_DIR, read_idx
from mixbits.errors import MixbitsError

# ----------------------------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_fake_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10, 2049)
    return root


def toy_dataset(n: int = 40, size: int = 8, channels: int = 1, num_classes: int = 4) -> ImageDataset:
    images = torch.arange(n * channels * size * size, dtype=torch.int64).remainder(251).to(torch.uint8)
    images = images.view(n, channels, size, size)
    labels = torch.arange(n) % num_classes
    return ImageDataset(images, labels, num_classes, (0.5,) * channels, (0.25,) * channels, "toy")


def cifar_batch(n: int, label_key: bytes, num_classes: int, offset: int = 0) -> dict:
    data = (np.arange(n * 3072) + offset).reshape(n, 3072) % 256
    return {b"data": data.astype(np.uint8), label_key: [(i + offset) % num_classes for i in range(n)],
            b"batch_label": b"fake"}


def dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="needs `apt-get install dataset-fashion-mnist`")
def test_real_fashion_mnist():
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.labels.bincount().tolist() == [6000] * 10
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    assert (train.num_classes, train.in_chans, train.image_size, len(train)) == (10, 1, (28, 28), 60000)
    assert train.mean == (0.2860,) and train.std == (0.3530,)
    # The dataset statistics match the pixels.
    assert abs(train.images.float().mean().item() / 255 - 0.2860) < 1e-3
    assert load_dataset("fashion-mnist", "train").images is train.images  # cached in-process


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_gzipped_and_plain(tmp_path, gz):
    root = write_fake_fashion_mnist(tmp_path / "fashion-mnist", gz=gz)
    ds = load_dataset("fashion-mnist", "test", root=str(root))
    assert ds.images.shape == (20, 1, 28, 28) and ds.labels.tolist() == [i % 10 for i in range(20)]
    raw = read_idx(root / ("t10k-images-idx3-ubyte" + (".gz" if gz else "")), 2051)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(raw))
    # The parent directory works too.
    assert len(load_dataset("fashion-mnist", "train", root=str(tmp_path))) == 40


def test_idx_reader_rejects_corrupt_files(tmp_path):
    root = write_fake_fashion_mnist(tmp_path)
    bad = root / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.arange(40) % 10, 2051)  # image magic in a label file
    with pytest.raises(MixbitsError, match=r"train-labels-idx1-ubyte\.gz.*magic"):
        load_dataset("fashion-mnist", "train", root=str(root))
    truncated = root / "t10k-images-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(truncated.read_bytes())[:-5]))
    with pytest.raises(MixbitsError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", "test", root=str(root))
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(MixbitsError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", "test", root=str(root))


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(MixbitsError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=str(tmp_path / "nowhere"))
    root = write_fake_fashion_mnist(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MixbitsError, match=r"t10k-labels-idx1-ubyte\.gz is missing.*apt-get"):
        load_dataset("fashion-mnist", "test", root=str(root))


def test_unknown_dataset_split_and_size():
    with pytest.raises(MixbitsError, match="cifar10, cifar100, fashion-mnist, imagefolder"):
        load_dataset("mnist")
    with pytest.raises(MixbitsError, match="'val'"):
        load_dataset("fashion-mnist", "val")
    with pytest.raises(MixbitsError, match="image_size=32"):
        load_dataset("fashion-mnist", image_size=32)


# ----------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_reader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", cifar_batch(3, b"labels", 10, offset=i))
    dump(folder / "test_batch", cifar_batch(4, b"labels", 10))
    for root in (folder, tmp_path):  # the directory itself or its parent
        train = load_dataset("cifar10", "train", root=str(root))
        assert train.images.shape == (15, 3, 32, 32) and train.labels.tolist()[:3] == [1, 2, 3]
    test = load_dataset("cifar10", "test", root=str(folder))
    assert test.num_classes == 10 and test.mean == (0.4914, 0.4822, 0.4465)
    # Rows hold the red plane, then green, then blue, each row-major.
    row = cifar_batch(4, b"labels", 10)[b"data"][1]
    assert test.images[1, 1, 2, 5].item() == row[1024 + 2 * 32 + 5]


def test_cifar100_reader_and_errors(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    dump(folder / "train", cifar_batch(6, b"fine_labels", 100, offset=95))
    dump(folder / "test", cifar_batch(2, b"fine_labels", 100))
    train = load_dataset("cifar100", "train", root=str(tmp_path))
    assert train.labels.tolist() == [95, 96, 97, 98, 99, 0] and train.num_classes == 100
    assert train.std == (0.2673, 0.2564, 0.2762)
    with pytest.raises(MixbitsError, match="needs a root"):
        load_dataset("cifar100")
    with pytest.raises(MixbitsError, match="data_batch_1"):
        load_dataset("cifar10", root=str(tmp_path))
    dump(folder / "test", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})  # cifar-10 keys
    with pytest.raises(MixbitsError, match=r"cifar-100-python/test.*fine_labels"):
        load_dataset("cifar100", "test", root=str(folder))


def test_cifar_refuses_pickles_that_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    dump(folder / "train", cifar_batch(2, b"fine_labels", 100))

    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    dump(folder / "test", {b"data": Payload(), b"fine_labels": [0]})
    with pytest.raises(MixbitsError, match=r"refusing to load (builtins|__builtin__)\.print"):
        load_dataset("cifar100", "test", root=str(folder))


# ----------------------------------------------------------------------------------------------- image folder


def test_imagefolder_reader(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, count in (("train", 3), ("val", 2)):
        for cls, colour in colours.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                # Non-square and of varying size: shorter side to image_size, then a centre crop.
                Image.new("RGB", (20 + 4 * i, 12), colour).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train = load_dataset("imagefolder", "train", root=str(tmp_path), image_size=8)
    assert train.images.shape == (6, 3, 8, 8) and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.class_names == ("cat", "dog") and train.num_classes == 2
    assert (train.images[0, 0] == 255).all() and (train.images[0, 2] == 0).all()
    assert (train.images[5, 2] == 255).all()
    test = load_dataset("imagefolder", "test", root=str(tmp_path), image_size=8)  # falls back to val/
    assert len(test) == 4 and test.mean == (0.485, 0.456, 0.406)
    assert load_dataset("imagefolder", "train", root=str(tmp_path)).image_size == (32, 32)  # default size
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(MixbitsError, match="holds no images"):
        load_dataset("imagefolder", "train", root=str(tmp_path / "empty"))
    with pytest.raises(MixbitsError, match="no test or val"):
        load_dataset("imagefolder", "test", root=str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------- splits


def test_split_train_val_and_take_subset():
    ds = toy_dataset(100)
    train, val = split_train_val(ds, 0.2, seed=1)
    assert (len(train), len(val)) == (80, 20) and (train.name, val.num_classes) == ("toy", 4)
    # Images are unique per sample here, so the first pixel row identifies it.
    keys = lambda d: {tuple(img.flatten()[:16].tolist()) for img in d.images}  # noqa: E731
    assert keys(train).isdisjoint(keys(val)) and len(keys(train) | keys(val)) == 100
    assert torch.equal(split_train_val(ds, 0.2, seed=1)[1].images, val.images)
    assert not torch.equal(split_train_val(ds, 0.2, seed=2)[1].images, val.images)
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(MixbitsError, match=f"got {bad}"):
            split_train_val(ds, bad, seed=0)

    sub = take_subset(ds, 10, seed=0)
    assert len(sub) == 10 and sorted(sub.labels.bincount().tolist()) == [2, 2, 3, 3]
    assert torch.equal(take_subset(ds, 10, seed=0).images, sub.images)
    assert torch.equal(ds.subset(ds.labels == 1).labels, torch.ones(25, dtype=torch.int64))
    assert take_subset(ds, None, seed=0) is ds and take_subset(ds, 1000, seed=0) is ds
    with pytest.raises(MixbitsError, match="got 0"):
        take_subset(ds, 0, seed=0)


# ----------------------------------------------------------------------------------------------- augmentation


def test_random_crop_shifts_each_image():
    n, c, h, w, pad = 64, 2, 6, 7, 2
    # Every pixel value is unique, so exactly one offset reproduces each crop.
    x = (torch.arange(n * c * h * w) + 1).view(n, c, h, w)
    out = random_crop(x, pad, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = []
    for k in range(n):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(out[k], padded[k, :, dy : dy + h, dx : dx + w])]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 10  # offsets really vary per image
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)
    assert torch.equal(out, random_crop(x, pad, torch.Generator().manual_seed(0)))  # reproducible
    # A constant image keeps its value inside and gains only zeros from the padding.
    const = torch.full((32, 1, 8, 8), 7, dtype=torch.uint8)
    cropped = random_crop(const, 3, torch.Generator().manual_seed(1))
    assert set(cropped.unique().tolist()) <= {0, 7} and (cropped == 7).sum(dim=(1, 2, 3)).min() >= 25


def test_random_flip_and_normalize():
    x = torch.randint(0, 256, (16, 3, 5, 5), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(random_flip(x, gen, p=1.0), x.flip(-1)) and torch.equal(random_flip(x, gen, p=0.0), x)
    mixed = random_flip(x, gen, p=0.5)
    flipped = [torch.equal(mixed[k], x[k].flip(-1)) for k in range(16)]
    assert all(f or torch.equal(mixed[k], x[k]) for k, f in enumerate(flipped)) and 0 < sum(flipped) < 16
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    result = normalize(x, mean, std)
    assert result.dtype == torch.float32 and torch.allclose(result, expected, atol=1e-5)
    with pytest.raises(MixbitsError, match="one mean and std per channel"):
        normalize(x, (0.5,), (0.5,))


# ----------------------------------------------------------------------------------------------- loader


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def sample_ids(ds: ImageDataset) -> torch.Tensor:
    """Ids for the toy dataset's eval batches: the first pixel of each image is unique per sample."""
    return ds.images[:, 0, 0, 0].long()


def test_loader_is_reproducible_per_epoch():
    ds = toy_dataset(40)
    a, b = BatchLoader(ds, 8, train=True, seed=3), BatchLoader(ds, 8, train=True, seed=3)
    a.set_epoch(3)
    b.set_epoch(3)
    first, second = batches(a), batches(b)
    assert len(first) == 5 and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                   for (x1, y1), (x2, y2) in zip(first, second, strict=True))
    again = batches(a)  # iterating epoch 3 again gives the same batches
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, again, strict=True))
    a.set_epoch(4)
    assert not torch.equal(a.indices(), b.indices())
    assert not torch.equal(BatchLoader(ds, 8, train=True, seed=4).indices(), BatchLoader(ds, 8, train=True).indices())
    x, y = first[0]
    assert x.shape == (8, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_train_epoch_covers_samples_at_most_once():
    ds = toy_dataset(43)
    loader = BatchLoader(ds, 8, train=True, seed=0)
    assert loader.augment and loader.drop_last and loader.crop_padding == 1 and len(loader) == 5
    order = loader.indices()
    assert len(order) == 43 and sorted(order.tolist()) == list(range(43))
    labels = torch.cat([y for _, y in loader])
    assert labels.shape == (40,) and torch.equal(labels, ds.labels[order[:40]])


def test_eval_loader_covers_everything_in_order():
    ds = toy_dataset(43)
    loader = BatchLoader(ds, 8, train=False)
    assert not loader.augment and not loader.drop_last and len(loader) == 6
    got = batches(loader)
    assert [len(y) for _, y in got] == [8, 8, 8, 8, 8, 3]
    images = torch.cat([x for x, _ in got])
    assert torch.allclose(images, normalize(ds.images, ds.mean, ds.std))
    assert torch.equal(torch.cat([y for _, y in got]), ds.labels)


def test_ranks_take_disjoint_slices_of_one_permutation():
    ds = toy_dataset(48)
    ranks = [BatchLoader(ds, 4, train=True, seed=5, rank=r, world_size=3) for r in range(3)]
    for loader in ranks:
        loader.set_epoch(2)
    slices = [set(loader.indices().tolist()) for loader in ranks]
    assert all(len(s) == 16 for s in slices) and set.union(*slices) == set(range(48))
    assert sum(len(s) for s in slices) == 48  # disjoint
    single = BatchLoader(ds, 4, train=True, seed=5)
    single.set_epoch(2)
    assert set(single.indices()[1::3].tolist()) == slices[1]  # the same permutation on every rank
    # Uneven sizes are padded so every rank has the same number of batches.
    uneven = [BatchLoader(toy_dataset(10), 2, train=False, rank=r, world_size=4) for r in range(4)]
    assert [len(loader.indices()) for loader in uneven] == [3] * 4 and len({len(u) for u in uneven}) == 1
    assert set().union(*(set(u.indices().tolist()) for u in uneven)) == set(range(10))


def test_loader_rejects_bad_arguments():
    ds = toy_dataset(10)
    for bad in (0, -1):
        with pytest.raises(MixbitsError, match=f"batch_size must be an integer >= 1, got {bad}"):
            BatchLoader(ds, bad, train=True)
    with pytest.raises(MixbitsError, match="batch_size=11"):
        BatchLoader(ds, 11, train=True)
    assert len(BatchLoader(ds, 11, train=False)) == 1  # keeps the partial batch
    with pytest.raises(MixbitsError, match="empty"):
        BatchLoader(ds.subset([]), 4, train=False)
    with pytest.raises(MixbitsError, match="rank must be in 0..1"):
        BatchLoader(ds, 2, train=True, rank=2, world_size=2)


# ----------------------------------------------------------------------------------------------- config


def test_data_config_lists_every_problem():
    assert DataConfig().problems() == []
    bad = DataConfig(name="cifar", batch_size=0, eval_batch_size=-2, val_fraction=1.0, max_train_samples=0,
                     augment="yes", image_size=0)
    problems = bad.problems()
    for field in ("name", "batch_size", "eval_batch_size", "val_fraction", "max_train_samples", "augment",
                  "image_size"):
        assert any(p.startswith(f"data.{field}:") for p in problems), field
    assert "data.batch_size: must be an integer > 0, got 0" in problems and len(problems) == 7
    assert "Did you mean 'cifar10'" in problems[0]
    assert DataConfig(name="cifar10").problems(prefix="cfg.data")[0].startswith("cfg.data.root: required")
    assert any("image_size" in p for p in DataConfig(image_size=32).problems())
    assert set(DATASETS.names()) == {"fashion-mnist", "cifar10", "cifar100", "imagefolder"}


def test_build_loaders(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=100, n_test=30)
    cfg = DataConfig(root=str(root), batch_size=16, eval_batch_size=8, val_fraction=0.2, max_train_samples=50)
    train, val, test, meta = build_loaders(cfg, seed=0)
    assert (len(meta), len(val.dataset), len(test.dataset)) == (50, 20, 30)
    assert (len(train), len(val), len(test)) == (3, 3, 4) and train.augment and not val.augment
    assert (meta.num_classes, meta.in_chans, meta.image_size) == (10, 1, (28, 28))
    # The validation split does not depend on the training subset size.
    _, val_full, _, _ = build_loaders(DataConfig(root=str(root), batch_size=16, val_fraction=0.2), seed=0)
    assert torch.equal(val_full.dataset.images, val.dataset.images)
    with pytest.raises(MixbitsError, match="data.batch_size"):
        build_loaders(DataConfig(root=str(root), batch_size=0), seed=0)


def test_split_seed_keeps_one_validation_split_across_run_seeds(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=100, n_test=30)

    def parts(seed, split_seed=None):
        cfg = DataConfig(root=str(root), batch_size=8, val_fraction=0.2, max_train_samples=40, split_seed=split_seed)
        train, val, _, _ = build_loaders(cfg, seed=seed)
        return train.dataset.images, val.dataset.images

    fixed = [parts(seed, split_seed=0) for seed in (0, 1, 2)]
    assert all(torch.equal(val, fixed[0][1]) for _, val in fixed)  # one validation split for every seed
    assert torch.equal(fixed[0][1], parts(0)[1])  # the split of the seed it names
    assert not torch.equal(parts(1)[1], fixed[0][1])  # without it, each seed draws its own
    assert not torch.equal(fixed[1][0], fixed[0][0])  # the training subset still follows the run's seed
    for train, val in fixed:  # never a validation image in any seed's training part
        assert not (train.flatten(1)[:, None] == val.flatten(1)[None]).all(-1).any()
    assert DataConfig(split_seed="0").problems() == ["data.split_seed: must be an integer or null, got '0'"]
