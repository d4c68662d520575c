"""Operators that torch.compile should call as they are instead of rewriting.

Inductor turns GELU into its own C++ loop around a vectorised erf. On a CPU that loop is
slower than ATen's GELU kernels, standalone about 1.5-2x (8320 x 768, the MLP of ViT-Tiny at
batch 128, on the dev CPU: in bf16 3.2 against 2.1 ms forward and 5.9 against 3.1 ms backward,
in fp32 3.9 against 1.8 and 7.9 against 5.0), and GELU is the largest elementwise cost of a
compiled CPU training step. Wrapped as a custom operator, the compiled graph calls ATen's
kernels for it and fuses everything around it as before: the ViT-Tiny bf16 step ran 1.04-1.06x
faster (medians of 30 alternating pairs, three runs; `benchmarks/step_anatomy.py`). The
compiled graph then keeps GELU's output for the backward pass, as eager mode does, instead of
recomputing it there (one activation of the MLP's hidden width per block).

Only a compiled CPU graph that trains through GELU takes this path (`vit.GELU`): eager mode
calls F.gelu directly, and inference keeps inductor's own lowering, which a frozen graph folds
into the Linear before it (`vitlab.train.inference`).

Where vitlab's own kernel runs (native.py: Linux x86-64 with AVX-512 BF16 and a C compiler), the
graph calls `gelu_and_grad` instead: one pass writes GELU and its derivative, and the backward
pass is grad * derivative in inductor's own loops (one of them also sums the bias gradient),
in place of ATen's gelu_backward evaluating erf and exp again. The ViT-Tiny bf16 step ran
1.028-1.039x faster than with `gelu` (three runs of benchmarks/step_anatomy.py, section 4, on a
Zen 5 EPYC). An MLP without dropout inside goes further where the kernels run: `mlp` computes
GELU and its derivative inside fc1's product (the MLP section below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native


@torch.library.custom_op("vitlab::gelu", mutates_args=())
def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, opaque to the compiler."""
    return F.gelu(x)


@gelu.register_fake
def _gelu_fake(x):
    return torch.empty_like(x)


@torch.library.custom_op("vitlab::gelu_backward", mutates_args=())
def gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d gelu(x) / dx * grad, ATen's kernel; grad is cast to x's dtype (bf16 under autocast)."""
    return torch.ops.aten.gelu_backward(grad.to(x.dtype), x)


@gelu_backward.register_fake
def _gelu_backward_fake(grad, x):
    return torch.empty_like(x)


def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gelu_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return gelu_backward(grad, x)


gelu.register_autograd(_gelu_grad, setup_context=_save_input)


@torch.compiler.assume_constant_result  # decided once, while tracing; the build runs outside the graph
def native_kernels() -> bool:
    """Whether vitlab's kernels run on this machine (built on the first call)."""
    return native.library() is not None


