"""Which attention kernel vitlab's inference should use on a CPU: explicit softmax(QK^T)V or sdpa.

    python benchmarks/attention_path.py              # inference: four models, three modes; about 15 minutes
    python benchmarks/attention_path.py --modes train_bf16,train_fp32 --pairs 8   # training; about 12

vitlab trains with the explicit path on a CPU (benchmarks/step_anatomy.py: torch's fused backward is
slow there). For inference the choice is open, so each model is timed both ways in three modes:

- frozen: the compiled copy with bf16 weights that `vitlab eval` scores a long job with
  (vitlab.train.inference.FrozenInference);
- eager bf16: the model under bf16 autocast (`vitlab predict`, short jobs);
- eager fp32;
- and, to check the training rule (vitlab always takes the explicit path there), with --modes
  train_bf16,train_fp32: an eager forward and backward under bf16 autocast or in fp32.

The two paths alternate call by call (this host's speed drifts within minutes); the speed-up is the
median of the pairs' time ratios, sdpa / explicit, with its quartiles. Each bf16 mode's logits are
also compared with the fp32 model's (relative error), for both paths. vitlab's rule (Attention._explicit)
is read from the result: explicit where it is faster.

The frozen copy's first call compiles it. Within one process the second path's compile reuses the
first's kernels from inductor's cache, so the compile time is timed apart: the frozen copy's first
call in a fresh process with an empty cache, once per path (--no-cold to skip it).

With --checkpoint RUN, a trained run's test set is also scored both ways, through `vitlab eval`'s
own scoring (vitlab.train.evaluate.score): frozen bf16, eager bf16 and eager fp32, top-1 accuracy and
loss per path, and how many test images the two paths label differently.

    python benchmarks/attention_path.py --checkpoint runs/fm --data-dir ../shared/data/fashion-mnist

Writes benchmarks/results/attention_path.json (--out).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab.bench import alternate, machine, speedup
from vitlab.cli import Parser
from vitlab.errors import RunFailed
from vitlab.models import create_model
from vitlab.models.vit import Attention
from vitlab.train.inference import FrozenInference
from vitlab.utils import make_dir, tune_allocator, write_json

# (label, preset, image size, batch): tokens from 65 to 577
CASES = {
    "tiny32": ("ViT-Tiny CIFAR (65 tokens), batch 128", "vit_tiny_patch4_32", 32, 128),
    "small224": ("ViT-S/16 224 (197 tokens), batch 32", "vit_small_patch16_224", 224, 32),
    "base224": ("ViT-B/16 224 (197 tokens), batch 16", "vit_base_patch16_224", 224, 16),
    "small384": ("ViT-S/16 384 (577 tokens), batch 8", "vit_small_patch16_224", 384, 8),
}
MODES = ("frozen", "eager_bf16", "eager_fp32", "train_bf16", "train_fp32")
INFERENCE = MODES[:3]  # the default


def with_path(model: torch.nn.Module, path: str) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, Attention):
            m.path = path
    return model


def runner(model: torch.nn.Module, mode: str):
    """A call that runs the batch in `mode` and returns the logits in fp32: inference, or training
    (an eager forward and backward)."""
    if mode.startswith("train"):
        model.train()
        target = torch.zeros(1, dtype=torch.long)

        def train(x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "train_bf16"):
                out = model(x).float()
            F.cross_entropy(out, target.expand(x.shape[0])).backward()
            model.zero_grad(set_to_none=True)
            return out.detach()
        return train
    if mode == "frozen":
        frozen = FrozenInference(model, torch.bfloat16)

        def run(x):
            out = frozen(x)
            if frozen.note:  # it fell back to eager: these would not be the frozen copy's times
                raise RunFailed(f"the frozen copy did not compile: {frozen.note}")
            return out
        return run

    def eager(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "eager_bf16"):
            return model(x).float()
    return eager


def one_case(preset: str, img: int, batch: int, pairs: int, modes=INFERENCE, log=print) -> dict:
    torch.manual_seed(0)
    base = create_model(preset, img_size=img).eval()
    x = torch.randn(batch, 3, img, img)
    with torch.inference_mode():
        ref = with_path(base, "sdpa")(x).float()  # fp32, the reference for the bf16 modes' error
    res = {}
    for mode in modes:
        fns = {}
        for p in ("explicit", "sdpa"):
            fns[p] = runner(with_path(copy.deepcopy(base), p), mode)
        err = {}
        for p, fn in fns.items():  # warm-up (the frozen copy compiles on its first call) and accuracy
            t0 = time.perf_counter()
            out = fn(x)
            first = time.perf_counter() - t0
            fn(x)
            err[p] = ((out - ref).norm() / ref.norm()).item()
            log(f"    {mode:10s} {p:8s} first call {first:5.1f} s, logits vs fp32: {100 * err[p]:.2f}% relative error")
        times = alternate({p: functools.partial(fn, x) for p, fn in fns.items()}, pairs)
        med, q = speedup(times, "explicit", "sdpa")
        rate = {p: batch / statistics.median(t) for p, t in times.items()}
        res[mode] = dict(images_per_s=rate, explicit_speedup=med, speedup_quartiles=q, logits_rel_error=err)
        log(f"  {mode:10s} explicit {rate['explicit']:7.1f} img/s, sdpa {rate['sdpa']:7.1f} img/s: explicit "
            f"{med:.3f}x (quartiles {q[0]:.3f}-{q[1]:.3f}, {pairs} pairs)")
    return res


def cold_first_call(case: str, path: str) -> float:
    """Seconds of the frozen copy's first call (the compile) in a fresh process, empty inductor cache."""
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, __file__, "--first-call", case, path], text=True,
                             capture_output=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RunFailed(f"the compile-time child process ({case}, {path}) failed: {last}")
    return float(out.stdout.split()[-1])


