"""Why the ViT-Tiny training step runs at the rate it does on this CPU: its parts, timed one by one.

    python benchmarks/step_anatomy.py                 # ViT-Tiny CIFAR, batch 128, bf16; several minutes

Ten measurements, each a median over repeats (this host's speed drifts, so compare within a section):

1. matmuls: each Linear's three products at the step's shapes (rows = batch x tokens): the forward
   (addmm with bias), the input gradient (grad @ W) and the weight gradient both ways autograd
   issues it (grad^T @ x for qkv, x^T @ grad for the other three: a transposed operand either
   way), and grad^T @ x with its transposed operand made contiguous first (the copy included);
   where torch has oneDNN, also the forward and the input gradient through oneDNN's Linear with
   the weight packed into its blocked layout (as frozen inference runs them), and the packing's cost;
   where vitlab's kernels run, its three products as the compiled step calls them (from the fp32
   weight, packed per call; the weight gradient with the bias gradient), and for fc1 the forward
   with GELU and its derivative, for fc2 the input gradient times GELU's derivative.
2. attention: the core (q, k, v -> softmax(q k^T / sqrt(d)) v) forward and backward, per block: the
   explicit bf16 path (two batched matmuls and a softmax), the same in fp32, torch's
   scaled_dot_product_attention (flash kernel, and the math fallback), and vitlab's attention
   kernel (vitlab.models.ops.attention, attention_kernel.c), which the compiled bf16 step uses
   where it runs: from the qkv Linear's output to the projection's input, layout included.
3. GELU at the MLP's shape, forward and backward: ATen's kernels against inductor's compiled loop,
   and vitlab's native kernel (vitlab.models.native: GELU and its derivative in one pass; the
   backward pass is then a multiply).
4. the compiled training step with GELU as vitlab's opaque operator on ATen's kernels
   (vitlab.models.ops) against the same step with nn.GELU, which inductor compiles itself, and
   the step with vitlab's native kernel (the default where it runs) against that operator: steps
   alternate pair by pair, the speed-up is the median of the pairs' ratios.
5. the last block run for the prefix tokens alone (VisionTransformer.prefix_only_last_block, on by
   default) against the full last block, alternating in the same way: the compiled bf16 training
   step, and the frozen bf16 inference copy.
6. the Linears on other kernels, each against the default compiled step, alternating: oneDNN's
   packed-weight Linear for qkv, fc1 and fc2 (section 1's forward and input gradient, as custom
   operators, the weight packed every step), and torch.compile's max-autotune mode.
7. what is left outside the matmuls, each against the default compiled step, alternating: the
   packed-weight Linear for all four Linears (qkv, proj, fc1, fc2), forward and input gradient;
   the same for the forward alone (one packing per Linear instead of two); and inductor's
   cpp_wrapper (the compiled graph's kernels called from C++ instead of Python).
8. the compiled training step with vitlab's attention kernel (the default where it runs) against
   the same step with the explicit path (Attention.use_native off), alternating.
9. the compiled training step with the Linears on vitlab's kernel (linear_kernel.c, the default
   where it runs) against the same step with autograd's products (Linear.use_native off),
   alternating. When it was added, only the weight and bias gradients were vitlab's; since section
   10's change it times every product of the Linears together.
10. the compiled training step with the Linears' forward products and input gradients on vitlab's
   kernel as well (linear_kernel.c: the bias added on each tile of sums, fc1 -> GELU -> fc2 as one
   operator with GELU and its derivative computed on fc1's tiles and the derivative applied in fc2's
   input gradient; the default where it runs) against the same step with those products ATen's
   (Linear.native_products off: section 9's default), alternating.

Writes benchmarks/results/step_anatomy.json (--out); --sections runs some of them (e.g. 1,3,7).
"""

from __future__ import annotations

import copy
import statistics
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.bench import _median_rate, alternate, arch_of, machine, speedup
from vitlab.cli import Parser
from vitlab.config import OptimConfig
from vitlab.models import create_model, native, ops
from vitlab.models.vit import Linear
from vitlab.train.optim import build_optimizer
from vitlab.utils import make_dir, tune_allocator, write_json


def ms(fn, repeats: int = 20, warmup: int = 4) -> float:
    """Median wall time of fn in milliseconds (the benchmark's timer: one call = one "image")."""
    return 1e3 / _median_rate(fn, 1, repeats, warmup)


