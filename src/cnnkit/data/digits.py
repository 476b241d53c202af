"""``digits``: the 8x8 handwritten digits that ship with scikit-learn.

Alpaydin and Kaynak (1998), "Optical Recognition of Handwritten Digits", UCI
Machine Learning Repository: 1797 images of 10 classes, 32x32 bitmaps of 43
writers reduced to 8x8 blocks that count set pixels (0..16). Real data that needs
no download, so every cnnkit example and test can train on it offline.
"""

from __future__ import annotations

import numpy as np
import torch

from ._registry import register_dataset
from ._types import ImageData, convert_channels, resize_images

__all__ = ["digits"]


@register_dataset
def digits(*, image_size: int | tuple[int, int] | None = None, channels: int | None = None,
           seed: int = 0) -> ImageData:
    """Handwritten digits 0-9: 1797 real 8x8 grayscale images (Alpaydin & Kaynak 1998).

    Pixel counts 0..16 are scaled to uint8 0..255 (``round(v * 255 / 16)``). The
    default augmentation is ``"digits"`` (small affine, no flips: a flipped 2 is not
    a 2). ``seed`` is accepted for a uniform signature; the data is fixed.
    """
    from sklearn.datasets import load_digits  # imported lazily: scikit-learn is slow to import

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    images = torch.from_numpy(pixels).unsqueeze(1)
    if image_size is not None:
        images = resize_images(images, image_size)
    images = convert_channels(images, channels)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return ImageData(images, labels, [str(c) for c in bunch.target_names], "digits",
                     augment="digits")
