"""`vitlab bench` (= benchmarks/throughput.py): how fast is a vitlab ViT, against its peers?

Three implementations of the same network are timed in one process, on the same
threads, batch and input:

  vitlab     this package's VisionTransformer
  hf         Hugging Face `ViTForImageClassification` (sdpa attention), if transformers is installed
  textbook   the ViT as tutorials write it (below): separate q/k/v Linears, softmax(QK^T/sqrt(d))V

each in fp32 and under bf16 autocast, for a training step (forward, cross-entropy,
backward, AdamW) and for inference. Throughput is images/s: the median of the
timed repeats, which are interleaved across all setups in five rounds after a
warm-up, so that the host's drift hits every setup alike. MFU is the model's
matmul FLOPs per second divided by a matmul ceiling measured here for each
dtype; vitlab's rows count the FLOPs it does (its last block runs for [CLS]
alone, 14% fewer for ViT-Tiny CIFAR), the peers' every token's. "vitlab default" is what `vitlab train` does with no flags on a long
run: its precision chosen by measurement, torch.compile (run.compile auto),
timed after compiling, and the engine's AdamW (fused where the device has it;
the peers get torch's foreach AdamW).

    vitlab bench                                  # ViT-Tiny CIFAR config, batch 128, the comparison table
    vitlab bench --model vit_small_patch4_32 --batch-size 64
    vitlab bench --scaling                        # + cost against batch, tokens and model size; one plot
    vitlab bench --memory                         # + peak memory per step, gradient checkpointing on ViT-B/224
    vitlab bench --loop                           # + the full `vitlab train` loop against the bare step

Results go to --out: throughput.json always, scaling.png with --scaling; `--markdown` prints the
README table. Stopped midway (Ctrl-C), it keeps the sections it finished in throughput-partial.json,
leaving an earlier whole throughput.json as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .utils import make_dir, write_json


# -- the textbook ViT ---------------------------------------------------------------

class TextbookAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        split = lambda t: t.view(B, N, self.heads, self.d).transpose(1, 2)  # noqa: E731  (B, h, N, d)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d), dim=-1)  # (B, h, N, N)
        return self.out((attn @ v).transpose(1, 2).reshape(B, N, D))


class TextbookBlock(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TextbookAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TextbookViT(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_dim):
        super().__init__()
        n = (img_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[TextbookBlock(embed_dim, num_heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class _Logits(nn.Module):
    """A Hugging Face classifier that returns the logits tensor."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x):
        return self.hf(pixel_values=x).logits


# -- building the three -------------------------------------------------------------------

def arch_of(preset: str) -> dict:
    from .models import get_preset

    p = get_preset(preset)
    if p.family != "vit":
        raise UserError(f"bench compares ViTs; {preset} is a {p.family}")
    kw = dict(p.kwargs)
    size = kw["img_size"] if isinstance(kw["img_size"], int) else kw["img_size"][0]
    return dict(img_size=size, patch_size=kw["patch_size"], in_chans=kw.get("in_chans", 3),
                num_classes=kw["num_classes"], embed_dim=kw["embed_dim"], depth=kw["depth"],
                num_heads=kw["num_heads"], mlp_dim=kw.get("mlp_dim") or 4 * kw["embed_dim"])


def build(impl: str, a: dict) -> nn.Module:
    if impl == "vitlab":
        from .models import VisionTransformer

        return VisionTransformer(**a)
    if impl == "textbook":
        return TextbookViT(**a)
    if impl == "hf":
        import transformers

        cfg = transformers.ViTConfig(hidden_size=a["embed_dim"], num_hidden_layers=a["depth"],
                                     num_attention_heads=a["num_heads"], intermediate_size=a["mlp_dim"],
                                     image_size=a["img_size"], patch_size=a["patch_size"],
                                     num_channels=a["in_chans"], num_labels=a["num_classes"],
                                     attn_implementation="sdpa")
        return _Logits(transformers.ViTForImageClassification(cfg))
    raise ValueError(impl)


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


CPU = torch.device("cpu")


def _sync(device) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- FLOPs and the ceiling ------------------------------------------------------------------