@torch.library.custom_op("vitlab::gelu_and_grad", mutates_args=())
def gelu_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(x), gelu'(x)): vitlab's kernel for bf16 and fp32 on a CPU that runs it, ATen elsewhere."""
    x = x.contiguous()  # as the fake kernel promises
    lib = native.library()
    if lib is not None and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32):
        return native.gelu_and_grad(lib, x)
    return F.gelu(x), torch.ops.aten.gelu_backward(torch.ones_like(x), x)


@gelu_and_grad.register_fake
def _gelu_and_grad_fake(x):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def _save_derivative(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _gelu_and_grad_grad(ctx, grad, _):
    (d,) = ctx.saved_tensors
    return grad.to(d.dtype) * d  # plain torch ops: the compiled backward runs them in its own loops


gelu_and_grad.register_autograd(_gelu_and_grad_grad, setup_context=_save_derivative)


# -- attention ---------------------------------------------------------------------------------
# Where vitlab's kernels run, a compiled CPU training graph in bf16 hands attention, from the qkv
# Linear's output to the projection's input, to one operator (attention_kernel.c): no head-major
# copies of q, k, v, the output or their gradients, and the softmax in the same pass as the
# products. ViT-Tiny's attention core, forward and backward, took 3.7 ms per block this way
# against 6.5 ms for the explicit bf16 path, and the compiled bf16 step ran 1.050x faster
# (benchmarks/step_anatomy.py sections 2 and 8, 30 alternating pairs, on a Zen 5 EPYC).
# Elsewhere the operator computes the same in torch (used by the tests, and wherever the kernel
# cannot take a call).


def _split_heads(qkv: torch.Tensor, heads: int):
    B, N, D = native.attention_shapes(qkv, heads)
    return qkv.reshape(B, N, 3, heads, D).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)


def _kernel_takes(lib, qkv: torch.Tensor, heads: int, scale: float) -> bool:
    return (lib is not None and qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16
            and native.attention_shapes(qkv, heads)[2] % 32 == 0 and scale > 0)


@torch.library.custom_op("vitlab::attention", mutates_args=())
def attention(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale q k^T) v for every head of a qkv Linear's output (B, N, 3 * heads * d), as
    (out (B, N, heads * d), weights (B, heads, N, N + N % 2)): the softmax in qkv's dtype, each row
    padded with a zero to even length, kept for the backward pass."""
    qkv = qkv.contiguous()
    lib = native.library()
    if _kernel_takes(lib, qkv, heads, scale):
        return native.attention(lib, qkv, heads, scale)
    q, k, v = (t.float() for t in _split_heads(qkv, heads))
    w = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1).to(qkv.dtype)  # (B, h, N, N)
    out = (w.float() @ v).to(qkv.dtype).transpose(1, 2).flatten(2)  # (B, N, h*d)
    return out.contiguous(), F.pad(w, (0, w.shape[-1] % 2))


@attention.register_fake
def _attention_fake(qkv, heads, scale):
    B, N, D = native.attention_shapes(qkv, heads)
    return qkv.new_empty(B, N, heads * D), qkv.new_empty(B, heads, N, N + N % 2)


@torch.library.custom_op("vitlab::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, qkv: torch.Tensor, weights: torch.Tensor, heads: int,
                       scale: float) -> torch.Tensor:
    """The gradient of attention()'s qkv input from its output's; dout is cast to qkv's dtype."""
    dout, qkv, weights = dout.to(qkv.dtype).contiguous(), qkv.contiguous(), weights.contiguous()
    lib = native.library()
    if _kernel_takes(lib, qkv, heads, scale):
        return native.attention_backward(lib, dout, qkv, weights, heads, scale)
    B, N, D = native.attention_shapes(qkv, heads)
    q, k, v = (t.float() for t in _split_heads(qkv, heads))
    p = weights[..., :N].float()  # (B, h, N, N)
    do = dout.float().reshape(B, N, heads, D).transpose(1, 2)  # (B, h, N, d)
    dp = do @ v.transpose(-2, -1)
    ds = (p * (dp - (p * dp).sum(-1, keepdim=True)) * scale).to(qkv.dtype).float()  # rounded as the kernel does
    grads = (ds @ k, ds.transpose(-2, -1) @ q, p.transpose(-2, -1) @ do)  # dq, dk, dv: (B, h, N, d)
    return torch.stack(grads, 2).transpose(1, 3).reshape(B, N, 3 * heads * D).to(qkv.dtype)