def first_call(case: str, path: str) -> None:
    _, preset, img, batch = CASES[case]
    frozen = FrozenInference(with_path(create_model(preset, img_size=img).eval(), path), torch.bfloat16)
    x = torch.randn(batch, 3, img, img)
    t0 = time.perf_counter()
    frozen(x)
    print(time.perf_counter() - t0)


def score_run(checkpoint: str, data_dir: str | None, log=print) -> dict:
    """A trained run's test set scored with each path and mode: accuracy, loss, and how far apart
    the two paths' confusion matrices are (half their L1 distance: at least that many images got
    another label)."""
    from vitlab.train.checkpoint import load_model, resolve_weights
    from vitlab.train.evaluate import data_config_for, score

    model, meta = load_model(resolve_weights(checkpoint))
    cfg = data_config_for(meta, None, data_dir)
    res = {}
    for mode, precision, compile in (("frozen", "bf16", True), ("eager_bf16", "bf16", False),
                                     ("eager_fp32", "fp32", False)):
        conf, res[mode] = {}, {}
        for path in ("explicit", "sdpa"):
            r, *_ = score(with_path(model, path), meta, cfg, "test", precision=precision, compile=compile)
            conf[path] = r["confusion"]
            res[mode][path] = dict(acc=r["acc"], loss=r["loss"], n=r["n"])
            log(f"  {mode:10s} {path:8s} top-1 {r['acc']:.2f}%  loss {r['loss']:.4f}  ({r['n']} images)")
        moved = int((conf["explicit"] - conf["sdpa"]).abs().sum().item()) // 2
        res[mode]["relabelled_at_least"] = moved
        log(f"  {mode:10s} at least {moved} test images labelled differently by the two paths")
    with_path(model, "auto")
    return res


def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--modes", default=",".join(INFERENCE), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--pairs", type=int, default=12, help="alternating call pairs per mode")
    p.add_argument("--no-cold", action="store_true", help="skip the compile times in fresh processes")
    p.add_argument("--checkpoint", metavar="RUN_DIR_OR_FILE", help="also score this run's test set both ways")
    p.add_argument("--data-dir", help="its data root (default: the run's)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--first-call", nargs=2, help=argparse.SUPPRESS)  # (the cold compile's child process)
    args = p.parse_args(argv)
    make_dir(args.out)  # a bad --out is one line now, not after minutes of work
    if args.first_call:
        tune_allocator()
        first_call(*args.first_call)
        return 0
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not (cases or args.checkpoint):
        p.error(f"unknown case {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes takes a comma-separated list from {', '.join(MODES)}; got {args.modes!r}")
    if args.pairs < 2:
        p.error("--pairs must be 2 or more (the quartiles need two)")
    if args.data_dir and not args.checkpoint:
        p.error("--data-dir is the data of --checkpoint's run: give --checkpoint too")
    if args.checkpoint:
        from vitlab.train.checkpoint import resolve_weights

        resolve_weights(args.checkpoint)  # a missing run or data fails now, not after the timings
        if args.data_dir and not Path(args.data_dir).is_dir():
            p.error(f"--data-dir {args.data_dir} is not a directory")
    tune_allocator()  # as every `vitlab` command does
    print(f"attention path on a CPU (explicit or sdpa), on {machine()}")
    res = dict(date=str(date.today()), machine=machine(),
               command=shlex.join(["python", "benchmarks/attention_path.py", *(argv if argv is not None else sys.argv[1:])]),
               cases={})
    for c in cases:
        label, preset, img, batch = CASES[c]
        print(f"{label}:")
        res["cases"][c] = dict(label=label, preset=preset, img_size=img, batch=batch,
                               **one_case(preset, img, batch, args.pairs, modes))
        if not args.no_cold and "frozen" in modes:
            cold = {path: cold_first_call(c, path) for path in ("explicit", "sdpa")}
            res["cases"][c]["frozen"]["cold_first_call_s"] = cold
            print(f"  frozen copy's first call, fresh process and cache: explicit {cold['explicit']:.1f} s, "
                  f"sdpa {cold['sdpa']:.1f} s")
    if args.checkpoint:
        print(f"{args.checkpoint}, test set:")
        res["run"] = dict(checkpoint=args.checkpoint, **score_run(args.checkpoint, args.data_dir))
    out = write_json(Path(args.out) / "attention_path.json", res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "attention_path.py")
