"""Perturbation explanations: hide part of the input and watch the score.

These need forwards only, no gradients, so they work for any model (even one whose
backward is not faithful). Inputs are ``[B, C, *spatial]`` with 1, 2 or 3 spatial dims;
windows and strides are given per axis (an int applies to every axis).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ._base import Explainer, register_method
from .layer_masking import layer_masked_forward

__all__ = ["Occlusion", "window_starts", "per_axis", "default_window"]


def _positive(value: int | Sequence[int], what: str) -> int | tuple[int, ...]:
    """``value`` checked: a positive int, or 1 to 3 positive ints (one per axis)."""
    sizes = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise ValueError(f"{what} must be positive: an int or one size per spatial axis, "
                         f"got {value}")
    return int(value) if isinstance(value, int) else tuple(int(v) for v in sizes)


def per_axis(value: int | Sequence[int], dims: int, what: str) -> tuple[int, ...]:
    """``value`` for each of ``dims`` spatial axes: an int applies to every axis, a tuple
    gives one size per axis.

    Raises:
        ValueError: a tuple whose length is not ``dims``.

    Example:
        >>> from cnnkit.explain.perturbation import per_axis
        >>> per_axis(4, 3, "window"), per_axis((2, 8), 2, "stride")
        ((4, 4, 4), (2, 8))
    """
    if isinstance(value, int):
        return (value,) * dims
    sizes = tuple(int(v) for v in value)
    if len(sizes) != dims:
        raise ValueError(f"{what} {sizes} has {len(sizes)} sizes but the input has {dims} "
                         f"spatial dims; give an int (every axis) or {dims} sizes")
    return sizes


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: every ``stride``, plus one window flush
    with the far edge, so every element is covered (a window larger than the axis is cut
    to the axis)."""
    window = min(window, size)
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def default_window(spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The occlusion window and stride for an input of ``spatial`` sizes, when none is given.

    The rule, per axis of size ``n``: ``window = max(1, round(n / 5))`` (a fifth of the side,
    so about 5 windows fit side by side and each hides a part, never the whole input) and
    ``stride = max(1, window // 2)`` (neighbouring windows overlap by half, so every element
    is averaged over about ``2**dims`` windows and the map has no block edges at the window
    size). An 8x8 digit gets 2x2 windows every pixel, a 224x224 photo 45x45 every 22.

    Example:
        >>> from cnnkit.explain.perturbation import default_window
        >>> default_window((8, 8)), default_window((64,)), default_window((3, 224, 100))
        (((2, 2), (1, 1)), ((13,), (6,)), ((1, 45, 20), (1, 22, 10)))
    """
    window = tuple(max(1, round(int(n) / 5)) for n in spatial)
    return window, tuple(max(1, w // 2) for w in window)


@register_method("occlusion")
class Occlusion(Explainer):
    """Occlusion sensitivity: the drop of the target score when a window is hidden.

    Zeiler and Fergus (2014), "Visualizing and Understanding Convolutional Networks",
    ECCV (Sec. 4.2). A ``window`` of all channels (a segment of a signal, a rectangle of an
    image, a box of a volume) is set to ``baseline`` at every ``stride`` offset along each
    axis (plus a last window flush with the far edge); an element's value is the mean of
    ``S(x) - S(x occluded)`` over the windows that cover it, so positive means "hiding this
    lowers the class score". The occluded copies of one input go through the model
    ``internal_batch_size`` at a time; all K targets come from the same forwards.

    Args:
        model: the classifier.
        layer: ignored.
        window: window size: an int (every axis) or one size per spatial axis, e.g.
            ``(h, w)`` or ``(d, h, w)``; cut to the input size. None: adapted to each
            input's size by :func:`default_window` (a fifth of each side, at least 1), so a
            small input is never hidden whole by one window.
        stride: step between windows, likewise; None: half the window (at least 1).
        baseline: the value hidden elements get (0 is the mean for normalised input).
        internal_batch_size: occluded inputs per forward.
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
        >>> signal = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
        >>> cnnkit.explain.create("occlusion", signal, window=8, stride=4)(
        ...     torch.rand(3, 2, 32), target=1).shape
        torch.Size([3, 32])
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None,
                 window: int | Sequence[int] | None = None,
                 stride: int | Sequence[int] | None = None,
                 baseline: float = 0.0, internal_batch_size: int = 64,
                 masking: str = "input") -> None:
        super().__init__(model, layer)
        self.window = None if window is None else _positive(window, "window")
        self.stride = None if stride is None else _positive(stride, "stride")
        if internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be positive, got {internal_batch_size}")
        self.baseline, self.internal_batch_size = float(baseline), int(internal_batch_size)
        if masking not in ("input", "layer"):
            raise ValueError(f"masking must be 'input' or 'layer', got {masking!r}")
        self.masking = masking

    def sizes(self, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The window (cut to the input) and stride per axis for an input of ``spatial``
        sizes: as given, or by :func:`default_window`."""
        dims = len(spatial)
        auto_window, auto_stride = default_window(spatial)
        window = auto_window if self.window is None else per_axis(self.window, dims, "window")
        window = tuple(min(w, n) for w, n in zip(window, spatial, strict=True))
        if self.stride is not None:
            stride = per_axis(self.stride, dims, "stride")
        else:
            stride = auto_stride if self.window is None else tuple(max(1, w // 2) for w in window)
        return window, stride

    def hint(self, x: torch.Tensor, kind: str) -> str:
        spatial = tuple(int(v) for v in x.shape[2:])
        window, _ = self.sizes(spatial)
        if kind != "NaN or inf" and window == spatial:
            auto = default_window(spatial)[0]
            opt = str(auto[0]) if len(set(auto)) == 1 else ",".join(map(str, auto))
            return (f"occlusion window {'x'.join(map(str, window))} covers the whole "
                    f"{'x'.join(map(str, spatial))} input, so every element gets the same "
                    f"value: use --opt window={opt} (window={opt} in Python), or leave window "
                    "out to adapt it to the input")
        return super().hint(x, kind)

    @torch.no_grad()
    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        b, spatial = x.shape[0], tuple(x.shape[2:])
        dims = len(spatial)
        window, stride = self.sizes(spatial)
        starts = [window_starts(n, w, s) for n, w, s in zip(spatial, window, stride, strict=True)]
        # one window: a slice per spatial axis, in row-major order of its corner
        boxes = [tuple(slice(i, i + w) for i, w in zip(corner, window, strict=True))
                 for corner in itertools.product(*starts)]
        maps = x.new_zeros((b, targets.shape[1], *spatial))
        count = x.new_zeros(spatial)
        for box in boxes:
            count[box] += 1
        if not count.all():  # a stride longer than the window skips elements
            raise ValueError(f"stride {stride} is longer than "
                             f"the window {window} along some axis, so elements between the "
                             "windows get no value; give a stride no longer than the window")
        base_scores = self.select(self.model(x), targets)  # [B, K]
        every = slice(None)
        for n in range(b):
            for s in range(0, len(boxes), self.internal_batch_size):
                chunk = boxes[s:s + self.internal_batch_size]
                occluded = x[n:n + 1].repeat(len(chunk), *[1] * (x.ndim - 1))
                if self.masking == "layer":
                    mask = x.new_ones((len(chunk), 1, *spatial))
                    for c, box in enumerate(chunk):
                        mask[(c, every, *box)] = 0
                    logits = layer_masked_forward(self.model, occluded, mask)
                else:
                    for c, box in enumerate(chunk):
                        occluded[(c, every, *box)] = self.baseline
                    logits = self.model(occluded)
                scores = self.select(logits, targets[n:n + 1].expand(len(chunk), -1))
                drop = base_scores[n] - scores  # [chunk, K]
                for c, box in enumerate(chunk):
                    maps[(n, every, *box)] += drop[c].view(-1, *[1] * dims)
        return maps / count