def vit_flops(a: dict, training: bool, prefix_only: bool = False) -> float:
    """Matmul FLOPs per image (multiply-add = 2). Training = 3x forward (backward is ~2x).

    prefix_only: the last block computes its [CLS] token's output alone, as vitlab's forward does
    (VisionTransformer.prefix_only_last_block): keys and values for all n tokens, the rest for one.
    The peers compute every token's, which is the plain count (prefix_only=False).
    """
    g = a["img_size"] // a["patch_size"]
    n, d, m = g * g + 1, a["embed_dim"], a["mlp_dim"]
    inner = a["num_heads"] * (d // a["num_heads"])

    def layer(q: int) -> int:  # q tokens' outputs: q x (q, proj, MLP, attention rows), n x (k, v)
        return 2 * n * d * 2 * inner + 2 * q * d * inner + 2 * q * inner * d + 2 * 2 * q * d * m + 2 * 2 * q * n * inner

    blocks = a["depth"] * layer(n) if not prefix_only else (a["depth"] - 1) * layer(n) + layer(1)
    fwd = blocks + 2 * g * g * a["in_chans"] * a["patch_size"] ** 2 * d + 2 * d * a["num_classes"]
    return 3 * fwd if training else fwd


def _vitlab_prefix_only() -> bool:
    from .models import VisionTransformer

    return VisionTransformer.prefix_only_last_block


MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # a GPU needs a large product to reach its peak


def _matmul_step(dtype: torch.dtype, device=CPU):
    """One square matmul in this dtype, as a closure (a timed unit of compare's rounds)."""
    n = MATMUL_SIZE[device.type]
    x = torch.randn(n, n, device=device).to(dtype)
    y = torch.randn(n, n, device=device).to(dtype)
    return lambda: x @ y


_MATMULS = ("mm", "addmm", "bmm")  # the aten ops a ViT's products reach


def _record_matmuls(fn) -> list:
    """Run fn, recording each matmul it reaches: (op, [(shape, stride, dtype) or a plain arg])."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = {getattr(torch.ops.aten, name).default for name in _MATMULS}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                seen.append((func, [(tuple(x.shape), x.stride(), x.dtype) if isinstance(x, torch.Tensor) else x
                                    for x in args], dict(kwargs or {})))
            return func(*args, **(kwargs or {}))

    seen = []
    with Recorder():
        fn()
    return seen


def _matmul_alone_steps(a: dict, batch: int, dtype: torch.dtype | None, device=CPU, full: bool = False):
    """vitlab's own matmuls, alone: (training closure, inference closure). What a step would
    cost if everything else (norms, GELU, softmax, casts, copies, the optimizer) were free.

    The square matmul of the ceiling fills the matrix units in a way ViT-Tiny's 192- and
    768-wide products cannot, so "MFU against the ceiling" mixes two things: how fast this
    machine multiplies matrices *of these shapes*, and how much of the step is not matmuls.
    Here one real eager step of vitlab's ViT (forward under autocast in `dtype`, cross-entropy,
    backward) is run once with every matmul it reaches recorded: the op, each operand's shape,
    strides and dtype. The closures replay exactly those calls on random tensors of the same
    shapes and layouts (a Linear's weight gradient, say, multiplies a transposed operand, as
    autograd issues it), so a setup's rate over this one is the share of its time spent in
    those products. The patch projection is a convolution, not among them (0.1% of ViT-Tiny's
    FLOPs). Inference replays a forward in eval mode with the explicit attention products
    (as vitlab's bf16 inference on a CPU runs them; fp32 inference runs sdpa's kernel). Not a hard floor: another
    layout can run faster (benchmarks/step_anatomy.py), and operands of the same shape share
    one tensor, which keeps them warmer in cache than a real step's. full=True: with the last
    block computed for every token (prefix_only_last_block off), the products the peers run.
    """
    from .models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(**a).to(device)
    if full:
        model.prefix_only_last_block = False
    x = torch.randn(batch, a["in_chans"], a["img_size"], a["img_size"], device=device)
    y = torch.randint(0, a["num_classes"], (batch,), device=device)

    def train_step():
        with _ctx(dtype, device):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()

    def forward():
        with _ctx(dtype, device):
            model(x)

    model.train()
    train_calls = _record_matmuls(train_step)
    model.eval()  # grad stays enabled: the explicit attention path, as training takes on a CPU
    infer_calls = _record_matmuls(forward)
    del model, x, y
    pool = {}  # one random tensor per (shape, strides, dtype)

    def operand(spec):
        if not (isinstance(spec, tuple) and len(spec) == 3 and isinstance(spec[2], torch.dtype)):
            return spec  # a plain argument (addmm's beta or alpha)
        if spec not in pool:
            pool[spec] = torch.empty_strided(spec[0], spec[1], dtype=spec[2], device=device).normal_()
        return pool[spec]

    def replay(calls):
        bound = [(func, [operand(x) for x in args], kwargs) for func, args, kwargs in calls]

        def run():
            for func, args, kwargs in bound:
                func(*args, **kwargs)  # the product is dropped: only its time counts
        return run

    return replay(train_calls), replay(infer_calls)


# -- timing ---------------------------------------------------------------------------------

def _ctx(dtype, device=CPU):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _median_rate(fn, batch: int, steps: int, warmup: int, device=CPU, mean: bool = False) -> float:
    """Images/s over `steps` calls after `warmup`: from the median call, or (mean=True) from the
    total time, as an epoch's wall time counts every step, slow ones included."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return batch * steps / sum(times) if mean else batch / statistics.median(times)


def alternate(fns: dict, pairs: int) -> dict[str, list[float]]:
    """Seconds per call of two closures run turn about, the order flipped every pair, so that a drift
    of the host's speed hits both alike (benchmarks/step_anatomy.py, benchmarks/attention_path.py)."""
    names = list(fns)
    times = {k: [] for k in names}
    for i in range(pairs):
        for k in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def speedup(times: dict[str, list[float]], fast: str, slow: str) -> tuple[float, list[float]]:
    """`fast`'s speed-up over `slow` from alternate()'s times: the median of the pairs' time ratios
    and their quartiles."""
    ratios = [s / f for f, s in zip(times[fast], times[slow])]
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), [q[0], q[2]]


def _train_step(model: nn.Module, x, y, dtype, optimizer: str = "foreach"):
    """One full training step as a closure: forward, loss, backward, AdamW step.

    optimizer: "foreach" (torch's multi-tensor AdamW, faster on CPU than its default per-tensor loop;
    what the peers get) or "engine" (the AdamW `vitlab train` builds: the fused kernel where the
    device has one).
    """
    from .config import OptimConfig
    from .train.optim import build_optimizer, param_groups

    if optimizer == "engine":  # built on the module itself, as the engine does (a compiled wrapper renames params)
        opt = build_optimizer(getattr(model, "_orig_mod", model), OptimConfig(), lr=1e-4)
    elif optimizer == "foreach":
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, foreach=True)
    else:
        raise ValueError(f"optimizer is 'foreach' or 'engine', got {optimizer!r}")

    def step():
        with _ctx(dtype, x.device):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # no gradients kept between calls: other setups' memory

    return step


def _infer_step(model: nn.Module, x, dtype):
    def fwd():
        with torch.inference_mode(), _ctx(dtype, x.device):
            model(x)

    return fwd


def time_train(model: nn.Module, x, y, dtype, steps: int, warmup: int, optimizer: str = "foreach",
               mean: bool = False) -> float:
    """Images/s of a full training step (median of `steps` after `warmup`; mean=True: over their total time)."""
    model.train()
    return _median_rate(_train_step(model, x, y, dtype, optimizer), x.shape[0], steps, warmup, x.device, mean)


