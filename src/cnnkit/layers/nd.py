"""Layer types by number of spatial dimensions: one network description, built in 1D, 2D or 3D.

A sample is ``[N, C, *spatial]`` with 1 (signals), 2 (images) or 3 (volumes) spatial
dimensions, and a model's input is described by ``input_size = (C, *spatial)``. Models
never name ``nn.Conv2d`` or ``nn.BatchNorm3d``: they ask this module for the type of
their number of dimensions once, when they are built, and hand the types to their
blocks (the factory of MONAI, Cardoso et al. 2022, "MONAI: An open-source framework for
deep learning in healthcare", arXiv:2211.02701; blocks that take layer types as in timm).
The same description then gives the 2D network of its paper and its 1D and 3D
counterparts, e.g. 3D ResNets for video (Hara, Kataoka and Satoh 2018, "Can
Spatiotemporal 3D CNNs Retrace the History of 2D CNNs and ImageNet?", CVPR) and 1D
ones for time series (Wang, Yan and Oates 2017, "Time Series Classification from
Scratch with Deep Neural Networks: A Strong Baseline", IJCNN).

:func:`resolve_input_size` turns a builder's arguments (``input_size``, or the older
``in_chans`` and ``img_size``) into ``(in_chans, spatial)``; the number of dimensions is
``len(spatial)``.

Example:
    >>> from cnnkit.layers import interp_mode, resolve_input_size
    >>> from cnnkit.layers.nd import batch_norm, conv
    >>> conv(3), batch_norm(1).__name__, interp_mode(3)
    (<class 'torch.nn.modules.conv.Conv3d'>, 'BatchNorm1d', 'trilinear')
    >>> resolve_input_size((1, 16, 64, 64))
    (1, (16, 64, 64))
    >>> resolve_input_size(in_chans=1, img_size=32)
    (1, (32, 32))
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "DIMS", "CONVS", "CONV_TRANSPOSES", "BATCH_NORMS", "check_dims", "conv", "conv_transpose",
    "batch_norm", "instance_norm", "max_pool", "avg_pool", "adaptive_avg_pool",
    "adaptive_max_pool", "max_unpool", "dropout", "interp_mode", "spatial_axes",
    "spatial_dims", "resolve_input_size",
]

DIMS = (1, 2, 3)
# Tuples indexed by dims - 1: immutable, and usable directly in isinstance checks.
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_MAX_UNPOOLS = (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d)
_DROPOUTS = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_INTERP_MODES = ("linear", "bilinear", "trilinear")
_SHAPES = "(C, L), (C, H, W) or (C, D, H, W)"


def check_dims(dims: int) -> int:
    """Return ``dims`` if it is 1, 2 or 3 spatial dimensions; raise a ValueError otherwise.

    Example:
        >>> from cnnkit.layers.nd import check_dims
        >>> check_dims(2)
        2
    """
    if isinstance(dims, bool) or not isinstance(dims, int) or dims not in DIMS:
        raise ValueError(f"dims must be 1, 2 or 3 spatial dimensions (signals, images, "
                         f"volumes), got {dims!r}")
    return dims


def conv(dims: int) -> type[nn.Module]:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``."""
    return CONVS[check_dims(dims) - 1]


