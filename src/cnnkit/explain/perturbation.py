"""Perturbation explanations: hide part of the image and watch the score.

These need forwards only, no gradients, so they work for any model (even one whose
backward is not faithful).
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import Explainer, register_method
from .layer_masking import layer_masked_forward

__all__ = ["Occlusion", "window_starts"]


def _pair(v: int | tuple[int, int], what: str) -> tuple[int, int]:
    h, w = (v, v) if isinstance(v, int) else tuple(v)
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive, got {v}")
    return int(h), int(w)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: every ``stride``, plus one window flush
    with the far edge, so every pixel is covered (a window larger than the axis is cut to
    the axis)."""
    window = min(window, size)
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@register_method("occlusion")
class Occlusion(Explainer):
    """Occlusion sensitivity: the drop of the target score when a window is hidden.

    Zeiler and Fergus (2014), "Visualizing and Understanding Convolutional Networks",
    ECCV (Sec. 4.2). A ``window`` square of all channels is set to ``baseline`` at every
    ``stride`` offset (plus a last window flush with the bottom/right edge); a pixel's value
    is the mean of ``S(x) - S(x occluded)`` over the windows that cover it, so positive
    means "hiding this lowers the class score". The occluded copies of one image go through
    the model ``internal_batch_size`` at a time; all K targets come from the same forwards.

    Args:
        model: the classifier.
        layer: ignored.
        window: window size, int or (h, w); cut to the image size.
        stride: step between windows, int or (h, w).
        baseline: the value hidden pixels get (0 is the mean colour for normalised input).
        internal_batch_size: occluded images per forward.
        masking: ``"input"`` paints the window ``baseline``; ``"layer"`` hides it inside the
            network by layer masking (Balasubramanian and Feizi 2023, see
            :mod:`cnnkit.explain.layer_masking`), so the occluder's edges create no
            response; ``baseline`` is then unused.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> occ = cnnkit.explain.create("occlusion", model, window=4, stride=2)
        >>> occ(torch.rand(1, 3, 16, 16)).shape
        torch.Size([1, 16, 16])
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None,
                 window: int | tuple[int, int] = 8, stride: int | tuple[int, int] = 4,
                 baseline: float = 0.0, internal_batch_size: int = 64,
                 masking: str = "input") -> None:
        super().__init__(model, layer)
        self.window, self.stride = _pair(window, "window"), _pair(stride, "stride")
        if internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be positive, got {internal_batch_size}")
        self.baseline, self.internal_batch_size = float(baseline), int(internal_batch_size)
        if masking not in ("input", "layer"):
            raise ValueError(f"masking must be 'input' or 'layer', got {masking!r}")
        self.masking = masking

    @torch.no_grad()
    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        wh, ww = min(self.window[0], h), min(self.window[1], w)
        boxes = [(i, j) for i in window_starts(h, wh, self.stride[0])
                 for j in window_starts(w, ww, self.stride[1])]
        maps = x.new_zeros((b, targets.shape[1], h, w))
        count = x.new_zeros((h, w))
        for i, j in boxes:
            count[i:i + wh, j:j + ww] += 1
        base_scores = self.select(self.model(x), targets)  # [B, K]
        for n in range(b):
            for s in range(0, len(boxes), self.internal_batch_size):
                chunk = boxes[s:s + self.internal_batch_size]
                occluded = x[n:n + 1].repeat(len(chunk), 1, 1, 1)
                if self.masking == "layer":
                    mask = x.new_ones((len(chunk), 1, h, w))
                    for c, (i, j) in enumerate(chunk):
                        mask[c, :, i:i + wh, j:j + ww] = 0
                    logits = layer_masked_forward(self.model, occluded, mask)
                else:
                    for c, (i, j) in enumerate(chunk):
                        occluded[c, :, i:i + wh, j:j + ww] = self.baseline
                    logits = self.model(occluded)
                scores = self.select(logits, targets[n:n + 1].expand(len(chunk), -1))
                drop = base_scores[n] - scores  # [chunk, K]
                for c, (i, j) in enumerate(chunk):
                    maps[n, :, i:i + wh, j:j + ww] += drop[c, :, None, None]
        return maps / count
