"""Data: dataset sources, in-memory and file loaders, batched augmentation.

    bundle = build_data(cfg.data)                        # DataBundle(info, train, val, test)
    loader = make_loader(bundle.train, 128, train=True, seed=0, device=dev)
    tf = build_train_transform(cfg.aug, bundle.info, (32, 32), bundle.info.num_classes)
    for epoch in ...:
        loader.set_epoch(epoch)
        for images, labels in loader:                    # uint8 (B, C, H, W), int64 (B,), on dev
            x, targets = tf(images, labels, generator)   # float (B, C, h, w); int64 (B,) or soft (B, K)
"""

from .augment import build_eval_transform, build_train_transform
from .base import DataBundle, DataError, DatasetInfo, FileSplit, TensorSplit
from .datasets import DATASETS, build_data, data_root
from .loader import epoch_indices, make_loader
from .shapes import SHAPES_CLASSES, make_shapes

__all__ = [
    "DATASETS", "DataBundle", "DataError", "DatasetInfo", "FileSplit", "SHAPES_CLASSES", "TensorSplit",
    "build_data", "build_eval_transform", "build_train_transform", "data_root", "epoch_indices",
    "make_loader", "make_shapes",
]
