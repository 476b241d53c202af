"""Data: built-in data sets, user data, splits, augmentation and the in-memory loader.

Example:
    >>> from cnnkit.data import load_data, split_indices, channel_stats, TensorLoader
    >>> data = load_data("digits")
    >>> train, val, test = split_indices(data.labels, (0.8, 0.1, 0.1), seed=0)
    >>> mean, std = channel_stats(data.images[train])
    >>> loader = TensorLoader(data.images[train], data.labels[train], 64, shuffle=True,
    ...                       mean=mean, std=std, augment=data.augment)
    >>> x, y = next(iter(loader))
    >>> tuple(x.shape), y.dtype
    ((64, 1, 8, 8), torch.int64)
"""

from ._decode import load_image
from ._registry import (
                        dataset_info,
                        dataset_recipe,
                        dataset_targets,
                        list_datasets,
                        load_data,
                        register_dataset,
)
from ._types import ImageData, Samples, convert_channels, downscale, resize_images, resize_masks
from .augment import Augment, list_augment, register_augment
from .inputs import load_input
from .loader import Batches, TensorLoader
from .split import channel_stats, split_indices

# Each built-in module registers its data set on import.
from . import digits, shapes, shapes3d  # noqa: E402,F401  isort: skip

__all__ = ["Samples", "ImageData", "register_dataset", "list_datasets", "dataset_info",
           "dataset_recipe", "dataset_targets", "load_data",
           "split_indices", "channel_stats", "Augment", "list_augment", "register_augment",
           "Batches", "TensorLoader", "convert_channels", "resize_images", "resize_masks",
           "downscale", "load_image", "load_input"]
