"""Checks of what an explainer takes and gives: inputs ``[B, C, *spatial]`` with 1, 2 or 3
spatial dimensions (:func:`check_input`), and maps that show nothing (:func:`degenerate`:
not finite, all zero or constant), which :meth:`cnnkit.explain.Explainer.warn_degenerate`
reports in one line with the method's hint.
"""

from __future__ import annotations

import torch

from cnnkit.layers.nd import DIMS

__all__ = ["check_input", "degenerate"]


def check_input(x: torch.Tensor) -> int:
    """The number of spatial dimensions of inputs ``[B, C, *spatial]`` (1, 2 or 3).

    Raises:
        ValueError: another shape, with the three accepted ones.
    """
    dims = x.ndim - 2
    if dims not in DIMS:
        raise ValueError(f"expected inputs [B, C, L] (signals), [B, C, H, W] (images) or "
                         f"[B, C, D, H, W] (volumes), got shape {tuple(x.shape)}")
    return dims


def degenerate(maps: torch.Tensor) -> str | None:
    """What is wrong with maps ``[N, *spatial]`` that show nothing: ``"NaN or inf"``,
    ``"all zero"`` or ``"constant"`` (the first that any map is), else None.

    Example:
        >>> import torch
        >>> from cnnkit.explain.checks import degenerate
        >>> degenerate(torch.ones(2, 4, 4)), degenerate(torch.rand(2, 4, 4))
        ('constant', None)
    """
    flat = maps.detach().flatten(1)
    if not flat.numel():
        return None
    if not torch.isfinite(flat).all():
        return "NaN or inf"
    if (flat == 0).all(1).any():
        return "all zero"
    if (flat.amax(1) == flat.amin(1)).any():
        return "constant"
    return None
