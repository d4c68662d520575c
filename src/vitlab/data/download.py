"""Checksummed downloads that never leave a file that looks complete.

A download goes to `NAME.part-XXXX` beside its destination, with a tqdm bar.
Only after its checksum matches is it renamed to NAME (rename is atomic), so
NAME exists only when it is whole and verified. A checksum mismatch deletes
the part file and raises a UserError naming the URL and both checksums; any
other failure (network, disk, Ctrl-C) deletes it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..utils import make_dir
from .base import DataError

CHUNK = 1 << 20


class DownloadError(DataError):
    """The network or the disk failed (not a checksum mismatch, which is a plain DataError)."""

    def __init__(self, url: str, reason: str, dest: Path):
        super().__init__(f"could not download {url} ({reason}); place the file at {dest} instead")
        self.url, self.reason = url, reason


def file_hash(path: str | Path, algo: str = "md5") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, out, desc: str) -> None:
    """Stream `url` into the open binary file `out`, with a progress bar. Swappable in tests."""
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "vitlab"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False) as bar:
            for block in iter(lambda: resp.read(CHUNK), b""):
                out.write(block)
                bar.update(len(block))


def download(url: str, dest: str | Path, md5: str) -> Path:
    """Download `url` to `dest` unless a verified copy is already there. Returns dest.

    An existing `dest` is trusted only if its md5 matches; otherwise it is replaced.
    """
    dest = Path(dest)
    if dest.is_file() and file_hash(dest) == md5:
        return dest
    # folders this call makes: taken away again if the download fails, so a mistyped --data-dir or a
    # machine offline leaves no empty dataset folder behind (an image folder would read it as a class)
    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    make_dir(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f"{dest.name}.part-", dir=dest.parent)
    ok = False
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out, dest.name)
        actual = file_hash(tmp)
        if actual != md5:
            raise DataError(f"download of {url} failed its checksum (expected md5 {md5}, got {actual}); "
                            f"the file was deleted, try again or place a good copy at {dest}")
        os.replace(tmp, dest)
        ok = True
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise DownloadError(url, str(reason), dest) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not ok:
            for d in made:  # deepest first; a folder something else wrote into stays
                with contextlib.suppress(OSError):
                    d.rmdir()
    return dest

