"""A small reader for MATLAB level-5 .mat files: numeric arrays only.

Flowers102 ships its labels and split as two tiny .mat files; reading them
needs only this much of the format, so scipy is not a runtime dependency.

Layout (MATLAB "MAT-File Format", level 5):
  128-byte header: 116 bytes of text, 8 bytes subsystem offset, uint16 version,
  2-byte endian indicator ("IM" on disk = little-endian).
  Then data elements, each a tag (uint32 type, uint32 byte count) and its data,
  padded to 8 bytes. A "small" element packs the count in the tag's upper 16 bits
  and up to 4 data bytes in the tag's second word. miCOMPRESSED wraps one
  zlib-compressed element (and is not padded). A variable is an miMATRIX whose
  sub-elements are: array flags, dimensions, name, real part, [imaginary part].
  Data is column-major.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from .base import DataError

# data types: code -> numpy dtype
_MI = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
MI_MATRIX, MI_COMPRESSED = 14, 15
# array classes: code -> numpy dtype of the result
_MX = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_COMPLEX_FLAG = 0x0800


def _elements(buf: bytes, end: str, path: str):
    """Yield (type, payload bytes) for each top-level element of `buf`."""
    pos, n = 0, len(buf)
    while pos + 8 <= n:
        typ, nbytes = struct.unpack_from(end + "II", buf, pos)
        if typ >> 16:  # small element: count in the upper half, data in the second word
            typ, nbytes = typ & 0xFFFF, typ >> 16
            yield typ, buf[pos + 4:pos + 4 + nbytes]
            pos += 8
            continue
        if pos + 8 + nbytes > n:
            raise DataError(f"{path} is truncated (an element runs past the end of the file)")
        yield typ, buf[pos + 8:pos + 8 + nbytes]
        pos += 8 + nbytes
        if typ != MI_COMPRESSED:
            pos += -nbytes % 8  # padding to the next 8-byte boundary


def _matrix(payload: bytes, end: str, path: str):
    """Decode one miMATRIX payload -> (name, ndarray) or (name, None) for non-numeric classes."""
    parts = list(_elements(payload, end, path))
    if len(parts) < 3:
        return None, None
    flags = np.frombuffer(parts[0][1], dtype=end + "u4")
    cls, is_complex = int(flags[0]) & 0xFF, bool(int(flags[0]) & _COMPLEX_FLAG)
    dims = tuple(int(d) for d in np.frombuffer(parts[1][1], dtype=end + _MI[parts[1][0]]))
    name = parts[2][1].decode("latin-1").rstrip("\x00")
    if cls not in _MX or len(parts) < 4:  # struct, cell, char, sparse, object: not needed here
        return name, None

    def numeric(i):
        typ, data = parts[i]
        if typ not in _MI:
            raise DataError(f"{path}: variable {name!r} has an unsupported data type {typ}")
        # MATLAB may store a double array in a smaller type (e.g. uint8); widen to the class.
        return np.frombuffer(data, dtype=end + _MI[typ]).astype(_MX[cls])

    arr = numeric(3)
    if is_complex and len(parts) > 4:
        arr = arr + 1j * numeric(4)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: variable {name!r} has {arr.size} values for dimensions {dims}")
    return name, arr.reshape(dims, order="F")


def loadmat(path) -> dict[str, np.ndarray]:
    """Read the numeric variables of a level-5 .mat file into {name: array (MATLAB's dimensions)}."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if len(buf) < 128:
        raise DataError(f"{path} is not a MATLAB .mat file (too short)")
    if buf[:10] == b"MATLAB 7.3" or buf[:8] == b"\x89HDF\r\n\x1a\n":
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file; save it with -v7 or -v6")
    indicator = buf[126:128]
    if indicator == b"IM":
        end = "<"
    elif indicator == b"MI":
        end = ">"
    else:
        raise DataError(f"{path} is not a MATLAB level-5 .mat file (bad header)")
    out: dict[str, np.ndarray] = {}
    for typ, payload in _elements(buf[128:], end, path):
        if typ == MI_COMPRESSED:
            try:
                inner = zlib.decompress(payload)
            except zlib.error:
                raise DataError(f"{path} has a corrupt compressed element") from None
            elems = list(_elements(inner, end, path))
        else:
            elems = [(typ, payload)]
        for t, p in elems:
            if t == MI_MATRIX:
                name, arr = _matrix(p, end, path)
                if name and arr is not None:
                    out[name] = arr
    return out
