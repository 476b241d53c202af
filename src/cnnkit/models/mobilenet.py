"""MobileNet V1 and V2.

* V1: Howard, Zhu, Chen, Kalenichenko, Wang, Weyand, Andreetto and Adam (2017),
  "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
  Applications". A 3x3 stride-2 convolution, then 13 depthwise separable convolutions
  (3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU), global average pool, linear.
  torchvision has no V1, so its module names are cnnkit's own.
* V2: Sandler, Howard, Zhu, Zhmoginov and Chen (2018), "MobileNetV2: Inverted
  Residuals and Linear Bottlenecks". Inverted residual blocks (1x1 expansion, 3x3
  depthwise, linear 1x1 projection; a skip when shapes allow) with ReLU6. Module
  names, shapes and initialisation follow torchvision (``features.N.conv...``,
  ``classifier.1``), so its checkpoints load with ``strict=True``.

``width_mult`` (the paper's width multiplier alpha) scales every width, rounded to a
multiple of 8 (torchvision's ``_make_divisible``; for V1 the widths times 0.25, 0.5,
0.75 and 1 are already multiples of 8). Parameters scale roughly with alpha^2.

The ``"small"`` stem makes the first convolution stride 1 and the first stride-2
stage stride 1 as well, so the total stride is 8 instead of 32 (32x32 inputs end in
a 4x4 map, 8x8 inputs in 1x1). ``attn`` inserts a recalibration block after each
depthwise convolution (+BN+activation): in V1 after every depthwise conv, in V2
inside every inverted residual; None keeps torchvision's indices.

``input_size=(C, L)`` or ``(C, D, H, W)`` builds the same networks in 1D or 3D
(:mod:`cnnkit.layers.nd`; depthwise 3 or 3x3x3 kernels), as the 3D MobileNets of
Kopuklu, Kose, Gunduz and Rigoll (2019), "Resource Efficient 3D Convolutional Neural
Networks", ICCVW.

Example:
    >>> import torch
    >>> from cnnkit.models.mobilenet import mobilenet_v2
    >>> m = mobilenet_v2(num_classes=10, img_size=32, width_mult=0.5)
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import nd
from ..layers.attention import create_attn
from ._base import Classifier, check_img_size, imagenet_stats, init_weights, resolve_stem
from ._registry import register_model

_V1_PAPER = ("Howard et al. 2017, MobileNets: Efficient Convolutional Neural Networks "
             "for Mobile Vision Applications")
_V2_PAPER = "Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks"

# V1 (Table 1 of the paper): (pointwise width, depthwise stride) of the 13 separable convs.
# The paper's table lists stride 2 for the last one, a known typo: the map stays 7x7.
_V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]
# V2 (Table 2): expansion t, width c, repeats n, stride s of the first repeat.
_V2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never below 90% of ``v``.

    The rounding of the TensorFlow MobileNet reference (and torchvision).
    """
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> activation, indexed 0/1/2 like torchvision.

    ``conv_layer`` and ``norm_layer`` are the types of the network's number of dimensions.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, act_layer: type[nn.Module] = nn.ReLU6,
                 conv_layer: type[nn.Module] = nn.Conv2d,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__(
            conv_layer(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2,
                       groups=groups, bias=False),
            norm_layer(out_chs), act_layer(inplace=True))


