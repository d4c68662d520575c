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

    python benchmarks/allocator.py --peers                # about 10 minutes

asks what a user gets: vitlab's ViT-Tiny step as `vitlab train` runs it (default precision, eager,
the allocator set) against the Hugging Face and textbook ViTs of `vitlab bench` each in a process of
its own, as a user's script would run them (glibc's defaults), pair by pair; allocator_peers.json.
"""

from __future__ import annotations

import argparse
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
from vitlab.utils import make_dir, write_json

WORKLOADS = ("tiny_train", "tiny_infer", "mini_train")


def child(workload: str, steps: int, impl: str = "vitlab", precision: str = "default") -> dict:
    """Runs in the child: the setting (unless the environment turns it off), then the workload.

    impl: vitlab, or (ViT-Tiny only) a peer of `vitlab bench`: hf or textbook, with the bench's
    foreach AdamW; precision: "default" (what `vitlab train` picks), "bf16" or "fp32".
    """
    import torch

    from vitlab.bench import _infer_step, _train_step, arch_of, build, default_precision
    from vitlab.models import create_model
    from vitlab.utils import tune_allocator

    tuned = tune_allocator()  # before the workload's first tensor (torch's import allocates little)
    torch.manual_seed(0)
    dtype = {"default": default_precision()[0], "bf16": torch.bfloat16, "fp32": None}[precision]
    if workload == "mini_train":
        batch, model = 64, create_model("vit_mini_convstem_patch8_32", in_chans=1)
        x = torch.randn(batch, 1, 32, 32)
    else:
        batch, model = 128, build(impl, arch_of("vit_tiny_patch4_32"))
        x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if workload == "tiny_infer":
        model.eval()
        call = _infer_step(model, x, dtype)
    else:
        call = _train_step(model, x, y, dtype, "engine" if impl == "vitlab" else "foreach")
    call()  # the first call builds oneDNN's kernels; not timed
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(steps):
        call()
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return dict(tuned=tuned, images_per_s=steps * batch / seconds, faults_per_step=faults / steps,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_child(workload: str, steps: int, tuned: bool, impl: str = "vitlab", precision: str = "default") -> dict:
    env = dict(os.environ, VITLAB_TUNE_MALLOC="1" if tuned else "0")
    out = subprocess.run([sys.executable, __file__, "--child", workload, "--steps", str(steps), "--impl", impl,
                          "--precision", precision], env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"allocator.py: the {workload} child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


METRICS = ("images_per_s", "faults_per_step", "peak_rss_mib")
STEPS = {"tiny_train": 15, "tiny_infer": 60, "mini_train": 150}
# --peers: vitlab as `vitlab train` runs it (default precision, the allocator set) against each peer of
# `vitlab bench` as a script of its own runs it (glibc's defaults): (label, workload, peer, precision)
PEERS = [("train vs hf bf16", "tiny_train", "hf", "bf16"), ("train vs hf fp32", "tiny_train", "hf", "fp32"),
         ("train vs textbook bf16", "tiny_train", "textbook", "bf16"),
         ("infer vs hf bf16", "tiny_infer", "hf", "bf16"), ("infer vs textbook bf16", "tiny_infer", "textbook", "bf16")]


def paired(label: str, run_a, run_b, pairs: int) -> tuple[list, list]:
    """Alternate two kinds of child, A first in even pairs and B first in odd ones (neither side
    always follows the other); returns both lists of results."""
    ra, rb = [], []
    for i in range(pairs):
        for fn, acc in ((run_a, ra), (run_b, rb)) if i % 2 == 0 else ((run_b, rb), (run_a, ra)):
            acc.append(fn())
        print(f"  {label} pair {i + 1}/{pairs}: {ra[-1]['images_per_s'] / rb[-1]['images_per_s']:.2f}x", flush=True)
    return ra, rb


def summary(ra: list, rb: list, names: tuple[str, str]) -> dict:
    ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(ra, rb)]
    return dict(median={name: {m: statistics.median(r[m] for r in runs) for m in METRICS}
                        for name, runs in zip(names, (ra, rb))},
                pair_ratios=ratios, median_ratio=statistics.median(ratios))


def report(res: dict, path: Path, header: str, rows: list[str]) -> None:
    """Write the record and print its markdown table (the README's) with the provenance line."""
    write_json(path, res)
    print("\n" + "\n".join([header, *rows]))
    print(f"\n_{res['date']}, {res['machine']}; command: `{res['command']}`_")
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5, help="child pairs (tuned, untuned) per workload")
    p.add_argument("--steps", type=int, default=None, help="timed calls per child (default: per workload)")
    p.add_argument("--peers", action="store_true",
                   help="instead: vitlab (allocator set) against the bench's peers in processes of their own "
                        "(glibc's defaults); writes allocator_peers.json")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    p.add_argument("--impl", default="vitlab", choices=["vitlab", "hf", "textbook"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="default", choices=["default", "bf16", "fp32"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    make_dir(args.out)  # a bad --out is one line now, not after minutes of work
    if args.child:
        print(json.dumps(child(args.child, args.steps or 10, args.impl, args.precision)))
        return 0
    if args.pairs < 1 or (args.steps is not None and args.steps < 1):
        p.error("--pairs and --steps must be positive")
    from vitlab.bench import have_transformers, machine

    if args.peers and not have_transformers():
        p.error("--peers times Hugging Face's ViT: pip install transformers")
    res = {"date": str(date.today()), "machine": machine(),
           "command": " ".join(["python benchmarks/allocator.py", *(sys.argv[1:] if argv is None else argv)])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.peers:
        res["comparisons"] = {}
        for label, w, peer, precision in PEERS:
            n = args.steps or STEPS[w]
            ra, rb = paired(label, lambda: run_child(w, n, True), lambda: run_child(w, n, False, peer, precision),
                            args.pairs)
            res["comparisons"][label] = dict(workload=w, steps=n, peer=peer, peer_precision=precision,
                                             **summary(ra, rb, ("vitlab", "peer")))
        rows = [f"| {label} | {r['median']['vitlab']['images_per_s']:.0f} | {r['median']['peer']['images_per_s']:.0f} | "
                f"{r['median_ratio']:.2f}x | {', '.join(f'{x:.2f}' for x in r['pair_ratios'])} |"
                for label, r in res["comparisons"].items()]
        report(res, out / "allocator_peers.json", "| vitlab (default precision, allocator set) | vitlab images/s | "
               "peer images/s | ratio (median of pairs) | pair ratios |\n|---|---:|---:|---:|---|", rows)
        return 0
    res["workloads"] = {}
    for w in WORKLOADS:
        n = args.steps or STEPS[w]
        ra, rb = paired(f"{w} tuned/untuned", lambda: run_child(w, n, True), lambda: run_child(w, n, False),
                        args.pairs)
        res["workloads"][w] = dict(steps=n, **summary(ra, rb, ("tuned", "untuned")),
                                   tuned_took=all(r["tuned"] for r in ra))
    rows = []
    for w, r in res["workloads"].items():
        t, u = r["median"]["tuned"], r["median"]["untuned"]
        rows.append(f"| {w} | {t['images_per_s']:.0f} | {u['images_per_s']:.0f} | {r['median_ratio']:.2f}x | "
                    f"{t['faults_per_step']:.0f} / {u['faults_per_step']:.0f} | "
                    f"{t['peak_rss_mib']:.0f} / {u['peak_rss_mib']:.0f} MiB |")
    report(res, out / "allocator.json", "| workload | images/s, tuned | images/s, glibc default | speed-up (median "
           "of pairs) | page faults per step, tuned / default | peak RSS, tuned / default |\n"
           "|---|---:|---:|---:|---:|---:|", rows)
    return 0


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "allocator.py")
