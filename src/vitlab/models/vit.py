"""The Vision Transformer, whole, in one file.

Read top to bottom: patch embedding -> attention -> MLP -> block -> model.
Shapes use B batch, C channels, H x W image, P patch size, N tokens
(prefix tokens + patches), D embedding width, h heads, d head width.

Parameter names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{i}.attn.qkv`, ...), so timm checkpoints load by a plain copy and the
Hugging Face / Google / torchvision layouts need only a renaming
(`vitlab.models.pretrained`).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    """A size given as one int or as (height, width) -> (height, width)."""
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return (int(x), int(x))
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__") or len(x) != 2:
        raise ValueError(f"a size must be an int or (height, width), got {x!r}")
    h, w = x
    return (int(h), int(w))


def record_arch(model: nn.Module, **kwargs) -> None:
    """Keep `model.arch` (the record create_model attaches, which save_model writes and load_model
    rebuilds from) true after an in-place change such as a new head or input size."""
    arch = getattr(model, "arch", None)
    if arch is not None:
        arch.setdefault("kwargs", {}).update(kwargs)


def stem_layers(spec) -> list[tuple[int, int]]:
    """conv_stem spec -> [(width, stride), ...]. An entry is a width (a stride-2 layer) or a
    (width, stride) pair with stride 1 or 2; lists (from a JSON arch record) read as pairs."""
    def is_int(v):  # bool is an int subclass, and True must not pass as width 1 or stride 1
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(spec, (tuple, list)):
        raise ValueError(f"conv_stem is a sequence of widths or (width, stride) pairs, got {spec!r}")
    out = []
    for entry in spec:
        pair = (entry, 2) if is_int(entry) else tuple(entry) if isinstance(entry, (tuple, list)) else ()
        if len(pair) != 2 or not (is_int(pair[0]) and pair[0] > 0 and is_int(pair[1]) and pair[1] in (1, 2)):
            raise ValueError(f"conv_stem entries are a positive int width, or (width, stride) with stride "
                             f"1 or 2; got {entry!r}")
        out.append((pair[0], pair[1]))
    return out


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and project each to D dims.

    A conv with kernel = stride = P is exactly "flatten each patch, apply one
    shared Linear", and it is the layout every pretrained checkpoint uses.

    conv_stem=(c1, c2, ...) makes it the ViT paper's *hybrid* input (section 3.1):
    k stride-2 3x3 conv-BN-ReLU layers with those widths shrink the image by S = 2^k
    first, and `proj` (kernel = stride = P / S) cuts their feature map into
    the same grid of tokens. Early convolutions give a transformer the locality
    a plain patchify lacks, which is what it cannot learn from little data or
    few epochs (Xiao et al. 2021, "Early convolutions help transformers see
    better"). The token grid, and everything after it, is unchanged. An entry
    (c, 1) adds a stride-1 layer of width c, which deepens the stem without
    shrinking it: (32, 64, (64, 1), 128) is four convs with S = 8.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, strict_img_size=True,
                 conv_stem: Sequence[int | tuple[int, int]] = ()):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        for side, size, p in zip(("height", "width"), self.img_size, self.patch_size):
            if size % p:
                raise ValueError(f"image {side} {size} is not divisible by the patch size {p}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.stem = None
        kernel, chans = self.patch_size, in_chans
        if conv_stem:
            layers, shrink = [], 1
            for width, stride in stem_layers(conv_stem):
                layers += [nn.Conv2d(chans, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                chans, shrink = width, shrink * stride
            if any(p % shrink for p in self.patch_size):
                raise ValueError(f"a conv stem that shrinks the image {shrink}x needs a patch size divisible "
                                 f"by {shrink}, got {self.patch_size[0]}x{self.patch_size[1]}")
            self.stem = nn.Sequential(*layers)
            kernel = (self.patch_size[0] // shrink, self.patch_size[1] // shrink)
        self.proj = nn.Conv2d(chans, embed_dim, kernel_size=kernel, stride=kernel)

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of images (B, C, H, W), got {type(x).__name__}")
        if not x.is_floating_point():  # raw pixels would run, and predict garbage
            raise TypeError(f"expected float images normalised as for training, got {x.dtype} (raw pixels?): "
                            f"scale to [0, 1] and normalise with the data's mean and std")
        if x.dtype == torch.float64 and self.proj.weight.dtype != torch.float64:  # numpy's default
            raise TypeError(f"got float64 images for a {self.proj.weight.dtype} model; convert them with "
                            f"x.to({self.proj.weight.dtype})")
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"expected {self.in_chans}-channel images, got {c} channels")
        if self.strict_img_size and (h, w) != self.img_size:
            raise ValueError(
                f"expected {self.img_size[0]}x{self.img_size[1]} images, got {h}x{w}; "
                f"resize the input or build the model with img_size=({h}, {w})"
            )
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.stem is not None:
            x = self.stem(x)  # (B, c_last, H/S, W/S), S = the stem's shrink
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N_patches, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    The qkv output rows are ordered (q|k|v), each head-major, as in timm.
    When D is not divisible by h the heads use d = D // h and the inner width
    is h * d (the seed notebook's choice), so qkv is D -> 3*h*d and proj h*d -> D.
    """

    # "auto" (the rule in _explicit), "explicit" or "sdpa": which kernel computes attention when the
    # weights are not asked for. Set per module to compare the two (benchmarks/attention_path.py).
    path = "auto"
    use_native = True  # False: never vitlab's attention kernel (benchmarks/step_anatomy.py)

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        if self.head_dim == 0:
            raise ValueError(f"embed_dim {dim} is smaller than num_heads {num_heads}")
        self.inner_dim = num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, 3 * self.inner_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(self.inner_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _explicit(self, q: torch.Tensor, n: int) -> bool:
        if self.path != "auto":
            if self.path not in ("explicit", "sdpa"):
                raise ValueError(f"Attention.path is 'auto', 'explicit' or 'sdpa', got {self.path!r}")
            return self.path == "explicit"
        if q.device.type != "cpu":
            return False
        if torch.is_grad_enabled():
            return True
        # inference: explicit in bf16, where torch's CPU kernels are slower; fp32 inference keeps
        # sdpa (no clear winner there, and it holds no (N, N) matrix), and so does a batch whose
        # (B, h, M, N) logits would pass 2^28 elements (512 MiB in bf16; the softmax's output is
        # alive beside them, about 1 GiB together), which the fused kernels never hold
        return q.dtype == torch.bfloat16 and q.shape[0] * self.num_heads * q.shape[2] * n <= 2**28

    def _native(self, qkv: torch.Tensor) -> bool:
        """Whether vitlab's attention kernel takes this call: a compiled CPU graph training in bf16
        (as `vitlab train` runs a long job), no attention dropout, and heads of a multiple of 32."""
        return (self.use_native and self.path == "auto" and _compiled_cpu_training(qkv)
                and qkv.dtype == torch.bfloat16 and not (self.training and self.attn_drop > 0)
                and self.head_dim % 32 == 0 and ops.native_kernels())

    def forward(self, x: torch.Tensor, return_attn: bool = False, queries: int | None = None):
        """(B, N, D) -> (B, N, D); with `queries`, the outputs of the first `queries` tokens only,
        (B, queries, D): they attend to every token, the others' own outputs are not computed."""
        B, N, _ = x.shape
        if queries is None:
            qkv = self.qkv(x)  # (B, N, 3*h*d)
            if not return_attn and self._native(qkv):
                # one operator from the qkv output to the projection's input, no head-major copies
                # (attention_kernel.c): the ViT-Tiny bf16 step ran 1.05x faster (benchmarks/step_anatomy.py, 8)
                out = ops.attention(qkv, self.num_heads, self.scale)[0]  # (B, N, h*d)
                return self.proj_drop(self.proj(out))
            qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        else:
            if return_attn:
                raise ValueError("return_attn needs every token's queries; queries must be None")
            # the (q|k|v) rows of the fused weight, split: queries for the first tokens, keys and values for all
            i, w, b = self.inner_dim, self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :queries], w[:i], None if b is None else b[:i])  # (B, M, h*d), M = queries
            q = q.reshape(B, queries, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, M, d)
            kv = F.linear(x, w[i:], None if b is None else b[i:]).reshape(B, N, 2, self.num_heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, h, N, d)
        M = q.shape[2]  # query rows: N, or `queries`
        drop = self.attn_drop if self.training else 0.0
        if return_attn:
            # Explicit path: the weights are materialised and handed back.
            # Softmax in fp32 so the maps are exact even under bf16 autocast.
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
            attn = logits.float().softmax(dim=-1)
            out = F.dropout(attn, drop, self.training).to(v.dtype) @ v  # (B, h, N, d)
        elif self._explicit(q, N):
            # CPU: for ViT-sized sequences (N ~ 50-600) two batched matmuls and a softmax beat
            # torch's fused kernels in training (the flash backward was a third of the whole step)
            # and in bf16 inference (benchmarks/throughput.py, benchmarks/attention_path.py)
            attn = None
            w = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, M, N)
            out = F.dropout(w, drop, self.training) @ v  # (B, h, M, d)
        else:
            # Fused path (GPU, fp32 inference on a CPU, a very large inference batch): never
            # materialises the (N, N) matrix on the flash/efficient kernels.
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)  # (B, h, M, d)
        out = out.transpose(1, 2).reshape(B, M, self.inner_dim)  # (B, M, h*d)
        out = self.proj_drop(self.proj(out))  # (B, M, D)
        return (out, attn) if return_attn else out


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # (torch releases before it had none)


