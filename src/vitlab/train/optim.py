"""Optimiser, learning-rate schedule and weight EMA.

The schedule is a pure function of the step, so resuming needs only the step
counter, and a test can check its value at any step.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from ..config import OptimConfig, ScheduleConfig
from ..errors import UserError


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Decayed matrices/kernels vs everything weight decay should not touch; optionally per layer.

    Biases, norm scales (all 1-D tensors) and the position embedding and
    [CLS]/[DIST] tokens are excluded from decay: decaying them pulls them towards
    zero, which only hurts (the tokens and positions carry no scale to regularise).

    layer_decay < 1 (fine-tuning, BEiT/MAE style) gives each ViT layer its own
    group with `lr_scale = layer_decay ** (depth + 1 - layer)`: the head keeps
    the full rate, block i gets less the deeper it sits, the patch embedding and
    tokens least, so the pretrained early features move least. Frozen
    parameters (requires_grad False) are left out.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    depth = len(getattr(model, "blocks", ()))
    per_layer = layer_decay != 1.0 and depth > 0
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name in skip or name.endswith(".gamma"))
        layer = vit_layer_id(name, depth) if per_layer else depth + 1
        key = (decay, layer)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "name": ("decay" if decay else "no_decay") + (f"_layer{layer}" if per_layer else ""),
                           "lr_scale": layer_decay ** (depth + 1 - layer) if per_layer else 1.0}
        groups[key]["params"].append(p)
    # decayed groups first, then by layer: a stable order, so optimizer state resumes into the same groups
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], k[1]))]


def vit_layer_id(name: str, depth: int) -> int:
    """0 for the embeddings and tokens, i + 1 for blocks.i, depth + 1 for the final norm and heads."""
    if name.startswith(("patch_embed.", "cls_token", "dist_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def effective_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The configured lr is for batch 128; scale linearly (Goyal et al.) unless told not to."""
    return cfg.lr * global_batch / 128 if cfg.scale_lr else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if not 0.0 < cfg.layer_decay <= 1.0:
        raise UserError(f"optim.layer_decay must be in (0, 1], got {cfg.layer_decay}")
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    if not groups:
        raise UserError("nothing to train: every parameter is frozen")
    # AdamW: the fused kernel (one pass over each tensor for the whole update) where the parameters'
    # device has one, instead of the foreach kernels, which SGD and other devices keep. It matters
    # where the optimizer is a visible share of the step: in a short ad-hoc timing it made the
    # Fashion-MNIST preset's small compiled CPU step ~8% faster; on matmul-bound ViT-Tiny the gain
    # is inside the noise (+1.5% and -5% in two runs: benchmarks/throughput.py, the two compiled rows).
    if cfg.name == "adamw":
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), **{"fused" if fused else "foreach": True})
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               foreach=True)
    raise UserError(f"unknown optimizer {cfg.name!r}; choose adamw or sgd")


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, cfg: ScheduleConfig) -> float:
    """Linear warmup from cfg.warmup_lr to base_lr, then cosine down to cfg.min_lr."""
    if step < warmup_steps:
        return cfg.warmup_lr + (base_lr - cfg.warmup_lr) * step / warmup_steps
    if cfg.name == "constant":
        return base_lr
    if cfg.name != "cosine":
        raise UserError(f"unknown schedule {cfg.name!r}; choose cosine or constant")
    span = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, span) / span  # 0 -> 1 over the decay phase
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


class ModelEMA:
    """Exponential moving average of the weights, evaluated alongside the model.

    Buffers (none in a plain ViT; BatchNorm statistics in a ResNet or a hybrid ViT's stem) are copied, not averaged.
    The decay is warmed up, min(decay, (1 + n) / (10 + n)) at the n-th update (counting from 0),
    as TensorFlow's ExponentialMovingAverage does with num_updates: with a fixed 0.999 the
    average of a run shorter than a few thousand steps is still mostly the random
    initialisation (a 400-step run's EMA scored chance on shapes while the model scored 72%).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, n: int) -> None:
        """Fold in the model's weights after optimizer step n (the run's global step: a resumed
        run goes on with the same decays)."""
        ema_p = [p for p in self.module.parameters()]
        cur_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, cur_p, 1.0 - self.decay_at(n))
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