class DepthwiseSeparable(nn.Module):
    """V1 block: 3x3 depthwise conv-BN-ReLU, optional attention, 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, attn: str | None,
                 conv_layer: type[nn.Module] = nn.Conv2d,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        types = dict(act_layer=nn.ReLU, conv_layer=conv_layer, norm_layer=norm_layer)
        self.dw = ConvNormAct(in_chs, in_chs, 3, stride, groups=in_chs, **types)
        self.attn = create_attn(attn, in_chs)
        self.pw = ConvNormAct(in_chs, out_chs, 1, **types)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.attn(self.dw(x)))


class InvertedResidual(nn.Module):
    """V2 block: 1x1 expansion (if t > 1), 3x3 depthwise, linear 1x1 projection, skip."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int,
                 attn: str | None, conv_layer: type[nn.Module] = nn.Conv2d,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        hidden = int(round(in_chs * expand_ratio))
        self.use_res_connect = stride == 1 and in_chs == out_chs
        types = dict(conv_layer=conv_layer, norm_layer=norm_layer)
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_chs, hidden, 1, **types))
        layers.append(ConvNormAct(hidden, hidden, 3, stride, groups=hidden, **types))
        gate = create_attn(attn, hidden)
        if not isinstance(gate, nn.Identity):  # attn=None keeps torchvision's indices
            layers.append(gate)
        # Linear bottleneck: no activation after the projection (Sandler et al., Sec. 3.2).
        layers += [conv_layer(hidden, out_chs, 1, bias=False), norm_layer(out_chs)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNet(Classifier):
    """Shared body of V1 and V2: ``features`` (a Sequential of blocks), global pool, head.

    ``blocks`` are (module, stride, out channels); each feature_info entry is the last
    block at one resolution (before each stride-2 block) plus the final block.
    ``img_size`` (an int: 2D, or 1 to 3 sizes) gives the number of dimensions the blocks
    were built in.
    """

    def __init__(self, blocks: list[tuple[nn.Module, int, int]], classifier: nn.Module,
                 num_classes: int, in_chans: int, img_size: int | tuple[int, ...], stem: str,
                 paper: str) -> None:
        super().__init__()
        in_chans, spatial = nd.resolve_input_size(None, in_chans, img_size)
        self.dims = dims = len(spatial)
        self.stem = stem
        self.num_classes, self.in_chans = num_classes, in_chans
        self.features = nn.Sequential(*(b for b, _, _ in blocks))
        self.feature_info = []
        reduction = 1
        for i, (_, stride, chans) in enumerate(blocks):
            reduction *= stride
            if i == len(blocks) - 1 or blocks[i + 1][1] > 1:
                self.feature_info.append(dict(num_chs=chans, reduction=reduction,
                                              module=f"features.{i}"))
        check_img_size("MobileNet", spatial, stem, reduction)
        self.num_features = blocks[-1][2]
        self.cam_layer = f"features.{len(blocks) - 1}"
        self.global_pool = nd.adaptive_avg_pool(dims)(1)
        self.classifier = classifier
        mean, std = imagenet_stats(in_chans)
        self.default_cfg = dict(input_size=(in_chans, *spatial), mean=mean, std=std,
                                num_classes=num_classes, paper=paper)
        init_weights(self, dims)  # torchvision's MobileNetV2 scheme, used for V1 too

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        if isinstance(self.classifier, nn.Sequential):
            x = self.classifier[:-1](x)  # V2's dropout
        return x if pre_logits else self.get_classifier()(x)

    def get_classifier(self) -> nn.Module:
        if isinstance(self.classifier, nn.Sequential):
            return self.classifier[-1]
        return self.classifier



def _types(input_size: tuple[int, ...] | None, in_chans: int | None,
           img_size: int | tuple[int, ...] | None, stem: str
           ) -> tuple[int, tuple[int, ...], str, dict[str, type[nn.Module]]]:
    """in_chans, spatial size, resolved stem and the layer types of the builder's dims."""
    in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                              default=(3, 224, 224), family="MobileNet")
    dims = len(spatial)
    types = dict(conv_layer=nd.conv(dims), norm_layer=nd.batch_norm(dims))
    return in_chans, spatial, resolve_stem(stem, spatial), types


@register_model
def mobilenet_v1(num_classes: int = 1000, in_chans: int | None = None,
                 img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
                 width_mult: float = 1.0, attn: str | None = None,
                 input_size: tuple[int, ...] | None = None) -> MobileNet:
    """MobileNet V1, depthwise separable convolutions (Howard et al. 2017, MobileNets)."""
    in_chans, spatial, stem, types = _types(input_size, in_chans, img_size, stem)
    small = stem == "small"
    chans = make_divisible(32 * width_mult)
    blocks: list[tuple[nn.Module, int, int]] = [
        (ConvNormAct(in_chans, chans, 3, 1 if small else 2, act_layer=nn.ReLU, **types),
         1 if small else 2, chans)]
    first_stride2 = True
    for width, stride in _V1_BLOCKS:
        if small and stride == 2 and first_stride2:
            stride, first_stride2 = 1, False
        out = make_divisible(width * width_mult)
        blocks.append((DepthwiseSeparable(chans, out, stride, attn, **types), stride, out))
        chans = out
    return MobileNet(blocks, nn.Linear(chans, num_classes), num_classes, in_chans, spatial,
                     stem, _V1_PAPER)


@register_model
def mobilenet_v2(num_classes: int = 1000, in_chans: int | None = None,
                 img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
                 width_mult: float = 1.0, attn: str | None = None,
                 drop_rate: float = 0.2, input_size: tuple[int, ...] | None = None) -> MobileNet:
    """MobileNet V2, inverted residuals, linear bottlenecks (Sandler et al. 2018, MobileNetV2)."""
    in_chans, spatial, stem, types = _types(input_size, in_chans, img_size, stem)
    small = stem == "small"
    chans = make_divisible(32 * width_mult)
    blocks: list[tuple[nn.Module, int, int]] = [
        (ConvNormAct(in_chans, chans, 3, 1 if small else 2, **types), 1 if small else 2, chans)]
    first_stride2 = True
    for t, c, n, s in _V2_STAGES:
        out = make_divisible(c * width_mult)
        if small and s == 2 and first_stride2:
            s, first_stride2 = 1, False
        for i in range(n):
            stride = s if i == 0 else 1
            blocks.append((InvertedResidual(chans, out, stride, t, attn, **types), stride, out))
            chans = out
    # The last 1x1 conv is not thinned below 1280 channels (Sandler et al., Sec. 6.1).
    last = make_divisible(1280 * max(1.0, width_mult))
    blocks.append((ConvNormAct(chans, last, 1, **types), 1, last))
    classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(last, num_classes))
    return MobileNet(blocks, classifier, num_classes, in_chans, spatial, stem, _V2_PAPER)
