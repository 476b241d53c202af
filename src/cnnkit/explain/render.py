"""Pictures of explanations: overlays with a colour bar, and a grid comparing methods.

Inputs ``[C, *spatial]`` and maps ``[*spatial]`` of any of the three dims get the picture
that suits them:

* a signal ``[C, L]``: its channels as lines over a colour band of the attribution
  (the map as the background colour at each position);
* an image ``[C, H, W]``: the map laid over it, as a heat map;
* a volume ``[C, D, H, W]``: a grid of depth slices (at most ``slices`` of them, evenly
  spaced, each tile labelled ``z=d``), the map laid over each, one colour scale for the
  whole volume.

Colours: a map of non-negative values is scaled by its maximum and drawn in ``inferno``
(perceptually uniform: van der Walt and Smith 2015, matplotlib's viridis family); a map
with negative values is scaled by its largest magnitude to [-1, 1] and drawn in
``coolwarm`` (Moreland 2009, "Diverging Color Maps for Scientific Visualization"), blue
for negative and red for positive evidence. The map's opacity at each element is
``alpha`` times its scaled magnitude (:func:`blend`), so where the attribution is zero the
input shows through unchanged and the strongest element is ``alpha`` opaque.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["normalize_map", "scale_map", "blend", "save_overlay", "save_grid", "to_display",
           "slice_indices", "montage", "UNSIGNED_CMAP", "SIGNED_CMAP"]

UNSIGNED_CMAP = "inferno"
SIGNED_CMAP = "coolwarm"


def normalize_map(m: torch.Tensor) -> np.ndarray:
    """Min-max scale one map ``[*spatial]`` to [0, 1] for display (a constant map gives 0)."""
    a = m.detach().float().cpu().numpy()
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def scale_map(m: torch.Tensor) -> tuple[np.ndarray, bool]:
    """One map ``[*spatial]`` scaled for display, and whether it is signed: a map without
    negative values is divided by its maximum (to [0, 1]), a signed one by its largest
    magnitude (to [-1, 1]); zero stays zero, and an all-zero or non-finite map gives
    zeros (nothing drawn).

    Example:
        >>> import torch
        >>> from cnnkit.explain.render import scale_map
        >>> [(a.tolist(), signed) for a, signed in (scale_map(torch.tensor([0.0, 1.0, 4.0])),
        ...                                         scale_map(torch.tensor([-2.0, 1.0])))]
        [([0.0, 0.25, 1.0], False), ([-1.0, 0.5], True)]
    """
    a = m.detach().float().cpu().numpy()
    if not a.size or not np.isfinite(a).all():
        return np.zeros_like(a), False
    signed = bool(a.min() < 0)
    top = float(np.abs(a).max())
    return (a / top if top > 0 else np.zeros_like(a)), signed


def blend(image: np.ndarray, heat: np.ndarray, alpha: float = 0.7,
          signed: bool = False) -> np.ndarray:
    """RGB ``[..., 3]`` of ``image`` (grey ``[...]`` or RGB ``[..., 3]`` in [0, 1]) with the
    scaled map ``heat`` (``[...]``, in [0, 1], or [-1, 1] when ``signed``; NaN: no map)
    over it: colour ``cmap(heat)`` at opacity ``alpha * |heat|``, so an element of zero
    attribution keeps the input's colour exactly.

    Example:
        >>> import numpy as np
        >>> from cnnkit.explain.render import blend
        >>> out = blend(np.full((2, 2), 0.5), np.array([[0.0, 1.0], [0.0, 0.0]]))
        >>> out[0, 0].tolist(), bool((out[0, 1] != 0.5).any())
        ([0.5, 0.5, 0.5], True)
    """
    import matplotlib

    rgb = np.repeat(image[..., None], 3, -1) if image.ndim == heat.ndim else image[..., :3]
    rgb = rgb.astype(float)
    h = np.nan_to_num(np.asarray(heat, dtype=float), nan=0.0)
    cmap = matplotlib.colormaps[SIGNED_CMAP if signed else UNSIGNED_CMAP]
    colour = cmap((h + 1) / 2 if signed else h)[..., :3]
    a = (alpha * np.clip(np.abs(h), 0, 1))[..., None]
    return np.where(a > 0, (1 - a) * rgb + a * colour, rgb)


def _mappable(signed: bool) -> Any:
    """A colour scale for the colour bar: [0, 1] or [-1, 1]."""
    import matplotlib
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(matplotlib.colors.Normalize(-1.0 if signed else 0.0, 1.0),
                          matplotlib.colormaps[SIGNED_CMAP if signed else UNSIGNED_CMAP])


def _bar_label(signed: bool) -> str:
    return "relative attribution (- / +)" if signed else "relative importance"


def to_display(image: torch.Tensor) -> np.ndarray:
    """``[C, *spatial]`` -> floats in [0, 1] with the channels last (one channel dropped):
    ``[H, W]`` or ``[H, W, 3]`` for imshow, ``[D, H, W(, 3)]``, ``[L(, C)]``.

    uint8 is divided by 255; floats already in [0, 1] are kept, other floats (normalised
    inputs) are min-max scaled, so nothing is clipped away.
    """
    img = image.detach().float().cpu()
    if image.dtype == torch.uint8:
        img = img / 255
    elif img.numel() and (img.min() < 0 or img.max() > 1):
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    img = img.clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.movedim(0, -1).numpy()


def slice_indices(depth: int, slices: int = 8) -> list[int]:
    """At most ``slices`` depth indices, evenly spaced from the first to the last.

    Example:
        >>> from cnnkit.explain.render import slice_indices
        >>> slice_indices(20, 4), slice_indices(3, 8)
        ([0, 6, 13, 19], [0, 1, 2])
    """
    if slices < 1:
        raise ValueError(f"slices must be a positive int, got {slices}")
    return sorted({round(v) for v in np.linspace(0, depth - 1, min(depth, slices))})


def montage(volume: np.ndarray, indices: list[int], cols: int | None = None,
            fill: float = np.nan) -> np.ndarray:
    """The slices ``volume[indices]`` (``[D, H, W]`` or ``[D, H, W, 3]``) tiled row by row
    into one picture, ``cols`` per row (about square by default), with a one-pixel gap of
    ``fill`` (NaN: transparent) between the tiles.

    Example:
        >>> import numpy as np
        >>> from cnnkit.explain.render import montage
        >>> montage(np.zeros((5, 2, 3)), [0, 2, 4], cols=2).shape
        (5, 7)
    """
    cols = cols or math.ceil(math.sqrt(len(indices)))
    rows = math.ceil(len(indices) / cols)
    h, w = volume.shape[1:3]
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, *volume.shape[3:]), fill,
                  dtype=float)
    for n, d in enumerate(indices):
        r, c = divmod(n, cols)
        out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = volume[d]
    return out


def _show(ax: Any, image: np.ndarray, heat: np.ndarray | None, alpha: float,
          signed: bool) -> Any:
    if heat is None:
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1,
                  interpolation="nearest")
    else:
        ax.imshow(blend(image, heat, alpha, signed), interpolation="nearest")
    ax.axis("off")
    return None if heat is None else _mappable(signed)


def _draw_signal(ax: Any, image: torch.Tensor, heat: np.ndarray | None, alpha: float,
                 signed: bool) -> Any:
    """The channels of ``[C, L]`` as lines, over the map as a colour band."""
    import matplotlib

    sig = image.detach().float().cpu()
    sig = (sig / 255 if image.dtype == torch.uint8 else sig).numpy()
    lo, hi = float(sig.min()), float(sig.max())
    pad = 0.05 * (hi - lo) or 0.5
    if heat is not None:
        cmap = matplotlib.colormaps[SIGNED_CMAP if signed else UNSIGNED_CMAP]
        band = cmap((heat + 1) / 2 if signed else heat)
        band[..., 3] = alpha * np.clip(np.abs(heat), 0, 1)  # zero: the background shows
        ax.imshow(band[None], aspect="auto", interpolation="nearest",
                  extent=(-0.5, sig.shape[1] - 0.5, lo - pad, hi + pad))
    for c, line in enumerate(sig):
        ax.plot(np.arange(len(line)), line, lw=1, color="black" if c == 0 else None)
    ax.set(xlim=(-0.5, sig.shape[1] - 0.5), ylim=(lo - pad, hi + pad))
    ax.tick_params(labelsize=6)
    return None if heat is None else _mappable(signed)


def _draw(ax: Any, image: torch.Tensor, heat: torch.Tensor | None, alpha: float,
          slices: int) -> Any:
    """``image`` ``[C, *spatial]`` with ``heat`` ``[*spatial]`` (None: the input alone) on
    ``ax``; returns the heat's colour scale (None without heat)."""
    dims = image.ndim - 1
    norm, signed = (None, False) if heat is None else scale_map(heat)
    if norm is not None and norm.shape != tuple(image.shape[1:]):
        raise ValueError(f"a map of shape {norm.shape} does not fit an input of shape "
                         f"{tuple(image.shape)}; give maps [*spatial] of the input")
    if dims == 1:
        return _draw_signal(ax, image, norm, alpha, signed)
    if dims == 2:
        return _show(ax, to_display(image), norm, alpha, signed)
    if dims != 3:
        raise ValueError(f"cannot draw an input of shape {tuple(image.shape)}; give [C, L], "
                         "[C, H, W] or [C, D, H, W]")
    idx = slice_indices(image.shape[1], slices)
    cols = math.ceil(math.sqrt(len(idx)))
    im = _show(ax, montage(to_display(image), idx, cols, fill=1.0),
               None if norm is None else montage(norm, idx, cols), alpha, signed)
    h, w = image.shape[2:]
    for n, d in enumerate(idx):
        r, c = divmod(n, cols)
        ax.text(c * (w + 1), r * (h + 1), f"z={d}", fontsize=5, color="white", va="top",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "lw": 0})
    return im


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_overlay(path: str | Path, image: torch.Tensor, heat: torch.Tensor, title: str,
                 alpha: float = 0.7, slices: int = 8) -> None:
    """One input ``[C, *spatial]`` with its map ``[*spatial]`` on top (:func:`blend`) and a
    colour bar (relative importance, 0 to 1, or signed attribution, -1 to 1); a volume
    shows ``slices`` depth slices.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> from cnnkit.explain.render import save_overlay
        >>> save_overlay("signal.png", torch.rand(2, 64), torch.rand(64), "saliency")
        >>> image = Image.open("signal.png")  # a 2-channel signal of 64 steps, its map over it
        >>> image.format, image.width > image.height
        ('PNG', True)
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 2.6) if image.ndim == 2 else (4.2, 3.6))
    im = _draw(ax, image, heat, alpha, slices)
    ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(_bar_label(bool(im.norm.vmin < 0)), fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def save_grid(path: str | Path, images: list[torch.Tensor], maps: dict[str, torch.Tensor],
              titles: list[str], alpha: float = 0.7, slices: int = 8) -> None:
    """Rows: inputs ``[C, *spatial]``; columns: the input, then one overlay per method
    titled by its name (``maps[method]`` is ``[N, *spatial]``, or a list of N maps when
    the inputs differ in size); one colour bar per kind of map drawn (unsigned, signed)."""
    plt = _pyplot()
    rows, cols = len(images), 1 + len(maps)
    wide = 1.4 if images and images[0].ndim == 2 else 1.0  # signals are wide
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * wide * cols, 2.3 * rows),
                             squeeze=False)
    scales: dict[bool, Any] = {}
    for r, img in enumerate(images):
        _draw(axes[r, 0], img, None, alpha, slices)
        axes[r, 0].set_title(titles[r], fontsize=8)
        for c, (method, m) in enumerate(maps.items(), start=1):
            im = _draw(axes[r, c], img, m[r], alpha, slices)
            scales[bool(im.norm.vmin < 0)] = im
            if r == 0:
                axes[r, c].set_title(method, fontsize=9)
    for signed, im in sorted(scales.items()):
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02,
                     label=_bar_label(signed))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
