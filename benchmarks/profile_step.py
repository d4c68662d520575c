"""Where a vitlab training step spends its time on this machine: torch.profiler's operator table.

    python benchmarks/profile_step.py                                   # ViT-Tiny CIFAR, batch 128, bf16
    python benchmarks/profile_step.py --precision fp32 --model vit_mini_patch4_32 --batch-size 64
    python benchmarks/profile_step.py --compile     # the compiled step, inductor's kernels by name
    python benchmarks/profile_step.py --frozen      # inference: the frozen copy `vitlab eval` scores with

The eager step (forward under autocast, cross-entropy, backward, the engine's AdamW), or with
--compile the step `vitlab train` runs on a long run (torch.compile; each of inductor's generated
kernels appears in the table under its own name), warmed up, then profiled over --steps steps.
With --frozen, a forward pass of the frozen, compiled copy with weights in --precision
(vitlab.train.inference), profiled over 10 x --steps calls.
Prints the operators by self time and writes the table, the matmul share and its achieved rate
to --out (text and JSON).
"""

from __future__ import annotations

import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from vitlab.bench import arch_of, machine, vit_flops
from vitlab.cli import Parser
from vitlab.config import OptimConfig
from vitlab.models import create_model
from vitlab.train.optim import build_optimizer
from vitlab.utils import atomic_write_text, make_dir, tune_allocator, write_json

# (mkldnn::_linear_pointwise: a frozen graph's Linear, its weight packed once, bias and GELU fused;
# vitlab's operators: the compiled bf16 step's products on vitlab's kernels, with what they fuse in
# their time too: the bias, the MLP's GELU and its derivative, attention's softmax)
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "vitlab::linear_wgrad",
           "vitlab::linear", "vitlab::linear_dgrad", "vitlab::mlp", "vitlab::attention", "vitlab::attention_backward")
CASTS = ("aten::copy_",)


def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch4_32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="profile the torch.compile'd step")
    p.add_argument("--frozen", action="store_true", help="profile inference: the frozen, compiled copy")
    p.add_argument("--out", default="benchmarks/results/profile")
    args = p.parse_args(argv)
    if args.compile and args.frozen:
        p.error("--frozen profiles a compiled copy already: give --compile or --frozen, not both")
    make_dir(args.out)  # a bad --out is one line now, not after minutes of work
    tune_allocator()  # as every `vitlab` command does
    torch.manual_seed(0)
    model = create_model(args.model)
    opt = build_optimizer(model, OptimConfig(), lr=1e-4)
    run_model = model
    if args.compile or args.frozen:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # each generated C++ kernel is a profiler event
        if args.compile:
            run_model = torch.compile(model)
    a = arch_of(args.model)
    x = torch.randn(args.batch_size, a["in_chans"], a["img_size"], a["img_size"])
    y = torch.randint(0, a["num_classes"], (args.batch_size,))
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    calls = args.steps * (10 if args.frozen else 1)

    if args.frozen:
        from vitlab.train.inference import FrozenInference

        frozen = FrozenInference(model.eval(), dtype)

        def step():  # inference: one forward pass of the frozen copy
            frozen(x)
    else:
        def step():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(run_model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):  # with --compile or --frozen the first compiles
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)  # microseconds
    share = {e.key: e.self_cpu_time_total / total for e in events}
    mm_s = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6
    # the FLOPs the model does: its last block for [CLS] alone, unless switched off
    flops = vit_flops(a, not args.frozen, prefix_only=model.prefix_only_last_block) * args.batch_size * calls
    table = events.table(sort_by="self_cpu_time_total", row_limit=20)
    top = sorted(share.items(), key=lambda kv: -kv[1])[:12]
    res = dict(date=str(date.today()), machine=machine(), command=" ".join(["python benchmarks/profile_step.py",
                                 *(argv if argv is not None else sys.argv[1:])]), model=args.model, batch=args.batch_size,
               precision=args.precision, compiled=args.compile, steps=args.steps, frozen=args.frozen, calls=calls,
               images_per_s_profiled=args.batch_size * calls / wall,
               matmul_share=sum(share.get(k, 0) for k in MATMULS), matmul_gflops=flops / mm_s / 1e9,
               cast_share=sum(share.get(k, 0) for k in CASTS), top_self_time_share=dict(top))
    print(table)
    print(f"matmuls {100 * res['matmul_share']:.0f}% of self time at {res['matmul_gflops']:.0f} GFLOP/s; "
          f"copies (dtype casts) {100 * res['cast_share']:.0f}%")
    out = Path(args.out)
    stem = (f"{args.model}-{args.precision}-b{args.batch_size}" + ("-frozen" if args.frozen else "")
            + ("-compiled" if args.compile and not args.frozen else ""))
    print(f"wrote {write_json(out / f'{stem}.json', res)}")
    atomic_write_text(out / f"{stem}.txt", table + "\n")
    return 0


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "profile_step.py")
