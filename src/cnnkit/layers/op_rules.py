"""The per-call rules that operator facts point to: multiply-accumulates and what an
operator does to the spatial axes, read from one functional call's arguments.

A ``macs`` rule is ``(args, kwargs, output) -> int``; a ``field`` rule is
``(args, kwargs, extent_in, extent_out) ->`` a spatial map of :mod:`cnnkit.layers.ops`
(:class:`~cnnkit.layers.ops.Window`, ``Transposed``, ``Resample``, ``Shift``)
or None for an element-wise operator. ``extent_in`` is the spatial shape of the first
input and ``extent_out`` that of the output; the number of axes is ``len(extent_out)``.
The recurrences that turn these maps into receptive fields are
:mod:`cnnkit.analysis.receptive_field` (Araujo, Norris and Sim 2019, "Computing
Receptive Fields of Convolutional Neural Networks", Distill; Dumoulin and Visin 2016,
"A guide to convolution arithmetic for deep learning").

Example:
    >>> import torch
    >>> from cnnkit.layers.op_rules import conv_field
    >>> w = torch.zeros(8, 2, 3, 5, 7)
    >>> conv_field((torch.zeros(1, 2, 9, 9, 9), w), {"padding": 1}, (9, 9, 9), (9, 7, 5))
    Window(kernel=(3, 5, 7), stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1))
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .ops import Resample, Shift, Transposed, Window, arg, ntuple

__all__ = ["conv_macs", "conv_transpose_macs", "linear_macs", "norm_macs", "conv_field",
           "conv_transpose_field", "pool_field", "lp_pool_field", "adaptive_field",
           "adaptive_window", "resample_field", "pad_field", "crop_field", "unpool_field",
           "pixel_shuffle_field", "pixel_unshuffle_field", "TAPS"]

# Input pixels that feed one output pixel along an axis, per interpolation mode.
TAPS = {"nearest": 1, "nearest-exact": 1, "linear": 2, "bilinear": 2, "trilinear": 2,
        "bicubic": 4}


# -- multiply-accumulates ------------------------------------------------------------------
def conv_macs(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    """A convolution: weight ``[C_out, C_in / groups, *kernel]``, so every output element
    costs ``C_in / groups * prod(kernel)``, in any number of dims."""
    return out.numel() * math.prod(arg(args, kwargs, 1, "weight").shape[1:])


def conv_transpose_macs(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    """A transposed convolution: weight ``[C_in, C_out / groups, *kernel]``, the same
    product paid per *input* element."""
    x = arg(args, kwargs, 0, "input")
    return x.numel() * math.prod(arg(args, kwargs, 1, "weight").shape[1:])


def linear_macs(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    """A linear layer: ``rows x in x out``."""
    return out.numel() * arg(args, kwargs, 1, "weight").shape[-1]


def norm_macs(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    """A normalisation at inference is ``x * scale + shift``: one per output element."""
    return out.numel()


# -- spatial maps --------------------------------------------------------------------------
def conv_field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
               extent_out: tuple[int, ...]) -> Window:
    """A convolution's window per axis; ``padding="same"`` puts ``d (k - 1) // 2`` first (an
    odd pixel goes last), ``"valid"`` is none."""
    n = len(extent_out)
    kernel = tuple(arg(args, kwargs, 1, "weight").shape[2:])
    stride = ntuple(arg(args, kwargs, 3, "stride", 1), n)
    dilation = ntuple(arg(args, kwargs, 5, "dilation", 1), n)
    padding = arg(args, kwargs, 4, "padding", 0)
    if isinstance(padding, str):
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2
                        for k, d in zip(kernel, dilation, strict=True))
    return Window(kernel, stride, ntuple(padding, n), dilation)


def conv_transpose_field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
                         extent_out: tuple[int, ...]) -> Transposed:
    n = len(extent_out)
    kernel = tuple(arg(args, kwargs, 1, "weight").shape[2:])
    return Transposed(kernel, ntuple(arg(args, kwargs, 3, "stride", 1), n),
                      ntuple(arg(args, kwargs, 4, "padding", 0), n),
                      ntuple(arg(args, kwargs, 7, "dilation", 1), n))


def pool_field(dilated: bool):
    """The window of a max pool (``dilated``: it has a dilation argument) or average pool."""

    def field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
              extent_out: tuple[int, ...]) -> Window:
        n = len(extent_out)
        kernel = ntuple(arg(args, kwargs, 1, "kernel_size"), n)
        stride = ntuple(arg(args, kwargs, 2, "stride") or kernel, n)
        padding = ntuple(arg(args, kwargs, 3, "padding", 0), n)
        dilation = ntuple(arg(args, kwargs, 4, "dilation", 1), n) if dilated else (1,) * n
        return Window(kernel, stride, padding, dilation)

    return field


def lp_pool_field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
                  extent_out: tuple[int, ...]) -> Window:
    n = len(extent_out)
    kernel = ntuple(arg(args, kwargs, 2, "kernel_size"), n)
    stride = ntuple(arg(args, kwargs, 3, "stride") or kernel, n)
    return Window(kernel, stride, (0,) * n, (1,) * n)


def adaptive_window(n_in: int, n_out: int) -> tuple[float, float, float]:
    """``(kernel, stride, padding)`` equivalent to adaptive pooling from n_in to n_out.

    Adaptive pooling window ``i`` covers ``[floor(i n/m), ceil((i+1) n/m))``; the kernel is
    the largest window and the padding puts pixel 0 at the centre of the first window.
    With ``n_out == 1`` this is the whole input (global pooling).
    """
    windows = [math.ceil((i + 1) * n_in / n_out) - (i * n_in) // n_out for i in range(n_out)]
    kernel, first = max(windows), windows[0]
    return float(kernel), n_in / n_out, (kernel - 1) / 2 - (first - 1) / 2


def adaptive_field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
                   extent_out: tuple[int, ...]) -> Window:
    """Adaptive pooling (and ``"area"`` interpolation) as its equivalent window per axis."""
    windows = [adaptive_window(a, b) for a, b in zip(extent_in, extent_out, strict=True)]
    kernel, stride, padding = (tuple(w[i] for w in windows) for i in range(3))
    return Window(kernel, stride, padding, (1,) * len(extent_out))


def resample_field(fixed_mode: str | None = None, aligned: bool = False):
    """``F.interpolate`` (or a deprecated alias fixing ``mode`` and ``align_corners``).

    Linear modes without ``align_corners`` centre output pixel 0 at input coordinate
    ``0.5 n / m - 0.5`` (clamped at 0).
    """

    def field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
              extent_out: tuple[int, ...]) -> Window | Resample:
        mode = fixed_mode or arg(args, kwargs, 3, "mode", "nearest")
        if mode == "area":  # area interpolation is adaptive average pooling
            return adaptive_field(args, kwargs, extent_in, extent_out)
        taps = TAPS.get(mode, 1)
        align = arg(args, kwargs, 4, "align_corners", aligned)
        offset = tuple(max(0.0, 0.5 * a / b - 0.5) if taps > 1 and not align else 0.0
                       for a, b in zip(extent_in, extent_out, strict=True))
        return Resample(taps, offset)

    return field


def pad_field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
              extent_out: tuple[int, ...]) -> Shift:
    """``F.pad`` lists (before, after) pairs from the last dim backwards."""
    n = len(extent_out)
    pads = list(arg(args, kwargs, 1, "pad"))
    return Shift(tuple(pads[2 * (n - 1 - i)] if 2 * (n - 1 - i) < len(pads) else 0
                       for i in range(n)))


def crop_field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
               extent_out: tuple[int, ...]) -> Shift | None:
    """``x[..., a:b, c:d]`` (a crop) shifts pixel 0 to ``(a, c)``; other indexing: None."""
    n, ndim = len(extent_out), args[0].ndim
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    if Ellipsis in index:
        spatial: tuple[Any, ...] = index[index.index(Ellipsis) + 1:]
    elif len(index) > ndim - n:  # x[:, :, a:b, c:d]: the spatial part starts at ndim - n
        spatial = index[ndim - n:]
    else:
        return None
    if len(spatial) > n or not all(isinstance(i, slice) and i.step in (None, 1)
                                   for i in spatial):
        return None
    spatial = (slice(None),) * (n - len(spatial)) + tuple(spatial)
    starts = [_slice_start(i, size) for i, size in zip(spatial, extent_in, strict=True)]
    return Shift(tuple(-s for s in starts))


def _slice_start(index: slice, size: int) -> int:
    start = index.start or 0
    return start + size if start < 0 else start


def unpool_field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
                 extent_out: tuple[int, ...]) -> Resample:
    """Max-unpooling: each output pixel holds one pooled value (or zero), as nearest
    upsampling."""
    return Resample(1, (0.0,) * len(extent_out))


def pixel_shuffle_field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
                        extent_out: tuple[int, ...]) -> Resample:
    r = int(arg(args, kwargs, 1, "upscale_factor"))
    return Resample(1, (-(r - 1) / (2 * r),) * len(extent_out))


def pixel_unshuffle_field(args: tuple, kwargs: dict, extent_in: tuple[int, ...],
                          extent_out: tuple[int, ...]) -> Window:
    n, r = len(extent_out), int(arg(args, kwargs, 1, "downscale_factor"))
    return Window((r,) * n, (r,) * n, (0,) * n, (1,) * n)
