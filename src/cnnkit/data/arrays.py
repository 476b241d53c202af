"""Data held in memory: arrays ``(x, y)`` or a ``torch.utils.data.Dataset`` of ``(x, y)``
pairs, made into :class:`~cnnkit.data.Samples` (``cnnkit.train(data=(x, y))``).

Inputs:

- a **torch tensor** is ``[N, C, *spatial]`` (PyTorch's layout: ``[N, C]`` features,
  ``[N, C, L]`` series, ``[N, C, H, W]`` images, ``[N, C, D, H, W]`` volumes);
- a **NumPy array** follows the rules of an ``.npz`` file (``--data x.npz``), so the same
  arrays give the same run either way: ``[N, H, W]`` grey images, ``[N, H, W, C]`` when the
  last axis has 1, 3 or 4 channels, else ``[N, C, H, W]``; other ranks are
  ``[N, C, *spatial]``;
- values are uint8 (or integers) in 0..255, booleans, or floats in [0, 1].

Targets, by the task (``task=``, default ``classify``): class indices ``[N]`` (or class
names, NumPy strings) for ``classify``; masks ``[N, *spatial]`` of class indices (255:
ignored) for ``segment``; numbers ``[N]`` or ``[N, K]`` for ``regress``; none for
``superres`` (give ``x`` alone, or ``(x, None)``). A Dataset's items are ``(x, y)`` with
``x`` a tensor (``[C, *spatial]``), an array or a PIL image (array rules) and ``y`` an
int, a 0-d tensor or an array; it is read once, its size checked before anything is
allocated (:func:`cnnkit._limits.require_memory`).

The data is not saved with the run: its ``config.yaml`` says ``data: <in-memory>``, and
``cnnkit eval RUN`` asks for ``--data PATH`` (see :data:`IN_MEMORY`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from cnnkit._limits import require_memory

from ._types import IGNORE_INDEX, MAX_SPATIAL_DIMS, Samples, convert_channels, resize_images
from .npz import _npz_images, _npz_labels, _npz_values

__all__ = ["IN_MEMORY", "in_memory_error", "samples_from_arrays", "samples_from_dataset",
           "samples_from"]

# The ``data`` of a run trained on arrays or a Dataset, in its config.yaml: not a path.
IN_MEMORY = "<in-memory>"


def in_memory_error() -> ValueError:
    """What reading the data of an in-memory run says (``cnnkit eval RUN``, ``--resume``)."""
    return ValueError(f"the run's data is {IN_MEMORY}: arrays or a Dataset passed to "
                      "cnnkit.train(data=...), which are not saved on disk; give data on disk "
                      "(cnnkit eval RUN --data PATH), or in Python pass the arrays again "
                      "(cnnkit.train(resume=RUN, data=(x, y)))")


def samples_from(data: Any, targets: str = "labels", *, image_size: int | None = None,
                 channels: int | None = None) -> Samples:
    """:class:`Samples` from ``(x, y)``, ``x`` alone or a Dataset (module docstring).

    Args:
        data: arrays ``(x, y)`` (NumPy or torch), ``x`` alone (``superres``), or a
            ``torch.utils.data.Dataset`` of ``(x, y)`` items.
        targets: what ``y`` holds, a task's ``data_targets``: ``"labels"``, ``"masks"``,
            ``"values"`` or ``"images"`` (no ``y``).
        image_size: resize the inputs to this size (not with masks).
        channels: convert the inputs to 1 or 3 channels.

    Raises:
        ValueError: a shape, dtype, range or length that does not fit, naming it and the fix.
        MemoryLimitError: a Dataset too large to hold in memory.

    Example:
        >>> import numpy as np
        >>> from cnnkit.data.arrays import samples_from
        >>> x = np.random.default_rng(0).integers(0, 256, (30, 8, 8), dtype=np.uint8)
        >>> d = samples_from((x, np.arange(30) % 3))
        >>> d.input_size, d.classes, d.name
        ((1, 8, 8), ['0', '1', '2'], '<in-memory>')
    """
    if isinstance(data, torch.utils.data.Dataset):
        x, y, channels_first = _materialise(data, targets)
    elif isinstance(data, (tuple, list)) and len(data) in (1, 2):
        x, y = data[0], data[1] if len(data) == 2 else None
        channels_first = isinstance(x, torch.Tensor)
    elif isinstance(data, (np.ndarray, torch.Tensor)):
        x, y, channels_first = data, None, isinstance(data, torch.Tensor)
    else:
        raise ValueError(f"data=... takes a data set name or path, arrays (x, y) or a "
                         f"torch.utils.data.Dataset of (x, y) pairs, got {type(data).__name__}")
    return samples_from_arrays(x, y, targets, channels_first=channels_first,
                               image_size=image_size, channels=channels)


def samples_from_arrays(x: Any, y: Any, targets: str = "labels", *, channels_first: bool = True,
                        image_size: int | None = None, channels: int | None = None) -> Samples:
    """:class:`Samples` from inputs ``x`` and targets ``y`` (``channels_first``: torch's
    ``[N, C, *spatial]``; else the ``.npz`` rules for 3-d and 4-d arrays)."""
    name = IN_MEMORY
    x = _numpy(x, "x")
    if x.ndim < 2 or x.ndim > 2 + MAX_SPATIAL_DIMS or len(x) == 0:
        raise ValueError(f"data x of shape {x.shape}: give N >= 1 samples as [N, C, *spatial] "
                         f"(0 to {MAX_SPATIAL_DIMS} spatial axes; NumPy images also [N, H, W] "
                         "or [N, H, W, C])")
    inputs = _npz_images(x, name) if not channels_first and x.ndim in (3, 4) else _inputs(x)
    n = inputs.shape[0]
    if targets != "images" and y is None:
        raise ValueError(f"data=x alone has no targets, and this task needs {targets}; give "
                         "data=(x, y)")
    labels, classes, masks, values = torch.zeros(n, dtype=torch.long), ["image"], None, None
    if targets == "labels":
        labels, classes = _npz_labels(_numpy(y, "y"), None, name)
    elif targets == "values":
        values, classes = _npz_values(_numpy(y, "y"), None, name)
    elif targets == "masks":
        masks = _masks(_numpy(y, "y"), inputs.shape)
        labels = _dominant(masks)
        used = masks[masks != IGNORE_INDEX]
        classes = [str(k) for k in range((int(used.max()) if used.numel() else 0) + 1)]
    count = len(values) if values is not None else len(labels)
    if count != n:
        raise ValueError(f"data: {n} samples in x but {count} targets in y; give one per sample")
    if image_size is not None:
        if masks is not None:
            raise ValueError("image_size resizes the inputs but not their masks; resize both "
                             "arrays before cnnkit.train(data=(x, y))")
        inputs = resize_images(inputs, image_size)
    return Samples(convert_channels(inputs, channels), labels, classes, name, masks=masks,
                   augment="flip_crop" if inputs.ndim == 4 else "none",
                   mask_classes=classes if masks is not None else None, values=values)


def samples_from_dataset(dataset: torch.utils.data.Dataset, targets: str = "labels",
                         **kwargs: Any) -> Samples:
    """:class:`Samples` from a Dataset of ``(x, y)`` items, read once into memory."""
    return samples_from(dataset, targets, **kwargs)


def _numpy(a: Any, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    out = np.asarray(a)
    if out.dtype == object:
        raise ValueError(f"data {what} holds Python objects ({type(a).__name__}); give a "
                         "numeric array or tensor")
    return out


def _inputs(x: np.ndarray) -> torch.Tensor:
    """``[N, C, *spatial]`` as uint8 (integers in 0..255, booleans) or float32 in [0, 1]."""
    if x.dtype == np.bool_:
        return torch.from_numpy(x.astype(np.uint8) * 255)
    if x.dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"data x: integer inputs span {lo}..{hi}; give uint8 0..255 (or "
                             "floats in [0, 1])")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
    if x.dtype.kind == "f":
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"data x: float inputs span {lo:g}..{hi:g}; scale them to [0, 1] "
                             "(the run normalises them by the training split's statistics)")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clamp_(0, 1)
    raise ValueError(f"data x of dtype {x.dtype} is not supported; give uint8 0..255 or floats "
                     "in [0, 1]")


def _masks(y: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    if y.shape != (shape[0], *shape[2:]) or y.dtype.kind not in "iub":
        raise ValueError(f"data y: masks must be integers [N, *spatial] matching x "
                         f"{tuple(shape)}, got {y.dtype} {y.shape}; one class index per pixel")
    if y.size and (int(y.min()) < 0 or int(y.max()) > IGNORE_INDEX):
        raise ValueError(f"data y: mask values span {int(y.min())}..{int(y.max())}; give class "
                         f"indices 0..254 ({IGNORE_INDEX}: ignored)")
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.uint8))


def _dominant(masks: torch.Tensor) -> torch.Tensor:
    """Each mask's most frequent class other than 0 and 255 (0 if none): the split's strata."""
    flat = masks.reshape(len(masks), -1).long()
    counts = torch.zeros(len(masks), IGNORE_INDEX + 1, dtype=torch.long)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, 0] = counts[:, IGNORE_INDEX] = 0
    top = counts.argmax(1)
    return torch.where(counts.max(1).values > 0, top, torch.zeros_like(top))


def _materialise(dataset: Any, targets: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """A Dataset's items stacked into arrays, their size checked before allocation."""
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError("data: a Dataset needs a length (a map-style Dataset with __len__); "
                         "an IterableDataset cannot be sized before it is read") from None
    if n == 0:
        raise ValueError("data: the Dataset is empty; give at least a few samples per class")
    first = dataset[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise ValueError(f"data: Dataset items must be (x, y) pairs, item 0 is "
                         f"{type(first).__name__}; wrap it to return (input, target)")
    x0, y0 = _numpy(first[0], "x of item 0"), _numpy(first[1], "y of item 0")
    per_item = x0.nbytes + y0.nbytes
    require_memory(n * per_item, f"a Dataset of {n} items of {'x'.join(map(str, x0.shape))} "
                   f"{x0.dtype}", "give fewer or smaller samples (a Subset, or resize them)")
    x = np.empty((n, *x0.shape), x0.dtype)
    y = np.empty((n, *y0.shape), y0.dtype) if y0.dtype.kind not in "US" else [None] * n
    for i in range(n):
        xi, yi = first if i == 0 else dataset[i]
        xi, yi = _numpy(xi, f"x of item {i}"), _numpy(yi, f"y of item {i}")
        if xi.shape != x0.shape or (y0.dtype.kind not in "US" and yi.shape != y0.shape):
            raise ValueError(f"data: Dataset item {i} has x {xi.shape} and y {yi.shape}, item 0 "
                             f"x {x0.shape} and y {y0.shape}; every item must have one shape "
                             "(resize them in the Dataset)")
        x[i], y[i] = xi, yi
    return x, (np.asarray(y) if targets != "images" else None), \
        isinstance(first[0], torch.Tensor)
