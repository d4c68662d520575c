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


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float,
                    ns_dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer:
    """ns_dtype: the dtype of Muon's Newton-Schulz matmuls (bf16 where the run computes in bf16)."""
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
        return adamw(groups, lr, (cfg.beta1, cfg.beta2))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               foreach=True)
    if cfg.name == "muon":
        return MuonAdamW(model, groups, lr=lr, betas=(cfg.beta1, cfg.beta2), momentum=cfg.muon_momentum,
                         ns_dtype=ns_dtype)
    raise UserError(f"unknown optimizer {cfg.name!r}; choose adamw, sgd or muon")


def adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with its fused kernel where every parameter's device has one, else the foreach kernels."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **{"fused" if fused else "foreach": True})


def muon_params(model: nn.Module) -> set[int]:
    """The parameters Muon updates: the weight matrices inside the transformer blocks (qkv, proj,
    fc1, fc2). The patch/conv embedding, the tokens, the head and every 1-D tensor stay on AdamW,
    as Muon's authors advise: orthogonalising the update suits hidden linear maps, not an
    input embedding or a classifier whose rows are the classes."""
    return {id(p) for name, p in model.named_parameters() if p.ndim == 2 and name.startswith("blocks.")}


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Newton-Schulz approximation of U V^T for a stack of wide matrices G = U S V^T, (k, m, n), m <= n.

    Jordan et al.'s quintic iteration: it pushes every singular value into roughly [0.7, 1.2] in
    five steps rather than exactly to 1, which trains as well, and it is accurate enough in bf16
    (the authors' choice; a fast matmul on GPUs and on CPUs with AMX). On the wide orientation the
    Gram matrices are the small (m, m) ones; baddbmm folds each step's scalar terms into the
    matmuls (1.6x faster than separate ops on this CPU).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (k, m, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + poly @ x
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, then the update matrix orthogonalised.

    Written here rather than using torch.optim.Muon because that one orthogonalises matrix by
    matrix; the blocks' matrices come in a few shapes (qkv, proj, fc1, fc2, once per block), so
    stacking each shape and running Newton-Schulz batched cuts the optimizer's kernel count about
    depth-fold, which is what a small model's CPU step notices. The step for a matrix of shape
    (A, B) is lr * 0.2 * sqrt(max(A, B)) * orthogonalize(update) (Moonshot's scaling: the update's
    RMS matches AdamW's, so AdamW's lr and weight decay carry over); decoupled weight decay as AdamW.
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype  # not a group setting: it follows the run's precision, not its checkpoint
        for group in self.param_groups:
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(st["momentum_buffer"])
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=mu)  # Nesterov: g + mu * buf
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            # one batched orthogonalisation per wide shape: a tall matrix goes in transposed
            # (fc1's (256, 128) stacks with fc2's (128, 256)), and comes out transposed back
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, u in enumerate(updates):
                by_shape.setdefault((min(u.shape), max(u.shape)), []).append(i)
            for (m, n), idx in by_shape.items():
                wide = [updates[i].mT if updates[i].shape[0] > updates[i].shape[1] else updates[i] for i in idx]
                ortho = orthogonalize(torch.stack(wide), group["ns_steps"], dtype=self.ns_dtype).unbind(0)
                ortho = [o.mT if updates[i].shape[0] > updates[i].shape[1] else o for o, i in zip(ortho, idx)]
                torch._foreach_add_([params[i] for i in idx], ortho, alpha=-lr * 0.2 * math.sqrt(n))


class MuonAdamW:
    """Muon (Jordan et al. 2024: SGD-momentum whose update matrix is orthogonalised by five
    Newton-Schulz steps) for the blocks' matrices, AdamW for everything else, behind one optimizer
    interface, so the engine's schedule, clipping, scaler and checkpoints treat it as one.

    Muon's step is scaled with Moonshot's rule (0.2 * sqrt(max(rows, cols))) so its update has the
    RMS of an AdamW update: the lr and weight decay tuned for AdamW carry over unchanged. The groups
    are param_groups()' decay/no-decay (and per-layer) groups, each split in two; they keep their
    names and lr_scale, and `param_groups` lists them all, so setting the lr sets both.
    """

    def __init__(self, model: nn.Module, groups: list[dict], lr: float, betas: tuple[float, float], momentum: float,
                 ns_dtype: torch.dtype = torch.float32):
        ortho = muon_params(model)
        adam_groups, muon_groups = [], []
        for g in groups:
            rest = {k: v for k, v in g.items() if k != "params"}
            mats = [p for p in g["params"] if id(p) in ortho]
            others = [p for p in g["params"] if id(p) not in ortho]
            if others:
                adam_groups.append({**rest, "params": others})
            if mats:
                muon_groups.append({**rest, "params": mats, "name": rest["name"] + "_muon"})
        if not muon_groups:
            raise UserError("optim.name muon: this model has no trainable transformer-block weight matrices "
                            "for Muon to update (none, or frozen); use adamw")
        self.adamw = adamw(adam_groups, lr, betas) if adam_groups else None
        self.muon = Muon(muon_groups, lr=lr, momentum=momentum, ns_dtype=ns_dtype)
        self.optimizers = [o for o in (self.adamw, self.muon) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        # read afresh each time: load_state_dict gives the inner optimizers new group dicts, and an
        # lr written into a list kept from before would no longer reach them (a resumed run's schedule)
        return [g for o in self.optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict() if self.adamw else None, "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"adamw", "muon"}:
            raise ValueError("not a MuonAdamW optimizer state (was the run trained with another optim.name?)")
        if self.adamw:
            self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


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