def _compiled_cpu_training(x: torch.Tensor) -> bool:
    """Whether x flows through a compiled CPU graph that trains through it (not torch.export's):
    where vitlab's operators (ops.py) replace what inductor would lower itself."""
    return (x.requires_grad and x.device.type == "cpu" and torch.compiler.is_compiling()
            and not _is_exporting())


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class Linear(nn.Linear):
    """nn.Linear, except inside a compiled CPU graph that trains it in bf16 autocast: there its
    products run on vitlab's kernel (ops.linear, linear_kernel.c): the forward product with the bias
    added on the way out, the input gradient, and the weight and bias gradients in one pass, which
    reads the step's cold operands faster than oneDNN does and returns them in fp32. The values are
    autocast's, within rounding."""

    use_native = True  # False: autograd's products even where vitlab's kernel runs (benchmarks/step_anatomy.py)
    native_products = True  # False: the forward product and input gradient stay ATen's (benchmarks/step_anatomy.py)

    def native(self, x: torch.Tensor) -> bool:
        """Whether this call takes vitlab's operator (ops.linear)."""
        return (self.use_native and _compiled_cpu_training(x) and _bf16_autocast() and self.weight.requires_grad
                and self.weight.dtype == torch.float32 and self.in_features % 16 == 0 and ops.native_kernels())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native(x):
            return ops.linear(x.to(torch.bfloat16), self.weight, self.bias, self.native_products)
        return super().forward(x)


