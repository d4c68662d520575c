"""The records every data source returns: dataset facts, splits, the bundle."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


class DataError(UserError):
    """Missing, corrupt or malformed data; the CLI prints the one line and exits 2."""


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    classes: list[str]
    in_chans: int
    img_size: tuple[int, int]  # native (H, W) of the in-memory images, or the decode size for files
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    note: str = ""  # what the source decided for the user (a held-out test split), for the run's log


class TensorSplit:
    """A small dataset held in memory: the whole split is two (three) tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"TensorSplit images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"TensorSplit has {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images  # uint8 (N, C, H, W)
        self.labels = labels.long()  # int64 (N,)
        self.boxes = boxes  # int64 (N, 4) x0, y0, x1, y1 (exclusive), or None

    def __len__(self) -> int:
        return self.images.shape[0]

    def select(self, idx: torch.Tensor) -> "TensorSplit":
        return TensorSplit(self.images[idx], self.labels[idx], None if self.boxes is None else self.boxes[idx])

    def __repr__(self) -> str:
        return f"TensorSplit({len(self)} images {tuple(self.images.shape[1:])})"


class FileSplit:
    """A large-image dataset: paths decoded on the fly by loader workers."""

    def __init__(self, paths: list[str], labels: torch.Tensor | list[int]):
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)  # int64 (N,)
        if len(self.paths) != self.labels.shape[0]:
            raise ValueError(f"FileSplit has {len(self.paths)} paths but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, idx: torch.Tensor) -> "FileSplit":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return FileSplit([self.paths[i] for i in idx.tolist()], self.labels[idx])

    def __repr__(self) -> str:
        return f"FileSplit({len(self)} files)"


Split = TensorSplit | FileSplit


@dataclass
class DataBundle:
    info: DatasetInfo
    train: Split
    val: Split | None
    test: Split
