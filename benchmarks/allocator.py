"""What vitlab's allocator setting (vitlab.utils.tune_allocator) buys on this machine.

Every `vitlab` command raises glibc's mmap and trim thresholds before it starts, so the activation
buffers a step frees are reused instead of being handed back to the kernel and faulted in again.
This script measures it: each workload runs in a fresh child process, once with the setting and once
without (VITLAB_TUNE_MALLOC=0), the two alternating pair by pair so that the machine's drift moves
both alike; the figures are medians over the pairs.

    python benchmarks/allocator.py                        # about 5 minutes
    python benchmarks/allocator.py --pairs 1 --steps 2     # smoke test

Workloads (their time is measured inside the child, after imports and a warm-up call):
  tiny_train  ViT-Tiny CIFAR (vit_tiny_patch4_32) training step, batch 128, bf16 autocast where
              the CPU has fast bf16 (as `vitlab train` picks), the engine's AdamW
  tiny_infer  the same model's inference, batch 128
  mini_train  the Fashion-MNIST preset's hybrid model (vit_mini_convstem_patch8_32), batch 64, in
              the same precision, not compiled
Writes benchmarks/results/allocator.json (--out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from vitlab.cli import Parser

WORKLOADS = ("tiny_train", "tiny_infer", "mini_train")


def child(workload: str, steps: int) -> dict:
    """Runs in the child: the setting (unless the environment turns it off), then the workload."""
    import torch
    import torch.nn.functional as F

    from vitlab.bench import default_precision
    from vitlab.config import OptimConfig
    from vitlab.models import create_model
    from vitlab.train.optim import build_optimizer
    from vitlab.utils import tune_allocator

    tuned = tune_allocator()  # before the workload's first tensor (torch's import allocates little)
    torch.manual_seed(0)
    dtype, _ = default_precision()
    name, batch, chans = (("vit_mini_convstem_patch8_32", 64, 1) if workload == "mini_train"
                          else ("vit_tiny_patch4_32", 128, 3))
    model = create_model(name, in_chans=chans)
    x, y = torch.randn(batch, chans, 32, 32), torch.randint(0, 10, (batch,))
    ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else contextlib.nullcontext
    if workload == "tiny_infer":
        model.eval()

        def call():
            with torch.inference_mode(), ctx():
                model(x)
    else:
        opt = build_optimizer(model, OptimConfig(), lr=1e-4)

        def call():
            with ctx():
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    call()  # the first call builds oneDNN's kernels; not timed
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(steps):
        call()
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return dict(tuned=tuned, images_per_s=steps * batch / seconds, faults_per_step=faults / steps,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_child(workload: str, steps: int, tuned: bool) -> dict:
    env = dict(os.environ, VITLAB_TUNE_MALLOC="1" if tuned else "0")
    out = subprocess.run([sys.executable, __file__, "--child", workload, "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"allocator.py: the {workload} child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5, help="child pairs (tuned, untuned) per workload")
    p.add_argument("--steps", type=int, default=None, help="timed calls per child (default: per workload)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps or 10)))
        return 0
    if args.pairs < 1 or (args.steps is not None and args.steps < 1):
        p.error("--pairs and --steps must be positive")
    from vitlab.bench import machine

    steps = {"tiny_train": 15, "tiny_infer": 60, "mini_train": 150}
    res = {"date": str(date.today()), "machine": machine(),
           "command": " ".join(["python benchmarks/allocator.py", *(sys.argv[1:] if argv is None else argv)]),
           "workloads": {}}
    for w in WORKLOADS:
        n = args.steps or steps[w]
        runs = {"tuned": [], "untuned": []}
        for i in range(args.pairs):
            # alternate which runs first, so neither side always follows the other
            order = (True, False) if i % 2 == 0 else (False, True)
            for tuned in order:
                runs["tuned" if tuned else "untuned"].append(run_child(w, n, tuned))
            ratio = runs["tuned"][-1]["images_per_s"] / runs["untuned"][-1]["images_per_s"]
            print(f"  {w} pair {i + 1}/{args.pairs}: tuned/untuned {ratio:.2f}x", flush=True)
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("images_per_s", "faults_per_step", "peak_rss_mib")}
               for k, v in runs.items()}
        ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs["tuned"], runs["untuned"])]
        res["workloads"][w] = dict(steps=n, median=med, pair_ratios=ratios, median_ratio=statistics.median(ratios),
                                   tuned_took=all(r["tuned"] for r in runs["tuned"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocator.json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n| workload | images/s, tuned | images/s, glibc default | speed-up (median of pairs) | "
          "page faults per step, tuned / default | peak RSS, tuned / default |\n|---|---:|---:|---:|---:|---:|")
    for w, r in res["workloads"].items():
        t, u = r["median"]["tuned"], r["median"]["untuned"]
        print(f"| {w} | {t['images_per_s']:.0f} | {u['images_per_s']:.0f} | {r['median_ratio']:.2f}x | "
              f"{t['faults_per_step']:.0f} / {u['faults_per_step']:.0f} | "
              f"{t['peak_rss_mib']:.0f} / {u['peak_rss_mib']:.0f} MiB |")
    print(f"\n_{res['date']}, {res['machine']}; command: `{res['command']}`_")
    print(f"wrote {out / 'allocator.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
