"""Choose the Fashion-MNIST preset: many candidate recipes, each at the epoch count it
would fit in the CPU budget, trained side by side (one process each) on a GPU.

A 15-minute CPU run allows one try per quarter hour; a GPU runs many side by side
(on an H200, ten at once took about 14 s per epoch each, twelve about 22-25 s: these tiny
models are bound by Python and kernel launches, not by the GPU, and torch.compile does not
help there, hence --compile false; a 25-epoch try takes 6-10 minutes). What carries over from GPU to CPU is the recipe at a
fixed number of epochs: the same code, batch, learning rate and schedule (fp32 on
both), so the accuracy after E epochs is the same in distribution. E for each
candidate is the number of epochs the dev CPU trains in the budget, measured with
`--measure` on that CPU (a bare training step, batch 64, against the plain patch-7
model, which fits 25 epochs in 15 minutes there: benchmarks/results/fashion_mnist_plain-seed0.json).
The winner is then run for real on the CPU by benchmarks/fashion_mnist.py.

    python benchmarks/fashion_mnist_sweep.py --measure                 # on the CPU: img/s per candidate
    python benchmarks/fashion_mnist_sweep.py --data-dir DIR --device cuda --jobs 8
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
import traceback
from datetime import date
from pathlib import Path

from vitlab.cli import Parser
from vitlab.utils import atomic_write_text, make_dir, tune_allocator, write_json

MINI = dict(embed_dim=128, depth=4, num_heads=4, mlp_dim=256, in_chans=1, num_classes=10)
HYBRID = dict(MINI, img_size=32, patch_size=8, conv_stem=(32, 64))  # the preset's model (rounds 3 and 4)

# name -> (model kwargs, config overrides, CPU training speed relative to plain_p7_28, from --measure
# on the dev CPU, rounded down where repeated measurements disagreed: host speed drifts 10-30%)
CANDIDATES: dict[str, tuple[dict, dict, float]] = {
    # plain ViTs
    "plain_p7_28": (dict(MINI, img_size=28, patch_size=7), {}, 1.0),
    "plain_p4_28": (dict(MINI, img_size=28, patch_size=4), {}, 0.39),
    "plain_p4_28_d96x6": (dict(MINI, img_size=28, patch_size=4, embed_dim=96, depth=6, mlp_dim=192), {}, 0.4),
    # hybrids: a conv stem before the patch projection (same token grid)
    "hybrid_p8_32_s32-64": (dict(MINI, img_size=32, patch_size=8, conv_stem=(32, 64)), {}, 0.95),
    "hybrid_p8_32_s16-32-64": (dict(MINI, img_size=32, patch_size=8, conv_stem=(16, 32, 64)), {}, 0.95),
    "hybrid_p8_32_s32-64_dp.1": (dict(MINI, img_size=32, patch_size=8, conv_stem=(32, 64)),
                                 {"model.drop_path_rate": 0.1}, 0.95),
    "hybrid_p4_28_s24-48_d64": (dict(MINI, img_size=28, patch_size=4, embed_dim=64, mlp_dim=128,
                                     conv_stem=(24, 48)), {}, 0.85),
    "hybrid_p4_28_s32-64": (dict(MINI, img_size=28, patch_size=4, conv_stem=(32, 64)), {}, 0.45),
    "hybrid_p8_32_s32-64_depth6": (dict(MINI, img_size=32, patch_size=8, depth=6, conv_stem=(32, 64)), {}, 0.75),
    # round 2 (the CPU step is 1.3x faster with run.compile: speeds scaled by 1.3)
    "c_hybrid_p8_32_s32-64": (dict(MINI, img_size=32, patch_size=8, conv_stem=(32, 64)), {}, 1.25),
    "c_hybrid_p8_32_s32-64_erase.25": (dict(MINI, img_size=32, patch_size=8, conv_stem=(32, 64)),
                                       {"aug.erasing": 0.25}, 1.25),
    "c_hybrid_p8_32_s32-64_ema": (dict(MINI, img_size=32, patch_size=8, conv_stem=(32, 64)),
                                  {"run.ema": True, "run.ema_decay": 0.999}, 1.2),
    "c_hybrid_p8_32_s32-64-128": (dict(MINI, img_size=32, patch_size=8, conv_stem=(32, 64, 128)), {}, 1.0),
    # round 3 (2026-11-26): stronger conv stems at equal CPU time; rates here are epochs / 25 with the
    # epochs the dev CPU fits in 15 compiled minutes (the preset's real runs: 29), scaled by --measure-style
    # speed ratios to it (noisy: the host drifts 10-30% between runs)
    "r3_base": (HYBRID, {}, 29 / 25),
    "r3_s32-64-128": (dict(HYBRID, conv_stem=(32, 64, 128)), {}, 21 / 25),
    "r3_s32-64-64s1": (dict(HYBRID, conv_stem=(32, 64, (64, 1))), {}, 19 / 25),
    "r3_s32-64-64s1-128": (dict(HYBRID, conv_stem=(32, 64, (64, 1), 128)), {}, 20 / 25),
    "r3_depth6": (dict(HYBRID, depth=6), {}, 21 / 25),
    "r3_batch128": (HYBRID, {"run.batch_size": 128}, 30 / 25),
    # round 4: recipe knobs on the preset's model, all at 20 epochs (a 10-CPU-minute proxy)
    "r4_base": (HYBRID, {}, 0.8),
    "r4_noclip": (HYBRID, {"optim.clip_grad": 0.0}, 0.8),
    "r4_ls0": (HYBRID, {"optim.label_smoothing": 0.0}, 0.8),
    "r4_avgpool": (dict(HYBRID, global_pool="avg"), {}, 0.8),
    "r4_nocrop": (HYBRID, {"aug.crop_padding": 0}, 0.8),
    "r4_wd.01": (HYBRID, {"optim.weight_decay": 0.01}, 0.8),
    "hybrid_p8_32_s32-64_w192": (dict(MINI, img_size=32, patch_size=8, embed_dim=192, num_heads=4, mlp_dim=384,
                                      conv_stem=(32, 64)), {}, 0.65),
}
BASE_EPOCHS = 25  # plain_p7_28 on the dev CPU: 25 epochs in the 15-minute budget

# The shared recipe: configs/fashion_mnist.yaml's, scheduled by epochs instead of by the clock.
RECIPE = {
    "data.name": "fashion-mnist", "aug.crop_padding": 2, "aug.hflip": 0.5, "aug.mixup_alpha": 0.0,
    "optim.lr": 4e-3, "optim.beta2": 0.98, "optim.label_smoothing": 0.1, "model.pos_embed_init": "sincos",
    "model.drop_path_rate": 0.0, "sched.warmup_epochs": 1, "run.batch_size": 64, "run.precision": "fp32",
}


def epochs_for(rate: float, minutes: float) -> int:
    return max(1, round(BASE_EPOCHS * rate * minutes / 15))


def measure(names) -> None:
    import torch

    from vitlab.bench import time_train
    from vitlab.models.vit import VisionTransformer

    for name in names:
        kw = CANDIDATES[name][0]
        x, y = torch.randn(64, 1, kw["img_size"], kw["img_size"]), torch.randint(0, 10, (64,))
        rate = time_train(VisionTransformer(**kw), x, y, None, steps=30, warmup=5)  # fp32, as the recipe
        print(f"{name:28s} {rate:7.0f} img/s", flush=True)


def run_one(name: str, epochs: int, data_dir: str, device: str, seed: int, out: str, threads: int,
            compile_: str = "auto") -> dict:
    from vitlab.config import build_config, parse_overrides
    from vitlab.models.registry import PRESETS, Preset
    from vitlab.train.engine import train

    kw, extra, _ = CANDIDATES[name]
    PRESETS[f"sweep_{name}"] = Preset("vit", dict(kw))
    overrides = {**RECIPE, **extra, "model.name": f"sweep_{name}", "data.dir": data_dir, "run.device": device,
                 "run.epochs": epochs, "run.seed": seed, "run.out": out, "run.name": f"{name}-seed{seed}",
                 "run.threads": threads, **({} if compile_ == "auto" else {"run.compile": compile_})}
    argv = []
    for k, v in overrides.items():
        argv += [f"--{k}", str(v)]
    cfg = build_config(None, parse_overrides(argv))
    t = time.time()
    run_dir = train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [r["test_acc"] for r in rows if "test_acc" in r]
    return {"name": name, "epochs": epochs, "seed": seed, "final_test_acc": curve[-1], "best_test_acc": max(curve),
            "final_train_acc": rows[-1].get("train_acc"), "curve": curve, "minutes": (time.time() - t) / 60}


def _worker(args):
    name, epochs, data_dir, device, seed, out, threads, compile_ = args
    log = Path(out) / f"{name}-seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    tune_allocator()  # as `vitlab train` does
    with open(log, "w") as f:
        sys.stdout = sys.stderr = f
        try:
            return run_one(name, epochs, data_dir, device, seed, out, threads, compile_)
        except BaseException:
            traceback.print_exc()
            return {"name": name, "epochs": epochs, "seed": seed, "error": traceback.format_exc(limit=3)[-600:]}


def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true", help="time each candidate's training step on this CPU")
    p.add_argument("--only", nargs="*", help="candidate names (default: all)")
    p.add_argument("--data-dir", default="../shared/data/fashion-mnist")
    p.add_argument("--device", default="cuda")
    p.add_argument("--minutes", type=float, default=15, help="the CPU budget each candidate's epochs stand for")
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="CPU threads per job")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                   help="run.compile for every candidate (on a GPU these launch-bound models gain nothing from it)")
    args = p.parse_args(argv)
    make_dir(args.out)  # a bad --out is one line now, not after minutes of work
    names = args.only or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidate(s) {unknown}; known: {list(CANDIDATES)}")
    if args.measure:
        measure(names)
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device here; the sweep is meant for a GPU "
                  "(--device cpu runs it, one 15-minute budget per candidate)", file=sys.stderr)
            return 2
    jobs = [(n, epochs_for(CANDIDATES[n][2], args.minutes), args.data_dir, args.device, s,
             "runs/sweep", args.threads, args.compile) for s in args.seeds for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"fashion_mnist_sweep_{args.minutes:g}min"
    results = []
    with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
        for r in pool.imap_unordered(_worker, jobs):  # each result saved as it lands: a cut-off sweep keeps them
            results.append(r)
            with open(out / f"{tag}.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps({k: r.get(k) for k in ("name", "seed", "epochs", "final_test_acc", "error")}), flush=True)
    lines = [f"| candidate | seed | epochs (= {args.minutes:g} CPU min) | final test acc | best | final train acc |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['seed']} | {r['epochs']} | error | | |")
        else:
            lines.append(f"| {r['name']} | {r['seed']} | {r['epochs']} | {r['final_test_acc']:.2f} | "
                         f"{r['best_test_acc']:.2f} | {r['final_train_acc']} |")
    table = "\n".join(lines)
    print(table)
    record = {"benchmark": "fashion_mnist_sweep", "date": str(date.today()), "device": args.device,
              "minutes": args.minutes, "command": "python benchmarks/fashion_mnist_sweep.py " + " ".join(
                  sys.argv[1:] if argv is None else argv), "recipe": RECIPE, "results": results}
    write_json(out / f"{tag}.json", record)
    atomic_write_text(out / f"{tag}.md", table + "\n")
    return 0


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "fashion_mnist_sweep.py")
