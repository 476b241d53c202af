"""Inference of dense models on inputs of any size: padding and sliding windows.

A segmentation network takes sizes that are multiples of its stride and was trained
on one tile size; users' images are neither. :func:`dense_forward` pads the input
to the model's ``size_multiple`` (reflected, so the border looks like image content)
and crops the prediction back; an image larger than the training tile is covered by
overlapping windows of the tile size whose predictions are averaged where they
overlap (logits for segmentation, pixels for super-resolution), so memory stays
bounded and every pixel is predicted with the context size the model learnt. Series,
images and volumes alike: windows tile every spatial axis.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from cnnkit.models._dense import pad_to_multiple

__all__ = ["dense_forward", "window_starts"]


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows of ``tile`` covering ``[0, length)``; the last ends at ``length``.

    Example:
        >>> from cnnkit.tasks.dense import window_starts
        >>> window_starts(10, 4, 3)
        [0, 3, 6]
        >>> window_starts(11, 4, 3)
        [0, 3, 6, 7]
    """
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _forward_padded(model: nn.Module, x: torch.Tensor, multiple: int, scale: int
                    ) -> torch.Tensor:
    xp, sizes = pad_to_multiple(x, multiple, dims=x.ndim - 2)
    return model(xp)[(..., *(slice(0, v * scale) for v in sizes))]


@torch.no_grad()
def dense_forward(model: nn.Module, x: torch.Tensor, tile: Sequence[int] | None = None,
                  overlap: float = 0.25) -> torch.Tensor:
    """Run a dense model on ``x [B, C, *spatial]`` of any size.

    Args:
        model: a :class:`~cnnkit.models._dense.DenseModel` (uses ``size_multiple`` and
            ``scale``).
        x: normalised input batch (1 to 3 spatial axes).
        tile: window size per spatial axis, normally the training size; None runs the
            whole input at once.
        overlap: fraction of a window shared with its neighbour (0 <= overlap < 1).

    Returns:
        ``[B, K, *spatial]`` logits (segmentation) or ``[B, C, *scale x spatial]`` images.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    multiple, scale = int(getattr(model, "size_multiple", 1)), int(getattr(model, "scale", 1))
    sizes = tuple(int(v) for v in x.shape[2:])
    if tile is not None and len(tile) != len(sizes):
        raise ValueError(f"tile {tuple(tile)} has {len(tile)} sizes for an input of "
                         f"{len(sizes)} spatial axes {sizes}; give one size per axis")
    if tile is None or all(v <= t for v, t in zip(sizes, tile, strict=True)):
        return _forward_padded(model, x, multiple, scale)
    tiles = [min(t, v) for t, v in zip(tile, sizes, strict=True)]
    starts = [window_starts(v, t, max(1, round(t * (1 - overlap))))
              for v, t in zip(sizes, tiles, strict=True)]
    out = count = None
    for corner in itertools.product(*starts):
        window = tuple(slice(c, c + t) for c, t in zip(corner, tiles, strict=True))
        pred = _forward_padded(model, x[(..., *window)], multiple, scale).float()
        if out is None:
            big = [v * scale for v in sizes]
            out = pred.new_zeros(*pred.shape[:2], *big)
            count = pred.new_zeros(1, 1, *big)
        sl = (..., *(slice(c * scale, (c + t) * scale) for c, t in zip(corner, tiles, strict=True)))
        out[sl] += pred
        count[sl] += 1
    return out / count
