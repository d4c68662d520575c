"""The training loop. One function, `train(cfg)`, readable top to bottom.

Setup: processes, device, precision, data, model, optimiser, loss, run dir.
Loop:  for each epoch, for each batch: augment on the device, forward under
       autocast, backward, (clip, step, EMA) every `accum_steps` batches.
       Log at an interval, not every step: reading a loss back is a sync.
End of epoch: evaluate (and the EMA), append metrics, redraw curves,
       save the best weights and the full resumable state, atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import TrainConfig, apply_debug, check_resume_config, from_dict, save_yaml, to_dict
from ..errors import RunFailed, UserError, brief, stopped_by_signal
from ..models import build_from_arch, count_params, create_model, get_preset
from ..models.vit import VisionTransformer
from ..utils import RunLock, append_line, atomic_write_text, file_part, make_dir, seed_everything
from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_sum, broadcast_object, init_distributed, shutdown
from .losses import DistillationLoss, TeacherView
from .optim import ModelEMA, build_optimizer, effective_lr, lr_at


# -- device and precision -----------------------------------------------------

def resolve_device(pref: str, local_rank: int = 0, flag: str = "--run.device") -> torch.device:
    """auto | cpu | cuda | cuda:N -> a device; `flag` names the option in the error lines."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {pref}: no CUDA device is available here")
        try:
            dev = torch.device(pref if ":" in pref else f"cuda:{local_rank}")
        except RuntimeError:  # cuda:x, cuda:-1
            raise UserError(f"unknown device {pref!r} for {flag}; choose auto, cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {pref}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0")
        return dev
    if pref != "cpu":
        raise UserError(f"unknown device {pref!r} for {flag}; choose auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def resolve_workers(choice: int | None, device: torch.device, world_size: int = 1) -> int:
    """data.num_workers: as asked, else 2 decoding processes on a CPU (they share its cores with the
    training step) and, with a GPU, the machine's cores split over the processes, up to 8 each: a
    ViT-B/16 step on an H200 (2,250 img/s in bf16) outruns 2 workers decoding 500 px JPEGs
    (~600 img/s, benchmarks/finetune_speed.py)."""
    if choice is not None:
        if choice < 0:
            raise UserError(f"data.num_workers must be 0 or more, got {choice}")
        return choice
    if device.type != "cuda":
        return 2
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (a container's share)
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(2, min(8, cores // max(world_size, 1) - 1))


def cuda_has_native_bf16() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch without the argument: its answer is the native one
        return bool(torch.cuda.is_bf16_supported())


def cpu_has_bf16() -> bool:
    """True when oneDNN can run bf16 matmuls natively (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_BF16_RATE: tuple[float, float] | None = None


def cpu_matmul_rates(size: int = 768, reps: int = 3) -> tuple[float, float]:
    """Measured (fp32, bf16) matmul GFLOP/s on this CPU, best of `reps`; cached per process.

    Native bf16 support is not the same as bf16 being faster: with AVX512-BF16
    but no AMX, oneDNN's bf16 kernels can run at half the fp32 rate (seen on
    the 2-core dev machine). So `auto` precision asks the hardware, in ~0.1 s.
    """
    global _BF16_RATE
    if _BF16_RATE is None:
        rates = []
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(size, size).to(dtype)
            b = torch.randn(size, size).to(dtype)
            a @ b  # warm up the kernel choice
            best = math.inf
            for _ in range(reps):
                t0 = time.perf_counter()
                a @ b
                a @ b
                best = min(best, (time.perf_counter() - t0) / 2)
            rates.append(2 * size**3 / best / 1e9)
        _BF16_RATE = (rates[0], rates[1])
    return _BF16_RATE


def resolve_precision(pref: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """-> (autocast dtype or None for fp32, a note for the log)."""
    why = ""  # what `auto` based its choice on
    if pref == "auto":
        if device.type == "cuda":
            # native bf16 only (Ampere and later): torch's default also counts slow emulation (V100, T4)
            pref = "bf16" if cuda_has_native_bf16() else "fp16"
            why = " (auto: this GPU has native bf16)" if pref == "bf16" else " (auto: this GPU has no native bf16)"
        elif not cpu_has_bf16():
            return None, "fp32 (this CPU has no native bf16 matmul, so bf16 autocast would be slower)"
        else:
            fp32, bf16 = cpu_matmul_rates()
            if bf16 < 1.2 * fp32:  # autocast casts cost something: bf16 must win clearly
                return None, (f"fp32 (bf16 matmul measured at {bf16:.0f} vs {fp32:.0f} GFLOP/s fp32 on this CPU; "
                              f"--precision bf16 forces it)")
            pref = "bf16"
            why = f" (auto: bf16 matmul measured at {bf16:.0f} vs {fp32:.0f} GFLOP/s fp32)"
    if pref == "fp32":
        return None, "fp32"
    if pref == "bf16":
        return torch.bfloat16, f"bf16 autocast on {device.type}{why}"
    if pref == "fp16":
        if device.type != "cuda":
            raise UserError("fp16 needs a GPU (loss scaling); use --precision bf16 or fp32 on CPU")
        return torch.float16, f"fp16 autocast with loss scaling{why}"
    raise UserError(f"unknown precision {pref!r}; choose auto, bf16, fp16 or fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# torch.compile costs 20-60 s up front. On the 2-core dev CPU it made a small ViT's step 1.43x
# faster (vit_mini_patch7_28, batch 64: benchmarks/results/mini/throughput.json) and a matmul-bound
# one 1.04-1.10x in fp32 (ViT-Tiny, batch 128: benchmarks/results/no-amx/throughput.json, the "vitlab
# compiled, foreach AdamW" row against eager vitlab; in bf16 on an AMX host, no gain:
# benchmarks/results/throughput.json). Below this many optimizer steps it may not pay back.
AUTO_COMPILE_MIN_STEPS = 2000


def resolve_compile(choice: bool | None, total_steps: int, dist) -> tuple[bool, str]:
    """run.compile: True / False as asked; None (auto) compiles a long single-process run. -> (on, note)."""
    if choice is not None:
        return bool(choice), "torch.compile" if choice else "eager"
    if dist.enabled:
        return False, "eager (auto: compile is not chosen automatically under several processes)"
    if total_steps < AUTO_COMPILE_MIN_STEPS:
        return False, f"eager (auto: {total_steps} steps is too short for compiling to pay back)"
    return True, "torch.compile (auto: a long run; --run.compile false for eager)"


def _is_compile_failure(e: BaseException) -> bool:
    """torch.compile's own failures (no C++ compiler, an unsupported op), not the model's errors."""
    import torch._dynamo.exc as dexc

    return isinstance(e, (dexc.BackendCompilerFailed, dexc.InternalTorchDynamoError)) or \
        type(e).__module__.startswith("torch._inductor")


def compile_failure_note(e: BaseException) -> str:
    """A compile failure in one line: its type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"torch.compile failed ({type(e).__name__}: {first})"


def _compiled_step(train_model, model, x, dist, log):
    """Forward through the compiled model. If compiling itself fails (at the first step, or at a
    recompile for a new batch shape) in a single process, go on in eager mode: a laptop without a
    C++ compiler should train, just slower. -> (out, module to use from now on, still compiled)."""
    try:
        return train_model(x), train_model, True
    except Exception as e:
        if dist.enabled or not _is_compile_failure(e):
            raise
        log(f"note: {compile_failure_note(e)}; training without it")
        return model(x), model, False


# -- model ----------------------------------------------------------------------

def choose_img_size(cfg: TrainConfig, native: tuple[int, int]) -> tuple[int, int]:
    """The model sees the data's own size when its patch size divides it, else the preset's size.
    Image files have no size of their own (they are decoded at data.img_size, 224 unset): unless
    data.img_size asks for one, a ViT gets its preset's size (32 px for a CIFAR-size preset, not
    3,136 tokens of 224 px)."""
    if cfg.model.img_size:
        return (cfg.model.img_size, cfg.model.img_size)
    preset = get_preset(cfg.model.name)
    if preset.family != "vit":
        return tuple(native)
    files = cfg.data.name == "flowers102" or cfg.data.name.startswith("imagefolder:")
    if files and cfg.data.img_size is None:
        s = preset.kwargs["img_size"]
        return (s, s) if isinstance(s, int) else tuple(s)
    p = preset.kwargs["patch_size"]
    if native[0] % p == 0 and native[1] % p == 0:
        return tuple(native)
    s = preset.kwargs["img_size"]
    return (s, s) if isinstance(s, int) else tuple(s)


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, img_size) -> nn.Module:
    """A fresh model from the registry (training from scratch)."""
    preset = get_preset(cfg.model.name)
    kw = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    if preset.family == "vit":
        kw.update(drop_rate=cfg.model.drop_rate, attn_drop_rate=cfg.model.attn_drop_rate,
                  drop_path_rate=cfg.model.drop_path_rate)
        if cfg.model.pos_embed_init:
            kw["pos_embed_init"] = cfg.model.pos_embed_init
    try:
        return create_model(cfg.model.name, **kw)
    except ValueError as e:  # a bad constructor value from the config
        raise UserError(f"model {cfg.model.name}: {e}") from None


def build_pretrained(cfg: TrainConfig, num_classes: int, in_chans: int) -> tuple[nn.Module, dict]:
    """Pretrained weights with a head for this dataset, at the checkpoint's resolution unless
    --model.img_size asks for another (position embeddings resampled). -> (model, source info)."""
    from ..models.pretrained import load_pretrained

    kw = dict(drop_rate=cfg.model.drop_rate, attn_drop_rate=cfg.model.attn_drop_rate,
              drop_path_rate=cfg.model.drop_path_rate)
    model, info = load_pretrained(cfg.model.pretrained, num_classes=num_classes, img_size=cfg.model.img_size,
                                  **kw)  # (a ResNet checkpoint ignores the ViT drop rates)
    if getattr(model, "in_chans", in_chans) != in_chans:
        raise UserError(f"{cfg.model.pretrained} takes {model.in_chans}-channel images but {cfg.data.name} has "
                        f"{in_chans}; fine-tune on {model.in_chans}-channel data")
    return model.train(), info


def resumed_img_size(state: dict, run_dir: Path) -> tuple[int, int] | None:
    """The input size a resumed run was built at: the rule that chose it may have changed since
    (choose_img_size), and the saved weights fit only that size. From the state (since it records
    it), else the run's weights file; None if neither says."""
    if state.get("img_size"):
        return tuple(state["img_size"])
    if (run_dir / ckpt.WEIGHTS).is_file():
        size = ckpt.read_meta(run_dir / ckpt.WEIGHTS).get("img_size")
        return tuple(size) if size else None
    return None


def resumed_pretrained(run_dir: Path, cfg: TrainConfig) -> tuple[nn.Module, dict] | None:
    """A resumed fine-tune's model, from the architecture and normalisation its own weights file
    records (the state loaded next replaces the weights): the source it started from need not still
    be where it was. The drop rates are the config's, as a resume may change them. None before the
    run's first evaluation wrote that file (then the source is read again)."""
    weights = run_dir / ckpt.WEIGHTS
    if not weights.is_file():
        return None
    meta = ckpt.read_meta(weights)
    arch = {**meta["arch"], "kwargs": dict(meta["arch"].get("kwargs", {}))}
    if arch.get("family") == "vit":
        arch["kwargs"].update(drop_rate=cfg.model.drop_rate, attn_drop_rate=cfg.model.attn_drop_rate,
                              drop_path_rate=cfg.model.drop_path_rate)
    try:
        model = build_from_arch(arch)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"--resume {run_dir}: cannot rebuild the model its {ckpt.WEIGHTS} records: {e}") from None
    return model.train(), meta


def freeze_backbone(model: nn.Module) -> int:
    """Train the classifier head(s) only (a linear probe); returns the number of trainable parameters."""
    heads = [m for m in (getattr(model, "head", None), getattr(model, "head_dist", None), getattr(model, "fc", None))
             if isinstance(m, nn.Module)]
    if not heads:
        raise UserError("model.freeze backbone: this model has no classifier head to train")
    model.requires_grad_(False)
    for h in heads:
        h.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_teacher(path: str, device: torch.device, info, img_size) -> TeacherView:
    """A frozen teacher (a vitlab run/checkpoint, or a pretrained, e.g. Hugging Face, classifier),
    wrapped to see this run's images at its own size, channels and normalisation (TeacherView)."""
    p = Path(path)
    if (p.is_dir() and (p / ckpt.WEIGHTS).is_file()) or p.suffix == ".safetensors":
        model, meta = ckpt.load_model(p)
    else:
        from ..models.pretrained import load_pretrained

        model, meta = load_pretrained(path)
    # a vitlab run's weights record the size it trained at; a ViT has one fixed size
    size = meta.get("img_size") or (model.img_size if isinstance(model, VisionTransformer) else None)
    view = TeacherView(model, info.in_chans, img_size, info.mean, info.std, chans=getattr(model, "in_chans", None),
                       size=size, mean=meta.get("mean"), std=meta.get("std"))
    return view.to(device).eval()


def check_teacher(teacher: nn.Module, name: str, in_chans: int, img_size, num_classes: int, device) -> None:
    """One image of this run's shape through the teacher, before the run starts: a teacher trained on
    other images (channels, a ViT's fixed size) or other classes is one line now, not a traceback at
    the first step with a half-made run directory."""
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(1, in_chans, *img_size, device=device))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--distill.teacher {name} does not take this run's {in_chans}-channel "
                        f"{img_size[0]}x{img_size[1]} images ({brief(e)})") from None
    if out.shape[-1] != num_classes:
        raise UserError(f"--distill.teacher {name} predicts {out.shape[-1]} classes, this run has {num_classes}")


