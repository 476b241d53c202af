"""Fully convolutional networks: FCN-32s, FCN-16s and FCN-8s.

Long, Shelhamer and Darrell (2015), "Fully Convolutional Networks for Semantic
Segmentation", CVPR. A classifier becomes a dense predictor: its fully connected layers
turn into convolutions (VGG's fc6 into a 7x7 convolution with 4096 filters, fc7 into a
1x1 one, both with ReLU and dropout), a 1x1 "score" convolution predicts the classes
on the stride-32 map, and a transposed convolution initialised to bilinear interpolation
upsamples the scores to the input. FCN-16s and FCN-8s add skips: 1x1 score layers on the
stride-16 (``pool4``) and stride-8 (``pool3``) features, fused by addition after a
learned 2x upsampling of the coarser scores, so finer layers refine the coarse
semantics. As in the paper the intermediate 2x upsamplings are learned, while the final
one is fixed to bilinear interpolation; the score layers start near zero (N(0, 0.01);
the paper's exact zeros would block the input gradient of a fresh model).

Module names follow the authors' Caffe model (``score_fr``, ``score_pool4``,
``upscore2`` ...) whatever the backbone. The paper's ``pad=100`` on conv1_1 with
offset crops is replaced by size-preserving paddings (fc6 pads 3) and a crop/pad of
every upsampled map to its partner, so any input size works, 64x64 included.

``input_size=(C, L)`` or ``(C, D, H, W)`` builds the FCN and its backbone in 1D or 3D
(:mod:`cnnkit.layers.nd`): the score layers, the linear / trilinear upsampling kernels
and fc6 (7, 7x7x7) follow the number of dimensions.

Example:
    >>> import torch
    >>> from cnnkit.models.fcn import fcn8s
    >>> m = fcn8s(num_classes=5, backbone="resnet18", img_size=64)
    >>> m(torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 5, 64, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import nd
from ._dense import DenseModel, Encoder
from ._registry import register_model

__all__ = ["FCN", "bilinear_kernel", "BilinearUpsample", "fit_to"]

_PAPER = ("Long, Shelhamer and Darrell 2015, Fully Convolutional Networks for Semantic "
          "Segmentation")
_CONV_TRANSPOSE_FNS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def bilinear_kernel(factor: int, dims: int = 2) -> torch.Tensor:
    """The bilinear interpolation kernel of an integer upsampling ``factor`` (linear in 1D,
    trilinear in 3D: the outer product of the 1D kernel ``dims`` times).

    Size ``2 * factor - factor % 2`` per axis, as the FCN authors' ``upsample_filt``:
    with stride ``factor`` and padding :func:`_upsample_padding` a transposed
    convolution with this kernel equals ``F.interpolate`` in the ``nd.interp_mode(dims)``
    mode with ``align_corners=False`` away from the border (where it sees zeros instead
    of the replicated edge).
    """
    size = 2 * factor - factor % 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    kernel = filt
    for _ in range(nd.check_dims(dims) - 1):
        kernel = kernel[..., None] * filt
    return kernel


def _upsample_padding(factor: int) -> int:
    # Output size (n-1)f - 2p + k = n f for k = 2f - f%2: p = f//2 (even f), (f-1)//2 (odd f).
    return (factor - factor % 2) // 2


class BilinearUpsample(nn.Module):
    """Fixed per-channel bilinear upsampling by an integer factor (no parameters).

    The FCN paper's final "deconvolution" layer, whose filters stay bilinear: a
    grouped transposed convolution with :func:`bilinear_kernel` (of ``dims`` dimensions).
    """

    def __init__(self, channels: int, factor: int, dims: int = 2) -> None:
        super().__init__()
        self.channels, self.factor, self.dims = channels, factor, nd.check_dims(dims)
        kernel = bilinear_kernel(factor, dims)
        kernel = kernel.expand(channels, 1, *kernel.shape).clone()
        self.register_buffer("weight", kernel, persistent=False)  # fixed: rebuilt, not saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor == 1:
            return x
        return _CONV_TRANSPOSE_FNS[self.dims - 1](
            x, self.weight.to(x.dtype), stride=self.factor,
            padding=_upsample_padding(self.factor), groups=self.channels)


def learned_upsample(channels: int, factor: int, dims: int = 2) -> nn.Module:
    """A learned transposed convolution initialised to bilinear upsampling (Long et al. 2015).

    Full ``channels x channels`` filters without bias, as the Caffe model; the
    cross-channel weights start at zero and channel ``i`` to ``i`` is bilinear
    (linear, trilinear: :func:`bilinear_kernel` of ``dims`` dimensions).
    """
    if factor == 1:
        return nn.Identity()
    up = nd.conv_transpose(dims)(channels, channels, 2 * factor - factor % 2, stride=factor,
                                 padding=_upsample_padding(factor), bias=False)
    with torch.no_grad():
        up.weight.zero_()
        kernel = bilinear_kernel(factor, dims).to(up.weight.device)
        for i in range(channels):
            up.weight[i, i] = kernel
    return up


def fit_to(x: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Crop (at the end) or zero-pad ``x``'s trailing axes to the spatial ``size`` (the FCN
    crop layer); ``len(size)`` is the number of spatial dimensions."""
    size = tuple(int(n) for n in size)
    x = x[(..., *(slice(0, n) for n in size))]
    short = [n - have for n, have in zip(size, x.shape[x.ndim - len(size):], strict=True)]
    return F.pad(x, [p for s in reversed(short) for p in (0, s)]) if any(short) else x


