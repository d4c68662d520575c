"""vitlab: Vision Transformers from scratch, trained fast on small data, with attention you can see."""

from .models import VisionTransformer, count_params, create_model, list_models

__version__ = "0.1.0"
__all__ = ["VisionTransformer", "count_params", "create_model", "list_models", "__version__"]