@attention_backward.register_fake
def _attention_backward_fake(dout, qkv, weights, heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _save_for_attention(ctx, inputs, output):
    qkv, ctx.heads, ctx.scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(qkv, output[1])


def _attention_grad(ctx, grad, _):
    qkv, weights = ctx.saved_tensors
    return attention_backward(grad, qkv, weights, ctx.heads, ctx.scale), None, None


attention.register_autograd(_attention_grad, setup_context=_save_for_attention)


# -- Linear --------------------------------------------------------------------------------------
# Where vitlab's kernels run, a compiled CPU training graph in bf16 autocast computes each
# transformer Linear through `linear` (and each MLP through `mlp`, below), all three products on
# linear_kernel.c: the weight and bias gradients in one pass (fp32 results, no separate bias
# reduction or casts): oneDNN's weight-gradient products were the step's slowest, their operands
# coming from memory, not cache; with that kernel the ViT-Tiny bf16 step ran 1.059x faster
# (benchmarks/step_anatomy.py section 9, 30 alternating pairs, on a Zen 5 EPYC). Then the forward
# product, with the bias added to each tile of sums on the way out (no bias copy before the
# product), and the input gradient, both from the fp32 weight packed in bf16 once per call (no
# separate cast): with the MLP's fusions below, 1.068x and 1.131x in two runs of section 10.
# `products=False` keeps those two on ATen's products (section 10's comparison). Elsewhere the
# operators compute the same in torch.


def _wgrad_kernel_takes(lib, dy: torch.Tensor, x: torch.Tensor) -> bool:
    return (lib is not None and dy.device.type == "cpu" and dy.dtype == x.dtype == torch.bfloat16
            and x.shape[-1] > 0 and x.shape[-1] % 16 == 0 and dy.shape[-1] > 0)


@torch.library.custom_op("vitlab::linear_wgrad", mutates_args=())
def linear_wgrad(dy: torch.Tensor, x: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy^T x, dy's column sums), both fp32, for dy (K, M) and x (K, N): a Linear's weight and bias
    gradients from its output gradient and input, rows = batch x tokens. The sums are empty (0,)
    when bias is False."""
    dy, x = dy.contiguous(), x.contiguous()
    lib = native.library()
    if _wgrad_kernel_takes(lib, dy, x):
        dw, db = native.linear_wgrad(lib, dy, x, bias)
        return dw, db if db is not None else dw.new_empty(0)
    dyf = dy.float()
    return dyf.t() @ x.float(), dyf.sum(0) if bias else dyf.new_empty(0)


@linear_wgrad.register_fake
def _linear_wgrad_fake(dy, x, bias):
    return (dy.new_empty(dy.shape[1], x.shape[1], dtype=torch.float32),
            dy.new_empty(dy.shape[1] if bias else 0, dtype=torch.float32))


def _products_take(lib, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether linear_kernel.c's forward product takes x (..., n_in) W^T + b: bf16 activations, the
    fp32 parameters, n_in a multiple of 32 and n_out of 64 (ViT widths are)."""
    n_out, n_in = weight.shape
    return (lib is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and weight.dtype == torch.float32 and n_in > 0 and n_in % 32 == 0 and n_out > 0 and n_out % 64 == 0
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == (n_out,))))


def _dgrad_takes(lib, g: torch.Tensor, weight: torch.Tensor) -> bool:
    n_out, n_in = weight.shape
    return (lib is not None and g.device.type == "cpu" and g.dtype == torch.bfloat16
            and weight.dtype == torch.float32 and n_out > 0 and n_out % 2 == 0 and n_in > 0 and n_in % 64 == 0)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, products: bool,
             gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x W^T + b, None), or with gelu (gelu(x W^T + b), its derivative): vitlab's kernel where it
    takes the call and `products` asks for it, ATen's product (and GELU kernel) otherwise."""
    lib = native.library()
    if products and _products_take(lib, x, weight, bias):
        return native.linear_forward(lib, x.contiguous(), weight.contiguous(),
                                     None if bias is None else bias.contiguous(), gelu)
    h = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if not gelu:
        return h, None
    if lib is not None and h.device.type == "cpu" and h.dtype in (torch.bfloat16, torch.float32):
        return native.gelu_and_grad(lib, h.contiguous())
    return F.gelu(h), torch.ops.aten.gelu_backward(torch.ones_like(h), h)


