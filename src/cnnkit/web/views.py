"""What of a layer's values the page receives: planes of maps, capped and subsampled.

A layer's output is a vector ``(N,)`` or maps ``(C, *spatial)`` with 1, 2 or 3 spatial
axes. The page draws every map as a plane ``[h, w]``: a 2D map is one, a 1D map is a
one-row strip ``[1, L]``, and a 3D map ``(D, H, W)`` is sent one depth slice at a time,
picked by the page's slider. The slider runs over the input's depth and every layer
shows its own slice at the same relative depth, ``k * D_layer // D_input``, so a layer
pooled to half the depth shows slice ``k // 2``.

Big layers are capped so a page stays light: at most ``max_channels`` channels are sent,
and planes are subsampled (every s-th row and column, so each value shown is a real
activation) until a whole network's answer holds at most ``max_values`` numbers.
Slicing a volume keeps an answer as light as a 2D one whatever its depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LayerPlan", "plan_layers", "plane_shape", "slice_index", "sent_values"]


@dataclass(frozen=True)
class LayerPlan:
    """What of a layer's output is sent: ``channels`` of them (maps) or ``values`` of a
    vector, every ``stride``-th row and column of each plane; ``depth`` slices for a 3D
    map (one is sent at a time; None otherwise); ``hidden`` for no-op layers."""

    channels: int
    stride: int
    hidden: bool
    depth: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "stride": self.stride, "hidden": self.hidden,
                "depth": self.depth}


def plane_shape(shape: Sequence[int]) -> tuple[int, int] | None:
    """The plane ``(h, w)`` a map of per-sample ``shape`` is drawn as; None for a vector.

    Example:
        >>> from cnnkit.web.views import plane_shape
        >>> [plane_shape(s) for s in [(4, 16), (4, 8, 8), (4, 6, 8, 8), (10,)]]
        [(1, 16), (8, 8), (8, 8), None]
    """
    if len(shape) < 2:
        return None
    if len(shape) > 4:
        raise ValueError(f"a map of shape {list(shape)} has {len(shape) - 1} spatial axes; "
                         "the explorer draws 1, 2 or 3")
    return (1, int(shape[-1])) if len(shape) == 2 else (int(shape[-2]), int(shape[-1]))


def _stride(plane: tuple[int, int], side: int) -> int:
    # A strip (1D) may be as long as a plane is large: side x side values in one row.
    limit = side * side if plane[0] == 1 else side
    return max(1, math.ceil(max(plane) / limit))


def plan_layers(shapes: list[tuple[int, ...]], hidden: list[bool], max_channels: int,
                max_side: int, max_values: int) -> list[LayerPlan]:
    """Channel caps and subsampling strides so that all sent values fit ``max_values``.

    Example:
        >>> from cnnkit.web.views import plan_layers
        >>> [p.stride for p in plan_layers([(64, 224, 224), (10,)], [False, False], 8, 64,
        ...                                 100_000)]
        [4, 1]
    """
    side = max_side
    while True:
        plans, total = [], 0
        for shape, skip in zip(shapes, hidden, strict=True):
            plane = plane_shape(shape)
            if plane is None:
                plan = LayerPlan(min(math.prod(shape), max_channels * max_side), 1, skip)
                sent = plan.channels
            else:
                plan = LayerPlan(min(shape[0], max_channels), _stride(plane, side), skip,
                                 int(shape[1]) if len(shape) == 4 else None)
                sent = plan.channels * math.prod(math.ceil(n / plan.stride) for n in plane)
            plans.append(plan)
            total += 0 if skip else sent
        if total <= max_values or side <= 4:
            return plans
        side //= 2


def slice_index(k: int, input_depth: int, depth: int) -> int:
    """The slice of a layer ``depth`` slices deep shown at slider position ``k`` of an
    input ``input_depth`` deep: the same relative depth.

    Example:
        >>> from cnnkit.web.views import slice_index
        >>> [slice_index(k, 8, 4) for k in range(8)]
        [0, 0, 1, 1, 2, 2, 3, 3]
    """
    return min(depth - 1, k * depth // max(1, input_depth))


def sent_values(out: torch.Tensor, plan: LayerPlan, k: int, input_depth: int,
                ) -> tuple[torch.Tensor, int | None]:
    """What is sent of one layer's output ``out`` (one sample) at slider position ``k``:
    ``[channels, h, w]`` planes of a map (``[values]`` of a vector), and the depth slice
    sent (None unless 3D)."""
    if out.ndim < 2:
        return out.reshape(-1)[:plan.channels], None
    x, index = out[:plan.channels], None
    if x.ndim == 4:
        index = slice_index(k, input_depth, x.shape[1])
        x = x[:, index]
    elif x.ndim == 2:
        x = x[:, None]
    return x[:, ::plan.stride, ::plan.stride], index
