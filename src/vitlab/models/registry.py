"""Named model presets and `create_model`.

Every preset is one row: a family (vit / resnet) and its constructor arguments.
`create_model(name, **overrides)` builds it with any argument replaced and
records the full architecture on the model (`model.arch`) so a checkpoint can
rebuild exactly the same network later without pickling code.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch.nn as nn

from .resnet import ResNet
from .vit import VisionTransformer
from ..errors import UserError


@dataclass(frozen=True)
class Preset:
    family: str  # "vit" or "resnet"
    kwargs: dict = field(default_factory=dict)
    note: str = ""


def _vit(dim, depth, heads, mlp, patch, img, classes, note="", **extra):
    kw = dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=patch, img_size=img,
              num_classes=classes, **extra)
    return Preset("vit", kw, note)


# The variant table: width, depth, heads, MLP width (ViT / DeiT papers).
_TI, _S, _B, _L = (192, 12, 3, 768), (384, 12, 6, 1536), (768, 12, 12, 3072), (1024, 24, 16, 4096)

PRESETS: dict[str, Preset] = {
    # -- CIFAR-size family (32x32, 10 classes) ---------------------------------
    "vit_mini_patch4_32": _vit(128, 4, 4, 256, 4, 32, 10, "a small, fast ViT for the demo, tests and CPU budgets"),
    "vit_mini_patch7_28": _vit(128, 4, 4, 256, 7, 28, 10, "vit_mini for 28-px grey images (MNIST-like): 16 patches of 7x7",
                               in_chans=1),
    "vit_mini_convstem_patch8_32": _vit(128, 4, 4, 256, 8, 32, 10, "hybrid vit_mini: two stride-2 3x3 convs "
                                        "(32, 64 wide) before an 8-px patch grid of 16 tokens", conv_stem=(32, 64)),
    "vit_mini_convstem_patch4_28": _vit(128, 4, 4, 256, 4, 28, 10, "hybrid vit_mini for 28-px images: the same "
                                        "stem, then 1x1 projection to a 7x7 grid of 49 tokens", conv_stem=(32, 64)),
    "vit_tiny_patch4_32": _vit(192, 6, 3, 768, 4, 32, 10, "the seed project's ViT-Tiny for CIFAR"),
    "vit_small_patch4_32": _vit(*_S, 4, 32, 10, "ViT-S width/depth at 32 px, patch 4"),
    "vit_base_patch4_32": _vit(*_B, 4, 32, 10, "ViT-B width/depth at 32 px, patch 4"),
    "vit_base_patch3_32": _vit(*_B, 3, 30, 10, "ViT-B, patch 3: takes 30x30 crops of 32-px images (32 is not a multiple of 3)"),
    "vit_base_patch2_32": _vit(*_B, 2, 32, 10, "ViT-B, patch 2: 256 tokens per 32-px image"),
    "deit_mini_distilled_patch4_32": _vit(128, 4, 4, 256, 4, 32, 10, "vit_mini with DeiT's distillation token", distilled=True),
    "deit_mini_distilled_patch7_28": _vit(128, 4, 4, 256, 7, 28, 10, "vit_mini_patch7_28 with DeiT's distillation token",
                                          distilled=True, in_chans=1),
    "deit_tiny_distilled_patch4_32": _vit(192, 6, 3, 768, 4, 32, 10, "ViT-Tiny CIFAR with DeiT's distillation token", distilled=True),
    # -- the seed notebook's two models -----------------------------------------
    "vit_b16": _vit(768, 12, 12, 3072, 16, 224, 1000, "the seed notebook's ViT-B/16", drop_rate=0.1),
    "vit_tiny": _vit(512, 4, 6, 1024, 4, 32, 10, "the seed notebook's 32-px model (6 heads of 85 dims on 512)"),
    # -- ImageNet-size standard names (224 px, 1000 classes) --------------------
    "vit_tiny_patch16_224": _vit(*_TI, 16, 224, 1000),
    "vit_small_patch16_224": _vit(*_S, 16, 224, 1000),
    "vit_base_patch16_224": _vit(*_B, 16, 224, 1000),
    "vit_base_patch32_224": _vit(*_B, 32, 224, 1000),
    "vit_large_patch16_224": _vit(*_L, 16, 224, 1000),
    "vit_large_patch32_224": _vit(*_L, 32, 224, 1000),
    "deit_tiny_distilled_patch16_224": _vit(*_TI, 16, 224, 1000, distilled=True),
    "deit_small_distilled_patch16_224": _vit(*_S, 16, 224, 1000, distilled=True),
    "deit_base_distilled_patch16_224": _vit(*_B, 16, 224, 1000, distilled=True),
    # -- CNN baseline / teacher -------------------------------------------------
    "resnet18_cifar": Preset("resnet", dict(layers=(2, 2, 2, 2), num_classes=10, cifar_stem=True, img_size=32),
                             "ResNet-18 with a 3x3 stem and no max-pool, for 32-px images"),
    "resnet18": Preset("resnet", dict(layers=(2, 2, 2, 2), num_classes=1000, cifar_stem=False, img_size=224),
                       "ResNet-18, ImageNet stem"),
}

_FAMILIES = {"vit": VisionTransformer, "resnet": ResNet}


class UnknownModelError(UserError):
    pass


def list_models() -> list[str]:
    """The registry's preset names (`vitlab models` prints them with their sizes)."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset `name` (family, constructor arguments, description); an unknown name is one
    UserError with the closest name, if one is close."""
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name).lower(), PRESETS, n=1)
        hint = (f"; did you mean {close[0]!r}?" if close
                else "; `vitlab models` lists them (vitlab.list_models() in Python)")
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    return PRESETS[name]


def build_from_arch(arch: dict) -> nn.Module:
    """Rebuild a model from the `arch` dict that `create_model` records."""
    family = arch.get("family")
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r} in architecture record")
    kwargs = dict(arch.get("kwargs", {}))
    if "layers" in kwargs:
        kwargs["layers"] = tuple(kwargs["layers"])
    for key in ("img_size", "patch_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        model = _FAMILIES[family](**kwargs)
    except TypeError as e:  # an override the constructor does not take
        raise ValueError(f"bad model argument for {arch.get('name', family)}: {e}") from None
    model.arch = {"name": arch.get("name", family), "family": family, "kwargs": dict(arch.get("kwargs", {}))}
    return model


def create_model(name_or_path: str, pretrained=False, **overrides) -> nn.Module:
    """Build a preset by name, with any constructor argument overridden; optionally with pretrained weights.

    >>> m = create_model("vit_tiny_patch4_32", num_classes=100, drop_path_rate=0.1)
    >>> m = create_model("vit_base_patch16_224", pretrained="path/to/hf_dir", num_classes=102)
    >>> m = create_model("path/to/hf_dir", num_classes=102, img_size=384)

    pretrained: False (random init), True (the preset's default hub weights) or
    a checkpoint path / hub id (see `vitlab.models.pretrained`). A checkpoint
    path or hub id given as the name loads its weights too. With weights,
    num_classes puts on a fresh head when the count differs and img_size
    resamples the position embeddings. `model.pretrained_info` then holds the
    source's class names, normalisation mean/std and resolution.
    """
    is_preset = name_or_path in PRESETS
    if is_preset and not pretrained:
        preset = get_preset(name_or_path)
        kwargs = {**preset.kwargs, **overrides}
        return build_from_arch({"name": name_or_path, "family": preset.family, "kwargs": kwargs})
    from .pretrained import default_source, load_pretrained

    if is_preset:
        source = default_source(name_or_path) if pretrained is True else pretrained
        preset_name = name_or_path
    else:
        if not _looks_like_checkpoint(name_or_path):
            get_preset(name_or_path)  # not a preset, not a path: raises with a did-you-mean
        if pretrained not in (False, True, None) and str(pretrained) != str(name_or_path):
            raise UnknownModelError(f"{name_or_path!r} is not a preset, so pretrained={pretrained!r} has no "
                                    f"architecture to go into; pass a preset name, or only the checkpoint")
        source, preset_name = name_or_path, None
    num_classes = overrides.pop("num_classes", None)
    img_size = overrides.pop("img_size", None)
    model, info = load_pretrained(source, num_classes=num_classes, img_size=img_size, preset=preset_name,
                                  **overrides)
    model.pretrained_info = info
    return model.train()  # like a freshly built model; load_pretrained hands back eval mode


def _looks_like_checkpoint(name: str) -> bool:
    """A path that exists, or a hub id ("owner/repo"): anything but a bare preset-like name."""
    import os

    return os.path.exists(name) or "/" in str(name) or os.sep in str(name)


def count_params(model: nn.Module) -> int:
    """The number of parameters (every one, trainable or not)."""
    return sum(p.numel() for p in model.parameters())
