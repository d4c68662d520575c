"""Small helpers shared across vitlab: atomic file writes and seeding."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write a file so that it is either complete or absent, never half-written.

    `write(tmp_path)` writes to a temporary file in the same directory, which is
    fsynced and then renamed over `path` (rename is atomic on POSIX). A crash or
    SIGKILL at any point leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    def _w(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, _w)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
