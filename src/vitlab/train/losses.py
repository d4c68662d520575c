"""Losses: label-smoothed (soft-target) cross-entropy and DeiT's distillation loss."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..models.vit import _pair


def smooth_targets(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Hard labels (B,) or soft targets (B, K) -> smoothed soft targets (B, K).

    Smoothing moves `smoothing` of the mass onto the uniform distribution, so
    each row still sums to 1 (also for Mixup/CutMix targets).
    """
    if targets.ndim == 1:
        targets = F.one_hot(targets, num_classes).float()
    return targets * (1.0 - smoothing) + smoothing / num_classes


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against hard labels (B,) or soft targets (B, K), with label smoothing."""
    logits = logits.float()  # the loss in fp32 even under bf16 autocast
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)
    soft = smooth_targets(targets, logits.shape[-1], smoothing)
    return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()


class TeacherView(nn.Module):
    """A frozen teacher fed this run's (normalised) images the way it was trained to see them.

    A teacher trained at another size, with other normalisation statistics, or on RGB where this
    run is grey would otherwise score images unlike any it learnt from: a ResNet trained at 224 px
    given a ViT student's 32-px batches still answers, just badly, and the student learns that.
    So the batch is un-normalised with the run's mean/std and re-normalised with the teacher's,
    a grey image is repeated onto three channels (exact: R = G = B), and the batch is resized
    (bilinear, antialiased when shrinking) to the teacher's size. Each step that applies is one
    line in `changes` for the run log; none applies when the teacher saw images like the run's.
    """

    def __init__(self, teacher: nn.Module, run_chans: int, run_size, run_mean, run_std,
                 chans: int | None = None, size=None, mean=None, std=None):
        super().__init__()
        self.teacher = teacher
        self.changes: list[str] = []  # in the order forward() applies them
        self.size = _pair(size) if size is not None and _pair(size) != _pair(run_size) else None
        self.repeat = chans == 3 and run_chans == 1
        if self.repeat:
            self.changes.append("grey repeated onto 3 channels")
        c = 3 if self.repeat else run_chans
        m_run = torch.tensor(run_mean, dtype=torch.float32).expand(c) if len(run_mean) in (1, c) else None
        s_run = torch.tensor(run_std, dtype=torch.float32).expand(c) if len(run_std) in (1, c) else None
        scale = shift = None
        if mean is not None and std is not None and m_run is not None and s_run is not None \
                and len(mean) == c and len(std) == c:
            m_t, s_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
            if not (torch.allclose(m_t, m_run) and torch.allclose(s_t, s_run)):
                # x_teacher = (x * std_run + mean_run - mean_t) / std_t
                scale, shift = s_run / s_t, (m_run - m_t) / s_t
                self.changes.append("re-normalised with its own mean/std")
        if self.size is not None:
            self.changes.append(f"resized from {run_size[0]}x{run_size[1]} to {self.size[0]}x{self.size[1]}")
        self.register_buffer("scale", None if scale is None else scale.view(1, c, 1, 1), persistent=False)
        self.register_buffer("shift", None if shift is None else shift.view(1, c, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K) logits
        x = images
        if self.repeat:
            x = x.expand(-1, 3, -1, -1)
        if self.scale is not None:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.size is not None:
            shrink = self.size[0] < x.shape[-2] or self.size[1] < x.shape[-1]
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=shrink)
        return self.teacher(x)


class DistillationLoss(nn.Module):
    """DeiT's distillation loss (Touvron et al. 2021), as a loss object.

    kind="none": base loss on the (CLS) logits only.
    kind="soft": (1-alpha) * CE(cls, y) + alpha * tau^2 * KL(softmax(dist/tau) || softmax(teacher/tau)).
    kind="hard": (1-alpha) * CE(cls, y) + alpha * CE(dist, argmax teacher).
    DeiT uses alpha=0.5 for hard distillation. The student's distillation
    head supplies `dist`; a model without one uses its only head for both.
    The teacher runs frozen, once per batch, on the same (augmented) images.
    """

    def __init__(self, kind: str = "none", alpha: float = 0.5, tau: float = 1.0, smoothing: float = 0.0,
                 teacher: nn.Module | None = None):
        super().__init__()
        if kind not in ("none", "soft", "hard"):
            raise UserError(f"unknown distillation kind {kind!r}; choose none, soft or hard")
        if kind != "none" and teacher is None:
            raise UserError(f"distillation kind {kind!r} needs a teacher (--distill.teacher)")
        self.kind, self.alpha, self.tau, self.smoothing = kind, alpha, tau, smoothing
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):  # the teacher stays in eval mode whatever the student does
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, outputs, targets: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = cross_entropy(cls_logits, targets, self.smoothing)
        if self.kind == "none":
            if isinstance(outputs, tuple):  # a distilled model trained without a teacher: both heads learn the labels
                return 0.5 * (base + cross_entropy(dist_logits, targets, self.smoothing))
            return base
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        dist_logits = dist_logits.float()
        if self.kind == "soft":
            t = self.tau
            kl = F.kl_div(F.log_softmax(dist_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                          reduction="batchmean", log_target=True)
            distill = kl * t * t
        else:
            distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
        return (1 - self.alpha) * base + self.alpha * distill