class GELU(nn.GELU):
    """Exact (erf) GELU, as in the original ViT and every checkpoint.

    nn.GELU, except inside a compiled CPU graph that trains through it: there it calls vitlab's
    own kernel, which also writes the derivative for the backward pass (native.py), or where
    that cannot run, ATen's kernels as one opaque operator, because inductor's own GELU loop is
    slower on a CPU (ops.py). Inference keeps inductor's lowering, which a frozen graph folds
    into the Linear before it; torch.export (and the ONNX exporter on top of it) sees plain GELU.
    """

    use_native = True  # False: ATen's kernels even where vitlab's runs (benchmarks/step_anatomy.py)

    def forward(self, x):
        if self.approximate == "none" and _compiled_cpu_training(x):
            if self.use_native and x.dtype in (torch.bfloat16, torch.float32) and ops.native_kernels():
                return ops.gelu_and_grad(x)[0]  # GELU and its derivative in one pass (native.py)
            return ops.gelu(x)
        return F.gelu(x, approximate=self.approximate)


class Mlp(nn.Module):
    """Linear -> exact GELU -> dropout -> Linear -> dropout, applied per token.

    In a compiled CPU graph that trains it in bf16 (where its Linears take vitlab's operator, and
    without dropout between them), the three run as one operator, ops.mlp: GELU computed on fc1's
    products, its derivative applied in fc2's input gradient."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether ops.mlp computes this call: only when it would give what the three modules give,
        so with the modules vitlab built (not replaced, no hooks, which the operator would skip), no
        active dropout between the Linears, and both Linears on vitlab's products."""
        parts = (self.fc1, self.act, self.drop1, self.fc2)
        return (type(self.fc1) is Linear and type(self.fc2) is Linear and type(self.act) is GELU
                and type(self.drop1) is nn.Dropout and not any(m._forward_hooks or m._forward_pre_hooks for m in parts)
                and self.fc1.native(x) and self.fc2.native(x) and self.fc1.native_products and self.fc2.native_products
                and self.act.use_native and self.act.approximate == "none"
                and not (self.drop1.training and self.drop1.p > 0))

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        if self._fused(x):
            # one operator (ops.mlp): GELU in fc1's product, its derivative in fc2's input gradient
            return self.drop2(ops.mlp(x.to(torch.bfloat16), self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                      self.fc2.bias, True)[0])
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample.

    Kept samples are scaled by 1/keep so the expected output is unchanged and
    nothing needs rescaling at evaluation time.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):  # (B, N, D)
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learnable scale on a residual branch (CaiT / DeiT-III)."""

    def __init__(self, dim, init_value=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, num_heads, mlp_dim, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, layer_scale=None, norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_attn: bool = False, queries: int | None = None):
        """(B, N, D) -> (B, N, D), or (B, queries, D): the first `queries` tokens' outputs alone."""
        if return_attn:
            y, attn = self.attn(self.norm1(x), return_attn=True)
        else:
            y, attn = self.attn(self.norm1(x), queries=queries), None  # every token's keys and values
        if queries is not None:
            x = x[:, :queries]  # (B, queries, D): from here on the other tokens are not needed
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attn else x


