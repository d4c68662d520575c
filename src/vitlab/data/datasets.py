"""Dataset sources, selected by name: `build_data(DataConfig) -> DataBundle`.

Small datasets (shapes, CIFAR, MNIST, Fashion-MNIST) are read whole into
uint8 tensors (TensorSplit); large-image ones (Flowers102, image folders)
become lists of paths (FileSplit) that loader workers decode.

Where data lives: `cfg.dir`, else $VITLAB_DATA, else ~/.cache/vitlab. Each
source looks in a few obvious places under that root (the root itself, and
a subfolder named after the dataset), reads an extracted copy or the
official archive, and otherwise downloads the official files (checksummed,
see `download.py`). When none of that works the error is one line naming
where it looked and how to supply the data.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import DataConfig
from .base import DataBundle, DataError, DatasetInfo, TensorSplit
from .shapes import SHAPES_CLASSES, TEST_SEED, TEST_SIZE, TRAIN_SEED, TRAIN_SIZE, make_shapes

# Published per-channel statistics, in [0, 1] units.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DATASETS = ("shapes", "cifar10", "cifar100", "mnist", "fashion-mnist", "flowers102", "imagefolder:PATH")


def data_root(cfg: DataConfig) -> Path:
    """cfg.dir, else $VITLAB_DATA, else ~/.cache/vitlab."""
    if cfg.dir:
        return Path(cfg.dir).expanduser()
    if os.environ.get("VITLAB_DATA"):
        return Path(os.environ["VITLAB_DATA"]).expanduser()
    return Path.home() / ".cache" / "vitlab"


# -- shapes -----------------------------------------------------------------------

_SHAPES_CACHE: dict[tuple, tuple] = {}


def _shapes(cfg: DataConfig):
    # Generation is deterministic and takes ~1 s, so keep it per process: tests,
    # the demo and attention plots ask for it repeatedly.
    key = (TRAIN_SIZE, TEST_SIZE)
    if key not in _SHAPES_CACHE:
        _SHAPES_CACHE[key] = (make_shapes(TRAIN_SIZE, TRAIN_SEED), make_shapes(TEST_SIZE, TEST_SEED))
    (xtr, ytr, btr), (xte, yte, bte) = _SHAPES_CACHE[key]
    train = TensorSplit(xtr, ytr, btr)
    test = TensorSplit(xte, yte, bte)
    # Mean/std computed from the generated training set (rounded, so they read well in configs).
    x = xtr[:2000].float().div_(255)
    mean = tuple(round(float(m), 3) for m in x.mean((0, 2, 3)))
    std = tuple(round(float(s), 3) for s in x.std((0, 2, 3)))
    info = DatasetInfo("shapes", len(SHAPES_CLASSES), list(SHAPES_CLASSES), 3, tuple(xtr.shape[2:]), mean, std)
    return info, train, None, test


# -- build_data -------------------------------------------------------------------

_SOURCES = ("cifar10", "cifar100", "mnist", "fashion-mnist", "flowers102")


def _source(name: str):
    if name == "shapes":
        return _shapes
    if name == "imagefolder":
        raise DataError("imagefolder needs a path: --data imagefolder:PATH (one subfolder per class)")
    if name not in _SOURCES and not name.startswith("imagefolder:"):
        import difflib

        close = difflib.get_close_matches(name, ("shapes",) + _SOURCES + ("imagefolder:PATH",), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint} (choose from {', '.join(DATASETS)})")
    from . import sources  # the file-reading sources, imported only when asked for

    if name.startswith("imagefolder:"):
        return sources.imagefolder
    return getattr(sources, name.replace("-", "_"))


def _shuffle(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def build_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load the dataset `cfg.name` and apply cfg.val_fraction / cfg.subset.

    val_fraction > 0 holds out that share of the training split (a shuffle seeded
    by `seed`) as validation, replacing any official val split; subset=N then keeps
    the first N training images of another seeded shuffle.
    """
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.subset is not None and cfg.subset <= 0:
        raise DataError(f"data.subset must be a positive number of images, got {cfg.subset}")
    info, train, val, test = _source(cfg.name)(cfg)
    if cfg.val_fraction > 0:
        n = len(train)
        n_val = max(1, round(n * cfg.val_fraction))
        if n_val >= n:
            raise DataError(f"data.val_fraction={cfg.val_fraction} leaves no training images out of {n}")
        perm = _shuffle(n, seed + 1)
        val, train = train.select(perm[:n_val]), train.select(perm[n_val:])
    if cfg.subset is not None and cfg.subset < len(train):
        perm = _shuffle(len(train), seed + 2)
        train = train.select(perm[: cfg.subset])
    return DataBundle(info, train, val, test)
