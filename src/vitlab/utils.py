"""Small helpers shared across vitlab: atomic file writes and seeding."""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UserError


def make_dir(path: str | Path) -> Path:
    """Create an output folder and its parents. A path that cannot be one (a file, a read-only
    place) is bad input: one UserError line, not an OSError traceback."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {path}: {e.strerror or e}") from None
    return path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write a file so that it is either complete or absent, never half-written.

    `write(tmp_path)` writes to a temporary file in the same directory, which is
    fsynced and then renamed over `path` (rename is atomic on POSIX). A crash or
    SIGKILL at any point leaves the previous file intact.
    """
    path = Path(path)
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes it 0600 (and a writer may recreate the file): give it a normal file's mode
        os.chmod(tmp, 0o666 & ~_umask())
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


def write_json(path: str | Path, record) -> Path:
    """A benchmark's or a run's record as indented JSON: its folder made (a bad one is one UserError
    line), the file written whole or not at all. -> the path."""
    path = Path(path)
    make_dir(path.parent)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def file_part(name: str) -> str:
    """A name as part of a file name: 'T-shirt/top' -> 'T-shirt_top', 'imagefolder:x' -> 'imagefolder_x'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "unknown"


def torch_file_kind(path: str | Path) -> str | None:
    """Why torch.load could not read `path`, from its first bytes, where torch's own reason (a pickle
    opcode, a byte value) would mean nothing to a user; None if it looks like a torch file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot read it: {e.strerror}"
    if head.startswith(b"PK\x03\x04"):  # torch's zip format: a damaged one is cut short or corrupt
        return None if zip_is_whole(path) else "a damaged torch zip archive: cut short or corrupt"
    if not head or head[:1] != b"\x80":  # pickle protocol 2+ starts with PROTO (0x80)
        return "not a torch file: neither its zip format nor a pickle" + (" (empty)" if not head else "")
    return None


def zip_is_whole(path: str | Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator() -> bool:
    """Keep freed tensor buffers in the process instead of handing them back to the OS (glibc only).

    A training step allocates and frees hundreds of activation buffers of 0.1-50 MB. glibc serves
    each one above its mmap threshold with fresh pages from the kernel, which fault in (and are
    zeroed) one 4 KiB page at a time, and returns the top of its heap to the kernel whenever enough
    of it is free; the next step then faults the same memory in again. With both thresholds raised,
    the buffers are reused from the heap: on the dev CPU, in fresh processes, ViT-Tiny's bf16
    training step ran 1.31x and its inference 1.59x faster (page faults per step 49k -> 1.6k and
    50k -> 39), the Fashion-MNIST preset's small model 1.09x (benchmarks/allocator.py; the
    pairs scattered widely). Peak RSS rose by up to 10%; up to 1 GiB of freed heap stays with the
    process until it exits. The same effect is why Intel recommends jemalloc or tcmalloc for
    PyTorch on CPUs; this needs no extra library. It is process-wide: tests that call
    `vitlab.cli.main` in-process set it for the test process too (harmless).

    Returns whether the settings took; calling it again is harmless. A no-op off glibc (macOS,
    Windows, musl) and when the environment sets VITLAB_TUNE_MALLOC=0 (the benchmark's baseline).
    """
    if os.environ.get("VITLAB_TUNE_MALLOC", "1") == "0":
        return False
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # Setting either threshold switches off glibc's adaptive one (which starts at 128 KiB and stops
    # at 32 MiB), so both are set: the trim threshold alone would leave every buffer over 128 KiB on
    # fresh pages. 512 MiB covers ViT-B/16's largest activation at batch 128 (its MLP's, 155 MB in
    # bf16, 310 MB in fp32); glibc before about 2.35 refuses more than 32 MiB, its adaptive maximum.
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, 512 << 20) or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) and mmap_ok)