def matmuls(a: dict, batch: int, dtype) -> list[dict]:
    rows = batch * ((a["img_size"] // a["patch_size"]) ** 2 + 1)
    d, m = a["embed_dim"], a["mlp_dim"]
    out = []
    for name, (k, n) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, m), "fc2": (m, d)}.items():
        x, w, b, g = (torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype),
                      torch.randn(rows, n, dtype=dtype))
        gflop = 2 * rows * k * n / 1e9
        t = dict(forward=ms(lambda: torch.addmm(b, x, w.t())), input_grad=ms(lambda: g @ w),
                 weight_grad_gT_x=ms(lambda: g.t() @ x), weight_grad_xT_g=ms(lambda: x.t() @ g),
                 weight_grad_gT_x_copied=ms(lambda: g.t().contiguous() @ x))
        pack_ms = None
        if packed_linear_available():
            # oneDNN's Linear with the weight reordered into its blocked layout first, as a frozen
            # inference graph runs it (the input gradient too: a Linear with weight W^T); in training
            # the weight changes every step, so the reorder would be paid every step (pack_ms)
            mk = torch.ops.mkldnn
            pw, pwt = mk._reorder_linear_weight(w, rows), mk._reorder_linear_weight(w.t().contiguous(), rows)
            t["forward_packed"] = ms(lambda: mk._linear_pointwise(x, pw, b, "none", [], ""))
            t["input_grad_packed"] = ms(lambda: mk._linear_pointwise(g, pwt, None, "none", [], ""))
            pack_ms = ms(lambda: mk._reorder_linear_weight(w, rows))
        lib = native.library()
        if lib is not None and dtype == torch.bfloat16 and k % 64 == 0 and n % 64 == 0:
            # vitlab's kernel as the compiled step runs it: from the fp32 weight and bias, packed per
            # call (linear_kernel.c), and with what it fuses for fc1 (GELU) and fc2 (GELU's derivative)
            wf, bf, deriv = w.float(), b.float(), torch.rand(rows, k, dtype=dtype)
            t["forward_vitlab"] = ms(lambda: native.linear_forward(lib, x, wf, bf))
            t["input_grad_vitlab"] = ms(lambda: native.linear_dgrad(lib, g, wf, None))
            t["weight_grad_vitlab"] = ms(lambda: native.linear_wgrad(lib, g, x, True))
            if name == "fc1":
                t["forward_gelu_vitlab"] = ms(lambda: native.linear_forward(lib, x, wf, bf, gelu=True))
            if name == "fc2":
                t["input_grad_times_gelu_derivative_vitlab"] = ms(lambda: native.linear_dgrad(lib, g, wf, deriv))
        out.append(dict(linear=name, shape=[rows, k, n], ms=t, gflops={key: gflop / v * 1e3 for key, v in t.items()},
                        pack_weight_ms=pack_ms))
        print(f"  {name:4s} ({rows}x{k} -> {n}): " + ", ".join(f"{key} {gflop / v * 1e3:.0f}" for key, v in t.items())
              + " GFLOP/s" + (f"; packing the weight {pack_ms:.2f} ms" if pack_ms is not None else ""))
    return out


