"""Mixup and CutMix on whole batches, with per-sample mixing weights.

Each image i is mixed with its partner B-1-i (the batch reversed), so no
extra memory is gathered. With probability `mix_prob` a batch is mixed at all;
inside a mixed batch every image draws its own weight lam ~ Beta(alpha, alpha)
and, when both are enabled, its own choice of CutMix (probability
`switch_prob`) or Mixup (timm's "elem" mode). Targets become soft:

    target_i = lam_i * onehot(y_i) + (1 - lam_i) * onehot(y_partner)

For CutMix lam_i is the share of image i that is still its own after the box
was clipped to the image, i.e. the real pixel ratio. Label smoothing is left
to the loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError


def beta(alpha: float, n: int, g: torch.Generator) -> torch.Tensor:
    """(n,) draws of Beta(alpha, alpha) taken from the torch generator `g`.

    torch.distributions.Beta cannot take a generator, so a numpy generator is seeded
    from `g`: the stream stays a pure function of g's state.
    """
    seed = int(torch.randint(2**62, (1,), generator=g, device=g.device))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float()


def cutmix_boxes(lam: torch.Tensor, H: int, W: int, g: torch.Generator):
    """Per-sample boxes of area share (1 - lam), centre uniform over the image, clipped.

    lam: (B,). Returns y0, y1, x0, x1 (B,) int64 (end exclusive) and the actual
    lam after clipping: 1 - box_area / (H * W).
    """
    B = lam.shape[0]
    cut = (1 - lam).sqrt()
    ch, cw = (cut * H).round(), (cut * W).round()
    c = torch.rand(B, 2, generator=g, device=g.device).to(lam.device)
    cy, cx = (c[:, 0] * H).floor(), (c[:, 1] * W).floor()
    y0 = (cy - ch / 2).round().clamp(0, H).long()
    y1 = (cy + ch / 2).round().clamp(0, H).long()
    x0 = (cx - cw / 2).round().clamp(0, W).long()
    x1 = (cx + cw / 2).round().clamp(0, W).long()
    lam_actual = 1 - ((y1 - y0) * (x1 - x0)).float() / (H * W)
    return y0, y1, x0, x1, lam_actual


class Mixer:
    """(x float (B, C, H, W), labels (B,), g) -> (mixed x, int labels or soft targets (B, K))."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, mix_prob: float, switch_prob: float, num_classes: int):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise UserError(f"mixup/cutmix alpha must be >= 0, got {mixup_alpha} / {cutmix_alpha}")
        if not (0 <= mix_prob <= 1 and 0 <= switch_prob <= 1):
            raise UserError(f"aug.mix_prob and aug.switch_prob must be in [0, 1], got {mix_prob} / {switch_prob}")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix_prob, self.switch_prob, self.num_classes = mix_prob, switch_prob, num_classes

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, g: torch.Generator):
        if not self.enabled:
            return x, labels
        # Drawn even when mix_prob is 1, so the stream does not depend on mix_prob.
        if float(torch.rand(1, generator=g, device=g.device)) >= self.mix_prob:
            return x, labels
        B, C, H, W = x.shape
        dev = x.device
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cut = torch.rand(B, generator=g, device=g.device).to(dev) < self.switch_prob
        else:
            use_cut = torch.full((B,), self.cutmix_alpha > 0, device=dev)
        alpha_mix = self.mixup_alpha if self.mixup_alpha > 0 else 1.0
        alpha_cut = self.cutmix_alpha if self.cutmix_alpha > 0 else 1.0
        lam_mix = beta(alpha_mix, B, g).to(dev)  # (B,)
        lam_cut = beta(alpha_cut, B, g).to(dev)
        y0, y1, x0, x1, lam_cut = cutmix_boxes(lam_cut, H, W, g)

        partner = x.flip(0)  # image i pairs with image B-1-i
        # Mixup for the images that drew it; CutMix pastes the partner's box for the others.
        ys = torch.arange(H, device=dev).view(1, H, 1)
        xs = torch.arange(W, device=dev).view(1, 1, W)
        box = ((ys >= y0.view(B, 1, 1)) & (ys < y1.view(B, 1, 1)) & (xs >= x0.view(B, 1, 1))
               & (xs < x1.view(B, 1, 1)) & use_cut.view(B, 1, 1)).unsqueeze(1)  # (B, 1, H, W)
        w = torch.where(use_cut, torch.ones_like(lam_mix), lam_mix).view(B, 1, 1, 1)  # mixup weight of self
        mixed = torch.where(box, partner, torch.lerp(partner, x, w))  # cut images: w = 1 outside the box
        lam = torch.where(use_cut, lam_cut, lam_mix)  # (B,) share of the image's own label

        onehot = F.one_hot(labels, self.num_classes).float()  # (B, K)
        targets = lam.view(B, 1) * onehot + (1 - lam.view(B, 1)) * onehot.flip(0)
        return mixed, targets

    def __repr__(self):
        return (f"Mixer(mixup={self.mixup_alpha}, cutmix={self.cutmix_alpha}, prob={self.mix_prob}, "
                f"switch={self.switch_prob})")
