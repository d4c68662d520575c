"""Attention maps of a ViT: per-layer [CLS] attention, rollout, gradient rollout.

Everything here asks the model for its weights per call (`return_attn=True`,
the explicit attention path), so it works on models trained with the fused
SDPA path and needs no hooks and no global switch.

Shapes: B batch, L layers, h heads, N tokens = p prefix tokens ([CLS], and
[DIST] for distilled models) + gh*gw patches.

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in
Transformers"): a block computes x + Attn(x), so the token mixing of layer l
is A_l + I, not A_l alone. Rollout fuses the heads of each layer into one
(N, N) matrix, adds I, re-normalises each row to sum to 1 and multiplies the
layers: R = Ahat_L @ ... @ Ahat_1. Row t of R says how much of token t's
final representation flows from each input token; the [CLS] row restricted to
the patch columns is the map.

Two details that jacobgil/vit-explain gets wrong, and this file does not:
- the row re-normalisation divides by the row sum with keepdim, so each row
  is divided by its own sum (without keepdim, broadcasting divides column j by
  the sum of row j);
- the discard ratio drops the lowest entries per row and never a prefix
  token's column (vit-explain drops them over the whole flattened matrix of
  batch item 0 only, and protects only entry [0, 0]).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..errors import UserError

HEAD_FUSIONS = ("mean", "max", "min")
TOKENS = ("cls", "dist")


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, h, N, N) -> (B, N, N): one mixing matrix per layer."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise UserError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")


def discard_lowest(a: torch.Tensor, discard_ratio: float, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Zero the lowest `discard_ratio` share of each row's patch entries.

    a: (B, N, N), non-negative. The prefix columns (attention *to* [CLS] and
    [DIST]) are never dropped: they carry the global summary every row needs,
    and dropping them would make rollout leak mass unpredictably. Per row,
    k = floor(discard_ratio * (N - p)) of the N - p patch columns are zeroed.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise UserError(f"discard ratio must be in [0, 1), got {discard_ratio}")
    p = num_prefix_tokens
    patches = a[..., p:]  # (B, N, N - p)
    k = int(discard_ratio * patches.shape[-1])
    if k == 0:
        return a
    low = patches.topk(k, dim=-1, largest=False).indices  # (B, N, k)
    patches = patches.scatter(-1, low, 0.0)
    return torch.cat([a[..., :p], patches], dim=-1)  # (B, N, N)


def _exact(t: torch.Tensor) -> torch.Tensor:
    """Detached, in fp32 at least: products over many layers need the mantissa (fp64 stays fp64)."""
    t = t.detach()
    return t if t.dtype == torch.float64 else t.float()


def rollout_matrix(attns: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                   num_prefix_tokens: int = 1, head_weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The full rollout R = Ahat_L @ ... @ Ahat_1, (B, N, N), rows summing to 1.

    attns: one (B, h, N, N) tensor per layer, first layer first, or all layers
        stacked as (B, L, h, N, N) (attention_maps' "attn").
    head_weights: optional per-layer (B, h, N, N) weights (gradients, for
        gradient rollout), listed or stacked as attns; the fused matrix is then
        mean_h(relu(w * attn)).
    """
    attns = _layers(attns, "attns")
    if head_weights is not None:
        head_weights = _layers(head_weights, "head_weights")
        if len(head_weights) != len(attns):
            raise UserError(f"head_weights has {len(head_weights)} layers, attns {len(attns)}")
    if len(attns) == 0:
        raise UserError("rollout needs the attention of at least one layer")
    result = None
    for l, attn in enumerate(attns):
        attn = _exact(attn)  # (B, h, N, N)
        if head_weights is not None:
            # Gradient-weighted: keep only what increases the class score.
            a = (_exact(head_weights[l]) * attn).clamp(min=0).mean(dim=1)  # (B, N, N)
        else:
            a = fuse_heads(attn, head_fusion)  # (B, N, N)
        a = discard_lowest(a, discard_ratio, num_prefix_tokens)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # (N, N)
        a = a + eye  # the residual connection
        a = a / a.sum(dim=-1, keepdim=True)  # each row by its own sum
        result = a if result is None else a @ result  # (B, N, N)
    return result