def conv_transpose(dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose1d``, ``2d`` or ``3d``."""
    return CONV_TRANSPOSES[check_dims(dims) - 1]


def batch_norm(dims: int) -> type[nn.Module]:
    """``nn.BatchNorm1d``, ``2d`` or ``3d`` (Ioffe and Szegedy 2015, "Batch Normalization")."""
    return BATCH_NORMS[check_dims(dims) - 1]


def instance_norm(dims: int) -> type[nn.Module]:
    """``nn.InstanceNorm1d``, ``2d`` or ``3d`` (Ulyanov, Vedaldi and Lempitsky 2016,
    "Instance Normalization: The Missing Ingredient for Fast Stylization")."""
    return _INSTANCE_NORMS[check_dims(dims) - 1]


def max_pool(dims: int) -> type[nn.Module]:
    """``nn.MaxPool1d``, ``2d`` or ``3d``."""
    return _MAX_POOLS[check_dims(dims) - 1]


def avg_pool(dims: int) -> type[nn.Module]:
    """``nn.AvgPool1d``, ``2d`` or ``3d``."""
    return _AVG_POOLS[check_dims(dims) - 1]


def adaptive_avg_pool(dims: int) -> type[nn.Module]:
    """``nn.AdaptiveAvgPool1d``, ``2d`` or ``3d``."""
    return _ADAPTIVE_AVG_POOLS[check_dims(dims) - 1]


def adaptive_max_pool(dims: int) -> type[nn.Module]:
    """``nn.AdaptiveMaxPool1d``, ``2d`` or ``3d``."""
    return _ADAPTIVE_MAX_POOLS[check_dims(dims) - 1]


def max_unpool(dims: int) -> type[nn.Module]:
    """``nn.MaxUnpool1d``, ``2d`` or ``3d`` (the inverse of a max-pool with indices)."""
    return _MAX_UNPOOLS[check_dims(dims) - 1]


def dropout(dims: int) -> type[nn.Module]:
    """Channel dropout ``nn.Dropout1d``, ``2d`` or ``3d``: whole maps are dropped (Tompson,
    Goroshin, Jain, LeCun and Bregler 2015, "Efficient Object Localization Using
    Convolutional Networks")."""
    return _DROPOUTS[check_dims(dims) - 1]


def interp_mode(dims: int) -> str:
    """The ``F.interpolate`` mode of linear interpolation: ``"linear"``, ``"bilinear"`` or
    ``"trilinear"``."""
    return _INTERP_MODES[check_dims(dims) - 1]


def spatial_axes(x: torch.Tensor) -> tuple[int, ...]:
    """The spatial axes ``2 .. x.ndim - 1`` of ``[N, C, *spatial]``, for reductions.

    Example:
        >>> import torch
        >>> from cnnkit.layers.nd import spatial_axes
        >>> spatial_axes(torch.zeros(2, 3, 4, 5, 6))
        (2, 3, 4)
    """
    return tuple(range(2, x.ndim))


def _positive_int(what: str, value: object) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)  # ints, numpy ints; never floats
    except TypeError:
        raise ValueError(f"{what} must be a positive int, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{what} must be a positive int, got {n}")
    return n


def _is_sizes(size: object) -> bool:
    # Tuples, lists, torch.Size, numpy arrays: anything iterable but text.
    return isinstance(size, Iterable) and not isinstance(size, (str, bytes))


def _sizes(what: str, size: object) -> tuple[int, ...]:
    if not _is_sizes(size):
        raise ValueError(f"{what} must be a sequence of ints, got {size!r}")
    entries = tuple(size)
    return tuple(_positive_int(f"every entry of {what} {entries!r}", s) for s in entries)


def _spatial(img_size: int | Sequence[int], dims: int) -> tuple[int, ...]:
    """``img_size`` as a spatial tuple: an int is a square (cube) of ``dims`` sides."""
    if not _is_sizes(img_size):
        return (_positive_int("img_size", img_size),) * dims
    spatial = _sizes("img_size", img_size)
    if len(spatial) not in DIMS:
        raise ValueError(f"img_size {spatial} has {len(spatial)} entries; give 1 (L), 2 (H, W) "
                         f"or 3 (D, H, W) sizes, or input_size = {_SHAPES}")
    return spatial


def spatial_dims(input_size: Sequence[int]) -> int:
    """Number of spatial dimensions of ``input_size = (C, *spatial)``: 1, 2 or 3.

    Raises:
        ValueError: fewer than one or more than three spatial sizes, or a size that is
            not a positive int.

    Example:
        >>> from cnnkit.layers import spatial_dims
        >>> spatial_dims((3, 224, 224)), spatial_dims((12, 1000))
        (2, 1)
    """
    sizes = _sizes("input_size", input_size)
    if len(sizes) - 1 not in DIMS:
        raise ValueError(f"input_size {sizes} has {len(sizes) - 1} spatial dims; give "
                         f"{_SHAPES}")
    return len(sizes) - 1


def resolve_input_size(input_size: Sequence[int] | None = None, in_chans: int | None = None,
                       img_size: int | Sequence[int] | None = None, *,
                       default: Sequence[int] = (3, 224, 224), dims: Sequence[int] = DIMS,
                       family: str = "this model") -> tuple[int, tuple[int, ...]]:
    """A builder's input description as ``(in_chans, spatial)``.

    ``input_size = (C, *spatial)`` is the description; ``in_chans`` and ``img_size`` are
    the older two-part form and, when given with ``input_size``, must agree with it. An
    int ``img_size`` is a square (a cube where ``default`` is 3D); a sequence of 1, 2 or
    3 sizes gives a 1D, 2D or 3D network. What is not given comes from ``default``.

    Args:
        input_size: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``.
        in_chans: input channels C.
        img_size: spatial size, an int or 1 to 3 sizes.
        default: the builder's default ``input_size``.
        dims: the numbers of spatial dimensions the family can be built in.
        family: the family's name, for error messages.

    Raises:
        ValueError: a malformed size, 0 or 4+ spatial dims, a non-positive size, disagreeing
            arguments, or a number of dims outside ``dims``; one line naming the fix.

    Example:
        >>> from cnnkit.layers import resolve_input_size
        >>> resolve_input_size(img_size=(64,), in_chans=12)
        (12, (64,))
        >>> resolve_input_size((1, 8, 8, 8), in_chans=1, img_size=8)
        (1, (8, 8, 8))
    """
    if input_size is not None:
        sizes = _sizes("input_size", input_size)
        spatial_dims(sizes)
        chans, spatial = sizes[0], sizes[1:]
        if in_chans is not None and _positive_int("in_chans", in_chans) != chans:
            raise ValueError(f"in_chans={in_chans} disagrees with input_size {(chans, *spatial)}"
                             " (channels first); give one of them")
        if img_size is not None and _spatial(img_size, len(spatial)) != spatial:
            raise ValueError(f"img_size={img_size!r} disagrees with input_size "
                             f"{(chans, *spatial)}; give one of them")
    else:
        spatial_dims(default)
        chans = default[0] if in_chans is None else _positive_int("in_chans", in_chans)
        spatial = (tuple(default[1:]) if img_size is None
                   else _spatial(img_size, len(default) - 1))
    if len(spatial) not in dims:
        allowed = " or ".join(f"{d}D" for d in dims)
        raise ValueError(f"{family} is built in {allowed} only, not {len(spatial)}D "
                         f"(input size {(chans, *spatial)}); give a {allowed} input size")
    return chans, spatial
