"""Layer masking: hide part of the input inside the network instead of painting it grey.

Balasubramanian and Feizi (2023), "Towards Improved Input Masking for Convolutional
Neural Networks", ICCV. Painting hidden pixels grey or black creates new edges and
shapes the network reacts to (*missingness bias*). Layer masking carries the mask
through the network instead (Fig. 1 of the paper and its reference code):

* before every convolution the hidden elements of its input are zeroed and then filled
  by *neighbour padding*: ``k`` rounds (``k`` the kernel size) in which every hidden
  element next to a known one gets the mean of its known neighbours (3, 3x3 or 3x3x3 of
  them for 1, 2 or 3 spatial dims), so the convolution sees no artificial edge at the
  mask boundary;
* the mask is propagated with a max-pool of the layer's own kernel, stride, padding
  and dilation (1 = visible: an output is visible when any input of its window is), and
  the layer's output is multiplied by it, so hidden regions stay exactly zero;
* max/average pools zero their hidden inputs and propagate the mask the same way;
  adaptive average pools average over the visible elements only
  (``avg(x * m) / avg(m)``), as in the reference code.

Signals, images and volumes alike: the masked layers are the 1D, 2D and 3D
convolutions and pools, and a mask has the input's spatial shape.

The hooks find a layer's input mask by resolution: the most recent mask of that
spatial size (exact for chains; at a residual add it is the mask of the branch that
ran last, which differs from the paper's intersection only in the ring of pixels
around the boundary). A resolution seen for the first time gets the input mask
max-pooled to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.layers.nd import (
    DIMS,
    adaptive_avg_pool,
    adaptive_max_pool,
    avg_pool,
    conv,
    max_pool,
)

__all__ = ["layer_masking", "layer_masked_forward", "neighbour_pad", "MASKED_LAYERS"]

#: Module types whose outputs are masked: convolutions and pools of 1, 2 or 3 dims.
MASKED_LAYERS = tuple(kind(d) for kind in (conv, max_pool, avg_pool, adaptive_avg_pool,
                                           adaptive_max_pool) for d in DIMS)
_CONVS = tuple(conv(d) for d in DIMS)
_MAX_POOLS = tuple(max_pool(d) for d in DIMS)
_AVG_POOLS = tuple(avg_pool(d) for d in DIMS)
_ADAPTIVE_AVG_POOLS = tuple(adaptive_avg_pool(d) for d in DIMS)


def _functional(name: str, dims: int) -> Callable[..., torch.Tensor]:
    """``F.conv1d``, ``F.max_pool3d``, ``F.adaptive_max_pool2d``, ... by name and dims."""
    return getattr(F, f"{name}{dims}d")


def neighbour_pad(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    """Zero the hidden elements of ``x`` then fill, ``iters`` times, every hidden element
    with a visible neighbour (in its 3, 3x3 or 3x3x3 window) by the mean of its visible
    neighbours (the paper's neighbour padding). ``x`` is ``[B, C, *spatial]``, ``mask``
    ``[B or 1, 1, *spatial]`` with 1 = visible. The fills carry no gradient (as in the
    reference code)."""
    x = x * mask
    c, dims = x.shape[1], x.ndim - 2
    conv_nd = _functional("conv", dims)
    filt = torch.ones((1, 1, *[3] * dims), dtype=x.dtype, device=x.device)
    for _ in range(iters):
        with torch.no_grad():
            num = conv_nd(x, filt.expand(c, *filt.shape[1:]), padding=1, groups=c)
            den = conv_nd(mask, filt, padding=1)
            fill = torch.where(den > 0, num / den.clamp_min(1), 0.0) * (1 - mask)
            new_mask = (mask + den).clamp(0, 1)
        x = x + fill
        mask = new_mask
    return x


def _as_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[*spatial]``, ``[B, *spatial]`` or ``[B, 1, *spatial]`` -> ``[B or 1, 1, *spatial]``
    of x's dtype (``spatial``: x's spatial shape)."""
    m = torch.as_tensor(mask, device=x.device)
    dims = x.ndim - 2
    if m.ndim == dims:
        m = m[None, None]
    elif m.ndim == dims + 1:
        m = m[:, None]
    if m.ndim != x.ndim or m.shape[1] != 1 or tuple(m.shape[2:]) != tuple(x.shape[2:]) or (
            m.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"mask of shape {tuple(m.shape)} does not fit inputs of shape "
                         f"{tuple(x.shape)}; give [*spatial], [B, *spatial] or "
                         "[B, 1, *spatial] with the inputs' spatial shape")
    return (m != 0).to(x.dtype)


def _pool_mask(module: nn.Module, m: torch.Tensor, out_size: tuple[int, ...]) -> torch.Tensor:
    """The mask of ``module``'s output: a max-pool of the input mask with its geometry."""
    dims = m.ndim - 2
    max_pool_nd = _functional("max_pool", dims)
    if isinstance(module, _CONVS):
        if isinstance(module.padding, str):  # "same"/"valid": pad symmetrically to match
            pad = [d * (k - 1) // 2 if module.padding == "same" else 0
                   for k, d in zip(module.kernel_size, module.dilation, strict=True)]
        else:
            pad = list(module.padding)
        out = max_pool_nd(m, module.kernel_size, module.stride, pad, module.dilation)
    elif isinstance(module, _MAX_POOLS):
        out = max_pool_nd(m, module.kernel_size, module.stride, module.padding,
                          module.dilation, module.ceil_mode)
    elif isinstance(module, _AVG_POOLS):
        out = max_pool_nd(m, module.kernel_size, module.stride, module.padding,
                          ceil_mode=module.ceil_mode)
    else:
        out = _functional("adaptive_max_pool", dims)(m, out_size)
    if tuple(out.shape[2:]) != out_size:  # e.g. asymmetric "same" padding
        out = _functional("adaptive_max_pool", dims)(m, out_size)
    return out


@contextlib.contextmanager
def layer_masking(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Inside the block every forward of ``model`` runs layer-masked with ``mask``.

    Args:
        model: a CNN of 1, 2 or 3 spatial dims.
        mask: ``[*spatial]``, ``[B, *spatial]`` or ``[B, 1, *spatial]``; nonzero = visible,
            0 = hidden. It must have the spatial size of the inputs the model is called
            with.

    The hooks are removed on exit, even on error.
    """
    masks: dict[tuple[int, ...], torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}

    def start(_m: nn.Module, args: tuple[Any, ...]) -> None:
        base["mask"] = _as_mask(mask, args[0])
        masks.clear()
        masks[tuple(args[0].shape[2:])] = base["mask"]

    def mask_at(size: tuple[int, ...]) -> torch.Tensor:
        if size not in masks:
            masks[size] = _functional("adaptive_max_pool", len(size))(base["mask"], size)
        return masks[size]

    def pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        m = mask_at(tuple(x.shape[2:]))
        if isinstance(module, _CONVS):
            x = neighbour_pad(x, m, max(module.kernel_size))
        else:
            x = x * m
        return (x, *args[1:])

    def post(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        m_in = mask_at(tuple(args[0].shape[2:]))
        size = tuple(out.shape[2:])
        if isinstance(module, _ADAPTIVE_AVG_POOLS):  # mean over the visible elements only
            den = _functional("adaptive_avg_pool", len(size))(m_in, size)
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
        >>> from cnnkit.explain.layer_masking import layer_masked_forward
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16).eval()
        >>> mask = torch.ones(16, 16); mask[4:12, 4:12] = 0
        >>> layer_masked_forward(model, torch.rand(2, 3, 16, 16), mask).shape
        torch.Size([2, 3])
    """
    with layer_masking(model, mask):
        return model(x)
