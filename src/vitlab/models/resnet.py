"""ResNet-18 (He et al. 2016): the CNN baseline and the distillation teacher.

Two stems: the ImageNet one (7x7 stride-2 conv + max-pool, 224 px) and the
CIFAR one (3x3 stride-1 conv, no pool), which keeps a 32-px image at 32x32
through the first stage; without it a 32-px input is 1x1 by the last stage.
Parameter names follow torchvision's, so its checkpoints load by copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .vit import record_arch


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (possibly projected) shortcut."""

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes=1000, in_chans=3, cifar_stem=False, img_size=224):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        widths, blocks, in_ch = (64, 128, 256, 512), [], 64
        for i, (w, n) in enumerate(zip(widths, layers)):
            stage = [BasicBlock(in_ch, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            blocks.append(nn.Sequential(*stage))
            in_ch = w
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 512
        self.fc = nn.Linear(512, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero the last BN of each residual branch: every block starts as the
        # identity, which makes the early steps of training markedly stabler.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True):
        if enable:
            raise ValueError("gradient checkpointing is implemented for ViT models only")

    def reset_classifier(self, num_classes: int):
        """Replace the head for a new number of classes (0: no head)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be 0 (no head) or more, got {num_classes}")
        self.num_classes = num_classes
        record_arch(self, num_classes=num_classes)
        self.fc = nn.Linear(512, num_classes).to(self.bn1.weight.device) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got a tensor of shape {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H', W')
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, H'/8, W'/8)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x).flatten(1)  # (B, 512)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
