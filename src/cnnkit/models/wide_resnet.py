"""The CIFAR Wide Residual Network WRN-d-k.

Zagoruyko and Komodakis (2016), "Wide Residual Networks", BMVC. A 3x3 stem conv to
16 channels, then three groups of ``n = (d - 4) / 6`` pre-activation basic blocks
(BN-ReLU-conv3x3, BN-ReLU-[dropout]-conv3x3; He et al. 2016, "Identity Mappings in
Deep Residual Networks") of widths 16k, 32k and 64k with strides 1, 2, 2, and a
final BN-ReLU, global average pool and linear classifier. WRN-28-10 has 36.5M
parameters. The ImageNet bottleneck variants are ``wide_resnet50_2`` and
``wide_resnet101_2`` in :mod:`cnnkit.models.resnet`.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.layers.attention import create_attn

from ._base import Classifier, to_2tuple
from ._registry import register_model

__all__ = ["PreActBlock", "WideResNet"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class PreActBlock(nn.Module):
    """Pre-activation basic block with optional dropout between the two convolutions.

    When the shape changes, the shortcut is a 1x1 convolution applied to the
    pre-activated input (as in the authors' code), so both paths see BN-ReLU(x).
    ``attn`` recalibrates the residual branch before the addition (SE placement).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, dropout: float = 0.0,
                 attn: str | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.attn = create_attn(attn, out_chs)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

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
        in_chans: input channels.
        img_size: input size (only recorded in ``default_cfg``: the net is fully
            convolutional up to a global pool).
        depth: total depth ``d``; ``(d - 4)`` must be divisible by 6.
        widen_factor: width multiplier ``k``.
        dropout: dropout probability between the two convolutions of each block.
        attn: recalibration block name from :func:`cnnkit.layers.attention.list_attn`
            inserted in every block, or None.

    Example:
        >>> m = WideResNet(depth=10, widen_factor=1)
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3,
                 img_size: int | tuple[int, int] = 32, depth: int = 28, widen_factor: int = 10,
                 dropout: float = 0.0, attn: str | None = None) -> None:
        super().__init__()
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
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        in_chs = 16
        for g, (width, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
            blocks = []
            for i in range(n):
                blocks.append(PreActBlock(in_chs, width, stride if i == 0 else 1, dropout, attn))
                in_chs = width
            self.add_module(f"block{g + 1}", nn.Sequential(*blocks))
        # Pre-activation blocks end un-normalised, so the head needs its own BN-ReLU.
        self.bn = nn.BatchNorm2d(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = in_chs
        self.fc = nn.Linear(in_chs, num_classes)
        self._init_weights()

        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="block1"),
                             dict(num_chs=widths[1], reduction=2, module="block2"),
                             dict(num_chs=widths[2], reduction=4, module="relu")]
        self.cam_layer = "relu"
        if in_chans == 3:
            mean, std = CIFAR10_MEAN, CIFAR10_STD
        else:
            mean, std = (0.5,) * in_chans, (0.5,) * in_chans
        self.default_cfg = dict(input_size=(in_chans, *to_2tuple(img_size)), mean=mean,
                                std=std, num_classes=num_classes,
                                paper="Zagoruyko and Komodakis 2016, Wide Residual Networks")

    def _init_weights(self) -> None:
        # The authors' scheme: He-normal (fan_out) convs, unit BN, zero linear bias.
        for name, m in self.named_modules():
            if ".attn" in name:  # recalibration blocks keep their own initialisation
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
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
def wide_resnet(num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 32,
                depth: int = 28, widen_factor: int = 10, dropout: float = 0.0,
                attn: str | None = None) -> WideResNet:
    """Wide ResNet WRN-d-k for CIFAR (Zagoruyko and Komodakis 2016); WRN-28-10 by default."""
    return WideResNet(num_classes, in_chans, img_size, depth, widen_factor, dropout, attn)