# -- evaluation -------------------------------------------------------------------

TTA_KINDS = ("none", "flip", "flip-shift")


def check_tta(kind: str) -> None:
    if kind not in TTA_KINDS:
        raise UserError(f"unknown TTA {kind!r}; choose one of {', '.join(TTA_KINDS)}")


def tta_views(x: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """The views test-time augmentation scores, the image itself first. -> list of (B, C, H, W).

    flip: the image and its mirror (the one transform the training flips taught).
    flip-shift: each of those two also moved 1 px up, down, left and right (10 views), the
    uncovered row or column filled by reflection (the training crops' default, aug.pad_mode):
    a model trained on padded crops has seen such shifts, and where the patch grid is coarse
    (8 px patches in the Fashion-MNIST preset) averaging them smooths what one pixel of placement
    changes in the tokens.
    """
    check_tta(kind)
    if kind == "none":
        return [x]
    bases = [x, x.flip(-1)]
    if kind == "flip":
        return bases
    h, w = x.shape[-2:]
    if min(h, w) < 2:
        raise UserError(f"flip-shift TTA needs images of at least 2x2 pixels, got {h}x{w}")
    views = []
    for b in bases:
        padded = nn.functional.pad(b, (1, 1, 1, 1), mode="reflect")  # (B, C, H+2, W+2)
        views.append(b)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):  # the content moves by (dy, dx)
            views.append(padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w])
    return views