@torch.library.custom_op("vitlab::linear_dgrad", mutates_args=())
def linear_dgrad(g: torch.Tensor, weight: torch.Tensor, m: torch.Tensor | None, products: bool) -> torch.Tensor:
    """(g W) * m (m None: g W) in g's dtype, for g (..., n_out), the fp32 weight (n_out, n_in) and m
    (..., n_in): a Linear's input gradient, times GELU's derivative where the Linear reads GELU."""
    lib = native.library()
    if products and _dgrad_takes(lib, g, weight):
        return native.linear_dgrad(lib, g.contiguous(), weight.contiguous(), None if m is None else m.contiguous())
    dx = g @ weight.to(g.dtype)
    return dx if m is None else dx * m


@linear_dgrad.register_fake
def _linear_dgrad_fake(g, weight, m, products):
    return g.new_empty(*g.shape[:-1], weight.shape[1])


@torch.library.custom_op("vitlab::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, products: bool) -> torch.Tensor:
    """F.linear in x's dtype (bf16) from the fp32 weight and bias, opaque to the compiler, so that its
    backward pass is vitlab's: with `products`, the forward product and the input gradient on
    linear_kernel.c as well (the bias added on the way out, the weight cast while it is packed)."""
    return _forward(x, weight, bias, products)[0]


@linear.register_fake
def _linear_fake(x, weight, bias, products):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _save_for_linear(ctx, inputs, output):
    x, weight, bias, ctx.products = inputs
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight)


def _weight_grads(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias_dtype):
    dw, db = linear_wgrad(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]), bias_dtype is not None)
    return dw.to(weight.dtype), None if bias_dtype is None else db.to(bias_dtype)


def _linear_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    g = grad.to(x.dtype)
    return (linear_dgrad(g, weight, None, ctx.products), *_weight_grads(g, x, weight, ctx.bias_dtype), None)


linear.register_autograd(_linear_grad, setup_context=_save_for_linear)


# -- the MLP ------------------------------------------------------------------------------------
# fc1 -> GELU -> fc2 as one operator, so that GELU runs in fc1's product (on each tile of fp32 sums,
# writing GELU and its derivative, as gelu_and_grad does from a bf16 copy) and, in the backward
# pass, its derivative multiplies fc2's input gradient in that product: the passes over the MLP's
# widest activation that the GELU kernel and its backward multiply made are gone, and GELU reads
# fc1's sums before they are rounded to bf16. Together with the Linears' products above, the
# ViT-Tiny bf16 step ran 1.068x and 1.131x faster in two runs of benchmarks/step_anatomy.py
# section 10.


@torch.library.custom_op("vitlab::mlp", mutates_args=())
def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
        products: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fc2(gelu(fc1(x))), gelu(fc1(x)), gelu'(fc1(x))) in x's dtype (bf16) from fp32 parameters; the
    last two are kept for the backward pass."""
    y, d = _forward(x, w1, b1, products, gelu=True)
    return _forward(y, w2, b2, products)[0], y, d


@mlp.register_fake
def _mlp_fake(x, w1, b1, w2, b2, products):
    hidden = x.new_empty(*x.shape[:-1], w1.shape[0])
    return x.new_empty(*x.shape[:-1], w2.shape[0]), hidden, torch.empty_like(hidden)


def _save_for_mlp(ctx, inputs, output):
    x, w1, b1, w2, b2, ctx.products = inputs
    ctx.bias_dtypes = tuple(None if b is None else b.dtype for b in (b1, b2))
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, w1, w2, output[1], output[2])


def _mlp_grad(ctx, grad, _, __):
    x, w1, w2, y, d = ctx.saved_tensors
    g = grad.to(x.dtype)
    dw2, db2 = _weight_grads(g, y, w2, ctx.bias_dtypes[1])
    gh = linear_dgrad(g, w2, d, ctx.products)  # the gradient of fc1's output: GELU's derivative applied
    dw1, db1 = _weight_grads(gh, x, w1, ctx.bias_dtypes[0])
    return linear_dgrad(gh, w1, None, ctx.products), dw1, db1, dw2, db2, None


mlp.register_autograd(_mlp_grad, setup_context=_save_for_mlp)
