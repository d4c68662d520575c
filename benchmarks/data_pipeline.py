"""How much of a training step does the augmentation pipeline cost?

Times the CIFAR recipe (padded random crop + flip + RandAugment(2, 9) + Mixup/CutMix
+ random erasing + normalisation) on uint8 batches of 32x32 RGB images, op by op and
as the whole train transform, then a ViT-Tiny (vit_tiny_patch4_32) training step
(forward at `vitlab train`'s default precision, soft-target cross-entropy, backward,
AdamW) in the same process on the same threads, and prints the pipeline's share of
the step.
Target: under 5%.

    python benchmarks/data_pipeline.py --out results/data_pipeline.json
    python benchmarks/data_pipeline.py --iters 2 --steps 1      # smoke test

Each figure is the median over --iters (pipeline) or --steps (model) timed repeats
after --warmup untimed ones.
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import vitlab
from vitlab.bench import machine
from vitlab.cli import Parser
from vitlab.config import AugConfig
from vitlab.data import DatasetInfo, TensorSplit, build_train_transform, make_loader, make_shapes
from vitlab.data import augment as A
from vitlab.data.mix import Mixer
from vitlab.utils import make_dir, tune_allocator, write_json

RECIPE = AugConfig(crop_padding=4, pad_mode="reflect", hflip=0.5, randaugment_n=2, randaugment_m=9,
                   mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5, erasing=0.25)
INFO = DatasetInfo("cifar10-like", 10, [str(i) for i in range(10)], 3, (32, 32),
                   (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def median_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=30, help="timed repeats of each pipeline measurement")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--model", default="vit_tiny_patch4_32")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.out:  # a bad --out is one line now, not after the timing
        make_dir(Path(args.out).parent)
    tune_allocator()  # as every `vitlab` command does
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.batch_size
    images, labels, _ = make_shapes(max(B * 4, 512), seed=0)  # realistic uint8 pictures, not noise
    labels = labels % 10
    x, y = images[:B], labels[:B]
    g = torch.Generator().manual_seed(0)
    xf = A.to_float(A.hflip(A.random_crop(x, (32, 32), 4, g), 0.5, g))
    xn = A.normalize(xf, INFO.mean, INFO.std)
    mixer = Mixer(RECIPE.mixup_alpha, RECIPE.cutmix_alpha, RECIPE.mix_prob, RECIPE.switch_prob, 10)
    loader = make_loader(TensorSplit(images, labels), B, train=True, seed=0, device="cpu")
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    it, wu = args.iters, args.warmup
    rows = [
        ("loader: index a batch", median_ms(next_batch, it, wu)),
        ("random crop (pad 4, reflect)", median_ms(lambda: A.random_crop(x, (32, 32), 4, g, "reflect"), it, wu)),
        ("horizontal flip", median_ms(lambda: A.hflip(x, 0.5, g), it, wu)),
        ("uint8 -> float", median_ms(lambda: A.to_float(x), it, wu)),
        ("RandAugment n=2 m=9", median_ms(lambda: A.rand_augment(xf, 2, 9, g), it, wu)),
        ("normalise", median_ms(lambda: A.normalize(xf, INFO.mean, INFO.std), it, wu)),
        ("random erasing p=0.25", median_ms(lambda: A.random_erasing(xn, 0.25, g), it, wu)),
        ("Mixup/CutMix", median_ms(lambda: mixer(xn, y, g), it, wu)),
    ]
    tf = build_train_transform(RECIPE, INFO, (32, 32), 10)
    pipeline_ms = median_ms(lambda: tf(*next_batch(), g), it, wu)  # loader + whole transform

    model = vitlab.create_model(args.model, num_classes=10)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    xb, tb = tf(x, y, g)

    from vitlab.train.engine import autocast, resolve_precision

    amp_dtype, precision = resolve_precision("auto", torch.device("cpu"))

    def step():
        with autocast(torch.device("cpu"), amp_dtype):
            loss = F.cross_entropy(model(xb), tb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_ms = median_ms(step, args.steps, max(1, wu))
    share = pipeline_ms / (pipeline_ms + step_ms)

    print(f"data pipeline, batch {B}, on {machine()}")
    print(f"{'part':34s} {'ms/batch':>9s} {'images/s':>10s}")
    for name, ms in rows:
        print(f"{name:34s} {ms:9.2f} {B / ms * 1000:10.0f}")
    print(f"{'loader + whole train transform':34s} {pipeline_ms:9.2f} {B / pipeline_ms * 1000:10.0f}")
    print(f"{args.model + ' train step':34s} {step_ms:9.2f} {B / step_ms * 1000:10.0f}   ({precision})")
    print(f"pipeline share of (pipeline + step): {100 * share:.1f}%  (target < 5%)")

    if args.out:
        result = dict(date=str(date.today()), machine=machine(),
                      command="python benchmarks/data_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      precision=precision, batch_size=B, threads=torch.get_num_threads(), torch=torch.__version__, model=args.model,
                      iters=args.iters, steps=args.steps, ops_ms={n: round(ms, 3) for n, ms in rows},
                      pipeline_ms=round(pipeline_ms, 3), pipeline_images_per_s=round(B / pipeline_ms * 1000, 1),
                      step_ms=round(step_ms, 3), share=round(share, 4), target_share=0.05,
                      recipe={k: getattr(RECIPE, k) for k in RECIPE.__dataclass_fields__})
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "data_pipeline.py")
