"""Pictures of explanations: overlays with a colour bar, and a grid comparing methods."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["normalize_map", "save_overlay", "save_grid", "to_display"]


def normalize_map(m: torch.Tensor) -> np.ndarray:
    """Min-max scale one map ``[H, W]`` to [0, 1] for display (a constant map gives 0)."""
    a = m.detach().float().cpu().numpy()
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def to_display(image: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] (or uint8) -> ``[H, W]`` or ``[H, W, 3]`` float for imshow."""
    img = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    img = img.clamp(0, 1).cpu()
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def _show(ax, image: np.ndarray, heat: np.ndarray, alpha: float):
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    im = ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    ax.axis("off")
    return im


def save_overlay(path: str | Path, image: torch.Tensor, heat: torch.Tensor, title: str,
                 alpha: float = 0.5) -> None:
    """One image with its map on top and a colour bar (relative importance, 0 to 1)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = _show(ax, to_display(image), normalize_map(heat), alpha)
    ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("relative importance", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def save_grid(path: str | Path, images: list[torch.Tensor], maps: dict[str, torch.Tensor],
              titles: list[str], alpha: float = 0.5) -> None:
    """Rows: images; columns: the input, then one overlay per method."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows, cols = len(images), 1 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for r, img in enumerate(images):
        disp = to_display(img)
        axes[r, 0].imshow(disp, cmap="gray" if disp.ndim == 2 else None, vmin=0, vmax=1)
        axes[r, 0].set_title(titles[r], fontsize=8)
        axes[r, 0].axis("off")
        for c, (method, m) in enumerate(maps.items(), start=1):
            im = _show(axes[r, c], disp, normalize_map(m[r]), alpha)
            if r == 0:
                axes[r, c].set_title(method, fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02,
                 label="relative importance")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
