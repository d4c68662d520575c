"""`vitlab demo`: a short from-scratch training run on random data.

It proves the install (model, AdamW, bf16 autocast where the CPU has it)
in seconds; `vitlab train` is the real thing.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .models import count_params, create_model
from .utils import seed_everything


def add_arguments(p):
    p.add_argument("--model", default="vit_tiny_patch4_32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    seed_everything(args.seed)
    model = create_model(args.model)
    h, w = model.img_size
    x = torch.randn(args.batch_size, model.in_chans, h, w)
    y = torch.randint(0, model.num_classes, (args.batch_size,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    print(f"{args.model}: {count_params(model):,} parameters; fitting one random batch for {args.steps} steps")
    t0 = time.perf_counter()
    for step in range(args.steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    dt = time.perf_counter() - t0
    print(f"done: {args.steps * args.batch_size / dt:.0f} images/s")
    return 0