def packed_linear_available() -> bool:
    """oneDNN's packed-weight Linear (torch's CPU build with mkldnn; what frozen inference uses)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def attention(a: dict, batch: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, n = a["num_heads"], (a["img_size"] // a["patch_size"]) ** 2 + 1
    hd = a["embed_dim"] // h
    qkv = torch.randn(batch, n, 3, h, hd, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, h, n, hd, dtype=torch.bfloat16)

    def split(dtype):
        return qkv.permute(2, 0, 3, 1, 4).to(dtype).unbind(0)  # 3 x (B, h, N, d)

    def explicit(dtype):
        def run():
            q, k, v = split(dtype)
            out = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
            out.backward(grad.to(dtype))
        return run

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(*split(torch.bfloat16)).backward(grad)
        return run

    def kernel():  # from the qkv Linear's output (B, N, 3*h*d) to the projection's input (B, N, h*d)
        x = qkv.detach().reshape(batch, n, 3 * h * hd).requires_grad_()
        ops.attention(x, h, hd**-0.5)[0].backward(grad.transpose(1, 2).reshape(batch, n, h * hd))

    res = {"explicit_bf16": ms(explicit(torch.bfloat16)), "explicit_fp32": ms(explicit(torch.float32)),
           "sdpa_flash_bf16": ms(sdpa(SDPBackend.FLASH_ATTENTION)), "sdpa_math_bf16": ms(sdpa(SDPBackend.MATH))}
    if native.library() is not None:
        res["vitlab_kernel_bf16"] = ms(kernel)
    else:
        print(f"  vitlab's attention kernel does not run here: {native.why_not()}")
    print("  attention core forward + backward per block (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    return res


def gelu(a: dict, batch: int) -> dict:
    rows = batch * ((a["img_size"] // a["patch_size"]) ** 2 + 1)
    fwd = torch.compile(lambda t: F.gelu(t))
    bwd = torch.compile(lambda t, u: torch.ops.aten.gelu_backward(u, t))
    res = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        x, g = torch.randn(rows, a["mlp_dim"], dtype=dtype), torch.randn(rows, a["mlp_dim"], dtype=dtype)
        res[name] = {"aten_forward": ms(lambda: F.gelu(x)), "inductor_forward": ms(lambda: fwd(x)),
                     "aten_backward": ms(lambda: torch.ops.aten.gelu_backward(g, x)),
                     "inductor_backward": ms(lambda: bwd(x, g)),
                     # the tanh approximation, which a faster GELU might have been (it is not)
                     "aten_tanh_forward": ms(lambda: F.gelu(x, approximate="tanh")),
                     "aten_tanh_backward": ms(lambda: torch.ops.aten.gelu_backward(g, x, approximate="tanh"))}
        lib = native.library()
        if lib is not None:  # vitlab's kernel: GELU and its derivative; its backward is a multiply
            d = native.gelu_and_grad(lib, x)[1]
            res[name]["native_forward_and_derivative"] = ms(lambda: native.gelu_and_grad(lib, x))
            res[name]["native_backward_multiply"] = ms(lambda: g * d)
        print(f"  GELU {rows}x{a['mlp_dim']} {name} (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in res[name].items()))
    if native.library() is not None:
        res["accuracy"] = gelu_accuracy()
    return res


def gelu_accuracy() -> dict:
    """GELU's error against fp64 (from erfc, which does not cancel in the negative tail), vitlab's
    kernel and ATen's, on 100,001 points per range: the largest |error| / max(1, |x|), and the
    largest relative error."""
    lib = native.library()
    res = {}
    for lo, hi in ((-5, -3), (-3, 3), (3, 10)):
        x = torch.linspace(lo, hi, 100_001)
        x64 = x.double()
        exact = x64 * 0.5 * torch.special.erfc(-x64 / 2**0.5)
        scale = x64.abs().clamp(min=1)
        row = {}
        for who, y in (("native", native.gelu_and_grad(lib, x)[0]), ("aten", F.gelu(x))):
            err = (y.double() - exact).abs()
            row[who] = {"abs_over_max1x": (err / scale).max().item(), "relative": (err / exact.abs()).max().item()}
        res[f"fp32 x in [{lo}, {hi}]"] = row
        print(f"  fp32 GELU error, x in [{lo}, {hi}]: " + "; ".join(
            f"{who} {v['abs_over_max1x']:.2g} max(1,|x|), {v['relative']:.2g} relative" for who, v in row.items()))
    return res


def compiled_steps(preset: str, batch: int, variants: dict, compile_kwargs: dict | None = None) -> dict:
    """One compiled bf16 training step (AdamW included) per variant: {name: edit(model) or None};
    compile_kwargs: {name: torch.compile's keyword arguments} where a variant compiles with other
    than the defaults (a mode, or inductor options)."""
    a = arch_of(preset)
    x = torch.randn(batch, a["in_chans"], a["img_size"], a["img_size"])
    y = torch.randint(0, a["num_classes"], (batch,))

    def make(edit, kwargs):
        torch.manual_seed(0)
        model = create_model(preset)
        if edit is not None:
            edit(model)
        opt = build_optimizer(model, OptimConfig(), lr=1e-4)
        compiled = torch.compile(model, **kwargs)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(compiled(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    return {name: make(edit, (compile_kwargs or {}).get(name, {})) for name, edit in variants.items()}


def paired(steps: dict, fast: str, slow: str, batch: int, pairs: int, what: str) -> dict:
    """Warm both (compiling), alternate them pair by pair, report `fast`'s speed-up over `slow`."""
    for fn in steps.values():
        for _ in range(3):  # compiles
            fn()
    times = alternate(steps, pairs)
    med, q = speedup(times, fast, slow)
    res = dict(pairs=pairs, images_per_s={k: batch / statistics.median(v) for k, v in times.items()},
               speedup_median=med, speedup_quartiles=q)
    print(f"  {what}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in res["images_per_s"].items())
          + f"; {fast} {med:.3f}x (median of {pairs} pairs, quartiles {q[0]:.3f}-{q[1]:.3f})")
    return res


def gelu_operator_step(preset: str, batch: int, pairs: int) -> dict:
    """Compiled bf16 steps, alternating: vitlab's GELU operator on ATen's kernels against
    inductor's own GELU, and (where it runs) vitlab's native kernel against that operator."""
    def inductor_gelu(model):
        for blk in model.blocks:
            blk.mlp.act = nn.GELU()  # inductor lowers this one itself

    def aten_gelu_op(model):
        for blk in model.blocks:
            blk.mlp.act.use_native = False

    steps = compiled_steps(preset, batch, {"inductor_gelu": inductor_gelu, "vitlab_gelu_op": aten_gelu_op})
    res = {"op_vs_inductor": paired(steps, "vitlab_gelu_op", "inductor_gelu", batch, pairs, "compiled bf16 step")}
    del steps
    if native.library() is None:
        print(f"  vitlab's GELU kernel does not run here: {native.why_not()}")
        return res
    steps = compiled_steps(preset, batch, {"vitlab_gelu_op": aten_gelu_op, "native_gelu": None})
    res["native_vs_op"] = paired(steps, "native_gelu", "vitlab_gelu_op", batch, pairs, "compiled bf16 step")
    return res


def attention_kernel_step(preset: str, batch: int, pairs: int) -> dict:
    """The compiled bf16 step with vitlab's attention kernel (the default where it runs) against
    the same step with the explicit path: two batched matmuls, a softmax and inductor's layout
    copies around them."""
    if native.library() is None:
        print(f"  vitlab's attention kernel does not run here: {native.why_not()}")
        return {}

    def explicit(model):
        for blk in model.blocks:
            blk.attn.use_native = False

    steps = compiled_steps(preset, batch, {"explicit": explicit, "kernel": None})
    return {"kernel_vs_explicit": paired(steps, "kernel", "explicit", batch, pairs, "compiled bf16 step")}


def _linears_off(flag: str, slow: str, preset: str, batch: int, pairs: int) -> dict:
    """The default compiled bf16 step (kernel) against the same step with Linear.<flag> off (slow)."""
    if native.library() is None:
        print(f"  vitlab's Linear kernels do not run here: {native.why_not()}")
        return {}

    def off(model):
        for m in model.modules():
            if isinstance(m, Linear):
                setattr(m, flag, False)

    steps = compiled_steps(preset, batch, {slow: off, "kernel": None})
    return {f"kernel_vs_{slow}": paired(steps, "kernel", slow, batch, pairs, "compiled bf16 step")}


def linear_kernel_step(preset: str, batch: int, pairs: int) -> dict:
    """The compiled bf16 step with the Linears on vitlab's kernels (the default where they run)
    against the same step on autograd's products (Linear.use_native off). Section 9 measured the
    weight-gradient kernel alone this way, before the other products moved onto vitlab's kernel:
    run now, it times all of them together."""
    return _linears_off("use_native", "aten", preset, batch, pairs)


def fused_products_step(preset: str, batch: int, pairs: int) -> dict:
    """The compiled bf16 step with the forward products and input gradients on vitlab's kernel too
    (the default where it runs) against the same step with them on ATen's products and GELU as its
    own kernel (Linear.native_products off; the weight gradients are vitlab's either way)."""
    return _linears_off("native_products", "aten_products", preset, batch, pairs)


def prefix_only_last_block(preset: str, batch: int, pairs: int) -> dict:
    """The last block for the prefix tokens alone (VisionTransformer.prefix_only_last_block, the
    default) against the full last block: the default training step, and the frozen bf16 copy
    that long inference jobs use."""
    from vitlab.train.inference import FrozenInference

    def full(model):
        model.prefix_only_last_block = False

    res = {}
    steps = compiled_steps(preset, batch, {"full_last_block": full, "prefix_only": None})
    res["train_compiled_bf16"] = paired(steps, "prefix_only", "full_last_block", batch, pairs,
                                        "compiled bf16 training step")
    del steps
    a = arch_of(preset)
    x = torch.randn(batch, a["in_chans"], a["img_size"], a["img_size"])
    base = create_model(preset).eval()
    same = copy.deepcopy(base)  # the same weights
    full(same)
    copies = {"full_last_block": FrozenInference(same, torch.bfloat16), "prefix_only": FrozenInference(base, torch.bfloat16)}
    res["logits_max_abs_diff_frozen"] = (copies["full_last_block"](x) - copies["prefix_only"](x)).abs().max().item()
    steps = {k: (lambda f=f: f(x)) for k, f in copies.items()}
    res["infer_frozen_bf16"] = paired(steps, "prefix_only", "full_last_block", batch, 3 * pairs,
                                      "frozen bf16 inference")
    print(f"  frozen copies' logits differ by at most {res['logits_max_abs_diff_frozen']:.3g}")
    return res


# Section 6's Linear: forward and input gradient through oneDNN's packed-weight kernels (section 1's
# forward_packed / input_grad_packed), the weight gradient through mm as autograd issues it. Custom
# operators, so that the compiled graph calls them as they are; the weight is packed inside the
# call, every step, since training changes it.
@torch.library.custom_op("vitlab_bench::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mk, rows = torch.ops.mkldnn, x.numel() // x.shape[-1]
    return mk._linear_pointwise(x, mk._reorder_linear_weight(w, rows), b, "none", [], "")


@packed_linear.register_fake
def _packed_linear_fake(x, w, b):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("vitlab_bench::packed_linear_input_grad", mutates_args=())
def packed_linear_input_grad(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    mk, rows = torch.ops.mkldnn, g.numel() // g.shape[-1]
    return mk._linear_pointwise(g, mk._reorder_linear_weight(w.t().contiguous(), rows), None, "none", [], "")


@packed_linear_input_grad.register_fake
def _packed_linear_input_grad_fake(g, w):
    return g.new_empty((*g.shape[:-1], w.shape[1]))


def _packed_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _linear_backward(input_grad):
    """A Linear's backward with the input gradient from input_grad(g, w); the weight gradient
    through mm as autograd issues it, the bias gradient a sum."""
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.to(x.dtype)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        return input_grad(g, w), g2.t() @ x2, g2.sum(0)
    return backward


packed_linear.register_autograd(_linear_backward(packed_linear_input_grad), setup_context=_packed_linear_setup)


class PackedLinear(nn.Linear):
    """nn.Linear whose compiled bf16-autocast training forward goes through packed_linear."""

    op = staticmethod(packed_linear)

    def forward(self, x):
        if (torch.compiler.is_compiling() and torch.is_autocast_enabled("cpu") and x.requires_grad
                and self.bias is not None):
            dt = torch.get_autocast_dtype("cpu")
            return self.op(x.to(dt), self.weight.to(dt), self.bias.to(dt))
        return F.linear(x, self.weight, self.bias)


@torch.library.custom_op("vitlab_bench::packed_linear_fwd", mutates_args=())
def packed_linear_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """packed_linear's forward; its backward is a plain matmul (one packing per call, not two)."""
    return packed_linear(x, w, b)


@packed_linear_fwd.register_fake
def _packed_linear_fwd_fake(x, w, b):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


packed_linear_fwd.register_autograd(_linear_backward(torch.matmul), setup_context=_packed_linear_setup)


class PackedForwardLinear(PackedLinear):
    """PackedLinear with the input gradient through matmul as usual."""

    op = staticmethod(packed_linear_fwd)


def swap_linears(cls, names):
    """An edit for compiled_steps: each block's Linears at `names` (e.g. "attn.qkv") become `cls`,
    same parameters, other forward."""
    def edit(model):
        for blk in model.blocks:
            for name in names:
                blk.get_submodule(name).__class__ = cls
    return edit


def outside_matmuls(preset: str, batch: int, pairs: int) -> dict:
    """Section 7: the packed-weight Linear for all four Linears (forward and input gradient, then
    the forward alone) and inductor's cpp_wrapper, each against the default compiled step."""
    res = {}
    if packed_linear_available():
        for name, cls in (("packed_all_four", PackedLinear), ("packed_forward_all_four", PackedForwardLinear)):
            steps = compiled_steps(preset, batch, {name: swap_linears(cls, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")),
                                                   "default": None})
            res[name] = paired(steps, name, "default", batch, pairs, "compiled bf16 step")
            del steps
    else:
        print("  (no oneDNN packed Linear in this torch build: the packed-weight steps are skipped)")
    steps = compiled_steps(preset, batch, {"cpp_wrapper": None, "default": None},
                           compile_kwargs={"cpp_wrapper": {"options": {"cpp_wrapper": True}}})
    res["cpp_wrapper"] = paired(steps, "cpp_wrapper", "default", batch, pairs, "compiled bf16 step")
    return res


def linear_kernels(preset: str, batch: int, pairs: int) -> dict:
    """Two ways to run the Linears of the compiled training step on other kernels, each against the
    default step: oneDNN's packed-weight Linear (PackedLinear for qkv, fc1 and fc2: section 1's
    faster forward and input gradient, the packing paid every step), and torch.compile's
    max-autotune mode (inductor benchmarks its own C++ GEMM templates against ATen's per product)."""
    res = {}
    if packed_linear_available():
        packed = swap_linears(PackedLinear, ("attn.qkv", "mlp.fc1", "mlp.fc2"))
        steps = compiled_steps(preset, batch, {"packed_linear": packed, "default": None})
        res["packed_linear"] = paired(steps, "packed_linear", "default", batch, pairs, "compiled bf16 step")
        del steps
    else:
        print("  (no oneDNN packed Linear in this torch build: the packed-weight step is skipped)")
    steps = compiled_steps(preset, batch, {"max_autotune": None, "default": None},
                           compile_kwargs={"max_autotune": {"mode": "max-autotune-no-cudagraphs"}})
    res["max_autotune"] = paired(steps, "max_autotune", "default", batch, pairs, "compiled bf16 step")
    return res


SECTIONS = range(1, 11)  # the measurements the docstring numbers


def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch4_32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pairs", type=int, default=30, help="alternating training-step pairs in sections 4 to 10 (inference: 3x as many)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--sections", default=",".join(map(str, SECTIONS)), help="which sections to run, e.g. 1,3,7 (default: all)")
    args = p.parse_args(argv)
    make_dir(args.out)  # a bad --out is one line now, not after minutes of work
    if args.pairs < 2:
        p.error("--pairs must be 2 or more (the quartiles need two)")
    try:
        sections = {int(v) for v in args.sections.split(",") if v.strip()}
    except ValueError:
        sections = set()
    if not sections or not sections <= set(SECTIONS):
        p.error(f"--sections takes numbers from 1 to {SECTIONS[-1]} separated by commas, got {args.sections!r}")
    tune_allocator()  # as every `vitlab` command does
    a = arch_of(args.model)
    print(f"step anatomy, {args.model}, batch {args.batch_size}, on {machine()}")
    res = dict(date=str(date.today()), machine=machine(),
               command=" ".join(["python benchmarks/step_anatomy.py", *(argv if argv is not None else sys.argv[1:])]),
               model=args.model, batch=args.batch_size, sections=sorted(sections))
    b, n = args.batch_size, args.pairs
    for k, key, title, fn in (
            (1, "matmuls_bf16", "matmuls (bf16):", lambda: matmuls(a, b, torch.bfloat16)),
            (2, "attention_ms", "attention:", lambda: attention(a, b)),
            (3, "gelu_ms", "GELU:", lambda: gelu(a, b)),
            (4, "gelu_operator_step", "the compiled step: GELU as inductor lowers it, as an operator on ATen's kernels, on vitlab's:",
             lambda: gelu_operator_step(args.model, b, n)),
            (5, "prefix_only_last_block", "the last block for the prefix tokens only, or the full last block:",
             lambda: prefix_only_last_block(args.model, b, n)),
            (6, "linear_kernels", "the Linears on other kernels: oneDNN's packed weights, torch.compile's max-autotune:",
             lambda: linear_kernels(args.model, b, n)),
            (7, "outside_matmuls", "what is left outside the matmuls: all four Linears packed, the forward alone, "
             "cpp_wrapper:", lambda: outside_matmuls(args.model, b, n)),
            (8, "attention_kernel_step", "the compiled step: vitlab's attention kernel, or the explicit path:",
             lambda: attention_kernel_step(args.model, b, n)),
            (9, "linear_kernel_step", "the compiled step: the Linears on vitlab's kernel, or on ATen's "
             "products:", lambda: linear_kernel_step(args.model, b, n)),
            (10, "fused_products_step", "the compiled step: the forward products and input gradients on vitlab's "
             "kernel too, or on ATen's:", lambda: fused_products_step(args.model, b, n))):
        if k in sections:
            print(title)
            res[key] = fn()
    out = write_json(Path(args.out) / "step_anatomy.json", res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "step_anatomy.py")