def _conv_relu_drop(in_chs: int, out_chs: int, kernel: int, drop: float,
                    dims: int) -> list[nn.Module]:
    return [nd.conv(dims)(in_chs, out_chs, kernel, padding=kernel // 2), nn.ReLU(inplace=True),
            nd.dropout(dims)(drop)]


class FCN(DenseModel):
    """FCN-32s/16s/8s (Long, Shelhamer and Darrell 2015) on any zoo backbone.

    Args:
        skips: 0 (FCN-32s), 1 (FCN-16s: + the stride-16 stage) or 2 (FCN-8s: + stride 8).
        num_classes: output classes, background included.
        in_chans: input channels (3 unless ``input_size`` says otherwise).
        img_size: nominal input size (``default_cfg`` and ``stem="auto"``): an int (2D)
            or 1 to 3 sizes.
        backbone: a registered classifier with at least ``skips + 1`` feature stages;
            its last three stages play the paper's ``pool3``, ``pool4`` and ``pool5``.
        stem: the backbone's stem (``"auto"``, ``"imagenet"`` or ``"small"``).
        head_width: width of the convolutionised fc6 (7x7) and fc7 (1x1) layers; None
            gives the paper's 4096 for VGG backbones and no such layers (the score
            layer reads the last stage) for the others; 0 never adds them.
        drop_rate: dropout after fc6 and fc7 (0.5 in the paper).
        input_size: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``: the FCN and its backbone
            are built in that many dimensions.

    Example:
        >>> import torch
        >>> from cnnkit.models.fcn import FCN
        >>> m = FCN(2, num_classes=5, backbone="vgg16", img_size=64, head_width=64)
        >>> m(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 5, 64, 64])
    """

    task = "segment"

    def __init__(self, skips: int, num_classes: int = 21, in_chans: int | None = None,
                 img_size: int | tuple[int, ...] | None = None, backbone: str = "vgg16",
                 stem: str = "auto", head_width: int | None = None, drop_rate: float = 0.5,
                 input_size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                                  default=(3, 512, 512), family="FCN")
        self.dims = dims = len(spatial)
        if skips not in (0, 1, 2):
            raise ValueError(f"skips must be 0 (FCN-32s), 1 (FCN-16s) or 2 (FCN-8s), got {skips}")
        if head_width is not None and head_width < 0:
            raise ValueError(f"head_width must be >= 0 or None, got {head_width}")
        self.num_classes, self.in_chans, self.skips = num_classes, in_chans, skips
        n = skips + 1
        self.backbone = Encoder(backbone, in_chans, list(range(-n, 0)), img_size=spatial,
                                stem=stem)
        if len(self.backbone.model.feature_info) < n:
            raise ValueError(f"backbone {backbone!r} has {len(self.backbone.model.feature_info)}"
                             f" feature stages; FCN with {skips} skips needs {n}")
        chans, reds = self.backbone.channels, self.backbone.reductions
        ratios = [reds[i + 1] // reds[i] for i in range(n - 1)]
        if any(reds[i + 1] % reds[i] for i in range(n - 1)):
            raise ValueError(f"backbone {backbone!r} stage strides {reds} are not multiples "
                             "of each other; choose another backbone")

        width = (4096 if backbone.startswith("vgg") else 0) if head_width is None else head_width
        if width:  # fc6 as a 7x7 conv (padded so any size works), fc7 as a 1x1 conv
            self.head: nn.Module = nn.Sequential(
                *_conv_relu_drop(chans[-1], width, 7, drop_rate, dims),
                *_conv_relu_drop(width, width, 1, drop_rate, dims))
        else:
            self.head = nn.Identity()
        conv = nd.conv(dims)
        self.score_fr = conv(width or chans[-1], num_classes, 1)
        if skips >= 1:
            self.upscore2 = learned_upsample(num_classes, ratios[-1], dims)
            self.score_pool4 = conv(chans[-2], num_classes, 1)
        if skips == 2:
            self.upscore_pool4 = learned_upsample(num_classes, ratios[-2], dims)
            self.score_pool3 = conv(chans[-3], num_classes, 1)
        # Fixed, as the paper's last one.
        self.upscore = BilinearUpsample(num_classes, reds[0], dims)
        self._init_weights()

        self.describe_backbone(self.backbone, in_chans, spatial, _PAPER)

    def _init_weights(self) -> None:
        # fc6/fc7 get He init (torchvision's VGG scheme): no ImageNet fc weights are
        # converted here. The paper zero-initialises the score layers; N(0, 0.01) keeps
        # them near zero while a fresh model still passes gradients to its input (which
        # explainers and the dense-model contract need).
        for m in self.head.modules():
            if isinstance(m, nd.CONVS):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for name in ("score_fr", "score_pool4", "score_pool3"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, std=0.01)
                nn.init.zeros_(getattr(self, name).bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)  # shallow to deep: [pool3, pool4,] pool5
        score = self.score_fr(self.head(feats[-1]))
        if self.skips >= 1:
            score = fit_to(self.upscore2(score), feats[-2].shape[2:]) + \
                self.score_pool4(feats[-2])
        if self.skips == 2:
            score = fit_to(self.upscore_pool4(score), feats[-3].shape[2:]) + \
                self.score_pool3(feats[-3])
        return fit_to(self.upscore(score), x.shape[2:])


def _fcn(skips: int, **kwargs) -> FCN:
    return FCN(skips, **kwargs)


@register_model(task="segment")
def fcn32s(num_classes: int = 21, in_chans: int | None = None,
           img_size: int | tuple[int, ...] | None = None, backbone: str = "vgg16",
           stem: str = "auto", head_width: int | None = None, drop_rate: float = 0.5,
           input_size: tuple[int, ...] | None = None) -> FCN:
    """FCN-32s (Long, Shelhamer and Darrell 2015, Fully Convolutional Networks): stride-32 scores.

    The scores of the last stage are upsampled 32x by fixed bilinear interpolation.
    """
    return _fcn(0, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                backbone=backbone, stem=stem, head_width=head_width, drop_rate=drop_rate,
                input_size=input_size)


@register_model(task="segment")
def fcn16s(num_classes: int = 21, in_chans: int | None = None,
           img_size: int | tuple[int, ...] | None = None, backbone: str = "vgg16",
           stem: str = "auto", head_width: int | None = None, drop_rate: float = 0.5,
           input_size: tuple[int, ...] | None = None) -> FCN:
    """FCN-16s (Long, Shelhamer and Darrell 2015, Fully Convolutional Networks): + pool4 skip.

    Stride-32 scores, learned-2x-upsampled, plus the stride-16 stage's scores.
    """
    return _fcn(1, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                backbone=backbone, stem=stem, head_width=head_width, drop_rate=drop_rate,
                input_size=input_size)


@register_model(task="segment")
def fcn8s(num_classes: int = 21, in_chans: int | None = None,
          img_size: int | tuple[int, ...] | None = None, backbone: str = "vgg16",
          stem: str = "auto", head_width: int | None = None, drop_rate: float = 0.5,
          input_size: tuple[int, ...] | None = None) -> FCN:
    """FCN-8s (Long, Shelhamer and Darrell 2015, Fully Convolutional Networks): + pool4, pool3.

    Score layers on the stride-32, -16 and -8 stages fused by addition.
    """
    return _fcn(2, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                backbone=backbone, stem=stem, head_width=head_width, drop_rate=drop_rate,
                input_size=input_size)
