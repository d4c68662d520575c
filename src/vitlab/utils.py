"""Small helpers shared across vitlab: atomic file writes, a run folder's lock, and seeding."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
import weakref
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .errors import RunFailed, UserError, brief, raise_if_stopped


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
    if not os.access(path, os.W_OK | os.X_OK):  # an existing read-only folder: said before the work, not after
        raise UserError(f"cannot write in the folder {path}: permission denied")
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
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):  # the disk, not the folder the user named
            raise RunFailed(f"cannot write {path}: {write_failure(e, path.parent)}") from None
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes it 0600 (and a writer may recreate the file): give it a normal file's mode
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        reason = write_failure(e, path.parent)
        if reason is None:
            raise
        kept = "the previous copy is kept" if path.exists() else "nothing was written"
        raise RunFailed(f"cannot write {path}: {reason}; {kept}") from None


def write_failure(e: BaseException, folder: Path) -> str | None:
    """Why writing a file failed, as a line, where the cause is the disk (full, over quota, gone
    read-only, an I/O error), not vitlab; None for anything else. torch.save reports a full disk as
    a RuntimeError ("file write failed") and safetensors as its own SafetensorError."""
    if isinstance(e, OSError):
        reason = e.strerror or brief(e)
    elif type(e).__name__ == "SafetensorError" or (isinstance(e, RuntimeError) and any(
            k in str(e) for k in ("write", "PytorchStreamWriter", "unexpected pos"))):
        reason = brief(e)
    else:
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return reason
    if free < (64 << 20) and "space" not in reason.lower():
        reason += f" (the disk has {free >> 20} MB free)"
    return reason


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged(out: str | Path, stale: Callable[[set[str]], Iterable[Path]] | None = None) -> Iterator[Path]:
    """A set of files written together: into a hidden folder inside `out`, moved into `out` only once
    every one is written. An interruption (Ctrl-C, a full disk, a failed plot) leaves `out` as it was,
    never a mix of the old set and part of the new one. stale(names moved in) -> an earlier set's
    files to delete with the move. Ctrl-C and SIGTERM wait until the move and the deletion are done.

        with staged(out) as stage:
            atomic_write(stage / "a.png", ...)   # then the next file, and so on
    """
    out = make_dir(out)
    try:
        stage = Path(tempfile.mkdtemp(prefix=".staging.", dir=out))
    except OSError as e:
        raise UserError(f"cannot write in {out}: {e.strerror or e}") from None
    held = _flock(stage / HELD)  # while held, this set is being written: no other call sweeps it away
    try:
        _sweep_stages(out, stage)
        yield stage
        raise_if_stopped()  # a stop dropped on the way (errors.raise_if_stopped): not moved in
        with _signals_held():
            names = {f.name for f in stage.iterdir() if f.name != HELD}
            for name in sorted(names):  # renames within one folder's file system: each is atomic
                os.replace(stage / name, out / name)
            for f in (stale(names) if stale else ()):
                f.unlink(missing_ok=True)
    finally:
        if held is not None:
            held.close()
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM delivered after the block, not inside it (main thread, POSIX; elsewhere
    the block simply runs)."""
    import signal
    import threading

    stops = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


HELD = ".held"  # a staging folder's lock file
STAGE_GRACE_S = 60  # a staging folder this young is never swept: its writer may be about to lock it

# Files this process holds a lock through. A forked child (a data-loading worker) gets copies of
# their descriptors, and flock's lock lasts while any copy is open: the child closes its copies,
# so the lock ends with this process, not with its last worker.
_LOCKED_FILES: weakref.WeakSet = weakref.WeakSet()


def _close_in_child() -> None:
    for f in list(_LOCKED_FILES):
        with contextlib.suppress(OSError, ValueError):
            # the descriptor pointed at /dev/null instead: the lock file is let go, and the file
            # object's own close later (at the child's exit) closes nothing of anyone else's
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, f.fileno())
            os.close(null)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _flock(path: Path, create: bool = True):
    """`path` opened and exclusively locked (flock: the OS drops it when the process ends, however it
    ends). -> the open file, which holds the lock until closed; None where it is locked already, or
    on a system without fcntl (Windows) or whose file system refuses locks."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        f = open(path, "a+" if create else "r")
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    _LOCKED_FILES.add(f)
    return f


def _sweep_stages(out: Path, keep: Path) -> None:
    """Remove staging folders in `out` that a killed process (SIGKILL, a power cut) left: those whose
    lock nobody holds and that are older than a minute (a younger one's writer may be between making
    it and locking it). One without a lock file is left for an hour."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return
    import time

    for d in out.glob(".staging.*"):
        if d == keep or not d.is_dir():
            continue
        try:
            age = time.time() - d.stat().st_mtime
        except OSError:
            continue
        if age < STAGE_GRACE_S or (not (d / HELD).exists() and age < 3600):
            continue
        f = _flock(d / HELD, create=False)
        if f is None and (d / HELD).exists():  # held: its writer is at work
            continue
        if f is not None:
            f.close()
        shutil.rmtree(d, ignore_errors=True)


# the temporary files a run's own writes leave when SIGKILL cuts one short (atomic_write's names):
# others in the folder (`vitlab eval` writing eval.json there) are not the run's to remove
RUN_FILES = ("last.ckpt", "model.safetensors", "metrics.jsonl", "curves.png", "config.yaml", "test.json")


class RunLock:
    """One process at a time in a run folder: an exclusive lock on RUN/.lock, held while the run
    trains. The operating system drops the lock when its process ends however it ends (SIGKILL
    included; its data-loading workers do not hold it), so a crashed run never leaves a stale lock
    behind to refuse its --resume. Without fcntl (Windows), or on a file system that refuses locks
    (some network mounts), there is no lock: a warning says so once."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._f = None
        try:
            import fcntl
        except ImportError:
            self._no_lock("this system has no flock (fcntl)")
            return
        try:
            f = open(self.path, "a+")
        except OSError as e:
            raise UserError(f"cannot write in {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise UserError(f"another vitlab process{f' (pid {holder})' if holder.isdigit() else ''} is training "
                            f"in {self.path.parent}; wait for it to end, or write to another folder "
                            f"(--run.name, --out)") from None
        except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP: the file system has no locks
            f.close()
            self._no_lock(f"{self.path.parent}'s file system refuses file locks ({e.strerror or e})")
            return
        _LOCKED_FILES.add(f)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._f = f

    @staticmethod
    def _no_lock(why: str) -> None:
        import warnings

        from .errors import VitlabWarning

        warnings.warn(f"{why}; nothing stops a second run from writing into this folder at the same time",
                      VitlabWarning, stacklevel=3)

    def clean_stale(self) -> int:
        """Remove the hidden temporary files (.NAME.*.tmp) of the run's own files that a writer killed
        mid-save left; the lock says no other run is writing here now (without one: nothing). -> how many."""
        n = 0
        if self._f is None:
            return n
        for name in RUN_FILES:
            for f in self.path.parent.glob(f".{name}.*.tmp"):
                with contextlib.suppress(OSError):
                    f.unlink()
                    n += 1
        return n

    def close(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the file releases the lock
            self._f = None


def append_line(path: str | Path, line: str) -> None:
    """One line added to a log file (metrics.jsonl); a full disk is one RunFailed line, as for
    atomic_write (the file is rewritten whole from the checkpoint on --resume)."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise RunFailed(f"cannot write {path}: {write_failure(e, path.parent)}") from None


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
