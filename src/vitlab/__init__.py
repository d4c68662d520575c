"""vitlab: Vision Transformers from scratch, trained fast on small data, with attention you can see."""

from .models import VisionTransformer, count_params, create_model, list_models
from .models.pretrained import load_pretrained
from .train.checkpoint import load_model, save_model

__version__ = "0.1.0"
__all__ = ["VisionTransformer", "count_params", "create_model", "list_models", "load_model", "load_pretrained",
           "save_model", "__version__"]