@torch.no_grad()
def evaluate(model: nn.Module, loader, transform, device, amp_dtype, num_classes: int,
             dist: DistInfo = DistInfo(), separate_heads: bool = False, tta: str = "none",
             also_tta: bool = False) -> dict:
    """Loss, top-1/top-5 and the confusion matrix over a whole split (summed across processes).

    tta: classify each image by the mean logits over its tta_views ("flip": 2 views, twice the
    cost; "flip-shift": 10 views).
    also_tta: keep every statistic plain and add "acc_tta", the TTA top-1, from the same pass
    (what `--run.tta` logs each evaluation, at the cost of the extra views' forwards only).
    """
    check_tta(tta)  # before the first batch, not at it
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros(3, device=device, dtype=torch.float64)  # top1, top5, and cls-head top1
    dist_correct = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    tta_correct = torch.zeros((), device=device, dtype=torch.float64)
    distilled = getattr(model, "distilled", False) and separate_heads
    for images, labels in loader:
        x = transform(images)
        with autocast(device, amp_dtype):
            if distilled:
                cls_logits, dist_logits = model(x, separate=True)
                logits = (cls_logits.float() + dist_logits.float()) / 2
                correct[2] += (cls_logits.argmax(-1) == labels).sum()
                dist_correct += (dist_logits.argmax(-1) == labels).sum()
            else:
                logits = model(x)
            if tta != "none":
                views = tta_views(x, tta)
                tta_logits = logits.float()  # eval mode: model(view) is one (B, K) tensor, both heads averaged
                for v in views[1:]:
                    tta_logits = tta_logits + model(v).float()
                tta_logits = tta_logits / len(views)
                if also_tta:
                    tta_correct += (tta_logits.argmax(-1) == labels).sum()
                else:
                    logits = tta_logits
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, num_classes), dim=-1).indices  # (B, 5)
        correct[0] += (top[:, 0] == labels).sum()
        correct[1] += (top == labels[:, None]).any(-1).sum()
        confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes * num_classes)
        count += labels.numel()
    for t in (loss_sum, correct, dist_correct, confusion, count, tta_correct):
        all_reduce_sum(t, dist)
    n = max(count.item(), 1.0)
    out = {"loss": loss_sum.item() / n, "acc": 100 * correct[0].item() / n, "top5": 100 * correct[1].item() / n,
           "n": int(count.item()), "confusion": confusion.view(num_classes, num_classes).long().cpu()}
    if also_tta and tta != "none":
        out["acc_tta"] = 100 * tta_correct.item() / n
    if distilled:
        out["acc_cls_head"] = 100 * correct[2].item() / n
        out["acc_dist_head"] = 100 * dist_correct.item() / n
    return out


