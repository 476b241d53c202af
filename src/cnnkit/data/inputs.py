"""One input read from a file the way training read its data set: by its number of axes.

Inference (``cnnkit predict``, ``cnnkit explain``, :class:`cnnkit.run.Preprocess`) reads
single files; this picks the reader from the run's ``input_size = (C, *spatial)``:
images (2 spatial axes) through Pillow, volumes (3) from NIfTI files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from ._decode import load_image
from .volumes import is_volume_file, load_volume

__all__ = ["load_input"]


def load_input(source: str | os.PathLike | Image.Image | torch.Tensor, input_size: Sequence[int],
               keep_size: bool = False) -> torch.Tensor:
    """``source`` as ``[C, *spatial]`` (uint8, or float in [0, 1]), prepared as in training.

    Args:
        source: a file, a PIL image, or a tensor (returned as it is).
        input_size: the run's ``(C, *spatial)``.
        keep_size: keep the file's own spatial size (dense prediction runs on it whole).

    Raises:
        ValueError: a file of another kind than the run's inputs, or a kind cnnkit cannot
            read from single files yet (series).
    """
    if isinstance(source, torch.Tensor):
        return source
    c, *spatial = (int(v) for v in input_size)
    size = None if keep_size else tuple(spatial)
    if len(spatial) == 3:
        if isinstance(source, Image.Image) or not is_volume_file(source):
            raise ValueError(f"'{source}' is not a NIfTI volume (.nii, .nii.gz), but the model "
                             f"takes volumes of {c}x{'x'.join(map(str, spatial))}")
        return load_volume(source, size, c)
    if len(spatial) == 2:
        if not isinstance(source, Image.Image) and is_volume_file(source):
            raise ValueError(f"'{source}' is a volume, but the model takes images of "
                             f"{c}x{'x'.join(map(str, spatial))}")
        return load_image(source, size, c)
    raise ValueError(f"reading one input of {len(spatial)} spatial axes from a file is not "
                     "supported; pass a [C, *spatial] tensor instead")
