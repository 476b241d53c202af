"""The CIFAR Wide Residual Network WRN-d-k.

Zagoruyko and Komodakis (2016), "Wide Residual Networks", BMVC. A 3x3 stem conv to
16 channels, then three groups of ``n = (d - 4) / 6`` pre-activation basic blocks
(BN-ReLU-conv3x3, BN-ReLU-[dropout]-conv3x3; He et al. 2016, "Identity Mappings in
Deep Residual Networks") of widths 16k, 32k and 64k with strides 1, 2, 2, and a
final BN-ReLU, global average pool and linear classifier. WRN-28-10 has 36.5M
parameters. The ImageNet bottleneck variants are ``wide_resnet50_2`` and
``wide_resnet101_2`` in :mod:`cnnkit.models.resnet`. ``input_size=(C, L)`` or
``(C, D, H, W)`` builds the same network in 1D or 3D (:mod:`cnnkit.layers.nd`).
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.layers import nd
from cnnkit.layers.attention import create_attn

from ._base import Classifier
from ._registry import register_model
from .resnet import Bottleneck, ResNet, _resnet

__all__ = ["PreActBlock", "WideResNet"]

_PAPER = "Zagoruyko and Komodakis 2016, Wide Residual Networks"

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class PreActBlock(nn.Module):
    """Pre-activation basic block with optional dropout between the two convolutions.

    When the shape changes, the shortcut is a 1x1 convolution applied to the
    pre-activated input (as in the authors' code), so both paths see BN-ReLU(x).
    ``attn`` recalibrates the residual branch before the addition (SE placement).
    ``conv_layer`` and ``norm_layer`` are the types of the network's number of dimensions.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, dropout: float = 0.0,
                 attn: str | None = None, conv_layer: type[nn.Module] = nn.Conv2d,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.bn1 = norm_layer(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv_layer(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.relu2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv_layer(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.attn = create_attn(attn, out_chs)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = conv_layer(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.relu2(self.bn2(out))))
        return self.attn(out) + shortcut


class WideResNet(Classifier):
    """WRN-d-k for small (CIFAR-sized) images; total stride 4.

    Args:
        num_classes: classifier outputs.
        in_chans: input channels (3 unless ``input_size`` says otherwise).
        img_size: input size, an int (2D) or 1 to 3 sizes (32 unless ``input_size`` says
            otherwise); recorded in ``default_cfg``: the net is fully convolutional up to
            a global pool.
        depth: total depth ``d``; ``(d - 4)`` must be divisible by 6.
        widen_factor: width multiplier ``k``.
        dropout: dropout probability between the two convolutions of each block.
        attn: recalibration block name from :func:`cnnkit.layers.attention.list_attn`
            inserted in every block, or None.
        input_size: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``: the network is built in
            that many dimensions.

    Example:
        >>> import torch
        >>> from cnnkit.models.wide_resnet import WideResNet
        >>> m = WideResNet(depth=10, widen_factor=1)
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_chans: int | None = None,
                 img_size: int | tuple[int, ...] | None = None, depth: int = 28,
                 widen_factor: int = 10, dropout: float = 0.0, attn: str | None = None,
                 input_size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                                  default=(3, 32, 32), family="WRN")
        self.dims = dims = len(spatial)
        conv, norm = nd.conv(dims), nd.batch_norm(dims)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40 ...), "
                             f"got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.depth, self.widen_factor = depth, widen_factor
        self.conv1 = conv(in_chans, 16, 3, padding=1, bias=False)
        in_chs = 16
        for g, (width, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
            blocks = []
            for i in range(n):
                blocks.append(PreActBlock(in_chs, width, stride if i == 0 else 1, dropout, attn,
                                          conv, norm))
                in_chs = width
            self.add_module(f"block{g + 1}", nn.Sequential(*blocks))
        # Pre-activation blocks end un-normalised, so the head needs its own BN-ReLU.
        self.bn = norm(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nd.adaptive_avg_pool(dims)((1,) * dims)
        self.num_features = in_chs
        self.fc = nn.Linear(in_chs, num_classes)
        self._init_weights(conv, norm)

        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="block1"),
                             dict(num_chs=widths[1], reduction=2, module="block2"),
                             dict(num_chs=widths[2], reduction=4, module="relu")]
        self.cam_layer = "relu"
        if in_chans == 3:
            mean, std = CIFAR10_MEAN, CIFAR10_STD
        else:
            mean, std = (0.5,) * in_chans, (0.5,) * in_chans
        self.default_cfg = dict(input_size=(in_chans, *spatial), mean=mean,
                                std=std, num_classes=num_classes,
                                paper=_PAPER)

    def _init_weights(self, conv: type[nn.Module], norm: type[nn.Module]) -> None:
        # The authors' scheme: He-normal (fan_out) convs, unit BN, zero linear bias.
        for name, m in self.named_modules():
            if ".attn" in name:  # recalibration blocks keep their own initialisation
                continue
            if isinstance(m, conv):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, norm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        return self.relu(self.bn(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc



@register_model
def wide_resnet(num_classes: int = 10, in_chans: int | None = None,
                img_size: int | tuple[int, ...] | None = None, depth: int = 28,
                widen_factor: int = 10, dropout: float = 0.0, attn: str | None = None,
                input_size: tuple[int, ...] | None = None) -> WideResNet:
    """Wide ResNet WRN-d-k for CIFAR (Zagoruyko and Komodakis 2016); WRN-28-10 by default."""
    return WideResNet(num_classes, in_chans, img_size, depth, widen_factor, dropout, attn,
                      input_size)


# torchvision's wide ResNets: ImageNet ResNets with twice the bottleneck width (its keys).

@register_model
def wide_resnet50_2(num_classes: int = 1000, in_chans: int | None = None,
                    img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
                    attn: str | None = None, zero_init_residual: bool = False,
                    drop_rate: float = 0.0, output_stride: int = 32,
                    input_size: tuple[int, ...] | None = None) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko and Komodakis 2016): ResNet-50, bottleneck width x2."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans,
                   img_size=img_size, stem=stem, attn=attn,
                   zero_init_residual=zero_init_residual, drop_rate=drop_rate,
                   output_stride=output_stride, input_size=input_size,
                   width_per_group=128, paper=_PAPER)


@register_model
def wide_resnet101_2(num_classes: int = 1000, in_chans: int | None = None,
                     img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
                     attn: str | None = None, zero_init_residual: bool = False,
                     drop_rate: float = 0.0, output_stride: int = 32,
                     input_size: tuple[int, ...] | None = None) -> ResNet:
    """Wide ResNet-101-2 (Zagoruyko and Komodakis 2016): ResNet-101, bottleneck width x2."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, in_chans=in_chans,
                   img_size=img_size, stem=stem, attn=attn,
                   zero_init_residual=zero_init_residual, drop_rate=drop_rate,
                   output_stride=output_stride, input_size=input_size,
                   width_per_group=128, paper=_PAPER)