# -- state ------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def batch_generator(device: torch.device, seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """Augmentation randomness as a pure function of (seed, epoch, batch, rank): resumes replay it exactly."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 10_007 + step * 101 + rank) % (2**63))
    return g


def clock_progress(now: float, t_launch: float, wall_before: float, budget_s: float, reserve: float) -> float:
    """How far a clock-scheduled run (sched.by_time) is through its budget, 0..1, counting the
    time its earlier parts ran before a --resume (wall_before), so a resumed run continues its
    warmup, cosine and clean tail where they were instead of starting them over; `reserve` is
    the time kept back for the last evaluation."""
    return min(1.0, max(0.0, wall_before + now - t_launch) / max(budget_s - reserve, 1e-9))


def eval_reserve(history: list[dict]) -> float:
    """Seconds a time-limited run keeps back for its final evaluation: the last evaluation's
    duration and 1 s more, so a resumed run keeps what its earlier part measured instead of 0."""
    return next((h["eval_time"] + 1.0 for h in reversed(history) if "eval_time" in h), 0.0)


def run_name(cfg: TrainConfig, model_name: str | None = None) -> str:
    """cfg.run.name, else MODEL-DATA-TIME; model_name: the model's own (a fine-tune's weights decide
    it, not model.name, which a fine-tune does not use)."""
    data = cfg.data.name.replace(":", "-").replace("/", "_")[:40]
    model = file_part(model_name or cfg.model.name)[:60]
    return cfg.run.name or f"{model}-{data}-{datetime.now():%Y%m%d-%H%M%S}"


# -- the loop ---------------------------------------------------------------------

def train(cfg: TrainConfig, resume: str | None = None, finish: bool = False,
          go_on: str = "vitlab train --resume {run}") -> Path:
    """Train (or resume) a run; returns the run directory.

    finish: the run's training is complete but its final step (scoring the best weights on the test
    split) was cut short: do only that. go_on: how the user continues an interrupted run, said when
    Ctrl-C or SIGTERM stops it ({run}: the run folder)."""
    opened: list = []  # the run's data loaders: closed however it ends, so no worker outlives it
    run_at: list = []  # [the run folder, its RunLock], once this process holds it
    try:
        return _train(cfg, resume, opened, finish, run_at)
    except (KeyboardInterrupt, RuntimeError) as e:
        stop = e if isinstance(e, KeyboardInterrupt) else stopped_by_signal(e)
        if stop is None:
            raise
        if run_at and (run_at[0] / ckpt.LAST).is_file():  # (the CLI prints it: "vitlab train: interrupted; ...")
            raise type(stop)(f"every finished epoch is saved; continue with {go_on.format(run=run_at[0])}") from None
        raise stop from None
    finally:
        for loader in opened:
            loader.close()
        if run_at:  # the lock last: no one starts in the folder while a worker of this run still runs
            run_at[1].close()


