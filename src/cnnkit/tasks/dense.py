"""Inference of dense models on images of any size: padding and sliding windows.

A segmentation network takes sizes that are multiples of its stride and was trained
on one tile size; users' images are neither. :func:`dense_forward` pads the input
to the model's ``size_multiple`` (reflected, so the border looks like image content)
and crops the prediction back; an image larger than the training tile is covered by
overlapping windows of the tile size whose predictions are averaged where they
overlap (logits for segmentation, pixels for super-resolution), so memory stays
bounded and every pixel is predicted with the context size the model learnt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnkit.models._dense import pad_to_multiple

__all__ = ["dense_forward", "window_starts"]


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows of ``tile`` covering ``[0, length)``; the last ends at ``length``.

    Example:
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
    xp, (h, w) = pad_to_multiple(x, multiple)
    return model(xp)[..., :h * scale, :w * scale]


@torch.no_grad()
def dense_forward(model: nn.Module, x: torch.Tensor, tile: Sequence[int] | None = None,
                  overlap: float = 0.25) -> torch.Tensor:
    """Run a dense model on ``x [B, C, H, W]`` of any size.

    Args:
        model: a :class:`~cnnkit.models._dense.DenseModel` (uses ``size_multiple`` and
            ``scale``).
        x: normalised input batch.
        tile: ``(h, w)`` window size, normally the training size; None runs the whole
            image at once.
        overlap: fraction of a window shared with its neighbour (0 <= overlap < 1).

    Returns:
        ``[B, K, H, W]`` logits (segmentation) or ``[B, C, sH, sW]`` images.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    multiple, scale = int(getattr(model, "size_multiple", 1)), int(getattr(model, "scale", 1))
    h, w = x.shape[-2:]
    if tile is None or (h <= tile[0] and w <= tile[1]):
        return _forward_padded(model, x, multiple, scale)
    th, tw = min(tile[0], h), min(tile[1], w)
    ys = window_starts(h, th, max(1, round(th * (1 - overlap))))
    xs = window_starts(w, tw, max(1, round(tw * (1 - overlap))))
    out = count = None
    for y0 in ys:
        for x0 in xs:
            pred = _forward_padded(model, x[..., y0:y0 + th, x0:x0 + tw], multiple, scale).float()
            if out is None:
                out = pred.new_zeros(*pred.shape[:2], h * scale, w * scale)
                count = pred.new_zeros(1, 1, h * scale, w * scale)
            sl = (..., slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale))
            out[sl] += pred
            count[sl] += 1
    return out / count
