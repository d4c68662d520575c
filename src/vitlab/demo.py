"""`vitlab demo`: a short from-scratch training run on random data.

It proves the install (model, AdamW, bf16 autocast where the CPU has it)
in seconds: it fails (exit 1) if the loss on the one batch does not fall. `vitlab
train` is the real thing.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .models import count_params, create_model
from .utils import seed_everything


def add_arguments(p):
    p.add_argument("--model", default="vit_tiny_patch4_32", help="a preset (default: vit_tiny_patch4_32)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps on the one batch (default: 20)")
    p.add_argument("--batch-size", type=int, default=64, help="images in the batch (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights and the batch (default: 0)")


def run(args) -> int:
    from .errors import RunFailed, UserError
    from .train.engine import resolve_precision

    if args.steps < 2 or args.batch_size < 1:
        raise UserError(f"--steps must be at least 2 and --batch-size positive, got {args.steps} / {args.batch_size}")
    seed_everything(args.seed)
    model = create_model(args.model)
    h, w = model.img_size
    x = torch.randn(args.batch_size, model.in_chans, h, w)
    y = torch.randint(0, model.num_classes, (args.batch_size,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    bf16 = resolve_precision("auto", torch.device("cpu"))[0] is not None  # as vitlab train's default decides
    print(f"{args.model}: {count_params(model):,} parameters; fitting one random batch for {args.steps} steps "
          f"({'bf16 autocast' if bf16 else 'fp32'})")
    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {losses[-1]:.4f}")
    dt = time.perf_counter() - t0
    print(f"done: {args.steps * args.batch_size / dt:.0f} images/s")
    # memorising one batch is the least a working install does; a loss that does not fall is a fault
    if not losses[-1] < losses[0]:
        raise RunFailed(f"the loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f}): the install is not "
                        f"training correctly")
    print(f"ok: the loss fell from {losses[0]:.4f} to {losses[-1]:.4f}")
    return 0
