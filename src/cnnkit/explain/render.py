"""Pictures of explanations: overlays with a colour bar, and a grid comparing methods.

Inputs ``[C, *spatial]`` and maps ``[*spatial]`` of any of the three dims get the picture
that suits them:

* a signal ``[C, L]``: its channels as lines over a colour band of the attribution
  (the map as the background colour at each position);
* an image ``[C, H, W]``: the map laid over it, as a heat map;
* a volume ``[C, D, H, W]``: a grid of depth slices (at most ``slices`` of them, evenly
  spaced, each tile labelled ``z=d``), the map laid over each, one colour scale for the
  whole volume.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["normalize_map", "save_overlay", "save_grid", "to_display", "slice_indices",
           "montage"]


def normalize_map(m: torch.Tensor) -> np.ndarray:
    """Min-max scale one map ``[*spatial]`` to [0, 1] for display (a constant map gives 0)."""
    a = m.detach().float().cpu().numpy()
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


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


def _show(ax: Any, image: np.ndarray, heat: np.ndarray | None, alpha: float) -> Any:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    im = None if heat is None else ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    ax.axis("off")
    return im


def _draw_signal(ax: Any, image: torch.Tensor, heat: np.ndarray | None, alpha: float) -> Any:
    """The channels of ``[C, L]`` as lines, over the map as a colour band."""
    sig = image.detach().float().cpu()
    sig = (sig / 255 if image.dtype == torch.uint8 else sig).numpy()
    lo, hi = float(sig.min()), float(sig.max())
    pad = 0.05 * (hi - lo) or 0.5
    im = None
    if heat is not None:
        im = ax.imshow(heat[None, :], cmap="jet", alpha=alpha, vmin=0, vmax=1, aspect="auto",
                       extent=(-0.5, sig.shape[1] - 0.5, lo - pad, hi + pad))
    for c, line in enumerate(sig):
        ax.plot(np.arange(len(line)), line, lw=1, color="black" if c == 0 else None)
    ax.set(xlim=(-0.5, sig.shape[1] - 0.5), ylim=(lo - pad, hi + pad))
    ax.tick_params(labelsize=6)
    return im


def _draw(ax: Any, image: torch.Tensor, heat: torch.Tensor | None, alpha: float,
          slices: int) -> Any:
    """``image`` ``[C, *spatial]`` with ``heat`` ``[*spatial]`` (None: the input alone) on
    ``ax``; returns the heat's colour mapping (None without heat)."""
    dims = image.ndim - 1
    norm = None if heat is None else normalize_map(heat)
    if norm is not None and norm.shape != tuple(image.shape[1:]):
        raise ValueError(f"a map of shape {norm.shape} does not fit an input of shape "
                         f"{tuple(image.shape)}; give maps [*spatial] of the input")
    if dims == 1:
        return _draw_signal(ax, image, norm, alpha)
    if dims == 2:
        return _show(ax, to_display(image), norm, alpha)
    if dims != 3:
        raise ValueError(f"cannot draw an input of shape {tuple(image.shape)}; give [C, L], "
                         "[C, H, W] or [C, D, H, W]")
    idx = slice_indices(image.shape[1], slices)
    cols = math.ceil(math.sqrt(len(idx)))
    im = _show(ax, montage(to_display(image), idx, cols, fill=1.0),
               None if norm is None else montage(norm, idx, cols), alpha)
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
                 alpha: float = 0.5, slices: int = 8) -> None:
    """One input ``[C, *spatial]`` with its map ``[*spatial]`` on top and a colour bar
    (relative importance, 0 to 1); a volume shows ``slices`` depth slices.

    Example:
        >>> import torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "signal.png")
        >>> save_overlay(path, torch.rand(2, 64), torch.rand(64), "saliency")
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 2.6) if image.ndim == 2 else (4.2, 3.6))
    im = _draw(ax, image, heat, alpha, slices)
    ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("relative importance", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def save_grid(path: str | Path, images: list[torch.Tensor], maps: dict[str, torch.Tensor],
              titles: list[str], alpha: float = 0.5, slices: int = 8) -> None:
    """Rows: inputs ``[C, *spatial]``; columns: the input, then one overlay per method
    (``maps[method]`` is ``[N, *spatial]``)."""
    plt = _pyplot()
    rows, cols = len(images), 1 + len(maps)
    wide = 1.4 if images and images[0].ndim == 2 else 1.0  # signals are wide
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * wide * cols, 2.3 * rows),
                             squeeze=False)
    im = None
    for r, img in enumerate(images):
        _draw(axes[r, 0], img, None, alpha, slices)
        axes[r, 0].set_title(titles[r], fontsize=8)
        for c, (method, m) in enumerate(maps.items(), start=1):
            im = _draw(axes[r, c], img, m[r], alpha, slices)
            if r == 0:
                axes[r, c].set_title(method, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02,
                     label="relative importance")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
