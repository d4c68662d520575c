"""The large-image path: decode files with Pillow in DataLoader worker processes.

Workers only decode: any mode (L, LA, RGBA, P, CMYK, I;16, ...) -> RGB, shorter
side resized, centre square cropped, returned as uint8 (3, S, S). All random
augmentation happens later on whole batches (augment.py), so workers need no
seeds and a batch's pixels depend only on its file list.

For training the square is the resize size, img_size * 256 / 224 (the usual
ImageNet ratio), so the train transform's random crop has room to move; for
evaluation the resize is the same and the centre crop is img_size, the
standard "resize 256, crop 224" protocol.

A file that cannot be decoded is never fatal halfway through a run: with
on_corrupt="skip" it is dropped from its batch, reported once with its path
(a warning) and counted in `loader.corrupt`; with "fail" the loader raises a
UserError naming it.
"""

from __future__ import annotations

import math
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError, VitlabWarning, raise_if_stopped, stopped_by_signal
from .base import DataError, FileSplit
from .loader import epoch_indices


def to_rgb(img):
    """Any Pillow image -> mode RGB. Transparency is composited on white (not left as black);
    16/32-bit and float greyscale are scaled to 8 bits by their own range."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "RGBA", "La", "RGBa"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode(path: str, resize: int, crop: int) -> torch.Tensor:
    """Open, convert to RGB, resize the shorter side to `resize`, centre-crop crop x crop. uint8 (3, crop, crop)."""
    from PIL import Image

    with Image.open(path) as img:
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; ask for the smallest that is still >= resize.
        img.draft("RGB", (resize, resize))
        img = to_rgb(img)
        w, h = img.size
        s = resize / min(w, h)
        # the longer side as Hugging Face's processors size it (int(resize * long / short)), so an
        # exported model's ConvNeXt-style processor (models/export.py) crops the same pixels
        nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None if s > 0.5 else 2.0)
        left, top = (nw - crop) // 2, (nh - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
        a = np.asarray(img, dtype=np.uint8)  # (crop, crop, 3)
    return torch.from_numpy(a.copy()).permute(2, 0, 1)  # (3, crop, crop)


def read_image_file(path: str, in_chans: int, size: tuple[int, int], crop: bool = False) -> torch.Tensor:
    """A user's image file -> uint8 (C, H, W) at a model's input size, C = in_chans (RGB or L):
    with crop, as `decode` prepares image-file datasets (shorter side to 256/224 of the size, centre
    crop); else the whole image resized. A bad file (missing, not an image, truncated, absurdly
    large) is one UserError naming it. Used by `vitlab predict` and `vitlab visualize`."""
    from PIL import Image, UnidentifiedImageError

    h, w = size
    if not Path(path).is_file():
        raise UserError(f"image not found: {path}")
    try:
        if crop and in_chans == 3 and h == w:
            return decode(path, round(h * 256 / 224), h)
        with Image.open(path) as img:
            img.draft("RGB", (w, h))  # JPEG: decode at the smallest scale still >= the input size
            img = to_rgb(img)  # any mode (palette, alpha on white, 16-bit) -> RGB first
            if in_chans == 1:
                img = img.convert("L")
            a = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.uint8)  # (H, W) or (H, W, 3)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    x = torch.from_numpy(a.copy())
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)


class _Decode(Dataset):
    def __init__(self, split: FileSplit, resize: int, crop: int):
        self.paths, self.labels, self.resize, self.crop = split.paths, split.labels, resize, crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return decode(self.paths[i], self.resize, self.crop), int(self.labels[i]), None
        except Exception as e:  # noqa: BLE001 - any decoder failure means "this file is unreadable"
            return None, int(self.labels[i]), f"{self.paths[i]} ({type(e).__name__}: {e})"


def _collate(items):
    good = [(x, y) for x, y, err in items if err is None]
    bad = [err for _, _, err in items if err is not None]
    if good:
        x = torch.stack([x for x, _ in good])  # (B, 3, S, S) uint8
        y = torch.tensor([y for _, y in good], dtype=torch.long)
    else:
        x, y = None, None
    return x, y, bad


class FileLoader:
    """Batches of a FileSplit, decoded by `num_workers` processes, order from `epoch_indices`."""

    def __init__(self, split: FileSplit, batch_size: int, *, train: bool, seed: int, device, img_size=None,
                 rank: int = 0, world_size: int = 1, repeated_aug: int = 1, num_workers: int = 2,
                 drop_last: bool | None = None, on_corrupt: str = "skip"):
        if on_corrupt not in ("skip", "fail"):
            raise UserError(f"data.on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if len(split) == 0:
            raise DataError("the image list is empty")
        size = img_size or 224
        size = size if isinstance(size, int) else int(max(size))
        resize = round(size * 256 / 224)
        self.crop = resize if train else size  # train: keep the full square for the random crop
        self.dataset = _Decode(split, resize, self.crop)
        self.batch_size, self.train, self.seed, self.device = batch_size, train, seed, torch.device(device)
        self.rank, self.world_size, self.repeated_aug = rank, world_size, repeated_aug
        self.num_workers, self.on_corrupt = num_workers, on_corrupt
        self.drop_last = train if drop_last is None else drop_last
        self.epoch = 0
        self.corrupt: dict[str, str] = {}  # path -> reason, for every unreadable file met so far
        self._loader: DataLoader | None = None

    def close(self) -> None:
        """Stop the decoding workers now rather than at interpreter exit (the engine calls this
        when a run ends). The loader can be iterated again: it starts new workers."""
        if self._loader is not None:
            it = getattr(self._loader, "_iterator", None)  # torch's persistent worker pool, if started
            if it is not None and hasattr(it, "_shutdown_workers"):
                workers = list(getattr(it, "_workers", []))
                try:
                    it._shutdown_workers()
                except RuntimeError as e:  # workers a Ctrl-C or SIGTERM already ended: nothing left to stop
                    if stopped_by_signal(e) is None:
                        raise
                finally:
                    # torch's last resort for a worker that does not stop is SIGTERM, which ours ignore
                    # (_ignore_stop_signals): SIGKILL instead, so none outlives its run
                    for w in workers:
                        if w.is_alive():
                            w.kill()
                            w.join(timeout=5)
            self._loader = None

    @property
    def num_corrupt(self) -> int:
        return len(self.corrupt)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _num_samples(self) -> int:
        n = len(self.dataset)
        return n // self.world_size if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        m = self._num_samples()
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def batches(self) -> list[list[int]]:
        """This epoch's batches of dataset indices (for this rank)."""
        idx = epoch_indices(len(self.dataset), train=self.train, seed=self.seed, epoch=self.epoch, rank=self.rank,
                            world_size=self.world_size, repeated_aug=self.repeated_aug).tolist()
        return [idx[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]

    def __iter__(self):
        if self._loader is None:
            # Built once: the batch sampler reads the current epoch when iterated, so the
            # worker processes can persist across epochs instead of being forked anew.
            # No pinned memory: with persistent workers it makes the process hang for 5 s per worker
            # at exit (pytorch#81794; a fine-tuning run on one H200, 3 loaders of 8 workers, sat two
            # minutes after its last line), and a uint8 batch is small enough (4.8 MB at batch 32,
            # 224 px) that copying it from pageable memory costs the GPU step next to nothing.
            self._loader = DataLoader(self.dataset, batch_sampler=_EpochBatches(self), num_workers=self.num_workers,
                                      collate_fn=_collate, persistent_workers=self.num_workers > 0,
                                      worker_init_fn=_ignore_stop_signals)
        for x, y, bad in self._loader:
            raise_if_stopped()
            for err in bad:
                path = err.split(" (", 1)[0]
                if self.on_corrupt == "fail":
                    raise DataError(f"cannot decode image {err}; fix or remove it, or set data.on_corrupt=skip")
                if path not in self.corrupt:
                    self.corrupt[path] = err
                    warnings.warn(f"skipping unreadable image {err} ({len(self.corrupt)} so far)", VitlabWarning,
                                  stacklevel=2)
            if x is None:
                continue
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _ignore_stop_signals(worker_id: int) -> None:
    """A decoding worker ignores Ctrl-C's SIGINT and SIGTERM, which a terminal or a scheduler sends to
    the whole process group: the main process takes the signal and stops its workers itself (they
    also end on their own once it is gone, torch's watchdog). Taken in a worker, the signal would
    land mid-decode: a KeyboardInterrupt printed from a weakref callback, or torch's SIGTERM handler
    dying by the signal, which the main process's child watcher then reports as a RuntimeError
    traceback ("DataLoader worker ... is killed by signal: Terminated") instead of one line.
    Nor does a worker print a traceback when the main process, stopping, hangs up on the thread
    that hands it a batch's shared memory (multiprocessing's resource sharer: a broken pipe). That
    thread catches its errors and reports them through sys.excepthook; a thread that died of a
    hang-up uncaught would report through threading.excepthook, so both are quieted for hang-ups
    alone: any other error still prints."""
    import signal
    import sys
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hangup = (BrokenPipeError, ConnectionResetError)
    default_sys, default_threading = sys.excepthook, threading.excepthook

    def quiet_sys(exc_type, exc, tb):
        if not issubclass(exc_type, hangup):
            default_sys(exc_type, exc, tb)

    def quiet_threading(args):
        if not issubclass(args.exc_type, hangup):
            default_threading(args)

    sys.excepthook, threading.excepthook = quiet_sys, quiet_threading


class _EpochBatches:
    """A batch sampler that asks its loader for the current epoch's batches each time it is iterated.

    It holds the loader weakly: the loader owns the DataLoader that owns this sampler, and a strong
    reference back would make a cycle, so a loader dropped without close() (a run that failed, in a
    process that goes on: `vitlab ablate`, a sweep) would keep its worker processes until Python's
    cycle collector ran, instead of stopping them as soon as the last reference goes.
    """

    def __init__(self, loader: FileLoader):
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> FileLoader:
        loader = self._loader()
        if loader is None:  # (cannot happen while the FileLoader iterates: it holds the DataLoader)
            raise RuntimeError("the FileLoader of this batch sampler is gone")
        return loader

    def __iter__(self):
        return iter(self.loader.batches())

    def __len__(self):
        return len(self.loader)