def sincos_2d(grid, dim: int) -> torch.Tensor:
    """(gh*gw, dim) 2D sine-cosine position codes: half the channels encode the row,
    half the column, each as sin/cos at geometrically spaced frequencies."""
    gh, gw = grid
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angle = pos[:, None] * freqs[None]  # (gh*gw, dim/4)
        parts += [angle.sin(), angle.cos()]
    codes = torch.cat(parts, dim=1)  # (gh*gw, 4 * (dim // 4))
    return F.pad(codes, (0, dim - codes.shape[1])).float()  # zero-pad when dim is not a multiple of 4


def resample_pos_embed(pos_embed: torch.Tensor, new_grid, old_grid=None, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize learned position embeddings to a new patch grid.

    pos_embed: (1, prefix + gh*gw, D). The prefix ([CLS], [DIST]) rows are kept
    as they are; the patch rows are viewed as a (D, gh, gw) image and resized
    bicubically, which is what lets a 224-px checkpoint run at 384 px.
    """
    new_grid = _pair(new_grid)
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, dim = patches.shape[1], patches.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot infer the grid of {n} position embeddings; pass old_grid")
        old_grid = (side, side)
    old_grid = _pair(old_grid)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"{n} position embeddings do not fit a {old_grid[0]}x{old_grid[1]} grid")
    dtype = patches.dtype
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)  # (1, gh'*gw', D)
    return torch.cat([prefix, patches], dim=1)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2020), with DeiT's optional distillation token.

    Args (the ones that are not obvious):
        mlp_dim: hidden width of the MLP (the papers' "MLP size"); default 4*D.
        drop_rate: dropout after position embedding, attention projection and MLP layers.
        drop_path_rate: stochastic depth of the last block; block i gets rate * i / (depth - 1).
        layer_scale: initial LayerScale value, or None for no LayerScale.
        global_pool: "token" (the [CLS] output) or "avg" (mean of the patch tokens).
        distilled: add DeiT's [DIST] token and a second head; in eval mode the two
            heads' logits are averaged, in train mode both are returned.
        dynamic_img_size: accept any input size divisible by the patch size,
            resampling the position embeddings on the fly (slower; off by default
            so a wrong size is an error, not a silent resample).
        pos_embed_init: "trunc_normal" (std 0.02, as ViT/DeiT/timm) or "sincos":
            2D sine-cosine values over the patch grid (as MAE / MoCo v3 use, fixed
            there, learnable here). Small noise carries almost no position signal
            at first, so a ViT trained briefly from scratch learns faster with sincos.
        conv_stem: 3x3 conv layers run before the patch projection (the paper's hybrid
            ViT; see PatchEmbed): a width for a stride-2 layer, (width, 1) for a stride-1
            one. Empty: the plain patchify.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_dim=None, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, layer_scale=None, norm_eps=1e-6, global_pool="token",
                 distilled=False, dynamic_img_size=False, pos_embed_init="trunc_normal", conv_stem=()):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if pos_embed_init not in ("trunc_normal", "sincos"):
            raise ValueError(f"pos_embed_init must be 'trunc_normal' or 'sincos', got {pos_embed_init!r}")
        for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                           ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate < 1.0:  # 1.0 would drop everything (DropPath's 1/keep divides by zero)
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be 0 (no head) or more, got {num_classes}")
        self.pos_embed_init = pos_embed_init
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.global_pool = global_pool
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        mlp_dim = mlp_dim or 4 * embed_dim

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=not dynamic_img_size,
                                      conv_stem=conv_stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # Linear stochastic-depth rule: 0 for the first block, drop_path_rate for the last.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_dim, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=rates[i], layer_scale=layer_scale, norm_eps=norm_eps)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = None
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- initialisation ---------------------------------------------------
    def init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.pos_embed_init == "sincos":
            with torch.no_grad():  # prefix slots keep their small noise
                self.pos_embed[0, self.num_prefix_tokens:] = sincos_2d(self.patch_embed.grid_size, self.embed_dim)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The patch projection is a Linear in disguise: init it like one (fan-in).
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.patch_embed.modules():  # hybrid stem: He init for conv -> ReLU
            if isinstance(m, nn.Conv2d) and m is not self.patch_embed.proj:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay should leave alone (besides biases and norms)."""
        names = {"pos_embed", "cls_token"}
        if self.dist_token is not None:
            names.add("dist_token")
        return names

    # -- switches -----------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @property
    def img_size(self) -> tuple[int, int]:
        return self.patch_embed.img_size

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.patch_embed.patch_size

    @property
    def in_chans(self) -> int:
        return self.patch_embed.in_chans

    def set_img_size(self, img_size):
        """Change the input resolution in place, resampling the position embeddings."""
        img_size = _pair(img_size)
        old_grid = self.patch_embed.grid_size
        pe = self.patch_embed
        for side, size, p in zip(("height", "width"), img_size, pe.patch_size):
            if size % p:
                raise ValueError(f"image {side} {size} is not divisible by the patch size {p}")
        pe.img_size = img_size
        pe.grid_size = (img_size[0] // pe.patch_size[0], img_size[1] // pe.patch_size[1])
        pe.num_patches = pe.grid_size[0] * pe.grid_size[1]
        with torch.no_grad():
            new = resample_pos_embed(self.pos_embed.data, pe.grid_size, old_grid, self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(new)
        record_arch(self, img_size=list(img_size))

    def reset_classifier(self, num_classes: int):
        """Replace the head(s) for a new number of classes (fine-tuning)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be 0 (no head) or more, got {num_classes}")
        self.num_classes = num_classes
        record_arch(self, num_classes=num_classes)
        dev = self.cls_token.device
        make = lambda: nn.Linear(self.embed_dim, num_classes).to(dev) if num_classes > 0 else nn.Identity()  # noqa: E731
        self.head = make()
        if self.distilled:
            self.head_dist = make()
        for m in (self.head, self.head_dist):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # -- forward --------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor, grid) -> torch.Tensor:
        pos = self.pos_embed
        if tuple(grid) != self.patch_embed.grid_size:  # only with dynamic_img_size
            pos = resample_pos_embed(pos, grid, self.patch_embed.grid_size, self.num_prefix_tokens)
        B = x.shape[0]
        prefix = [self.cls_token.expand(B, -1, -1)]  # (B, 1, D)
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat(prefix + [x], dim=1)  # (B, N, D), N = prefix + patches
        return self.pos_drop(x + pos)

    def forward_features(self, x: torch.Tensor, return_attn: bool = False, prefix_only: bool = False):
        """(B, C, H, W) -> normalised tokens (B, N, D); with return_attn also
        the list of per-layer attention weights, each (B, h, N, N).

        prefix_only: the last block computes the outputs of the prefix tokens ([CLS], [DIST])
        alone, (B, prefix, D), what a [CLS]-pooled head reads (see forward).
        """
        if prefix_only and return_attn:
            raise ValueError("return_attn returns every token; prefix_only must be False")
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        x = self.patch_embed(x)  # (B, N_patches, D)
        x = self._pos_embed(x, grid)  # (B, N, D)
        attns = []
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            queries = self.num_prefix_tokens if prefix_only and i == last else None
            if return_attn:
                x, a = blk(x, return_attn=True)
                attns.append(a)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, False, queries, use_reentrant=False)
            else:
                x = blk(x, queries=queries)  # (B, N, D); after the last block with prefix_only (B, prefix, D)
        x = self.norm(x)
        return (x, attns) if return_attn else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, separate: bool = False):
        """Tokens (B, N, D) -> logits (B, K).

        A distilled model returns (cls_logits, dist_logits) in training mode or
        when separate=True, and their average otherwise (DeiT's inference rule).
        """
        if self.global_pool == "avg":
            feat = x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, D)
        else:
            feat = x[:, 0]  # (B, D): the [CLS] token
        if pre_logits:
            return feat
        logits = self.head(feat)  # (B, K)
        if not self.distilled:
            return logits
        dist_logits = self.head_dist(x[:, 1])  # (B, K): the [DIST] token
        if self.training or separate:
            return logits, dist_logits
        return (logits + dist_logits) / 2

    # With [CLS] pooling the head reads only the prefix tokens of the last block's output, so
    # forward() runs that block for them alone: its keys and values still come from every token, but
    # its queries, attention rows, output projection and MLP shrink from N tokens to 1 (2 with
    # [DIST]). That is nearly 1/depth of the model's FLOPs (14% of ViT-Tiny/CIFAR's, 7% of ViT-B/16's),
    # forward and backward, for the same logits and gradients (tests/test_vit.py). forward_features,
    # which returns every token, and return_attn run the full block. False: the full block always
    # (benchmarks/step_anatomy.py times both).
    prefix_only_last_block = True

    def forward(self, x: torch.Tensor, return_attn: bool = False, separate: bool = False):
        """(B, C, H, W) -> logits (B, K); with return_attn also the per-layer attention weights.
        separate: a distilled model's two heads' logits, not their average (see forward_head)."""
        if return_attn:
            feats, attns = self.forward_features(x, return_attn=True)
            return self.forward_head(feats, separate=separate), attns
        prefix_only = self.global_pool == "token" and self.prefix_only_last_block
        return self.forward_head(self.forward_features(x, prefix_only=prefix_only), separate=separate)
