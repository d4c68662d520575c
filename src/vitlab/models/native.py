"""vitlab's native kernels, for the compiled CPU training step: exact GELU with its derivative
in one pass (gelu_kernel.c), multi-head attention, forward and backward, in bf16
(attention_kernel.c), and a Linear layer's products in bf16 (linear_kernel.c: the forward product
with its bias, or with GELU and its derivative, the input gradient, or times GELU's derivative, the
weight and bias gradients); kernel_math.h and gemm_bf16.h hold what they share.

Built together into one library on first use with the C compiler that torch.compile needs
anyway on a CPU (about 0.6 s on the dev CPU), and kept in ~/.cache/vitlab/native (or
$XDG_CACHE_HOME/vitlab/native) under a name that hashes the sources, the flags and the compiler,
so that an edit or another compiler builds afresh. The file appears there by an atomic rename:
a process that stops mid-build leaves no half-written library, and several (torchrun ranks) may
build at once. Where that folder cannot be written, each process builds into a private
temporary folder of its own.

Only on Linux x86-64 with AVX-512 BF16 (the CPUs where vitlab trains in bf16 by default:
Sapphire Rapids and later Xeons, Zen 4 and later EPYCs and Ryzens). Anywhere else, with no
compiler, or with VITLAB_NATIVE=0, `library()` returns None and the compiled step keeps ATen's
GELU kernels (ops.gelu), attention's batched matmuls and ATen's products for the Linears: nothing
changes but the speed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

SOURCES = [Path(__file__).with_name(n) for n in ("gelu_kernel.c", "attention_kernel.c", "linear_kernel.c")]
HEADERS = [Path(__file__).with_name(n) for n in ("kernel_math.h", "gemm_bf16.h")]
FLAGS = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
         "-shared", "-fPIC"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"}
# torch's CPU builds use GNU OpenMP (libgomp.so.1, loaded before this library, so the kernel's
# reference to it resolves to the same runtime and follows torch.set_num_threads); clang's
# -fopenmp would link LLVM's libomp, a second thread pool, so clang is asked for libgomp
OPENMP = {"gcc": "-fopenmp", "clang": "-fopenmp=libgomp"}

class CompileError(RuntimeError):
    """The compiler ran and refused (or timed out): no other folder would help."""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vitlab" / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (file names, e.g. {'libgomp.so.1'})."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith((".so", ".so.1", ".so.5"))}
    except OSError:
        return set()
    return {p for p in paths if any(k in Path(p).name for k in ("libgomp", "libomp", "libiomp"))}


def _build(cc: str, dest_dir: Path) -> Path:
    """Compile the kernels into one library in dest_dir, reused when already there; older builds
    there (other sources or another compiler) are removed. Raises CompileError if the compiler
    fails, OSError if the folder cannot take the file."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CompileError(f"{Path(cc).name} --version failed: {e}") from None
    flags = [*FLAGS, OPENMP["clang" if "clang" in version.lower() else "gcc"]]
    code = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    key = hashlib.sha256(code + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    lib = dest_dir / f"native-{key}.so"
    if lib.exists():
        return lib
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".native-", suffix=".so", dir=dest_dir)
    os.close(fd)
    try:
        try:
            done = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                                  timeout=120)
        except subprocess.SubprocessError as e:
            raise CompileError(f"{Path(cc).name}: {e}") from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise CompileError(f"{Path(cc).name} failed: {first}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in [*dest_dir.glob("native-*.so"), *dest_dir.glob("gelu-*.so")]:  # gelu-*: before attention's kernel
        if old != lib:  # a process that has one loaded keeps its mapping
            old.unlink(missing_ok=True)
    return lib


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in ("vitlab_gelu_fwd_bf16", "vitlab_gelu_fwd_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.vitlab_attention_fwd_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_float]
    lib.vitlab_attention_bwd_bf16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_float]
    lib.vitlab_attention_fwd_bf16.restype = lib.vitlab_attention_bwd_bf16.restype = ctypes.c_int
    lib.vitlab_linear_wgrad_bf16.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr]
    lib.vitlab_linear_wgrad_bf16.restype = ctypes.c_int
    lib.vitlab_linear_fwd_bf16.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr]
    lib.vitlab_linear_dgrad_bf16.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr]
    lib.vitlab_linear_fwd_bf16.restype = lib.vitlab_linear_dgrad_bf16.restype = ctypes.c_int
    return lib


