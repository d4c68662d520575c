"""Batches: `make_loader(split, batch_size, ...)`.

Both loaders yield (images uint8 (B, C, H, W), labels int64 (B,)) on the
requested device and have `len()` (batches per epoch) and `set_epoch(e)`.
Augmentation is not done here: the engine applies the batched transforms
of `augment.py` to what comes out, on the training device.

The order of an epoch is a pure function of (seed, epoch), computed the same
way for both kinds of split by `epoch_indices`, so a resumed run sees the
same batches and every DDP rank agrees on the permutation without talking.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError, raise_if_stopped
from .base import FileSplit, TensorSplit


def epoch_indices(n: int, *, train: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  repeated_aug: int = 1) -> torch.Tensor:
    """The dataset indices this rank visits in this epoch, in order. int64 (M,).

    train: a fresh permutation per epoch from a generator seeded by (seed, epoch);
    the permutation is cut to a multiple of world_size and dealt round-robin, so
    the shards are disjoint and of equal length (DDP needs equal step counts).
    The up to world_size-1 images left over change every epoch.

    repeated_aug=k (DeiT's RASampler): every image of the permutation is written
    k times in a row before dealing, so its copies land on k different ranks (or
    in the same batch on one rank) and get k different augmentations. As in DeiT
    the epoch keeps its length (each rank still visits about n / world_size
    samples), so an epoch covers about n / k distinct images and the schedule
    does not change with k.

    eval (train=False): the identity order, dealt round-robin without padding
    or truncation, so every image is visited exactly once over all ranks (the
    shards may differ in length by one; sum counts with all_reduce at the end).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if not train:
        return torch.arange(rank, n, world_size)
    if repeated_aug < 1:
        raise UserError(f"repeated_aug must be >= 1, got {repeated_aug}")
    # Mix seed and epoch into one 63-bit seed; distinct (seed, epoch) pairs give distinct streams.
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 1) % (2**63 - 1))
    order = torch.randperm(n, generator=g)  # (n,)
    per_rank = n // world_size  # equal, disjoint shards
    if repeated_aug > 1:
        order = order.repeat_interleave(repeated_aug)  # (n * k,)
    order = order[: per_rank * world_size]
    return order[rank::world_size]


class TensorLoader:
    """Batches of an in-memory split by tensor indexing: no per-image Python work.

    The split's tensors are moved to `device` once; each batch is one index_select.
    """

    def __init__(self, split: TensorSplit, batch_size: int, *, train: bool, seed: int, device,
                 rank: int = 0, world_size: int = 1, repeated_aug: int = 1, drop_last: bool | None = None):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.images = split.images.to(device)  # uint8 (N, C, H, W)
        self.labels = split.labels.to(device)  # int64 (N,)
        self.batch_size, self.train, self.seed, self.device = batch_size, train, seed, torch.device(device)
        self.rank, self.world_size, self.repeated_aug = rank, world_size, repeated_aug
        self.drop_last = train if drop_last is None else drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def close(self) -> None:
        """Nothing to stop (no worker processes); FileLoader's counterpart stops its decoders."""

    def _indices(self) -> torch.Tensor:
        return epoch_indices(len(self.labels), train=self.train, seed=self.seed, epoch=self.epoch,
                             rank=self.rank, world_size=self.world_size, repeated_aug=self.repeated_aug)

    def _num_samples(self) -> int:
        n = len(self.labels)
        return (n // self.world_size) if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        m = self._num_samples()
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def __iter__(self):
        idx = self._indices().to(self.device)
        for b in range(len(self)):
            raise_if_stopped()
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]  # (B,)
            yield self.images.index_select(0, sel), self.labels.index_select(0, sel)


def make_loader(split, batch_size: int, *, train: bool, seed: int, device="cpu", img_size=None, rank: int = 0,
                world_size: int = 1, repeated_aug: int = 1, num_workers: int = 2, drop_last: bool | None = None,
                on_corrupt: str = "skip"):
    """A loader for a TensorSplit (in-memory indexing) or a FileSplit (decoding workers).

    img_size: (H, W) or int, the decode size of a FileSplit (ignored for tensors:
    the batched transforms resize). drop_last defaults to `train`.
    """
    if isinstance(split, TensorSplit):
        return TensorLoader(split, batch_size, train=train, seed=seed, device=device, rank=rank,
                            world_size=world_size, repeated_aug=repeated_aug, drop_last=drop_last)
    if isinstance(split, FileSplit):
        from .files import FileLoader

        return FileLoader(split, batch_size, train=train, seed=seed, device=device, img_size=img_size, rank=rank,
                          world_size=world_size, repeated_aug=repeated_aug, num_workers=num_workers,
                          drop_last=drop_last, on_corrupt=on_corrupt)
    raise TypeError(f"make_loader expects a TensorSplit or FileSplit, got {type(split).__name__}")
