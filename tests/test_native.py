"""vitlab's native kernels (vitlab/models/native.py; gelu_kernel.c, attention_kernel.c, linear_kernel.c): their
values against exact references, their build and cache, and the fallback where they cannot run."""

import os
import platform
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitlab.models import create_model, native, ops

def _gcc() -> bool:
    cc = native._compiler()
    if cc is None:
        return False
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    return "Free Software Foundation" in version  # GCC's banner (clang's differs)


# where the kernel must build and run: elsewhere the tests check the fallback instead
RUNS_HERE = (platform.system() == "Linux" and platform.machine() == "x86_64"
             and native.CPU_FLAGS <= native._cpu_flags() and _gcc())


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """library() decided afresh, with the cache and temporary files in tmp_path; the
    process's own choice restored after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VITLAB_NATIVE", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    native._decide.cache_clear()
    yield tmp_path / "cache" / "vitlab" / "native"
    native._decide.cache_clear()


def as_if_linux_x86_with_the_flags(monkeypatch):
    monkeypatch.setattr(native.platform, "system", lambda: "Linux")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "_cpu_flags", lambda: set(native.CPU_FLAGS))


def fake_compiler(path, message):
    """A `cc` that answers --version and fails every compile with `message`."""
    path.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && {{ echo fakecc 1; exit 0; }}\necho '{message}' >&2; exit 1\n")
    path.chmod(0o755)
    return path


def reference(x):
    """Exact GELU and derivative in fp64, from erfc (no cancellation in the negative tail)."""
    x64 = x.double()
    cdf = 0.5 * torch.special.erfc(-x64 / 2**0.5)
    return x64 * cdf, cdf + x64 * torch.exp(-0.5 * x64 * x64) / (2 * torch.pi) ** 0.5


def close(got, want, x, rel, abs_per_x):
    """|got - want| <= rel |want| + abs_per_x max(1, |x|), elementwise."""
    return bool(((got.double() - want).abs() <= rel * want.abs() + abs_per_x * x.double().abs().clamp(min=1)).all())


def inputs(dtype, n):
    torch.manual_seed(n)
    x = torch.randn(n, dtype=torch.float32) * 4
    x[: min(n, 8)] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 12.0, -12.0, 30.0, -30.0])[: min(n, 8)]
    return x.to(dtype)


def test_the_kernel_runs_where_the_cpu_and_a_compiler_allow(fresh_kernel):
    lib = native.library()
    if RUNS_HERE:
        assert lib is not None and native.why_not() is None
        assert len(list(fresh_kernel.glob("native-*.so"))) == 1
    else:
        assert lib is None and native.why_not()


@pytest.mark.parametrize("n", [1, 15, 16, 17, 31, 32, 33, 8320 * 3 + 5])  # every tail length class
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_values_and_derivative_match_exact_gelu(dtype, n):
    lib = native.library()
    if lib is None:  # nothing of vitlab's runs here: the op is ATen's, bit for bit
        x = inputs(dtype, n)
        y, d = ops.gelu_and_grad(x)
        assert torch.equal(y, F.gelu(x))
        assert torch.equal(d, torch.ops.aten.gelu_backward(torch.ones_like(x), x))
        return
    x = inputs(dtype, n)
    y, d = native.gelu_and_grad(lib, x)
    assert y.dtype == d.dtype == dtype and y.shape == d.shape == x.shape
    ry, rd = reference(x)
    aten_y, aten_d = F.gelu(x), torch.ops.aten.gelu_backward(torch.ones_like(x), x)
    if dtype == torch.float32:
        # A&S 7.1.26 is good to 1.5e-7 absolute in erf, about what fp32's own erf gives (ATen's
        # fp32 GELU is off by up to 3e-7 |x| here)
        assert close(y, ry, x, 0, 2e-7) and close(d, rd, x, 0, 4e-7)
    else:
        # bf16: within one unit in the last place (2^-8 relative) of the exact value
        assert close(y, ry, x, 2**-8, 1e-7) and close(d, rd, x, 2**-8, 1e-7)
        if n > 1000:  # and the exact value rounded at least as often as ATen's bf16 GELU is
            for got, aten, exact in ((y, aten_y, ry), (d, aten_d, rd)):
                assert (got != exact.to(dtype)).float().mean() <= (aten != exact.to(dtype)).float().mean() + 0.01


def test_kernel_propagates_nan():
    lib = native.library()
    x = torch.tensor([float("nan"), 1.0, -2.0] * 11)
    for dtype in (torch.float32, torch.bfloat16):
        # without the kernel, the op's fallback: ATen's own GELU
        y, d = native.gelu_and_grad(lib, x.to(dtype)) if lib is not None else ops.gelu_and_grad(x.to(dtype))
        assert torch.isnan(y[0::3]).all() and torch.isnan(d[0::3]).all()
        assert torch.isfinite(y[1::3]).all() and torch.isfinite(d[2::3]).all()


def test_gelu_and_grad_operator_trains_like_gelu():
    """The op's autograd: the gradient is grad * derivative, as ATen's GELU backward gives."""
    x = torch.randn(7, 33, requires_grad=True)
    g = torch.randn(7, 33)
    y, _ = ops.gelu_and_grad(x)
    (grad,) = torch.autograd.grad(y, x, g)
    ref = F.gelu(x)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(y, ref, atol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-5)
    torch.library.opcheck(ops.gelu_and_grad, (x.detach().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_compiled_training_step_gives_eager_gradients(dtype):
    """The default compiled CPU step (vitlab's kernel where it runs) against eager mode."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32", num_classes=10, depth=2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads = []
    torch._dynamo.reset()
    for m in (model, torch.compile(model)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(m(x).float(), y)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    torch._dynamo.reset()
    tol = 3e-2 if dtype is not None else 1e-4  # bf16: the two graphs round differently
    for eager, compiled in zip(*grads):
        assert (eager - compiled).norm() <= tol * eager.norm() + 1e-12


def test_build_is_cached_and_a_damaged_file_is_rebuilt(fresh_kernel):
    if not RUNS_HERE:
        lib = native.library()
        assert lib is not None or native.why_not()
        return
    cc = native._compiler()
    first = native._build(cc, fresh_kernel)
    stamp = first.stat().st_mtime_ns
    assert native._build(cc, fresh_kernel) == first and first.stat().st_mtime_ns == stamp  # reused
    assert not list(fresh_kernel.glob(".native-*"))  # no temporaries left
    stale = fresh_kernel / "native-0123456789abcdef.so"
    stale.write_bytes(b"an older build")
    older = fresh_kernel / "gelu-0123456789abcdef.so"  # the GELU kernel's own library, before attention's
    older.write_bytes(b"an older build")
    first.write_bytes(b"not a shared library")
    assert native.library() is not None  # loaded after one rebuild
    assert first.read_bytes()[:4] == b"\x7fELF"
    assert not stale.exists() and not older.exists()  # a build clears out older ones (other sources, compiler)


def test_an_unwritable_cache_builds_into_a_private_temporary_folder(fresh_kernel, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder would go")
    lib = native.library()
    if not RUNS_HERE:
        assert lib is not None or native.why_not()
        return
    assert lib is not None
    where = Path(lib._name).parent
    assert where.parent == tmp_path / "tmp" and where.name.startswith("vitlab-native-")
    assert stat.S_IMODE(where.stat().st_mode) == 0o700  # no one else can put a library there


def test_no_kernel_where_it_cannot_run(fresh_kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("VITLAB_NATIVE", "0")
    assert native.library() is None and "VITLAB_NATIVE=0" in native.why_not()
    monkeypatch.delenv("VITLAB_NATIVE")
    native._decide.cache_clear()
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native.library() is None and "not Linux x86-64" in native.why_not()
    as_if_linux_x86_with_the_flags(monkeypatch)
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"fma", "avx512f"})
    native._decide.cache_clear()
    assert native.library() is None and "lacks avx512_bf16" in native.why_not()
    native._decide.cache_clear()
    as_if_linux_x86_with_the_flags(monkeypatch)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.library() is None and "no C compiler" in native.why_not()
    if os.name == "posix":  # a compiler that fails: a one-line reason, no library, no temporary left
        native._decide.cache_clear()
        monkeypatch.setenv("CC", str(fake_compiler(tmp_path / "fakecc", "error: no")))
        assert native.library() is None
        assert native.why_not() == "building vitlab's kernels failed (fakecc failed: error: no)"
        assert not list(fresh_kernel.glob("*")) and not list((tmp_path / "tmp").glob("*"))  # not retried elsewhere


def test_a_second_openmp_runtime_keeps_atens_gelu(fresh_kernel, monkeypatch):
    if not RUNS_HERE:
        assert native.library() is not None or native.why_not()
        return
    calls = iter([{"/x/libgomp.so.1"}, {"/x/libgomp.so.1", "/y/libomp.so.5"}])
    monkeypatch.setattr(native, "_openmp_runtimes", lambda: next(calls))
    assert native.library() is None
    assert native.why_not() == "the kernels brought an OpenMP runtime torch does not use (/y/libomp.so.5)"


def test_processes_building_at_once_all_load_one_library(tmp_path):
    """torchrun ranks start together: each builds or reuses, none sees a half-written file."""
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("VITLAB_NATIVE", None)
    code = ("from vitlab.models import native; lib = native.library(); "
            "print(lib._name if lib is not None else 'none: ' + str(native.why_not()))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    names = {out.strip() for out, _ in outs}
    assert len(names) == 1  # all three agree
    if RUNS_HERE:
        built = list((tmp_path / "cache" / "vitlab" / "native").iterdir())
        assert [Path(n) for n in names] == built  # one library, no temporaries left


# -- attention ---------------------------------------------------------------------------------


def attention_reference(qkv, heads, dout):
    """Attention's output, softmax weights and qkv gradient in fp64, the weights unpadded."""
    B, N, C = qkv.shape
    x = qkv.double().requires_grad_()
    q, k, v = x.reshape(B, N, 3, heads, C // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    w = (q @ k.transpose(-2, -1) * (C // (3 * heads)) ** -0.5).softmax(-1)
    out = (w @ v).transpose(1, 2).reshape(B, N, -1)
    out.backward(dout.double())
    return out.detach(), w.detach(), x.grad


def relative(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("n, heads, d", [(65, 3, 64), (64, 2, 64), (17, 4, 32), (33, 1, 96), (197, 2, 64), (1, 1, 64),
                                         (16, 1, 128)])
def test_attention_matches_exact_attention(n, heads, d):
    """vitlab::attention and its backward (the kernel where it runs, torch's ops elsewhere) against
    fp64, every token count class (odd, even, under one vector, several), as close as bf16 allows
    and closer than the unfused bf16 path, whose q is rounded after scaling and whose products
    round to bf16 at every step."""
    torch.manual_seed(n)
    qkv = (torch.randn(3, n, 3 * heads * d) * 1.5).to(torch.bfloat16)
    dout = torch.randn(3, n, heads * d).to(torch.bfloat16)
    want_out, want_w, want_grad = attention_reference(qkv, heads, dout)
    x = qkv.clone().requires_grad_()
    out, weights = ops.attention(x, heads, d**-0.5)
    (grad,) = torch.autograd.grad(out, x, dout)
    assert out.dtype == weights.dtype == grad.dtype == torch.bfloat16
    assert weights.shape == (3, heads, n, n + n % 2) and not weights[..., n:].any()  # padded with zeros
    assert relative(out, want_out) < 5e-3 and relative(weights[..., :n], want_w) < 5e-3
    assert relative(grad, want_grad) < 8e-3
    x = qkv.clone().requires_grad_()  # the unfused path as autocast runs it
    q, k, v = x.reshape(3, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    plain = (((q * d**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(3, n, -1)
    (plain_grad,) = torch.autograd.grad(plain, x, dout)
    assert relative(out, want_out) <= relative(plain, want_out) * 1.1 + 1e-4
    assert relative(grad, want_grad) <= relative(plain_grad, want_grad) * 1.1 + 1e-4


def test_attention_kernel_and_its_fallback_agree(monkeypatch):
    """The torch fallback (CPUs without the kernel, other dtypes) computes what the kernel does."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 65, 3 * 3 * 64).to(torch.bfloat16)
    dout = torch.randn(2, 65, 3 * 64).to(torch.bfloat16)
    lib = native.library()
    out, w = ops.attention(qkv, 3, 0.125)
    grad = ops.attention_backward(dout, qkv, w, 3, 0.125)
    try:
        native._decide.cache_clear()
        monkeypatch.setenv("VITLAB_NATIVE", "0")
        ref_out, ref_w = ops.attention(qkv, 3, 0.125)
        ref_grad = ops.attention_backward(dout, qkv, ref_w, 3, 0.125)
    finally:
        monkeypatch.delenv("VITLAB_NATIVE")
        native._decide.cache_clear()
    if lib is None:  # both were the fallback
        assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
        return
    assert relative(out, ref_out.double()) < 5e-3 and relative(w, ref_w.double()) < 5e-3
    assert relative(grad, ref_grad.double()) < 8e-3
    # other dtypes always take the fallback, and an fp32 gradient is cast to qkv's dtype
    out32, w32 = ops.attention(qkv.float(), 3, 0.125)
    assert out32.dtype == torch.float32 and relative(out32, ref_out.double()) < 1e-2
    assert torch.equal(ops.attention_backward(dout.float(), qkv, w, 3, 0.125), grad)


def test_attention_propagates_nan():
    """A NaN in one token's q, k or v makes NaN of what it touches, never a silent zero weight."""
    torch.manual_seed(0)
    for part in range(3):
        qkv = torch.randn(2, 17, 3 * 2 * 32).to(torch.bfloat16)
        qkv[1, 5, part * 64 + 3] = float("nan")  # image 1, token 5, head 0 of q, k or v
        out, w = ops.attention(qkv, 2, 32**-0.5)
        grad = ops.attention_backward(torch.ones_like(out), qkv, w, 2, 32**-0.5)
        assert out[0].isfinite().all() and out[1, :, 32:].isfinite().all()  # other images and heads
        assert out[1, :, :32].isnan().any() and grad[1].isnan().any()
        if part == 0:  # token 5's query: its own row of weights
            assert w[1, 0, 5, :17].isnan().all() and w[1, 0, :5].isfinite().all()
        if part == 1:  # token 5's key: every row's weights
            assert w[1, 0, :, :17].isnan().all()


def test_attention_kernel_refuses_what_it_cannot_compute():
    lib = native.library()
    if lib is None:
        return  # nothing to call: the op's fallback takes every case (test above)
    qkv = torch.randn(1, 5, 3 * 48).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 32"):
        native.attention(lib, qkv, 1, 48**-0.5)
    with pytest.raises(ValueError, match="positive scale"):
        native.attention(lib, torch.randn(1, 5, 3 * 32).to(torch.bfloat16), 1, -1.0)
    out, _ = ops.attention(torch.randn(1, 5, 3 * 32).to(torch.bfloat16), 1, -0.5)  # the op: the fallback
    assert out.isfinite().all()


GUARDED_RUN = r"""
import ctypes, mmap, sys
import torch
from vitlab.models import native, ops

libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE, keep = mmap.PAGESIZE, []


def guarded(shape, after, dtype=torch.bfloat16):
    # a tensor flush against an inaccessible page, after its last byte or before its first
    numel = 1
    for n in shape:
        numel *= n
    nbytes = dtype.itemsize * numel
    pages = (nbytes + PAGE - 1) // PAGE
    m = mmap.mmap(-1, (pages + 1) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    guard, offset = (base + pages * PAGE, pages * PAGE - nbytes) if after else (base, PAGE)
    assert libc.mprotect(guard, PAGE, 0) == 0  # PROT_NONE
    keep.append(m)
    return torch.frombuffer(m, dtype=dtype, count=numel, offset=offset).view(shape)


lib = native.library()
for B, N, H, D in [(1, 1, 1, 32), (2, 17, 2, 32), (1, 65, 3, 64), (2, 16, 1, 128), (1, 33, 1, 96), (3, 197, 2, 64)]:
    for after in (True, False):
        torch.manual_seed(N)
        qkv, dout = guarded((B, N, 3 * H * D), after), guarded((B, N, H * D), after)
        qkv.copy_(torch.randn(B, N, 3 * H * D))
        dout.copy_(torch.randn(B, N, H * D))
        out, p = guarded((B, N, H * D), after), guarded((B, H, N, N + N % 2), after)
        dqkv = guarded((B, N, 3 * H * D), after)
        scale = D ** -0.5
        assert lib.vitlab_attention_fwd_bf16(qkv.data_ptr(), out.data_ptr(), p.data_ptr(), B, N, H, D, scale) == 0
        assert lib.vitlab_attention_bwd_bf16(dout.data_ptr(), qkv.data_ptr(), p.data_ptr(), dqkv.data_ptr(),
                                             B, N, H, D, scale) == 0
        ref_out, ref_p = native.attention(lib, qkv.clone(), H, scale)  # the same kernel on torch's own memory
        assert torch.equal(out, ref_out) and torch.equal(p, ref_p)
        assert torch.equal(dqkv, native.attention_backward(lib, dout.clone(), qkv.clone(), ref_p, H, scale))
for K, M, N in [(1, 1, 16), (7, 13, 48), (1100, 190, 80), (515, 576, 192)]:  # the weight-gradient kernel
    for after in (True, False):
        torch.manual_seed(K)
        dy, x = guarded((K, M), after), guarded((K, N), after)
        dy.copy_(torch.randn(K, M))
        x.copy_(torch.randn(K, N))
        dw, db = guarded((M, N), after, torch.float32), guarded((M,), after, torch.float32)
        assert lib.vitlab_linear_wgrad_bf16(dy.data_ptr(), x.data_ptr(), K, M, N, dw.data_ptr(), db.data_ptr()) == 0
        ref_dw, ref_db = native.linear_wgrad(lib, dy.clone(), x.clone(), True)
        assert torch.equal(dw, ref_dw) and torch.equal(db, ref_db)
for K, n_in, n_out in [(1, 32, 64), (7, 64, 128), (25, 192, 576), (301, 768, 192)]:  # forward and input gradient
    for after in (True, False):
        torch.manual_seed(K)
        x, w, b = guarded((K, n_in), after), guarded((n_out, n_in), after, torch.float32), guarded((n_out,), after, torch.float32)
        x.copy_(torch.randn(K, n_in))
        w.copy_(torch.randn(n_out, n_in) * 0.1)
        b.copy_(torch.randn(n_out))
        y, d = guarded((K, n_out), after), guarded((K, n_out), after)
        assert lib.vitlab_linear_fwd_bf16(x.data_ptr(), K, n_in, w.data_ptr(), b.data_ptr(), n_out, y.data_ptr(),
                                          d.data_ptr()) == 0
        ref_y, ref_d = native.linear_forward(lib, x.clone(), w.clone(), b.clone(), gelu=True)
        assert torch.equal(y, ref_y) and torch.equal(d, ref_d)
        if n_in % 64 == 0:
            g, m, dx = guarded((K, n_out), after), guarded((K, n_in), after), guarded((K, n_in), after)
            g.copy_(torch.randn(K, n_out))
            m.copy_(torch.rand(K, n_in))
            assert lib.vitlab_linear_dgrad_bf16(g.data_ptr(), K, n_out, w.data_ptr(), n_in, m.data_ptr(),
                                                dx.data_ptr()) == 0
            assert torch.equal(dx, native.linear_dgrad(lib, g.clone(), w.clone(), m.clone()))
print("inside")
"""


def test_kernels_stay_inside_their_tensors():
    """Every input and output placed flush against an inaccessible page (after its end, then before
    its start): a read or write outside any of them would kill the process. In a subprocess, so
    that a fault fails this test instead of the test run."""
    import sys

    if native.library() is None:
        return  # no kernel here: nothing of vitlab's touches raw memory
    done = subprocess.run([sys.executable, "-c", GUARDED_RUN], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "inside", (done.returncode, done.stderr[-2000:])


def test_attention_operator_registrations():
    """What torch.compile relies on: schema, fake kernels, autograd (torch.library.opcheck)."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3 * 2 * 32).to(torch.bfloat16)
    torch.library.opcheck(ops.attention, (qkv.clone().requires_grad_(), 2, 32**-0.5))
    out, w = ops.attention(qkv, 2, 32**-0.5)
    torch.library.opcheck(ops.attention_backward, (torch.randn_like(out), qkv, w, 2, 32**-0.5))


def compiled_calls(model, op: str, dtype, train=True) -> int:
    """How many times the graphs torch.compile captures for one step of `model` (forward, and with
    train its backward) call the operator `op` (e.g. "vitlab.attention.default")."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(sum(str(n.target) == op for n in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    model.train(train)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None), \
            torch.set_grad_enabled(train):
        out = torch.compile(model, backend=record)(torch.randn(2, 3, 32, 32))
    if train:
        out.float().sum().backward()
    torch._dynamo.reset()
    return sum(graphs)


def test_compiled_bf16_training_graph_calls_the_attention_operator_where_it_should():
    """In a compiled CPU training graph under bf16 autocast, attention (not the last block's,
    which runs for [CLS] alone) is one vitlab::attention call where the kernel runs; not with
    attention dropout, in fp32, for inference, or with Attention.use_native off."""
    from vitlab.models.vit import Attention

    def calls(model, dtype, train=True):
        return compiled_calls(model, "vitlab.attention.default", dtype, train)

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32", num_classes=10, depth=3)
    want = 2 if native.library() is not None else 0  # blocks 1-2; block 3 is the [CLS]-only last block
    assert calls(model, torch.bfloat16) == want
    assert calls(model, None) == 0  # fp32: the kernel is bf16's
    assert calls(model, torch.bfloat16, train=False) == 0  # inference keeps the frozen graph's path
    Attention.use_native = False
    try:
        assert calls(model, torch.bfloat16) == 0
    finally:
        Attention.use_native = True
    dropped = create_model("vit_tiny_patch4_32", num_classes=10, depth=3, attn_drop_rate=0.1)
    assert calls(dropped, torch.bfloat16) == 0  # attention dropout needs the unfused path
    narrow = create_model("vit_tiny_patch4_32", num_classes=10, depth=3, num_heads=4)  # heads of 48
    assert calls(narrow, torch.bfloat16) == 0


# -- the weight-gradient kernel (linear_kernel.c) -------------------------------------------------


@pytest.mark.parametrize("K, M, N", [(8320, 576, 192), (1, 7, 16), (2, 6, 32), (7, 13, 48), (513, 1, 16),
                                     (1100, 190, 80), (0, 5, 16), (1025, 768, 192)])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_gradient_kernel_matches_fp64(K, M, N, bias):
    """dy^T x and dy's column sums against fp64: bf16 products are exact in fp32, so the only error is
    fp32 summation, bounded here by 2^-17 of the sum of magnitudes (rows chunked by 512: every
    chunk remainder, odd row counts, dW rows not a multiple of 6 and fewer than one block a thread,
    vector widths 16 to 192)."""
    lib = native.library()
    if lib is None:
        return  # nothing to compare: test_weight_gradient_operator_agrees_with_autograd covers the fallback
    torch.manual_seed(K + M + N)
    dy, x = torch.randn(K, M).bfloat16(), torch.randn(K, N).bfloat16()
    dw, db = native.linear_wgrad(lib, dy, x, bias)
    want = dy.double().t() @ x.double()
    bound = dy.double().abs().t() @ x.double().abs()
    assert dw.dtype == torch.float32 and dw.shape == (M, N)
    assert ((dw.double() - want).abs() <= bound * 2**-17 + 1e-30).all()
    if bias:
        sums = dy.double().sum(0)
        assert ((db.double() - sums).abs() <= dy.double().abs().sum(0) * 2**-17 + 1e-30).all()
    else:
        assert db is None


def test_weight_gradient_kernel_refuses_widths_it_cannot_take():
    lib = native.library()
    if lib is None:
        return
    with pytest.raises(ValueError, match="multiple of 16"):
        native.linear_wgrad(lib, torch.randn(4, 8).bfloat16(), torch.randn(4, 24).bfloat16(), True)
    dw, db = ops.linear_wgrad(torch.randn(4, 8).bfloat16(), torch.randn(4, 24).bfloat16(), True)  # the op: fallback
    assert dw.shape == (8, 24) and db.shape == (8,)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("products", [True, False])
@pytest.mark.parametrize("out_features", [128, 96])  # 96: the forward kernel does not take it, ATen's product does
def test_linear_operator_agrees_with_autograd(monkeypatch, bias, products, out_features):
    """ops.linear's output and gradients against F.linear's on the same bf16 inputs in fp32 (the
    kernels, and the torch fallback with the library switched off), and its registrations (opcheck)."""
    torch.manual_seed(1)
    x = torch.randn(3, 37, 64).bfloat16()
    w, b = torch.randn(out_features, 64) * 0.1, (torch.randn(out_features) if bias else None)
    g = torch.randn(3, 37, out_features).bfloat16()
    xr, wr = x.float().requires_grad_(), w.bfloat16().float().requires_grad_()
    br = None if b is None else b.bfloat16().float().requires_grad_()
    want = torch.autograd.grad(F.linear(xr, wr, br), [t for t in (xr, wr, br) if t is not None], g.float())
    results = []
    for lib in (native.library(), None):
        monkeypatch.setattr(native, "library", lambda lib=lib: lib)
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        bi = None if b is None else b.clone().requires_grad_()
        y = ops.linear(xi, wi, bi, products)
        assert y.dtype == torch.bfloat16
        assert relative(y.float(), F.linear(xr, wr, br)) < 1e-2  # rounded to bf16
        got = torch.autograd.grad(y, [t for t in (xi, wi, bi) if t is not None], g)
        assert got[1].dtype == torch.float32  # the weight's own dtype
        for a, e in zip(got, want):
            assert relative(a.float(), e) < 1e-2  # dx is rounded to bf16; dW and db are fp32 sums
        results.append(got)
    for a, e in zip(*results):  # the kernel and the fallback: the same sums, apart from their order
        assert relative(a.float(), e.float()) < 1e-5
    torch.library.opcheck(ops.linear, (x.clone().requires_grad_(), w.clone().requires_grad_(),
                                       None if b is None else b.clone().requires_grad_(), products))
    torch.library.opcheck(ops.linear_wgrad, (g.reshape(-1, out_features), x.reshape(-1, 64), bias))


def test_compiled_bf16_training_graph_calls_the_linear_operator_where_it_should():
    """Under bf16 autocast in a compiled CPU training graph, every transformer Linear (qkv, proj,
    fc1, fc2) but the [CLS]-only last block's qkv goes through vitlab's operators where the kernels
    run (fc1 and fc2 as one vitlab::mlp); not in fp32, for inference, with Linear.use_native off, or
    for widths not a multiple of 16."""
    from vitlab.models.vit import Linear

    def calls(model, dtype, train=True):
        return compiled_calls(model, "vitlab.linear.default", dtype, train)

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32", num_classes=10, depth=3)
    want = 3 * 2 - 1 if native.library() is not None else 0  # the last block splits its qkv Linear
    assert calls(model, torch.bfloat16) == want  # qkv and proj: fc1 and fc2 are vitlab::mlp's (below)
    assert calls(model, None) == 0
    assert calls(model, torch.bfloat16, train=False) == 0
    Linear.use_native = False
    try:
        assert calls(model, torch.bfloat16) == 0
    finally:
        Linear.use_native = True
    odd = create_model("vit_tiny_patch4_32", num_classes=10, depth=3, embed_dim=200, num_heads=5)  # 200 % 16 != 0
    assert calls(odd, torch.bfloat16) == (3 if native.library() is not None else 0)  # fc2 alone: 768 inputs


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_weight_gradient_kernel_splits_work_over_any_thread_count(threads):
    """Threads split dW along its rows (M >= N) or columns (N > M) in blocks of 6 or 16; with
    counts that do not divide the blocks, and more threads than blocks, the sums stay the same."""
    lib = native.library()
    if lib is None:
        return
    before = torch.get_num_threads()
    torch.manual_seed(threads)
    cases = [(300, 50, 32), (300, 7, 96), (65, 190, 16)]  # split M; split N; more threads than N blocks
    inputs = [(torch.randn(K, M).bfloat16(), torch.randn(K, N).bfloat16()) for K, M, N in cases]
    want = [native.linear_wgrad(lib, dy, x, True) for dy, x in inputs]  # the default thread count
    try:
        torch.set_num_threads(threads)
        got = [native.linear_wgrad(lib, dy, x, True) for dy, x in inputs]
    finally:
        torch.set_num_threads(before)
    for (dw, db), (rw, rb) in zip(got, want):
        assert torch.equal(dw, rw) and torch.equal(db, rb)  # each element's sum runs in the same order


# -- the forward product and the input gradient (linear_kernel.c) ---------------------------------


def sum_bound(a, b):
    """2^-17 of the sums of magnitudes a product a b^T adds: a bound on its fp32 summation error (the
    products of bf16 pairs are exact in fp32)."""
    return (a.double().abs() @ b.double().abs().t()) * 2**-17


@pytest.mark.parametrize("K, n_in, n_out", [(8320, 192, 576), (8320, 768, 192), (1, 32, 64), (7, 64, 128),
                                            (25, 96, 64), (49, 192, 768), (0, 32, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_forward_kernel_matches_fp64(K, n_in, n_out, bias, gelu):
    """x W^T + b (and GELU with its derivative) against fp64 from the same bf16 inputs and weight:
    the fp32 sums' error, then one rounding to bf16 (2^-8 relative with room to spare), and for GELU
    the kernel's approximation (2e-7 max(1, |x|), as test_kernel_values_and_derivative_match_exact_gelu
    checks it). Row counts not a multiple of 6 or of a block, fewer rows than threads, no rows."""
    lib = native.library()
    if lib is None:
        return  # nothing to compare: test_linear_operator_agrees_with_autograd covers the fallback
    torch.manual_seed(K + n_in + n_out)
    x, w = torch.randn(K, n_in).bfloat16(), torch.randn(n_out, n_in) / n_in**0.5
    b = torch.randn(n_out) if bias else None
    y, d = native.linear_forward(lib, x, w, b, gelu)
    wb = w.bfloat16()  # the kernel packs the fp32 weight in bf16, as autocast casts it
    h = x.double() @ wb.double().t() + (0 if b is None else b.double())
    err = sum_bound(x, wb) + (0 if b is None else b.double().abs() * 2**-24)
    assert y.dtype == torch.bfloat16 and y.shape == (K, n_out)
    if not gelu:
        assert d is None
        assert ((y.double() - h).abs() <= 2**-8 * h.abs() + 2 * err).all()
        return
    ry, rd = reference(h)
    approx = 2e-7 * h.abs().clamp(min=1)
    assert ((y.double() - ry).abs() <= 2**-8 * ry.abs() + 1.2 * err + approx).all()  # |gelu'| <= 1.13
    assert ((d.double() - rd).abs() <= 2**-8 * rd.abs() + err + approx).all()  # |gelu''| <= 0.8


@pytest.mark.parametrize("K, n_out, n_in", [(8320, 576, 192), (8320, 192, 768), (1, 2, 64), (7, 6, 128),
                                            (25, 190, 64), (0, 64, 64)])
@pytest.mark.parametrize("scaled", [False, True])
def test_input_gradient_kernel_matches_fp64(K, n_out, n_in, scaled):
    """g W (times m, a saved GELU derivative, where given) against fp64: the fp32 sums' error and one
    rounding to bf16."""
    lib = native.library()
    if lib is None:
        return
    torch.manual_seed(K + n_in + n_out)
    g, w = torch.randn(K, n_out).bfloat16(), torch.randn(n_out, n_in) / n_out**0.5
    m = torch.rand(K, n_in).bfloat16() * 1.2 if scaled else None
    dx = native.linear_dgrad(lib, g, w, m)
    wb = w.bfloat16()
    want = g.double() @ wb.double()
    err = sum_bound(g, wb.t())
    if m is not None:
        want, err = want * m.double(), err * m.double()
    assert dx.dtype == torch.bfloat16 and dx.shape == (K, n_in)
    assert ((dx.double() - want).abs() <= 2**-8 * want.abs() + 2 * err).all()


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_forward_and_input_gradient_kernels_split_work_over_any_thread_count(threads):
    """Threads split the packing (16 weight rows or one pair of rows at a time) and the rows of the
    output: with counts that divide neither, and more threads than rows, every element is the same."""
    lib = native.library()
    if lib is None:
        return
    before = torch.get_num_threads()
    torch.manual_seed(threads)
    x, w, b = torch.randn(301, 96).bfloat16(), torch.randn(192, 96) * 0.1, torch.randn(192)
    g, few = torch.randn(301, 192).bfloat16(), torch.randn(2, 96).bfloat16()
    w2 = torch.randn(192, 128) * 0.1  # dgrad's n_in must be a multiple of 64

    def run():
        return (*native.linear_forward(lib, x, w, b, True), native.linear_forward(lib, few, w, None)[0],
                native.linear_dgrad(lib, g, w2, torch.rand(301, 128, generator=torch.Generator().manual_seed(0)).bfloat16()),
                native.linear_dgrad(lib, g[:2], w2, None))

    want = run()  # the default thread count
    try:
        torch.set_num_threads(threads)
        got = run()
    finally:
        torch.set_num_threads(before)
    for a, e in zip(got, want):
        assert torch.equal(a, e)


def test_forward_and_input_gradient_kernels_refuse_shapes_they_cannot_take():
    lib = native.library()
    if lib is None:
        return
    with pytest.raises(ValueError, match="multiple of 64 x 32"):
        native.linear_forward(lib, torch.randn(4, 48).bfloat16(), torch.randn(64, 48), None)  # 48 inputs
    with pytest.raises(ValueError, match="multiple of 64 x 32"):
        native.linear_forward(lib, torch.randn(4, 64).bfloat16(), torch.randn(96, 64), None)  # 96 outputs
    with pytest.raises(ValueError, match="multiple of 64"):
        native.linear_dgrad(lib, torch.randn(4, 96).bfloat16(), torch.randn(96, 48), None)  # 48 inputs
    with pytest.raises(ValueError, match="even number"):
        native.linear_dgrad(lib, torch.randn(4, 64).bfloat16(), torch.randn(64, 64), torch.randn(4, 32).bfloat16())
    # the operators take them, on ATen's products
    assert ops.linear(torch.randn(4, 48).bfloat16(), torch.randn(64, 48), None, True).shape == (4, 64)
    assert ops.linear_dgrad(torch.randn(4, 96).bfloat16(), torch.randn(96, 48), None, True).shape == (4, 48)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hidden", [256, 96])  # 96: fc1's forward and fc2's input gradient fall back to ATen's
def test_mlp_operator_agrees_with_autograd(monkeypatch, bias, hidden):
    """ops.mlp (fc1 -> GELU -> fc2 in one operator) against the same MLP in fp32 autograd from the same
    bf16 inputs and weights: output and every gradient (the kernels, and the torch fallback with the
    library switched off), and its registrations (opcheck)."""
    torch.manual_seed(2)
    x = torch.randn(2, 29, 64).bfloat16()
    w1, w2 = torch.randn(hidden, 64) / 8, torch.randn(64, hidden) / hidden**0.5
    b1, b2 = (torch.randn(hidden), torch.randn(64)) if bias else (None, None)
    g = torch.randn(2, 29, 64).bfloat16()
    ref = [t if t is None else t.bfloat16().float().requires_grad_() for t in (x, w1, b1, w2, b2)]
    out = F.linear(F.gelu(F.linear(ref[0], ref[1], ref[2])), ref[3], ref[4])
    want = torch.autograd.grad(out, [t for t in ref if t is not None], g.float())
    results = []
    for lib in (native.library(), None):
        monkeypatch.setattr(native, "library", lambda lib=lib: lib)
        mine = [t if t is None else t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
        y, hidden_out, deriv = ops.mlp(*mine, True)
        assert y.dtype == hidden_out.dtype == deriv.dtype == torch.bfloat16
        assert not hidden_out.requires_grad and not deriv.requires_grad
        assert relative(y.float(), out.detach()) < 1e-2
        got = torch.autograd.grad(y, [t for t in mine if t is not None], g)
        assert all(a.dtype == torch.float32 for a in got[1:])  # the parameters' own dtype
        for a, e in zip(got, want):
            assert relative(a.float(), e) < 2e-2  # bf16 activations and gradients between the products
        results.append(got)
    for a, e in zip(*results):  # the kernels and the fallback (which rounds fc1's output before GELU)
        assert relative(a.float(), e.float()) < 2e-2
    torch.library.opcheck(ops.mlp, (*[t if t is None else t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)], True))
    torch.library.opcheck(ops.linear_dgrad, (g, w2, torch.rand(2, 29, hidden).bfloat16(), True))


def test_compiled_bf16_training_graph_calls_the_mlp_operator_where_it_should():
    """Each block's MLP is one vitlab::mlp call in a compiled CPU training graph under bf16 autocast
    where the kernels run; not with dropout inside the MLP, with Linear.native_products off (fc1 and
    fc2 then go through vitlab::linear on ATen's products), in fp32, or for inference."""
    from vitlab.models.vit import Linear

    def calls(model, dtype, train=True, op="vitlab.mlp.default"):
        return compiled_calls(model, op, dtype, train)

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32", num_classes=10, depth=3)
    runs = native.library() is not None
    assert calls(model, torch.bfloat16) == (3 if runs else 0)
    assert calls(model, None) == 0
    assert calls(model, torch.bfloat16, train=False) == 0
    Linear.native_products = False
    try:
        assert calls(model, torch.bfloat16) == 0
        assert calls(model, torch.bfloat16, op="vitlab.linear.default") == (3 * 4 - 1 if runs else 0)
    finally:
        Linear.native_products = True
    dropped = create_model("vit_tiny_patch4_32", num_classes=10, depth=3, drop_rate=0.1)
    assert calls(dropped, torch.bfloat16) == 0
    assert calls(dropped, torch.bfloat16, op="vitlab.linear.default") == (3 * 4 - 1 if runs else 0)
    swapped = create_model("vit_tiny_patch4_32", num_classes=10, depth=3)
    for blk in swapped.blocks:  # a Linear replaced by another class (as benchmarks/step_anatomy.py does)
        blk.mlp.fc1.__class__ = torch.nn.Linear
    assert calls(swapped, torch.bfloat16) == 0  # runs, each module as it is
    assert calls(swapped, torch.bfloat16, op="vitlab.linear.default") == (3 * 3 - 1 if runs else 0)


def test_the_mlp_is_one_operator_only_where_that_gives_what_its_modules_give(monkeypatch):
    """Mlp._fused, with the Linears' own gate taken as passed: not with active dropout between the
    Linears (however the module is switched into training), a replaced submodule, or a hook the
    operator would skip (e.g. pruning's pre-hook, which recomputes the weight)."""
    from vitlab.models.vit import Linear, Mlp

    monkeypatch.setattr(Linear, "native", lambda self, x: True)
    x = torch.randn(2, 5, 64)
    mlp = Mlp(64, 256)
    assert mlp._fused(x)
    mlp.fc2.native_products = False
    assert not mlp._fused(x)
    mlp.fc2.native_products = True
    dropped = Mlp(64, 256, drop=0.1)
    assert not dropped.train()._fused(x)
    assert dropped.eval()._fused(x)
    dropped.drop1.train()  # Monte Carlo dropout: the model in eval mode, its dropout sampling
    assert not dropped._fused(x)
    replaced = Mlp(64, 256)
    replaced.drop1 = torch.nn.Identity()
    assert not replaced._fused(x)  # and no AttributeError for an Identity's missing p
    hooked = Mlp(64, 256)
    handle = hooked.fc1.register_forward_pre_hook(lambda m, args: None)
    assert not hooked._fused(x)
    handle.remove()
    assert hooked._fused(x)


def test_linear_operators_take_any_bias_layout_and_empty_widths():
    """A strided bias reaches the kernel contiguous, and a bias F.linear would broadcast, or a width of
    0, goes to ATen's product instead of the kernel (which would read past it or divide by 0)."""
    torch.manual_seed(3)
    x, w = torch.randn(4, 64).bfloat16(), torch.randn(128, 64) * 0.1
    strided = torch.randn(256)[::2]
    want = F.linear(x.float(), w.bfloat16().float(), strided)
    assert relative(ops.linear(x, w, strided, True).float(), want) < 1e-2
    one = torch.randn(1)
    assert relative(ops.linear(x, w, one, True).float(), F.linear(x.float(), w.bfloat16().float(), one)) < 1e-2
    assert ops.linear(torch.randn(4, 0).bfloat16(), torch.randn(64, 0), torch.randn(64), True).shape == (4, 64)
    assert torch.equal(ops.linear_dgrad(torch.randn(4, 0).bfloat16(), torch.randn(0, 64), None, True),
                       torch.zeros(4, 64, dtype=torch.bfloat16))