def _build_and_load(cc: str) -> ctypes.CDLL:
    """Build into the cache, or, where that folder cannot be written, into a fresh private
    temporary one (never a shared, predictable path another user could have filled)."""
    try:
        path = _build(cc, cache_dir())
    except OSError:
        path = _build(cc, Path(tempfile.mkdtemp(prefix="vitlab-native-")))  # mode 0700, new each time
    try:
        return _load(path)
    except OSError:  # a damaged file in the cache: build it again, once
        path.unlink(missing_ok=True)
        return _load(_build(cc, path.parent))


class _Decision(NamedTuple):
    lib: ctypes.CDLL | None
    reason: str | None = None  # why lib is None
    failed: bool = False  # the machine could run the kernel, but building or loading it failed


@functools.cache
def _decide() -> _Decision:
    """Build and load the kernels once per process, or say why not."""
    if os.environ.get("VITLAB_NATIVE", "1") == "0":
        return _Decision(None, "VITLAB_NATIVE=0")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return _Decision(None, f"not Linux x86-64 ({platform.system()} {platform.machine()})")
    missing = CPU_FLAGS - _cpu_flags()
    if missing:
        return _Decision(None, f"the CPU lacks {', '.join(sorted(missing))}")
    cc = _compiler()
    if cc is None:
        return _Decision(None, "no C compiler (cc, gcc or $CC)")
    before = _openmp_runtimes()
    try:
        lib = _build_and_load(cc)
    except (OSError, CompileError) as e:
        return _Decision(None, f"building vitlab's kernels failed ({e})", failed=True)
    added = _openmp_runtimes() - before
    if added:  # its threads would not be torch's (a second pool, oversubscribed cores): not used
        return _Decision(None, f"the kernels brought an OpenMP runtime torch does not use "
                               f"({', '.join(sorted(added))})", failed=True)
    return _Decision(lib)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot run here (why_not() says why)."""
    return _decide().lib


def why_not() -> str | None:
    """Why library() is None here (None when it is not)."""
    return _decide().reason


def build_failure() -> str | None:
    """why_not(), where the machine could have run the kernel but building or loading it failed
    (worth a note in a run's log; a CPU without AVX-512 BF16 is not)."""
    d = _decide()
    return d.reason if d.failed else None


def gelu_and_grad(lib: ctypes.CDLL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(x), gelu'(x)) for a contiguous bf16 or fp32 CPU tensor, by the kernel."""
    y, d = torch.empty_like(x), torch.empty_like(x)
    fn = lib.vitlab_gelu_fwd_bf16 if x.dtype == torch.bfloat16 else lib.vitlab_gelu_fwd_f32
    fn(x.data_ptr(), y.data_ptr(), d.data_ptr(), x.numel())
    return y, d


def attention_shapes(qkv: torch.Tensor, heads: int) -> tuple[int, int, int]:
    """(B, N, D) of a (B, N, 3 * heads * D) qkv output."""
    B, N, C = qkv.shape
    return B, N, C // (3 * heads)


def attention(lib: ctypes.CDLL, qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, N, heads * D), weights (B, heads, N, N + N % 2)) of a contiguous bf16 CPU qkv output
    (B, N, 3 * heads * D), by the kernel; D a multiple of 32. The weights are the softmax, in bf16,
    each row padded with a zero to even length: what attention_backward reads."""
    B, N, D = attention_shapes(qkv, heads)
    if not (D % 32 == 0 and scale > 0):  # what the kernel assumes (ops.attention checks D first)
        raise ValueError(f"vitlab's attention kernel takes heads of a multiple of 32 and a positive scale, "
                         f"got {D} and {scale}")
    out = qkv.new_empty(B, N, heads * D)
    weights = qkv.new_empty(B, heads, N, N + N % 2)
    if lib.vitlab_attention_fwd_bf16(qkv.data_ptr(), out.data_ptr(), weights.data_ptr(), B, N, heads, D, scale):
        raise MemoryError("vitlab's attention kernel could not allocate its scratch space")
    return out, weights


def attention_backward(lib: ctypes.CDLL, dout: torch.Tensor, qkv: torch.Tensor, weights: torch.Tensor,
                       heads: int, scale: float) -> torch.Tensor:
    """The gradient of the qkv output, (B, N, 3 * heads * D), from the output's (contiguous bf16)."""
    B, N, D = attention_shapes(qkv, heads)
    dqkv = torch.empty_like(qkv)
    if lib.vitlab_attention_bwd_bf16(dout.data_ptr(), qkv.data_ptr(), weights.data_ptr(), dqkv.data_ptr(),
                                     B, N, heads, D, scale):
        raise MemoryError("vitlab's attention kernel could not allocate its scratch space")
    return dqkv


def linear_wgrad(lib: ctypes.CDLL, dy: torch.Tensor, x: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dy^T x, dy's column sums or None), both fp32, for contiguous bf16 CPU matrices dy (K, M) and
    x (K, N) with N a multiple of 16, by the kernel."""
    (K, M), N = dy.shape, x.shape[1]
    if not (N % 16 == 0 and x.shape[0] == K):
        raise ValueError(f"vitlab's weight-gradient kernel takes inputs of a multiple of 16 features and as many "
                         f"rows as the gradient, got x {tuple(x.shape)} for dy {tuple(dy.shape)}")
    dw = torch.empty(M, N)
    db = torch.empty(M) if bias else None
    if lib.vitlab_linear_wgrad_bf16(dy.data_ptr(), x.data_ptr(), K, M, N, dw.data_ptr(),
                                    None if db is None else db.data_ptr()):
        raise MemoryError("vitlab's weight-gradient kernel could not allocate its packing buffers")
    return dw, db


def linear_forward(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x W^T + b, None), or with gelu (gelu(x W^T + b), its derivative), all bf16, for a contiguous
    bf16 CPU x (..., n_in) and the contiguous fp32 weight (n_out, n_in) and bias, by the kernel;
    n_in a multiple of 32, n_out of 64."""
    n_out, n_in = weight.shape
    if not (n_in > 0 and n_in % 32 == 0 and n_out > 0 and n_out % 64 == 0 and x.shape[-1] == n_in
            and (bias is None or (bias.shape == (n_out,) and bias.is_contiguous()))):
        raise ValueError(f"vitlab's Linear kernel takes a weight of a multiple of 64 x 32 for inputs of its width "
                         f"(and a contiguous bias of its rows), got {tuple(weight.shape)} for x {tuple(x.shape)}")
    y = x.new_empty(*x.shape[:-1], n_out)
    d = torch.empty_like(y) if gelu else None
    if lib.vitlab_linear_fwd_bf16(x.data_ptr(), x.numel() // n_in, n_in, weight.data_ptr(),
                                  None if bias is None else bias.data_ptr(), n_out, y.data_ptr(),
                                  None if d is None else d.data_ptr()):
        raise MemoryError("vitlab's Linear kernel could not allocate its packing buffers")
    return y, d


def linear_dgrad(lib: ctypes.CDLL, g: torch.Tensor, weight: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """(g W) * m (or g W), bf16, for a contiguous bf16 CPU g (..., n_out), the contiguous fp32 weight
    (n_out, n_in) and m (..., n_in) bf16, by the kernel; n_out even, n_in a multiple of 64."""
    n_out, n_in = weight.shape
    if not (n_out > 0 and n_out % 2 == 0 and n_in > 0 and n_in % 64 == 0 and g.shape[-1] == n_out
            and (m is None or m.shape == (*g.shape[:-1], n_in))):
        raise ValueError(f"vitlab's input-gradient kernel takes a weight of an even number of rows x a multiple of 64, "
                         f"and a gradient of its width, got {tuple(weight.shape)} for {tuple(g.shape)}")
    dx = g.new_empty(*g.shape[:-1], n_in)
    if lib.vitlab_linear_dgrad_bf16(g.data_ptr(), g.numel() // n_out, n_out, weight.data_ptr(), n_in,
                                    None if m is None else m.data_ptr(), dx.data_ptr()):
        raise MemoryError("vitlab's input-gradient kernel could not allocate its packing buffer")
    return dx
