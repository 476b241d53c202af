"""Recalibration ("attention") blocks: a learned gate in (0, 1) multiplies a feature map.

Every block maps ``[N, C, *spatial] -> [N, C, *spatial]`` and differs only in the shape
of its gate: per channel (SE, cSE, ECA), per position (sSE), both (scSE), or per channel
and per position along each axis (ELA). The blocks hold no number of dimensions: they
reduce over ``range(2, x.ndim)``, so one block (and one state_dict) serves 1D, 2D and 3D
networks, and the 2D layouts stay those of the papers' reference code. Models never
import the classes directly: they take ``attn: str | None`` and call :func:`create_attn`
once, so one registry name works in every architecture.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from .nd import spatial_axes

__all__ = [
    "SqueezeExcite", "ChannelSE", "SpatialSE", "SCSE", "ECA", "ELA",
    "eca_kernel_size", "register_attn", "create_attn", "list_attn",
]


def _check_channels(channels: int) -> None:
    if channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels}")


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial]`` as ``[N, C, prod(spatial), 1]``, so a 1x1 ``nn.Conv2d`` applies.

    A 1x1 convolution acts on each position alone, so flattening the positions is exact;
    2D maps pass through unchanged (the same operations as before dimensions were added).
    """
    return x if x.ndim == 4 else x.reshape(x.shape[0], x.shape[1], -1, 1)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation block.

    Hu, Shen and Sun (2018), "Squeeze-and-Excitation Networks", CVPR.
    Global average pooling squeezes each channel to one number, a bottleneck MLP
    ``FC(C -> C/r) -> ReLU -> FC(C/r -> C) -> sigmoid`` turns the descriptor into a
    gate per channel, and the input is scaled channel-wise by that gate.

    The hidden width is ``max(min_channels, channels // reduction)``: with r = 16 a
    64-channel stage would otherwise get a 4-unit bottleneck (or 0 units below 16
    channels), so the width is floored at 8, as timm does. The FC layers are 1x1
    convolutions named ``fc1``/``fc2`` with biases, which is numerically the same and
    gives the state_dict keys of ``torchvision.ops.SqueezeExcitation``.

    Args:
        channels: input (and output) channels C.
        reduction: bottleneck ratio r (16 in the paper).
        min_channels: smallest hidden width.
        hidden_channels: explicit hidden width; overrides ``reduction``/``min_channels``
            (e.g. RegNet's SE width is a quarter of the block's input width).
        act_layer: activation between the FC layers (ReLU in the paper).
        gate_layer: gate nonlinearity (sigmoid in the paper).

    Example:
        >>> import torch
        >>> from cnnkit.layers import SqueezeExcite
        >>> se = SqueezeExcite(64)
        >>> se.fc1.out_channels, se(torch.randn(2, 64, 8, 8)).shape
        (8, torch.Size([2, 64, 8, 8]))
    """

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8,
                 hidden_channels: int | None = None,
                 act_layer: type[nn.Module] = nn.ReLU,
                 gate_layer: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        _check_channels(channels)
        if hidden_channels is None:
            if reduction < 1 or min_channels < 1:
                raise ValueError(f"reduction ({reduction}) and min_channels ({min_channels}) "
                                 "must be positive ints")
            hidden_channels = max(min_channels, channels // reduction)
        elif hidden_channels < 1:
            raise ValueError(f"hidden_channels must be a positive int, got {hidden_channels}")
        self.fc1 = nn.Conv2d(channels, hidden_channels, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_channels, channels, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(spatial_axes(x), keepdim=True)  # [N, C, 1, ...]
        g = self.gate(self.fc2(self.act(self.fc1(_as_2d(s)))))
        return x * g.view(s.shape)


class ChannelSE(SqueezeExcite):
    """Channel squeeze & excitation (cSE): the SE gate, used inside segmentation networks.

    Roy, Navab and Wachinger (2018), "Concurrent Spatial and Channel 'Squeeze &
    Excitation' in Fully Convolutional Networks", MICCAI. cSE is the block of Hu et
    al. (2018) (:class:`SqueezeExcite`): spatial squeeze, channel excitation. The
    authors' reference code (ai-med/squeeze_and_excitation) uses a C/2 bottleneck
    with no floor, hence ``reduction=2`` and ``min_channels=1`` here.

    Args:
        channels: input (and output) channels C.
        reduction: bottleneck ratio r.
        min_channels: smallest hidden width.
        hidden_channels: explicit hidden width (overrides the two above).
        act_layer: activation between the FC layers.
        gate_layer: gate nonlinearity.

    Example:
        >>> from cnnkit.layers import ChannelSE
        >>> ChannelSE(32).fc1.out_channels
        16
    """

    def __init__(self, channels: int, reduction: int = 2, min_channels: int = 1,
                 hidden_channels: int | None = None,
                 act_layer: type[nn.Module] = nn.ReLU,
                 gate_layer: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__(channels, reduction, min_channels, hidden_channels, act_layer,
                         gate_layer)


class SpatialSE(nn.Module):
    """Spatial squeeze & excitation (sSE): a per-pixel gate shared by all channels.

    Roy, Navab and Wachinger (2018), "Concurrent Spatial and Channel 'Squeeze &
    Excitation' in Fully Convolutional Networks", MICCAI. A 1x1 convolution
    ``C -> 1`` squeezes the channels at every pixel, a sigmoid turns the map into a
    gate, and every channel is multiplied by it. The convolution has a bias, as in
    the authors' reference code (the paper's notation leaves biases out throughout).

    Args:
        channels: input (and output) channels C.

    Example:
        >>> import torch
        >>> from cnnkit.layers import SpatialSE
        >>> SpatialSE(16)(torch.randn(2, 16, 5, 7)).shape
        torch.Size([2, 16, 5, 7])
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        _check_channels(channels)
        self.conv = nn.Conv2d(channels, 1, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(self.conv(_as_2d(x)))  # [N, 1, positions(, 1)]
        return x * g.view(x.shape[0], 1, *x.shape[2:])


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (scSE).

    Roy, Navab and Wachinger (2018), "Concurrent Spatial and Channel 'Squeeze &
    Excitation' in Fully Convolutional Networks", MICCAI: the outputs of
    :class:`ChannelSE` and :class:`SpatialSE` applied to the same input are added
    (``combine="add"``, the default). ``combine="max"`` takes their element-wise
    maximum ("max-out"), the aggregation of the journal version and of the authors'
    released code: Roy, Navab and Wachinger (2019), "Recalibrating Fully Convolutional
    Networks With Spatial and Channel 'Squeeze and Excitation' Blocks", IEEE TMI 38(2).

    Args:
        channels: input (and output) channels C.
        reduction: cSE bottleneck ratio r.
        combine: ``"add"`` or ``"max"``.

    Example:
        >>> import torch
        >>> from cnnkit.layers import SCSE
        >>> SCSE(16, combine="max")(torch.randn(2, 16, 4, 4)).shape
        torch.Size([2, 16, 4, 4])
    """

    COMBINE = ("add", "max")

    def __init__(self, channels: int, reduction: int = 2, combine: str = "add") -> None:
        super().__init__()
        if combine not in self.COMBINE:
            raise ValueError(f"unknown scSE combine {combine!r}; choose 'add' or 'max'")
        self.combine = combine
        self.cse = ChannelSE(channels, reduction)
        self.sse = SpatialSE(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.combine == "add":
            return self.cse(x) + self.sse(x)
        return torch.maximum(self.cse(x), self.sse(x))

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}"


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive 1D kernel size ``k = |log2(C) / gamma + b / gamma|_odd``.

    Wang, Wu, Zhu, Li, Zuo and Hu (2020), "ECA-Net: Efficient Channel Attention for
    Deep Convolutional Neural Networks", CVPR, Eq. (12). ``|t|_odd`` is read as the
    official code does: truncate ``t`` to an int and round an even result up to the
    next odd number, so ``k`` is at least 1.

    Args:
        channels: channels C.
        gamma: the paper's gamma (2).
        b: the paper's b (1).

    Example:
        >>> from cnnkit.layers import eca_kernel_size
        >>> [eca_kernel_size(c) for c in (64, 256, 2048)]
        [3, 5, 7]
    """
    _check_channels(channels)
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """Efficient Channel Attention: a per-channel gate from a 1D convolution across channels.

    Wang, Wu, Zhu, Li, Zuo and Hu (2020), "ECA-Net: Efficient Channel Attention for
    Deep Convolutional Neural Networks", CVPR. Global average pooling, then one
    bias-free ``Conv1d(1, 1, k)`` slides over the channel axis (zero-padded), so the
    gate of channel j depends only on channels ``j - k//2 .. j + k//2`` (local
    cross-channel interaction without dimensionality reduction), then a sigmoid.
    The block has exactly ``k`` parameters.

    Args:
        channels: input (and output) channels C.
        kernel_size: odd kernel size; None for :func:`eca_kernel_size` (channels, gamma, b).
        gamma: the paper's gamma for the adaptive kernel size.
        b: the paper's b for the adaptive kernel size.

    Example:
        >>> from cnnkit.layers import ECA
        >>> eca = ECA(256)
        >>> eca.conv.kernel_size, sum(p.numel() for p in eca.parameters())
        ((5,), 5)
    """

    def __init__(self, channels: int, kernel_size: int | None = None, gamma: int = 2,
                 b: int = 1) -> None:
        super().__init__()
        k = eca_kernel_size(channels, gamma, b) if kernel_size is None else kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(f"ECA kernel_size must be a positive odd int, got {k}")
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        y = self.conv(x.mean(spatial_axes(x)).unsqueeze(1))  # [N, 1, C]: channels are the axis
        return x * self.gate(y).view(n, c, *(1,) * (x.ndim - 2))


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


class ELA(nn.Module):
    """Efficient Local Attention: strip-pooled row and column gates per channel.

    Xu and Wan (2024), "ELA: Efficient Local Attention for Deep Convolutional Neural
    Networks", arXiv:2403.01123. The input is averaged along W (one vector per row)
    and along H (one per column); both strips go through the same depthwise
    ``Conv1d(k)`` (no bias), GroupNorm and sigmoid, giving ``a_h[N, C, H]`` and
    ``a_w[N, C, W]``; the output is ``x * a_h * a_w`` broadcast, so each channel's
    gate is an outer product (rank 1 over space). In any number of dimensions there is
    one strip per spatial axis (the mean over the other axes), all through the same
    layers: a 1D signal gets one gate per position, a volume a product of three.
    Defaults are the paper's ELA-B (kernel 7, depthwise, 16 GroupNorm groups).
    GroupNorm needs its group count to divide C, so ``num_groups`` is lowered to the
    largest divisor of C not above it (24 channels -> 12 groups).

    Args:
        channels: input (and output) channels C.
        kernel_size: odd 1D kernel size.
        num_groups: GroupNorm groups before clipping.

    Example:
        >>> import torch
        >>> from cnnkit.layers import ELA
        >>> ela = ELA(24)
        >>> ela.gn.num_groups, ela(torch.randn(2, 24, 6, 9)).shape
        (12, torch.Size([2, 24, 6, 9]))
    """

    def __init__(self, channels: int, kernel_size: int = 7, num_groups: int = 16) -> None:
        super().__init__()
        _check_channels(channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ELA kernel_size must be a positive odd int, got {kernel_size}")
        if num_groups < 1:
            raise ValueError(f"ELA num_groups must be a positive int, got {num_groups}")
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2,
                              groups=channels, bias=False)
        self.gn = nn.GroupNorm(_largest_divisor_at_most(channels, num_groups), channels)
        self.gate = nn.Sigmoid()

    def _strip_gate(self, strip: torch.Tensor) -> torch.Tensor:
        return self.gate(self.gn(self.conv(strip)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = spatial_axes(x)
        out = x
        for axis in axes:  # 2D: a_h [N, C, H] (mean over W), then a_w [N, C, W] (mean over H)
            others = tuple(a for a in axes if a != axis)
            strip = x.mean(others) if others else x
            shape = [x.shape[0], x.shape[1]] + [x.shape[a] if a == axis else 1 for a in axes]
            out = out * self._strip_gate(strip).view(shape)
        return out


# The registry: name -> constructor taking ``channels`` first.
_ATTN: dict[str, Callable[..., nn.Module]] = {}


def register_attn(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register a recalibration block under ``name`` (lower case).

    Raises:
        ValueError: if ``name`` is taken or is the reserved ``"none"``.
    """
    key = name.lower()
    if key == "none" or key in _ATTN:
        raise ValueError(f"attention block {name!r} is already registered; pick another name")
    _ATTN[key] = factory


register_attn("se", SqueezeExcite)
register_attn("cse", ChannelSE)
register_attn("sse", SpatialSE)
register_attn("scse", SCSE)
register_attn("eca", ECA)
register_attn("ela", ELA)


def list_attn() -> list[str]:
    """Registered recalibration block names, sorted (``None``/``"none"`` also accepted).

    Example:
        >>> from cnnkit.layers import list_attn
        >>> list_attn()
        ['cse', 'eca', 'ela', 'scse', 'se', 'sse']
    """
    return sorted(_ATTN)


def create_attn(name: str | None, channels: int, **kwargs) -> nn.Module:
    """Build the recalibration block ``name`` for ``channels`` channels.

    Args:
        name: a name from :func:`list_attn`, or None / ``"none"`` for ``nn.Identity()``.
        channels: channels of the feature map the block gates.
        **kwargs: options of the block's constructor (``reduction``, ``combine`` ...).

    Raises:
        ValueError: unknown name (with the nearest names) or an option the block lacks.

    Example:
        >>> from cnnkit.layers import create_attn
        >>> create_attn("eca", 64)
        ECA(
          (conv): Conv1d(1, 1, kernel_size=(3,), stride=(1,), padding=(1,), bias=False)
          (gate): Sigmoid()
        )
        >>> create_attn(None, 64)
        Identity()
    """
    if name is None or name.lower() == "none":
        return nn.Identity()
    key = name.lower()
    if key not in _ATTN:
        close = difflib.get_close_matches(key, list(_ATTN), n=3, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown attention block {name!r}{hint} "
                         f"(choose from: none, {', '.join(list_attn())})")
    factory = _ATTN[key]
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        options = ", ".join(p for p in params if p != "channels")
        raise ValueError(f"attention block {key!r} has no option {', '.join(unknown)}; "
                         f"its options: {options}")
    return factory(channels, **kwargs)