def _train(cfg: TrainConfig, resume: str | None, opened: list, finish: bool = False,
           run_at: list | None = None) -> Path:
    from ..data import build_data, build_eval_transform, build_train_transform, make_loader

    t_launch = time.time()
    state = None
    if resume:
        run_dir = Path(resume)
        state = ckpt.load_state(run_dir / ckpt.LAST)
    device = resolve_device(cfg.run.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    elif device.type == "cpu" and dist.enabled:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
    main = dist.is_main
    log = tqdm.write if main else (lambda *a, **k: None)

    if cfg.run.tensorboard:  # before hours of unlogged training, and before the run's folder exists
        try:
            importlib.import_module("torch.utils.tensorboard")  # (`import torch.utils...` here would make torch a local)
        except ImportError as e:
            raise UserError(f"--run.tensorboard needs the tensorboard package ({brief(str(e))}; pip install "
                            "tensorboard), or leave it off: metrics.jsonl and curves.png are written either way") from None
    apply_debug(cfg)
    if state is not None and isinstance(state.get("config"), dict):
        # what the run was saved with against what it is asked to go on with (`vitlab train --resume`
        # checks this too; `vitlab ablate` and the benchmark scripts resume through here alone)
        try:
            saved = from_dict(state["config"])
        except UserError:  # written by another vitlab version: the state loads below say what does not fit
            saved = None
        if saved is not None:
            check_resume_config(saved, cfg, resume)
    seed_everything(cfg.run.seed)  # same on every rank: identical initial weights

    # -- data ---------------------------------------------------------------------
    data = build_data(cfg.data)
    info = data.info
    num_classes = cfg.model.num_classes or info.num_classes
    if cfg.model.pretrained:
        # Fine-tuning: the weights decide resolution and normalisation (what they were trained with).
        resumed = resumed_pretrained(run_dir, cfg) if state is not None else None
        model, source_info = resumed or build_pretrained(cfg, num_classes, info.in_chans)
        img_size = tuple(model.img_size)
        info = dataclasses.replace(info, mean=tuple(source_info["mean"]), std=tuple(source_info["std"]))
    else:
        size = resumed_img_size(state, run_dir) if state is not None else None
        model = build_model(cfg, num_classes, info.in_chans, size or choose_img_size(cfg, info.img_size))
        img_size = tuple(model.img_size)
    if cfg.model.freeze not in ("none", "backbone"):
        raise UserError(f"model.freeze must be 'none' or 'backbone', got {cfg.model.freeze!r}")
    if cfg.model.freeze == "backbone":
        freeze_backbone(model)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model = model.to(device)
    eval_split = data.val if data.val is not None else data.test
    eval_name = "val" if data.val is not None else "test"
    if cfg.run.batch_size % dist.world_size:
        raise UserError(f"--batch-size {cfg.run.batch_size} is the global batch and must divide evenly "
                        f"over {dist.world_size} processes")
    local_batch = cfg.run.batch_size // dist.world_size // max(cfg.optim.accum_steps, 1)
    if local_batch < 1:
        raise UserError("batch size too small for this many processes and accumulation steps")
    workers = resolve_workers(cfg.data.num_workers, device, dist.world_size)
    train_loader = make_loader(data.train, local_batch, train=True, seed=cfg.run.seed, device=device,
                               img_size=img_size, rank=dist.rank, world_size=dist.world_size,
                               repeated_aug=cfg.aug.repeated_aug, num_workers=workers,
                               on_corrupt=cfg.data.on_corrupt)
    opened.append(train_loader)
    eval_loader = make_loader(eval_split, max(local_batch, 256), train=False, seed=cfg.run.seed, device=device,
                              img_size=img_size, rank=dist.rank, world_size=dist.world_size,
                              num_workers=workers, on_corrupt=cfg.data.on_corrupt)
    opened.append(eval_loader)
    if len(train_loader) == 0:  # every batch is full in training (drop_last): an epoch would be empty
        per = f"one batch of {local_batch * dist.world_size}"
        if cfg.optim.accum_steps > 1:
            per += f" (--batch-size {cfg.run.batch_size} in {cfg.optim.accum_steps} accumulation steps)"
        raise UserError(f"the training split has {eval_split_count(data.train)} images, fewer than {per}; "
                        f"use a smaller --batch-size")
    train_tf = build_train_transform(cfg.aug, info, img_size, num_classes)
    eval_tf = build_eval_transform(info, img_size)

    # -- model, optimiser, loss ---------------------------------------------------------
    accum = max(cfg.optim.accum_steps, 1)
    steps_per_epoch = max(len(train_loader) // accum, 1)
    total_steps = cfg.run.epochs * steps_per_epoch
    warmup_epochs = cfg.sched.warmup_epochs
    if warmup_epochs > cfg.run.epochs / 3:  # a 3-epoch run with 5 warmup epochs would never reach its lr
        warmup_epochs = cfg.run.epochs / 3
        log(f"note: warmup shortened to {warmup_epochs:.2g} epoch{'' if warmup_epochs == 1 else 's'} "
            f"(a third of this {cfg.run.epochs}-epoch run)")
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    base_lr = effective_lr(cfg.optim, cfg.run.batch_size)
    amp_dtype, precision_note = resolve_precision(cfg.run.precision, device)
    # Muon's Newton-Schulz matmuls in bf16 where the run computes in bf16 (where bf16 is fast), else fp32
    optimizer = build_optimizer(model, cfg.optim, base_lr,
                                ns_dtype=torch.bfloat16 if amp_dtype == torch.bfloat16 else torch.float32)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ema = ModelEMA(model, cfg.run.ema_decay) if cfg.run.ema else None
    teacher = (load_teacher(cfg.distill.teacher, device, info, img_size)
               if cfg.distill.teacher and cfg.distill.kind != "none" else None)
    if teacher is None and cfg.distill.kind != "none":
        raise UserError(f"--distill.kind {cfg.distill.kind} needs --distill.teacher RUN_OR_PATH")
    if teacher is not None:
        check_teacher(teacher, cfg.distill.teacher, info.in_chans, img_size, num_classes, device)
    criterion = DistillationLoss(cfg.distill.kind, cfg.distill.alpha, cfg.distill.tau, cfg.optim.label_smoothing,
                                 teacher)
    separate_heads = getattr(model, "distilled", False)

    # -- run directory and resume ----------------------------------------------------------
    start_epoch, step, best, history = 0, 0, -1.0, []
    if state is not None:
        # `vitlab train --resume` refuses changes to the keys that shape this state (command.py's
        # FIXED_ON_RESUME); these catch a config.yaml edited by hand
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:  # torch's message lists the keys; its last line names the first misfit
            raise UserError(f"--resume {resume}: the saved weights do not fit the model its config.yaml "
                            f"describes now ({brief(str(e).strip().splitlines()[-1])})") from None
        try:
            optimizer.load_state_dict(state["optimizer"])
            groups = optimizer.param_groups
            # torch loads another optimizer's groups without complaint (filling in only the options newer
            # releases added) and fails at the first step: an option of this one still missing says so
            missing = set(getattr(optimizer, "defaults", {})) - set(groups[0]) if groups else set()
            if missing:
                raise KeyError(", ".join(sorted(missing)))
        except (ValueError, KeyError) as e:  # e.g. optim.name changed: the state is another optimizer's
            raise UserError(f"--resume {resume}: the saved optimizer state does not fit optim.name "
                            f"{cfg.optim.name!r} ({e}); resume with the run's own optimizer") from None
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        start_epoch, step, best, history = state["epoch"], state["step"], state["best"], list(state["history"])
        set_rng_state(state["rng"])
    else:
        arch = getattr(model, "arch", {}).get("name") if cfg.model.pretrained else None
        run_dir = Path(cfg.run.out) / broadcast_object(run_name(cfg, arch), dist)
        if main:
            if (run_dir / ckpt.LAST).exists():
                RunLock(run_dir).close()  # a run still training there is said as such (resuming it would fail)
                raise UserError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick --run.name")
            make_dir(run_dir)
    if main:
        lock = RunLock(run_dir)  # a second process in this folder (the same --run.name twice) stops here
        if run_at is not None:
            run_at[:] = [run_dir, lock]
        lock.clean_stale()  # a save that SIGKILL cut short left its temporary file
        if start_epoch < cfg.run.epochs and not finish:
            # more epochs may change model.safetensors: the test score of the weights it held goes with
            # them (else a stop before the new final step would leave it describing other weights)
            (run_dir / "test.json").unlink(missing_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        # metrics.jsonl is rewritten from the checkpointed history, so a crash between
        # writing a line and saving last.ckpt cannot leave a duplicate epoch.
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    train_model = model
    # compiled stays True until a compile failure sends the run back to eager (_compiled_step)
    compiled, compile_note = resolve_compile(cfg.run.compile, total_steps, dist)
    if compiled:
        train_model = torch.compile(model)
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    tb = _tensorboard(run_dir) if (cfg.run.tensorboard and main) else None

    meta = {"classes": info.classes, "mean": list(info.mean), "std": list(info.std), "data": cfg.data.name,
            "img_size": list(img_size), "config": to_dict(cfg)}
    if main:
        if info.note:
            log(f"note: {info.note}")
        if eval_name == "test":
            log("note: no validation split, so the best epoch (model.safetensors) is picked on the test split "
                "and its score is optimistic; --data.val_fraction 0.1 holds out one")
        if teacher is not None and teacher.changes:
            log(f"note: the teacher sees this run's images as it was trained to: {'; '.join(teacher.changes)}")
        if compiled and device.type == "cpu":
            from ..models import native

            failure = native.build_failure()  # a CPU that cannot run vitlab's kernels is no news; a failed build is
            if failure:
                log(f"note: {failure}; GELU, attention and the Linears' weight gradients run on ATen's kernels "
                    f"(several percent slower)")
        what = (f"{cfg.model.pretrained} ({getattr(model, 'arch', {}).get('name', 'pretrained')})"
                if cfg.model.pretrained else cfg.model.name)  # model.name is unused when fine-tuning
        log(f"run {run_dir}: {what} ({count_params(model):,} params) on {cfg.data.name} "
            f"({eval_split_count(data.train)} train / {eval_split_count(eval_split)} {eval_name}), "
            f"{info.num_classes} classes, {img_size[0]}x{img_size[1]}, {precision_note}, {compile_note}, "
            f"{dist.world_size} process(es), batch {cfg.run.batch_size}, {cfg.optim.name} lr {base_lr:.3g}")

    # -- epochs ----------------------------------------------------------------------
    log_every = max(cfg.run.log_every, 1)
    wall_before = history[-1]["wall_time"] if history else 0.0
    # The time limit covers the whole run: a resumed run gets what its earlier part left.
    deadline = t_launch + cfg.run.time_limit * 60 - wall_before if cfg.run.time_limit else None
    reserve = eval_reserve(history)  # seconds kept for the final evaluation, so it ends in time
    # sched.by_time: the schedule runs on the clock (progress = elapsed / budget), so warmup and the
    # cosine fit the time limit however fast the machine is; epochs is then an upper bound.
    if cfg.sched.by_time and deadline is None:
        raise UserError("sched.by_time needs a budget: --run.time_limit MINUTES")
    if cfg.sched.by_time and dist.enabled:
        raise UserError("sched.by_time runs in one process (each process's clock would give its own lr)")
    t_run = time.time()
    paused = False  # stopped by run.stop_after, to be resumed
    if main and not history:  # data, model and loaders built: what a user waits for before epoch 1
        log(f"ready in {t_run - t_launch:.0f} s")
    if finish and main:
        how = "as long as its time limit allowed" if history[-1].get("stopped") == "time_limit" else "all its epochs"
        log(f"the run trained {how} ({len(history)}); what a stop cut short is its final step: scoring the "
            f"best weights on the test split")
    for epoch in range(start_epoch, start_epoch if finish else cfg.run.epochs):
        train_loader.set_epoch(epoch)
        train_model.train()
        criterion.train()
        seen = torch.zeros((), device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        recent = torch.zeros(log_every, device=device)  # losses since the last check, for the NaN guard
        n_batches = len(train_loader)
        bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{cfg.run.epochs}", disable=None if main else True,
                   leave=False, dynamic_ncols=True, mininterval=1.0)
        t0 = time.perf_counter()
        n_images = 0
        cut = False  # the clock ended this epoch early
        for i, (images, labels) in enumerate(train_loader):
            where = step
            if cfg.sched.by_time:
                where = total_steps * clock_progress(time.time(), t_launch, wall_before, cfg.run.time_limit * 60,
                                                     reserve)
            lr = lr_at(where, base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps, cfg=cfg.sched)
            g = batch_generator(device, cfg.run.seed, epoch, i, dist.rank)
            # (a clock-run's last batch can sit at progress 1.0: with no clean tail it stays augmented)
            progress = where / max(total_steps, 1)
            clean = progress < cfg.aug.clean_head or (cfg.aug.clean_tail > 0 and progress >= 1 - cfg.aug.clean_tail)
            x, targets = train_tf(images, labels, g, clean=clean)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            last_micro = (i + 1) % accum == 0 or i + 1 == n_batches
            sync = contextlib.nullcontext() if (last_micro or not dist.enabled) else train_model.no_sync()
            with sync:
                with autocast(device, amp_dtype):
                    if compiled:
                        out, train_model, compiled = _compiled_step(train_model, model, x, dist, log)
                    else:
                        out = train_model(x)
                    loss = criterion(out, targets, x)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            if last_micro:
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.optim.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad, foreach=True)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model, step)
                step += 1
            logits = out[0] if isinstance(out, tuple) else out
            hard = targets if targets.ndim == 1 else targets.argmax(-1)
            loss_d = loss.detach()
            recent[i % log_every] = loss_d
            loss_sum += loss_d * labels.numel()
            correct += (logits.detach().argmax(-1) == hard).sum()
            seen += labels.numel()
            n_images += labels.numel()
            if (i + 1) % log_every == 0 or i + 1 == n_batches:
                k = (i % log_every) + 1
                window = recent[:k]
                nonfinite = (~torch.isfinite(window)).any().float()
                if bool(all_reduce_sum(nonfinite, dist) > 0):  # one sync per interval, not per step
                    where = (~torch.isfinite(window)).nonzero()
                    bad = (int(where[0]) if len(where) else 0) + i - k + 1
                    raise RunFailed(
                        f"loss became non-finite at epoch {epoch + 1}, batch {bad + 1} (optimizer step "
                        f"~{step - (i - bad) // accum}); stopped without saving this epoch; the last good state "
                        f"is in {run_dir / ckpt.LAST if history else 'no checkpoint yet'}; "
                        f"try a lower --optim.lr, --optim.clip_grad 1.0 or --precision fp32")
                if main:
                    dt = time.perf_counter() - t0
                    bar.set_postfix_str(f"loss {window.mean().item():.3f} acc {100 * correct.item() / max(seen.item(), 1):.1f} "
                                        f"lr {lr:.2e} {n_images * dist.world_size / max(dt, 1e-9):.0f} img/s")
                bar.update(k)
            if deadline and not dist.enabled and time.time() > deadline - reserve:
                cut = True
                break  # (under several processes the budget is checked per epoch, so all stop together)
        bar.close()
        train_time = time.perf_counter() - t0
        stats = torch.stack([loss_sum, correct, seen])
        all_reduce_sum(stats, dist)
        record = {"epoch": epoch + 1, "step": step, "lr": lr,
                  "train_loss": stats[0].item() / max(stats[2].item(), 1),
                  "train_acc": 100 * stats[1].item() / max(stats[2].item(), 1),
                  "images_per_s": stats[2].item() / max(train_time, 1e-9), "epoch_time": train_time}

        # -- evaluate, log, checkpoint -----------------------------------------------------
        # Decided once per epoch, so an epoch that ends the run is always the one scored; and under
        # several processes by all of them together, since evaluate() waits for every process.
        time_up = cut or (bool(deadline) and time.time() > deadline - reserve)
        if deadline and dist.enabled:
            time_up = bool(all_reduce_sum(torch.tensor(float(time_up), device=device), dist) > 0)
        last_epoch = epoch + 1 == cfg.run.epochs or time_up
        if (epoch + 1) % cfg.run.eval_every == 0 or last_epoch:
            t_eval = time.time()
            res = evaluate(model, eval_loader, eval_tf, device, amp_dtype, num_classes, dist, separate_heads,
                           tta="flip" if cfg.run.tta else "none", also_tta=True)
            record.update({f"{eval_name}_loss": res["loss"], f"{eval_name}_acc": res["acc"],
                           f"{eval_name}_top5": res["top5"]})
            for key in ("acc_cls_head", "acc_dist_head"):
                if key in res:
                    record[f"{eval_name}_{key}"] = res[key]
            if "acc_tta" in res:  # --run.tta: beside the plain score; the best checkpoint is still chosen by the plain one
                record[f"{eval_name}_acc_tta"] = res["acc_tta"]
            candidates = [(res["acc"], model, "model")]
            if ema is not None:
                ema_res = evaluate(ema.module, eval_loader, eval_tf, device, amp_dtype, num_classes, dist)
                record[f"{eval_name}_acc_ema"] = ema_res["acc"]
                candidates.append((ema_res["acc"], ema.module, "ema"))
            acc, best_model, which = max(candidates, key=lambda c: c[0])
            if acc > best and main:
                best = acc
                ckpt.save_model(run_dir / ckpt.WEIGHTS, best_model,
                                {**meta, "epoch": epoch + 1, f"{eval_name}_acc": acc, "weights": which})
            best = max(best, acc)
            record["eval_time"] = time.time() - t_eval  # scoring (and the EMA's) and the best-weights save
        record["wall_time"] = wall_before + (time.time() - t_run)
        if time_up and epoch + 1 < cfg.run.epochs:
            record["stopped"] = "time_limit"  # the run's last epoch (vitlab ablate counts such a rung as done)
        history.append(record)
        reserve = eval_reserve(history)
        if main:
            append_line(run_dir / "metrics.jsonl", json.dumps(record))
            _plot_curves(history, run_dir / "curves.png", eval_name)
            if tb is not None:
                for k, v in record.items():
                    tb.add_scalar(k, v, epoch + 1)
            ckpt.save_state(run_dir / ckpt.LAST, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema else None, "scaler": scaler.state_dict() if scaler else None,
                "epoch": epoch + 1, "step": step, "best": best, "history": history, "rng": rng_state(),
                "img_size": list(img_size), "num_classes": num_classes,
                "config": to_dict(cfg)})
            msg = (f"epoch {epoch + 1:3d}/{cfg.run.epochs}  loss {record['train_loss']:.4f}  "
                   f"train {record['train_acc']:5.2f}%")
            if f"{eval_name}_acc" in record:
                msg += f"  {eval_name} {record[f'{eval_name}_acc']:5.2f}%"
                if num_classes > 5:  # with five classes or fewer top-5 is 100% by definition
                    msg += f" (top5 {record[f'{eval_name}_top5']:5.2f})"
                if f"{eval_name}_acc_tta" in record:
                    msg += f"  flip-tta {record[f'{eval_name}_acc_tta']:5.2f}%"
                if f"{eval_name}_acc_ema" in record:
                    msg += f"  ema {record[f'{eval_name}_acc_ema']:5.2f}%"
            msg += f"  lr {lr:.2e}  {record['images_per_s']:.0f} img/s  {train_time:.1f}s"
            log(msg)
        if time_up:
            log(f"time limit of {cfg.run.time_limit} min reached after epoch {epoch + 1}")
            break
        if cfg.run.stop_after and epoch + 1 >= cfg.run.stop_after and epoch + 1 < cfg.run.epochs:
            log(f"stopping after epoch {epoch + 1} as asked (--run.stop_after); continue with --resume {run_dir}")
            paused = True
            break

    # -- summary -------------------------------------------------------------------------
    scored = [h for h in history if f"{eval_name}_acc" in h]  # every epoch, or every run.eval_every-th
    if main and history and not scored:  # paused (run.stop_after) before its first evaluation
        log(f"paused after {len(history)} epochs, before the first evaluation (run.eval_every "
            f"{cfg.run.eval_every}); continue with --resume {run_dir}")
    elif main and history:
        # the best as the weights file has it: an epoch's plain or EMA weights, whichever scored higher
        candidates = [(max(h[f"{eval_name}_acc"], h.get(f"{eval_name}_acc_ema", -1.0)), h["epoch"],
                       h.get(f"{eval_name}_acc_ema", -1.0) > h[f"{eval_name}_acc"]) for h in scored]
        top_acc, top_epoch, top_ema = max(candidates, key=lambda t: (t[0], -t[1]))  # a tie: the first, kept
        also = [f"{name} {scored[-1][key]:.2f}%" for name, key in (("flip TTA", f"{eval_name}_acc_tta"),
                                                                  ("EMA", f"{eval_name}_acc_ema")) if key in scored[-1]]
        also = f" ({', '.join(also)})" if also else ""
        total = history[-1]["wall_time"]
        log(f"{'paused' if paused else 'done'}: {len(history)} epochs in {total / 60:.1f} min; "
            f"{'last' if paused else 'final'} {eval_name} acc "
            f"{scored[-1][f'{eval_name}_acc']:.2f}%{also}, best {top_acc:.2f}% (epoch {top_epoch}"
            f"{', EMA weights' if top_ema else ''}; in {ckpt.WEIGHTS}); "
            f"mean {np.mean([h['images_per_s'] for h in history]):.0f} img/s; run dir {run_dir}")
    if data.val is not None and main and scored and not paused:  # (a paused run is scored when it ends)
        t_test = time.time()
        best_model, _ = ckpt.load_model(run_dir / ckpt.WEIGHTS, map_location=device)
        test_loader = make_loader(data.test, max(local_batch, 256), train=False, seed=cfg.run.seed, device=device,
                                  img_size=img_size, num_workers=workers, on_corrupt=cfg.data.on_corrupt)
        opened.append(test_loader)
        res = evaluate(best_model, test_loader, eval_tf, device, amp_dtype, num_classes)
        secs = time.time() - t_test
        top5 = f"top5 {res['top5']:.2f}%; " if num_classes > 5 else ""
        log(f"test accuracy of the best-by-val weights: {res['acc']:.2f}% ({top5}{res['n']} images in {secs:.0f} s)")
        atomic_write_text(run_dir / "test.json", json.dumps({"acc": res["acc"], "top5": res["top5"],
                                                            "loss": res["loss"], "n": res["n"], "seconds": secs}))
    shutdown(dist)
    return run_dir


def eval_split_count(split) -> int:
    return len(split.labels)


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter  # (imported once already, before the run began)

    return SummaryWriter(str(run_dir / "tb"))


def _plot_curves(history: list[dict], path: Path, eval_name: str) -> None:
    """curves.png: loss, accuracy and learning rate per epoch, redrawn every epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_write

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ev = [(h["epoch"], h) for h in history if f"{eval_name}_loss" in h]
    if ev:
        axes[0].plot([e for e, _ in ev], [h[f"{eval_name}_loss"] for _, h in ev], label=eval_name)
        axes[1].plot([e for e, _ in ev], [h[f"{eval_name}_acc"] for _, h in ev], label=eval_name)
        if any(f"{eval_name}_acc_ema" in h for _, h in ev):
            axes[1].plot([e for e, _ in ev], [h.get(f"{eval_name}_acc_ema", math.nan) for _, h in ev], label="EMA")
    axes[1].plot(ep, [h["train_acc"] for h in history], label="train", alpha=0.6)
    axes[2].plot(ep, [h["lr"] for h in history])
    for ax, title in zip(axes, ["loss", "accuracy (%)", "learning rate (end of epoch)"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
