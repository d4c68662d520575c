"""Models: the ViT (vit.py), the ResNet-18 baseline (resnet.py) and the preset registry."""

from .registry import PRESETS, build_from_arch, count_params, create_model, get_preset, list_models
from .resnet import ResNet
from .vit import VisionTransformer, resample_pos_embed

__all__ = ["PRESETS", "ResNet", "VisionTransformer", "build_from_arch", "count_params", "create_model",
           "get_preset", "list_models", "resample_pos_embed"]