def _layers(attns, what: str):
    """A stacked (B, L, h, N, N) tensor -> its L layers; a list stays as it is. A lone 4-D tensor is
    refused: iterating it would walk the batch as if it were the layers, silently."""
    if isinstance(attns, torch.Tensor):
        if attns.ndim != 5:
            raise UserError(f"{what} must be a list of (B, h, N, N) tensors, one per layer, or one (B, L, h, N, N) "
                            f"tensor; got a tensor of shape {tuple(attns.shape)}")
        return attns.unbind(1)
    for a in attns:
        if not isinstance(a, torch.Tensor) or a.ndim != 4:
            raise UserError(f"each layer of {what} must be a (B, h, N, N) tensor, got "
                            f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
    return attns


def token_row_to_grid(rows: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """(..., N) attention from one token to all tokens -> (..., gh, gw) over the patches."""
    gh, gw = grid
    patches = rows[..., num_prefix_tokens:]  # (..., gh*gw)
    if patches.shape[-1] != gh * gw:
        raise ValueError(f"{patches.shape[-1]} patch tokens do not fit a {gh}x{gw} grid")
    return patches.reshape(*patches.shape[:-1], gh, gw)


def _token_index(token: str, num_prefix_tokens: int) -> int:
    if token not in TOKENS:
        raise UserError(f"token must be 'cls' or 'dist', got {token!r}")
    if token == "dist" and num_prefix_tokens < 2:
        raise UserError("token 'dist' needs a distilled model (one with a [DIST] token)")
    return TOKENS.index(token)  # [CLS] is token 0, [DIST] token 1


def rollout(attns: Sequence[torch.Tensor], grid: tuple[int, int] | None = None, head_fusion: str = "mean",
            discard_ratio: float = 0.0, num_prefix_tokens: int = 1, token: str = "cls",
            head_weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Attention rollout map of one prefix token over the patches.

    Returns (B, gh, gw) (or (B, N - p) when grid is None). Not normalised for
    display: the values are the token's rollout weights on the patches; the
    rest of the row's unit mass sits on the prefix tokens.
    """
    R = rollout_matrix(attns, head_fusion, discard_ratio, num_prefix_tokens, head_weights)  # (B, N, N)
    row = R[:, _token_index(token, num_prefix_tokens)]  # (B, N)
    if grid is None:
        return row[:, num_prefix_tokens:]
    return token_row_to_grid(row, grid, num_prefix_tokens)  # (B, gh, gw)


def _check_vit(model: nn.Module) -> None:
    if not hasattr(model, "num_prefix_tokens") or not hasattr(model, "patch_embed"):
        raise UserError(f"attention maps need a Vision Transformer, got {type(model).__name__}")


def _class_scores(model: nn.Module, feats: torch.Tensor, token: str) -> torch.Tensor:
    """Logits (B, K) read from the token whose map is drawn.

    For a distilled model the [CLS] map explains the class head and the [DIST]
    map the distillation head; the prediction shown is still DeiT's average.
    """
    if not getattr(model, "distilled", False):
        return model.forward_head(feats)
    cls_logits, dist_logits = model.forward_head(feats, separate=True)
    return cls_logits if token == "cls" else dist_logits


def attention_maps(model: nn.Module, images: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   token: str = "cls", gradient: bool = False, target: torch.Tensor | int | None = None) -> dict:
    """Every map the plots need, as tensors on the CPU, for a batch of images.

    images: (B, C, H, W), normalised as for the model. Any size the model
    accepts; the grid comes from the input, so dynamic-size models work.
    The model is run in eval mode (restored afterwards) so dropout does not
    perturb the weights.

    Returns a dict:
        logits   (B, K)  DeiT's averaged logits for distilled models
        pred     (B,)    argmax of logits
        attn     (B, L, h, N, N) raw softmax weights of every layer
        layers   (B, L, h, gh, gw) `token`'s attention to each patch, per layer and head
        heads    (B, h, gh, gw) the last layer of `layers`
        rollout  (B, gh, gw) attention rollout of `token` over the patches
        grad_rollout (B, gh, gw) only with gradient=True: gradient-weighted
                 rollout for `target` (default: the predicted class)
        target   (B,) only with gradient=True
    """
    model = getattr(model, "module", model)  # DDP wrapper -> the model
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the model
    _check_vit(model)
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        what = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise UserError(f"attention_maps needs a float tensor of images (B, C, H, W) normalised as for the "
                        f"model, got {what}")
    p = model.num_prefix_tokens
    t = _token_index(token, p)
    ph, pw = model.patch_embed.patch_size
    grid = (images.shape[-2] // ph, images.shape[-1] // pw)
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    try:
        if gradient:
            with torch.enable_grad():
                # An input that requires grad keeps the graph alive even for a frozen model.
                images = images.detach().requires_grad_(True)
                feats, attns = model.forward_features(images, return_attn=True)  # weights stay in the graph
                logits = model.forward_head(feats)
                scores = _class_scores(model, feats, token)  # (B, K)
                pred = logits.argmax(dim=-1)
                if target is None:
                    tgt = pred
                else:
                    tgt = torch.as_tensor(target, device=device).long().expand(images.shape[0])
                    if ((tgt < 0) | (tgt >= logits.shape[-1])).any():
                        bad = sorted({t for t in tgt.tolist() if not 0 <= t < logits.shape[-1]})
                        raise UserError(f"target class {bad[0]} is out of range for a model of "
                                        f"{logits.shape[-1]} classes (0 to {logits.shape[-1] - 1})")
                # Samples are independent, so the gradient of the summed target
                # scores gives each sample its own. autograd.grad, not backward():
                # it leaves the parameters' .grad alone (safe mid-training, in a notebook).
                grads = torch.autograd.grad(scores.gather(1, tgt[:, None]).sum(), attns)
        else:
            with torch.no_grad():
                feats, attns = model.forward_features(images, return_attn=True)
                logits = model.forward_head(feats)
            pred = logits.argmax(dim=-1)
    finally:
        model.train(was_training)

    attn = torch.stack([a.detach().float() for a in attns], dim=1)  # (B, L, h, N, N)
    layers = token_row_to_grid(attn[:, :, :, t], grid, p)  # (B, L, h, gh, gw)
    out = {
        "logits": logits.detach().float().cpu(),
        "pred": pred.detach().cpu(),
        "attn": attn.cpu(),
        "layers": layers.cpu(),
        "heads": layers[:, -1].cpu(),
        "rollout": rollout(attns, grid, head_fusion, discard_ratio, p, token).cpu(),
    }
    if gradient:
        out["grad_rollout"] = rollout(attns, grid, head_fusion, discard_ratio, p, token, head_weights=grads).cpu()
        out["target"] = tgt.detach().cpu()
    return out


def gradient_rollout(model: nn.Module, images: torch.Tensor, target: torch.Tensor | int | None = None,
                     discard_ratio: float = 0.0, token: str = "cls") -> torch.Tensor:
    """Class-specific map (B, gh, gw): rollout of relu(dScore/dA * A), head-mean.

    "Why this class": only the attention whose increase would raise the
    target class score counts. target: class index or (B,) indices; default
    the predicted class.
    """
    maps = attention_maps(model, images, discard_ratio=discard_ratio, token=token, gradient=True, target=target)
    return maps["grad_rollout"]


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(..., gh, gw) -> (..., H, W): a patch map over the image's pixels.

    Bilinear with align_corners=False puts each grid value at its patch
    centre, so the map lines up with the image; "nearest" shows patches as blocks.
    """
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()  # (M, 1, gh, gw)
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    x = torch.nn.functional.interpolate(x, size=tuple(size), mode=mode, **kw)  # (M, 1, H, W)
    return x.reshape(*lead, *size)


def normalize_for_display(maps: torch.Tensor) -> torch.Tensor:
    """Scale each (..., H, W) map to [0, 1] by its own min and max (flat maps -> 0)."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    out = (flat - lo) / (hi - lo).clamp(min=1e-12)
    return out.reshape(maps.shape)
