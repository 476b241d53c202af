"""Layer masking: hide part of the image inside the network instead of painting it grey.

Balasubramanian and Feizi (2023), "Towards Improved Input Masking for Convolutional
Neural Networks", ICCV. Painting hidden pixels grey or black creates new edges and
shapes the network reacts to (*missingness bias*). Layer masking carries the mask
through the network instead (Fig. 1 of the paper and its reference code):

* before every convolution the hidden pixels of its input are zeroed and then filled by
  *neighbour padding*: ``k`` rounds (``k`` the kernel size) in which every hidden pixel
  next to a known one gets the mean of its known 3x3 neighbours, so the convolution
  sees no artificial edge at the mask boundary;
* the mask is propagated with a max-pool of the layer's own kernel, stride, padding
  and dilation (1 = visible: an output is visible when any input of its window is), and
  the layer's output is multiplied by it, so hidden regions stay exactly zero;
* max/average pools zero their hidden inputs and propagate the mask the same way;
  adaptive average pools average over the visible pixels only
  (``avg(x * m) / avg(m)``), as in the reference code.

The hooks find a layer's input mask by resolution: the most recent mask of that
spatial size (exact for chains; at a residual add it is the mask of the branch that
ran last, which differs from the paper's intersection only in the ring of pixels
around the boundary). A resolution seen for the first time gets the input mask
max-pooled to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["layer_masking", "layer_masked_forward", "neighbour_pad", "MASKED_LAYERS"]

#: Module types whose outputs are masked.
MASKED_LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d)


def neighbour_pad(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    """Zero the hidden pixels of ``x`` then fill, ``iters`` times, every hidden pixel with
    a visible 3x3 neighbour by the mean of its visible neighbours (the paper's neighbour
    padding). ``x`` is ``[B, C, H, W]``, ``mask`` ``[B or 1, 1, H, W]`` with 1 = visible.
    The fills carry no gradient (as in the reference code)."""
    x = x * mask
    c = x.shape[1]
    filt = torch.ones((1, 1, 3, 3), dtype=x.dtype, device=x.device)
    for _ in range(iters):
        with torch.no_grad():
            num = F.conv2d(x, filt.expand(c, 1, 3, 3), padding=1, groups=c)
            den = F.conv2d(mask, filt, padding=1)
            fill = torch.where(den > 0, num / den.clamp_min(1), 0.0) * (1 - mask)
            new_mask = (mask + den).clamp(0, 1)
        x = x + fill
        mask = new_mask
    return x


def _as_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` -> ``[B or 1, 1, H, W]`` of x's dtype."""
    m = torch.as_tensor(mask, device=x.device)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != tuple(x.shape[-2:]) or (
            m.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"mask of shape {tuple(m.shape)} does not fit images of shape "
                         f"{tuple(x.shape)}; give [H, W], [B, H, W] or [B, 1, H, W]")
    return (m != 0).to(x.dtype)


def _pool_mask(module: nn.Module, m: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """The mask of ``module``'s output: a max-pool of the input mask with its geometry."""
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str):  # "same"/"valid": pad symmetrically to match
            pad = [d * (k - 1) // 2 if module.padding == "same" else 0
                   for k, d in zip(module.kernel_size, module.dilation, strict=True)]
        else:
            pad = list(module.padding)
        out = F.max_pool2d(m, module.kernel_size, module.stride, pad, module.dilation)
    elif isinstance(module, nn.MaxPool2d):
        out = F.max_pool2d(m, module.kernel_size, module.stride, module.padding,
                           module.dilation, module.ceil_mode)
    elif isinstance(module, nn.AvgPool2d):
        out = F.max_pool2d(m, module.kernel_size, module.stride, module.padding,
                           ceil_mode=module.ceil_mode)
    else:
        out = F.adaptive_max_pool2d(m, out_size)
    if tuple(out.shape[-2:]) != out_size:  # e.g. asymmetric "same" padding
        out = F.adaptive_max_pool2d(m, out_size)
    return out


@contextlib.contextmanager
def layer_masking(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Inside the block every forward of ``model`` runs layer-masked with ``mask``.

    Args:
        model: a CNN.
        mask: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``; nonzero = visible, 0 = hidden.
            It must have the spatial size of the images the model is called with.

    The hooks are removed on exit, even on error.
    """
    masks: dict[tuple[int, int], torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}

    def start(_m: nn.Module, args: tuple[Any, ...]) -> None:
        base["mask"] = _as_mask(mask, args[0])
        masks.clear()
        masks[tuple(args[0].shape[-2:])] = base["mask"]

    def mask_at(size: tuple[int, int]) -> torch.Tensor:
        if size not in masks:
            masks[size] = F.adaptive_max_pool2d(base["mask"], size)
        return masks[size]

    def pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        m = mask_at(tuple(x.shape[-2:]))
        if isinstance(module, nn.Conv2d):
            x = neighbour_pad(x, m, max(module.kernel_size))
        else:
            x = x * m
        return (x, *args[1:])

    def post(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        m_in = mask_at(tuple(args[0].shape[-2:]))
        size = tuple(out.shape[-2:])
        if isinstance(module, nn.AdaptiveAvgPool2d):  # mean over the visible pixels only
            den = F.adaptive_avg_pool2d(m_in, size)
            out = torch.where(den > 0, out / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
            m_out = (den > 0).to(out.dtype)
        else:
            m_out = _pool_mask(module, m_in, size)
        masks[size] = m_out
        return out * m_out

    handles = [model.register_forward_pre_hook(start)]
    try:
        for module in model.modules():
            if isinstance(module, MASKED_LAYERS):
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def layer_masked_forward(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``mask`` applied by layer masking (see :func:`layer_masking`).

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16).eval()
        >>> mask = torch.ones(16, 16); mask[4:12, 4:12] = 0
        >>> layer_masked_forward(model, torch.rand(2, 3, 16, 16), mask).shape
        torch.Size([2, 3])
    """
    with layer_masking(model, mask):
        return model(x)