def default_precision(device=CPU) -> tuple[torch.dtype | None, str]:
    from .train.engine import resolve_precision

    return resolve_precision("auto", device)


# -- the comparison table -----------------------------------------------------------------

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtype -> row label


def compare(preset: str, batch: int, steps: int, warmup: int, impls=None, log=print, device=CPU) -> dict:
    a = arch_of(preset)
    impls = impls or (["vitlab", "hf", "textbook"] if have_transformers() else ["vitlab", "textbook"])
    impls = ["vitlab"] + [i for i in impls if i != "vitlab"]  # the default step is always measured
    torch.manual_seed(0)
    x = torch.randn(batch, a["in_chans"], a["img_size"], a["img_size"]).to(device)
    y = torch.randint(0, a["num_classes"], (batch,)).to(device)
    ftrain, finfer = vit_flops(a, True), vit_flops(a, False)  # what the peers compute
    # what vitlab's rows compute: its last block runs for the [CLS] token alone, so its MFU counts
    # the FLOPs it does, not the peers' (the images/s ratios are unaffected)
    vtrain, vinfer = (vit_flops(a, t, prefix_only=_vitlab_prefix_only()) for t in (True, False))
    dflt_dtype, note = default_precision(device)
    dname = DTYPE_NAMES[dflt_dtype]
    # a GPU without native bf16 (V100, T4) defaults to fp16: every setup is timed in fp16 instead of
    # bf16 (without loss scaling, which does not change a step's time much), against an fp16 ceiling
    dtypes = {"fp32": None, "fp16": torch.float16} if dname == "fp16" else DTYPES
    # Every implementation in both precisions (the peers' AdamW is torch's foreach kernel), then
    # what `vitlab train` runs by default for a long run: torch.compile (run.compile auto) in the
    # default precision with the engine's AdamW (fused), and, to tell the two gains apart, the
    # compiled step with foreach AdamW. All setups are held in memory at once (about 8 GB for ViT-B).
    specs = [(impl, pname, dtype, False, "foreach") for impl in impls for pname, dtype in dtypes.items()]
    specs += [("vitlab", dname, dflt_dtype, True, "foreach"), ("vitlab", dname, dflt_dtype, True, "engine")]
    # (row index, "train" | "infer", set the module's mode, the timed call, warm-up calls); the matmul
    # ceiling of each dtype is timed in the same rounds, so the MFU's numerator and denominator see
    # the same machine
    units = [(name, "matmul", lambda: None, _matmul_step(dt or torch.float32, device), 1)
             for name, dt in dtypes.items()]
    # the step's own matmuls alone, per dtype (see _matmul_alone_steps): what a row's rate is
    # measured against besides the square ceiling; vitlab's, and the full last block's the peers run
    for name, dt in dtypes.items():
        for suffix, full in (("", False), (" full", True)):
            train_mm, infer_mm = _matmul_alone_steps(a, batch, dt, device, full=full)
            units += [(f"{name} matmuls{suffix}", "train", lambda: None, train_mm, 1),
                      (f"{name} matmuls{suffix}", "infer", lambda: None, infer_mm, 1)]
    for i, (impl, pname, dtype, compiled, opt) in enumerate(specs):
        torch.manual_seed(0)
        model = build(impl, a).to(device)
        if compiled:  # the first calls compile (20-60 s); the warm-up calls below absorb them
            model = torch.compile(model)
        wu = max(warmup, 2) if compiled else warmup
        units.append((i, "train", model.train, _train_step(model, x, y, dtype, opt), wu))
        units.append((i, "infer", model.eval, _infer_step(model, x, dtype), wu))
    # On a CPU, vitlab's inference for a long job (`vitlab eval`, vitlab.train.inference): a frozen,
    # compiled copy with its weights in the default precision. Inference only: it cannot train.
    frozen = None
    if device.type == "cpu":
        from .train.inference import FrozenInference

        torch.manual_seed(0)
        frozen = len(specs)
        fmodel = FrozenInference(build("vitlab", a), dflt_dtype)
        units.append((frozen, "infer", fmodel.eval, _infer_step(fmodel, x, None), max(warmup, 2)))
    log(f"  warming up {len(specs)} setups ({warmup} calls each, 2 or more when compiled)")
    frozen_first_call = None  # seconds: the frozen copy's first call, which compiles it
    for i, kind, mode, fn, wu in units:
        mode()
        for w in range(wu):
            t0 = time.perf_counter()
            fn()
            if i == frozen and w == 0:
                frozen_first_call = time.perf_counter() - t0
    # This host's speed drifts by 10-30% within minutes, so the timed calls are interleaved: in each
    # of up to five rounds every setup runs its share of `steps` in turn, the order rotated by a
    # 1/rounds share of its length each round (so each unit runs early in one round, late in
    # another), and each figure is the median over all rounds. A drift then moves every setup's
    # figure alike instead of whichever ran during it.
    rounds = min(steps, 5)
    shift = max(1, len(units) // rounds)
    times = {(i, kind): [] for i, kind, *_ in units}
    for r in range(rounds):
        n = steps // rounds + (1 if r < steps % rounds else 0)
        k = r * shift % len(units)
        for i, kind, mode, fn, _ in units[k:] + units[:k]:
            mode()
            for _ in range(n):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[(i, kind)].append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{rounds} timed")
    # the ceiling is the best matmul over all rounds (as the machine can do at its fastest)
    ceilings = {name: 2 * MATMUL_SIZE[device.type]**3 / min(times[(name, "matmul")]) / 1e9 for name in dtypes}
    log(f"  matmul ceiling (best of {len(times[('fp32', 'matmul')])} in the same rounds): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in ceilings.items()))
    # images/s of the matmuls alone (median over the rounds, as every row)
    alone, alone_full = ({name: {kind: batch / statistics.median(times[(f"{name} matmuls{suffix}", kind)])
                               for kind in ("train", "infer")} for name in dtypes} for suffix in ("", " full"))
    log("  the step's matmuls alone: " + ", ".join(
        f"{k} {v['train']:.0f} img/s training, {v['infer']:.0f} inference" for k, v in alone.items()))
    log("  the same with the full last block (the peers' products): " + ", ".join(
        f"{k} {v['train']:.0f} img/s training, {v['infer']:.0f} inference" for k, v in alone_full.items()))
    rows = []
    for i, (impl, pname, dtype, compiled, opt) in enumerate(specs):
        tr, inf = (batch / statistics.median(times[(i, kind)]) for kind in ("train", "infer"))
        ceil = ceilings[pname]
        label = impl + (" compiled" if compiled else "") + (", foreach AdamW" if compiled and opt == "foreach" else "")
        ft, fi, mm = (vtrain, vinfer, alone) if impl == "vitlab" else (ftrain, finfer, alone_full)
        row = dict(impl=label, precision=pname, train=tr, infer=inf,
                   train_mfu=tr * ft / 1e9 / ceil, infer_mfu=inf * fi / 1e9 / ceil,
                   train_of_matmuls=tr / mm[pname]["train"], infer_of_matmuls=inf / mm[pname]["infer"])
        log(f"  {row['impl']:9s} {pname:5s} train {tr:7.0f} img/s ({100 * row['train_mfu']:4.1f}% MFU)   "
            f"infer {inf:7.0f} img/s ({100 * row['infer_mfu']:4.1f}% MFU)")
        rows.append(row)
    if frozen is not None:
        inf = batch / statistics.median(times[(frozen, "infer")])
        row = dict(impl="vitlab frozen", precision=dname, train=None, infer=inf, train_mfu=None,
                   infer_mfu=inf * vinfer / 1e9 / ceilings[dname], train_of_matmuls=None,
                   infer_of_matmuls=inf / alone[dname]["infer"])
        log(f"  {row['impl']:9s} {dname:5s} train       - (inference only)     "
            f"infer {inf:7.0f} img/s ({100 * row['infer_mfu']:4.1f}% MFU); first call (compiling) "
            f"{frozen_first_call:.1f} s")
        rows.append(row)
    default = next(r for r in rows if r["impl"] == "vitlab compiled" and r["precision"] == dname)
    # the default inference: the frozen copy on a CPU (what `vitlab eval` runs on a long job), else
    # the compiled model in eval mode
    default_infer = rows[frozen]["infer"] if frozen is not None else default["infer"]
    ratios = {}
    get = {(r["impl"], r["precision"]): r for r in rows}
    # and what each training target asks for, as a share of the default precision's matmuls
    # alone: above 100%, a step would have to run faster than its own matmuls as autograd issues them
    needs, targets = {}, dict(TARGETS)
    for impl, pname in [("hf", "bf16"), ("hf", "fp32"), ("textbook", "bf16"), ("textbook", "fp32")]:
        if (impl, pname) in get:
            key, peer = f"train_vs_{impl}_{pname}", get[(impl, pname)]["train"]
            ratios[key] = default["train"] / peer
            if key in targets:
                need = targets[key] * peer
                needs[key] = dict(images_per_s=need, of_matmuls=need / alone[dname]["train"])
    peers = [r for r in rows if not r["impl"].startswith("vitlab")]
    if peers:
        best_peer = max(peers, key=lambda r: r["infer"])
        ratios["infer_vs_best_peer"] = default_infer / best_peer["infer"]
        ratios["best_peer_infer"] = f"{best_peer['impl']} {best_peer['precision']}"
    return dict(preset=preset, device=device.type, arch=a, batch=batch, steps=steps, rounds=rounds, flops_train=ftrain, flops_infer=finfer,
                flops_train_vitlab=vtrain, flops_infer_vitlab=vinfer,
                ceilings_gflops=ceilings, matmuls_alone=alone,
                matmuls_alone_full_last_block=alone_full, target_needs=needs, rows=rows,
                default_precision=dname, default_note=note,
                default_train=default["train"], default_infer=default_infer,
                default_infer_impl="vitlab frozen" if frozen is not None else "vitlab compiled",
                frozen_first_call_s=frozen_first_call,
                # against the faster of the two ceilings: where bf16 is slower than fp32 (no AMX), the
                # bf16 ceiling would flatter an fp32 step
                default_train_mfu=default["train"] * vtrain / 1e9 / max(ceilings.values()), ratios=ratios)


TARGETS = [("train_vs_hf_bf16", 2.5), ("train_vs_hf_fp32", 4.0), ("train_vs_textbook_bf16", 1.3),
           ("infer_vs_best_peer", 1.3)]


def print_table(res: dict, log=print) -> None:
    log("")
    log(markdown_table(res))
    log("")
    r = res["ratios"]
    log(f"vitlab default = {res['default_precision']} ({res['default_note']})")
    for key, target in TARGETS:
        if key in r:
            ok = "meets" if r[key] >= target else "MISSES"
            log(f"  {key:26s} {r[key]:5.2f}x   (target >= {target}x: {ok})")
    m = res["default_train_mfu"]
    log(f"  {'train MFU (best ceiling)':26s} {100 * m:5.1f}%   (target >= 65%: {'meets' if m >= 0.65 else 'MISSES'})")
    if peer_count_mfu(res) is not None:
        log(f"  {'':26s} (counting the FLOPs vitlab does; at the peers' count per image, with the "
            f"full last block: {100 * peer_count_mfu(res):.1f}%)")
    for line in needs_lines(res):
        log("  " + line)
    if "loop" in res:
        lp = res["loop"]
        log(f"  {'full loop / bare step':26s} {100 * lp['ratio']:5.1f}%   "
            f"(target >= 90%: {'meets' if lp['ratio'] >= 0.9 else 'MISSES'})")


def peer_count_mfu(res: dict) -> float | None:
    """The default step's MFU at the peers' FLOPs per image (the full last block): what it would read
    if the FLOPs vitlab skips were counted as done. None where the two counts are the same."""
    if res.get("flops_train_vitlab", res["flops_train"]) == res["flops_train"]:
        return None
    return res["default_train"] * res["flops_train"] / 1e9 / max(res["ceilings_gflops"].values())


def needs_lines(res: dict) -> list[str]:
    """What each training target asks of the default step, against its matmuls alone."""
    d = res["default_precision"]
    out = []
    for key, need in res.get("target_needs", {}).items():
        target = dict(TARGETS)[key]
        out.append(f"{target}x {key.removeprefix('train_vs_').replace('_', ' ')} = {need['images_per_s']:.0f} img/s "
                   f"= {100 * need['of_matmuls']:.0f}% of the {d} step's matmuls alone "
                   f"({res['matmuls_alone'][d]['train']:.0f} img/s)")
    return out


def markdown_table(res: dict) -> str:
    a = res["arch"]
    alone = res.get("matmuls_alone")  # absent from results written before 2026-11-27's afternoon
    head = (f"{res['preset']} ({a['img_size']}x{a['img_size']}, patch {a['patch_size']}, {a['embed_dim']} dim, "
            f"{a['depth']} layers, {a['num_heads']} heads, MLP {a['mlp_dim']}), batch {res['batch']}; "
            "matmul ceiling here: " + ", ".join(f"{k} {v:.0f}" for k, v in res["ceilings_gflops"].items()) + " GFLOP/s")
    if alone:
        head += "; the step's own matmuls alone: " + ", ".join(
            f"{k} {v['train']:.0f} img/s training, {v['infer']:.0f} inference" for k, v in alone.items())
    full = res.get("matmuls_alone_full_last_block")  # written from 2026-11-28 on
    if full:
        head += ("; vitlab computes its last block for the [CLS] token alone (the peers for every token): "
                 f"its MFU counts {res['flops_infer_vitlab'] / 1e9:.3f} GFLOP per image's forward to the "
                 f"peers' {res['flops_infer'] / 1e9:.3f}, and the peers' matmuls alone, with the full "
                 "last block, run at " + ", ".join(
                     f"{k} {v['train']:.0f} img/s training, {v['infer']:.0f} inference" for k, v in full.items()))
    lines = [head, ""]
    if alone:
        lines += ["| implementation | precision | train img/s | train MFU | train / its matmuls alone "
                  "| infer img/s | infer MFU | infer / its matmuls alone |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| implementation | precision | train img/s | train MFU | infer img/s | infer MFU |",
                  "|---|---|---:|---:|---:|---:|"]
    infer_default = res.get("default_infer_impl", "vitlab compiled")
    for r in res["rows"]:
        dflt = r["precision"] == res["default_precision"]
        trains, infers = dflt and r["impl"] == "vitlab compiled", dflt and r["impl"] == infer_default
        star = (" (default)" if trains and infers else " (default training)" if trains
                else " (default inference)" if infers else "")
        train = ["-", "-"] if r["train"] is None else [f"{r['train']:.0f}", f"{100 * r['train_mfu']:.0f}%"]
        infer = [f"{r['infer']:.0f}", f"{100 * r['infer_mfu']:.0f}%"]
        if alone:
            train.append("-" if r["train"] is None else f"{100 * r['train_of_matmuls']:.0f}%")
            infer.append(f"{100 * r['infer_of_matmuls']:.0f}%")
        lines.append(f"| {r['impl']}{star} | {r['precision']} | " + " | ".join(train + infer) + " |")
    return "\n".join(lines)


# -- scaling ----------------------------------------------------------------------------------

def scaling(steps: int, warmup: int, dtype, log=print, device=CPU) -> dict:
    """Training-step cost of vitlab ViTs against batch size, token count and model size."""
    out = {"batch": [], "tokens": [], "model": []}
    base = arch_of("vit_tiny_patch4_32")

    def one(a, batch):
        torch.manual_seed(0)
        from .models import VisionTransformer

        model = VisionTransformer(**a).to(device)
        x = torch.randn(batch, a["in_chans"], a["img_size"], a["img_size"]).to(device)
        y = torch.randint(0, a["num_classes"], (batch,)).to(device)
        rate = time_train(model, x, y, dtype, steps, warmup)
        tokens = (a["img_size"] // a["patch_size"]) ** 2 + 1
        return dict(img_size=a["img_size"], patch=a["patch_size"], tokens=tokens, batch=batch,
                    embed_dim=a["embed_dim"], depth=a["depth"], train=rate,
                    gflops=rate * vit_flops(a, True, prefix_only=_vitlab_prefix_only()) / 1e9)

    for b in (16, 32, 64, 128, 256):
        out["batch"].append(one(base, b))
        log(f"  batch {b:4d}: {out['batch'][-1]['train']:.0f} img/s")
    for size in (32, 64, 96, 128, 160, 224):  # patch 8 keeps the largest affordable on a CPU
        a = {**base, "img_size": size, "patch_size": 8}
        r = one(a, max(8, 128 * 64 // ((size // 8) ** 2 + 1)))  # about the same tokens per step
        out["tokens"].append(r)
        log(f"  {size:3d} px, {r['tokens']:4d} tokens: {r['train']:.1f} img/s, {r['gflops']:.0f} GFLOP/s")
    for preset in ("vit_tiny_patch4_32", "vit_small_patch4_32", "vit_base_patch4_32"):
        a = arch_of(preset)
        r = one(a, 32)
        r["preset"] = preset
        out["model"].append(r)
        log(f"  {preset}: {r['train']:.1f} img/s, {r['gflops']:.0f} GFLOP/s")
    return out


def plot_scaling(sc: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    b = sc["batch"]
    axes[0].plot([r["batch"] for r in b], [r["train"] for r in b], marker="o")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks([r["batch"] for r in b], [str(r["batch"]) for r in b])
    axes[0].set_ylim(0, 1.15 * max(r["train"] for r in b))  # from zero: the wiggles are mostly host noise
    axes[0].set(xlabel="batch size", ylabel="train images/s", title="ViT-Tiny 32 px: batch size")
    t = sc["tokens"]
    axes[1].loglog([r["tokens"] for r in t], [r["train"] for r in t], marker="o", label="images/s")
    ax2 = axes[1].twinx()
    ax2.plot([r["tokens"] for r in t], [r["gflops"] for r in t], color="C1", marker="s", label="GFLOP/s")
    ax2.set_ylabel("achieved GFLOP/s", color="C1")
    ax2.set_ylim(0, 1.15 * max(r["gflops"] for r in t))
    axes[1].set_xticks([r["tokens"] for r in t], [str(r["tokens"]) for r in t])
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for r in t:
        axes[1].annotate(f"{r['img_size']}px", (r["tokens"], r["train"]), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    axes[1].set(xlabel="tokens per image (patch 8)", ylabel="train images/s", title="ViT-Tiny: image size")
    m = sc["model"]
    names = [r["preset"].split("_")[1] for r in m]
    axes[2].bar(names, [r["train"] for r in m])
    for i, r in enumerate(m):
        axes[2].annotate(f"{r['gflops']:.0f} GFLOP/s", (i, r["train"]), ha="center", fontsize=8,
                         xytext=(0, 3), textcoords="offset points")
    axes[2].set_yscale("log")
    axes[2].set(ylabel="train images/s", title="model size (32 px, patch 4, batch 32)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- memory -------------------------------------------------------------------------------------

_MEM_CHILD = r"""
import json, re, sys, torch, torch.nn.functional as F
from vitlab.models import create_model
from vitlab.bench import saved_activation_bytes
preset, batch, ckpt, bf16 = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
dev = torch.device(sys.argv[5] if len(sys.argv) > 5 else "cpu")
gpu = dev.type == "cuda"

def mib(key):  # VmRSS (now) or VmHWM (high-water mark) in MiB, from /proc
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

model = create_model(preset, drop_path_rate=0.0).to(dev)
model.set_grad_checkpointing(ckpt)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
h, w = model.img_size
x = torch.randn(batch, model.in_chans, h, w, device=dev); y = torch.randint(0, model.num_classes, (batch,), device=dev)
ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else torch.autocast(dev.type, enabled=False)
def step():
    with ctx:
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
step()  # the first step creates AdamW's state (and its temporaries); not the one measured
opt.zero_grad(set_to_none=True)
if gpu:  # the allocator's own counters: exact, and no RSS of the CUDA libraries
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev) / 2**20
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20
    act = saved_activation_bytes(model, x, ctx)
    print(json.dumps({"peak_rss_mib": peak, "state_rss_mib": base, "step_mib": peak - base,
                      "saved_activations_mib": act / 2**20, "measure": "torch.cuda.max_memory_allocated"}))
    sys.exit(0)
try:  # hand the freed first-step memory back to the OS, or the measured step would reuse it unseen
    import ctypes; ctypes.CDLL("libc.so.6").malloc_trim(0)
except OSError:
    pass
base = mib("VmRSS")  # weights + optimizer state + input, gradients freed
# Without a reset the high-water mark would still hold the first step's one-off peak.
if not reset_peak():
    sys.exit("cannot reset the peak-RSS counter (/proc/self/clear_refs)")
step()  # the measured step
peak = mib("VmHWM")
act = saved_activation_bytes(model, x, ctx)
print(json.dumps({"peak_rss_mib": peak, "state_rss_mib": base, "step_mib": peak - base,
                  "saved_activations_mib": act / 2**20}))
"""


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, ctx=None) -> int:
    """Bytes autograd keeps for the backward pass of one forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), (ctx or contextlib.nullcontext()):
        out = model(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del out
    return sum(n for ptr, n in seen.items() if ptr not in params)


def memory(preset: str = "vit_base_patch16_224", batch: int = 8, log=print, device=CPU) -> list[dict]:
    """Peak process memory and saved activations per training step, with and without checkpointing.

    Each setup runs in a child process, so it starts clean. On the CPU: the process's resident
    memory; on a GPU: the allocator's peak (torch.cuda.max_memory_allocated).
    """
    rows = []
    for ckpt in (False, True):
        r = subprocess.run([sys.executable, "-c", _MEM_CHILD, preset, str(batch), str(int(ckpt)), "0", str(device)],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"memory child failed: {r.stderr[-500:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res.update(preset=preset, batch=batch, grad_checkpointing=ckpt)
        rows.append(res)
        log(f"  {preset} batch {batch}, checkpointing {'on ' if ckpt else 'off'}: "
            f"peak {'GPU memory' if device.type == 'cuda' else 'RSS'} "
            f"{res['peak_rss_mib']:.0f} MiB ({res['state_rss_mib']:.0f} before it: weights, AdamW state, input; "
            f"+{res['step_mib']:.0f} in the step), "
            f"saved activations {res['saved_activations_mib']:.0f} MiB")
    return rows


# -- the full loop ---------------------------------------------------------------------------------

def loop_vs_step(preset: str, batch: int, steps: int, warmup: int, log=print, rounds: int = 2,
                 device=CPU) -> dict:
    """`vitlab train` images/s against the bare step's: augmentation, the progress bar, metrics,
    curves.png and the per-epoch checkpoint included.

    The loop's rate is the images of epoch 3 of 4 over the wall time between epoch 2's record and
    epoch 3's: epoch 2's bookkeeping (metrics line, curves.png, last.ckpt) and epoch 3's training,
    with no evaluation (that runs after epoch 4 only) and past the one-off costs of epoch 1 (the
    first plot imports matplotlib). An epoch of 30 steps makes the per-epoch writes weigh more than
    in a real run's 400-step epochs, so the figure errs low. The host's speed drifts by 10% or more
    over a minute, so bare-step and loop timings alternate (step, loop, step, loop, step) and the
    ratio is mean over mean. Each bare-step figure is 30 or more consecutive steps' images over
    their total time, as an epoch's figure is.
    """
    import tempfile

    from .config import build_config, parse_overrides
    from .models import create_model
    from .train.engine import train

    a = arch_of(preset)
    dtype, _ = default_precision(device)

    def bare_step() -> float:
        torch.manual_seed(0)
        model = create_model(preset, num_classes=6).to(device)
        x = torch.randn(batch, a["in_chans"], a["img_size"], a["img_size"]).to(device)
        y = torch.randint(0, 6, (batch,)).to(device)
        # the loop's own optimizer; images over the total time of `steps` steps in a row, as the
        # loop's figure is an epoch's images over its wall time (a median step would flatter the
        # bare step on a host whose speed drifts: a slow step counts in an epoch, not in a median)
        return time_train(model, x, y, dtype, max(steps, 30), warmup, "engine", mean=True)

    def loop() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = build_config(None, parse_overrides([
                "--model", preset, "--data", "shapes", "--data.subset", str(batch * 30), "--epochs", "4",
                "--batch-size", str(batch), "--lr", "2e-3", "--out", tmp, "--run.name", "loop",
                "--aug.mixup_alpha", "0.2", "--aug.cutmix_alpha", "1.0", "--aug.randaugment_n", "2",
                "--aug.erasing", "0.25", "--run.eval_every", "4", "--run.device", str(device),
                "--run.compile", "false"]))  # overhead of the loop itself: eager against the eager bare step
            run = train(cfg)
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        images = rows[2]["images_per_s"] * rows[2]["epoch_time"]
        return images / (rows[2]["wall_time"] - rows[1]["wall_time"])

    step_rates, loop_rates = [bare_step()], []
    for _ in range(rounds):
        loop_rates.append(loop())
        step_rates.append(bare_step())
    step_rate, loop_rate = sum(step_rates) / len(step_rates), sum(loop_rates) / len(loop_rates)
    log(f"  full loop {loop_rate:.0f} img/s ({', '.join(f'{r:.0f}' for r in loop_rates)}) vs bare step "
        f"{step_rate:.0f} img/s ({', '.join(f'{r:.0f}' for r in step_rates)}) = {100 * loop_rate / step_rate:.0f}%")
    return dict(loop=loop_rate, step=step_rate, loop_runs=loop_rates, step_runs=step_rates,
                ratio=loop_rate / step_rate,
                recipe="crop+flip+RandAugment(2,9)+Mixup/CutMix+erasing, shapes; epoch 3 of 4 "
                       "with one epoch's metrics, curves.png and last.ckpt")


# -- command ---------------------------------------------------------------------------------------

def describe_cpu(cpuinfo: str, fallback: str) -> str:
    """/proc/cpuinfo's text -> the CPU's name, its x86 family and model, and its bf16 matmul
    units, e.g. "AMD EPYC (family 26 model 2; AVX-512 BF16)". One model name covers hosts whose
    bf16 speeds differ 2-4x (an "Intel Xeon Processor" with and without AMX; an "AMD EPYC" of
    family 25, Zen 4, and of family 26, Zen 5, whose AVX-512 units are twice as wide), so the
    units are named from the flags and the generation from the family."""
    name, x86, arm, family, model = fallback, None, None, None, None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == fallback:
            name = value.strip()
        elif key == "cpu family" and family is None:
            family = value.strip()
        elif key == "model" and model is None:
            model = value.strip()
        elif key == "flags" and x86 is None:  # x86
            x86 = set(value.split())
        elif key == "Features" and arm is None:  # Arm: no model name, one "Features" line per core
            arm = set(value.split())
    if x86 is not None:
        units = [label for flag, label in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX")) if flag in x86]
    elif arm is not None:
        units = [label for flag, label in (("bf16", "Arm BF16"), ("sme", "SME")) if flag in arm]
    else:
        return name
    units = ", ".join(units) if units else "no bf16 matmul units"
    if x86 is not None and family and model:
        return f"{name} (family {family} model {model}; {units})"
    return f"{name} ({units})"


def machine(device=CPU) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = describe_cpu(Path("/proc/cpuinfo").read_text(), cpu)
    except OSError:  # not Linux
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def add_arguments(p):
    p.add_argument("--model", default="vit_tiny_patch4_32", help="a ViT preset (default: the seed's CIFAR ViT-Tiny)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed repeats per measurement (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per setup first (default: 3)")
    p.add_argument("--impl", action="append", choices=["vitlab", "hf", "textbook"],
                   help="only these implementations (repeatable)")
    p.add_argument("--scaling", action="store_true", help="also time batch / image size / model size; one plot")
    p.add_argument("--memory", action="store_true", help="also peak memory per step, checkpointing on ViT-B/224")
    p.add_argument("--loop", action="store_true", help="also the full training loop against the bare step")
    p.add_argument("--all", action="store_true", help="--scaling --memory --loop")
    p.add_argument("--out", default="runs/bench",
                   help="where throughput.json (and, with --scaling, scaling.png) go (default: runs/bench; the "
                        "README's records are in benchmarks/results/, each run given its own --out)")
    p.add_argument("--markdown", action="store_true", help="print the README table from --out's JSON and exit")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where every setup runs")


def _print_markdown(res: dict) -> None:
    print(markdown_table(res["compare"]))
    if "memory" in res:
        gpu = res["compare"].get("device") == "cuda"
        print(f"\n| ViT-B/16 224 px training step, batch 8, fp32 | peak {'GPU' if gpu else 'process'} memory | before the step "
              "(weights + AdamW state) | added by the step | activations kept for backward |\n|---|---:|---:|---:|---:|")
        for m in res["memory"]:
            print(f"| gradient checkpointing {'on' if m['grad_checkpointing'] else 'off'} | "
                  f"{m['peak_rss_mib']:.0f} MiB | {m['state_rss_mib']:.0f} MiB | {m['step_mib']:.0f} MiB | "
                  f"{m['saved_activations_mib']:.0f} MiB |")
    c = res["compare"]
    targets = dict(TARGETS)
    print("\n| vitlab default (training step; inference as `vitlab eval` runs a long job) against | ratio | target |\n|---|---:|---:|")
    for key, value in c["ratios"].items():
        if key in targets:
            print(f"| {key.replace('_vs_', ' vs ').replace('_', ' ')} | {value:.2f}x | {targets[key]}x |")
    print(f"| train MFU (against the faster ceiling) | {100 * c['default_train_mfu']:.0f}% | 65% |")
    if peer_count_mfu(c) is not None:
        print(f"| the same, counting the peers' FLOPs per image (full last block) | {100 * peer_count_mfu(c):.0f}% | - |")
    if "loop" in c:
        print(f"| full `vitlab train` loop / bare step | {100 * c['loop']['ratio']:.0f}% | 90% |")
    needs = needs_lines(c)
    if needs:
        print("\nWhat the training targets ask, against the step's own matmuls timed alone:\n")
        print("\n".join(f"- {line}" for line in needs))
    if c.get("frozen_first_call_s"):
        print(f"\nThe frozen copy's first call, which compiles it: {c['frozen_first_call_s']:.1f} s.")
    alloc = f"; allocator: {res['allocator']}" if "allocator" in res else ""
    if "native_kernels" in res:
        kernels = f"; compiled training's native kernels: {res['native_kernels']}"
    else:  # results written before 2026-11-29's attention kernel recorded the GELU kernel alone
        kernels = f"; compiled training's GELU kernel: {res['gelu_kernel']}" if "gelu_kernel" in res else ""
    print(f"\n_{res['date']}, {res['machine']}; command: `{res['command']}`{alloc}{kernels}_")


def run(args) -> int:
    out = Path(args.out)
    if args.markdown:
        f = out / "throughput.json"
        if not f.is_file():
            raise UserError(f"{f} not found: run `vitlab bench --out {out}` first")
        try:
            res = json.loads(f.read_text())
            _print_markdown(res)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{f} is not a result of this version of vitlab bench ({e!r}); run it again") from None
        return 0
    if args.batch_size < 1 or args.steps < 1:
        raise UserError("--batch-size and --steps must be positive")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be positive, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .train.engine import resolve_device

    if args.device == "auto":
        raise UserError("--device is cpu or cuda[:N] (bench compares on one named device)")
    device = resolve_device(args.device, flag="--device")
    if args.impl and "hf" in args.impl and not have_transformers():
        raise UserError("--impl hf needs transformers (pip install transformers)")
    arch_of(args.model)  # an unknown or non-ViT model is an error before anything is printed
    make_dir(out)  # and so is an --out that cannot be a folder: not after minutes of timing
    print(f"vitlab bench on {machine(device)}")
    script = Path(sys.argv[0]).name == "throughput.py"
    cmd = ("python benchmarks/throughput.py " if script else "vitlab bench ") + " ".join(args.argv)
    res = {"date": str(date.today()), "machine": machine(device), "command": cmd.strip()}
    from .utils import tune_allocator

    # vitlab's allocator setting is process-wide, so the peers in this one process run with it too:
    # the ratios compare the models, not the allocators (benchmarks/allocator.py times the setting)
    res["allocator"] = ("glibc thresholds raised for every setup (vitlab.utils.tune_allocator)" if tune_allocator()
                        else "the platform's default")
    if device.type == "cpu":  # which kernels the compiled vitlab rows train with (vitlab.models.native)
        from .models import native

        res["native_kernels"] = ("vitlab's (attention in one operator, bf16; the Linears' products, bf16: forward "
                                 "with the bias added, and fc1's with GELU and its derivative, input gradient, "
                                 "fc2's times GELU's derivative, weight and bias gradients in one pass)"
                                 if native.library() is not None else f"ATen's ({native.why_not()})")
        print(f"compiled vitlab training steps use {res['native_kernels']} kernels for attention, GELU and the "
              f"Linears' products")
    try:
        _measure(args, res, out, device)
    except KeyboardInterrupt as e:  # minutes of timings are not thrown away: kept beside, not over, a whole result
        done = [k for k in ("compare", "scaling", "memory") if k in res]
        if not done:
            raise
        partial = write_json(out / "throughput-partial.json", {**res, "partial": f"stopped after: {', '.join(done)}"})
        raise type(e)(f"the sections measured so far ({', '.join(done)}) are in {partial}") from None
    write_json(out / "throughput.json", res)
    print(f"wrote {out / 'throughput.json'}")
    return 0


def _measure(args, res: dict, out: Path, device) -> None:
    """vitlab bench's sections, each added to `res` as it ends."""
    print(f"training step and inference, {args.model}, batch {args.batch_size}:")
    res["compare"] = compare(args.model, args.batch_size, args.steps, args.warmup, args.impl, device=device)
    if args.loop or args.all:
        print("full training loop:")
        res["compare"]["loop"] = loop_vs_step(args.model, args.batch_size, args.steps, args.warmup, device=device)
    print_table(res["compare"])
    if args.scaling or args.all:
        dtype, _ = default_precision(device)
        print(f"scaling (vitlab, default precision {DTYPE_NAMES[dtype]}):")
        res["scaling"] = scaling(max(3, args.steps // 2), 1, dtype, device=device)
        plot_scaling(res["scaling"], out / "scaling.png", f"vitlab training step, {res['machine']}, {res['date']}")
        print(f"wrote {out / 'scaling.png'}")
    if args.memory or args.all:
        print("memory per training step (fp32):")
        res["memory"] = memory(device=device)
