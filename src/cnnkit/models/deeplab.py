"""DeepLabv3 and DeepLabv3+: atrous ResNet, atrous spatial pyramid pooling, a light decoder.

DeepLabv3 is Chen, Papandreou, Schroff and Adam (2017), "Rethinking Atrous Convolution
for Semantic Image Segmentation": a ResNet whose last stages trade their stride for
dilation (``output_stride`` 16 or 8, see :mod:`cnnkit.models.resnet`), followed by ASPP
(atrous spatial pyramid pooling): a 1x1 convolution, three 3x3 convolutions with atrous
rates (6, 12, 18) at output stride 16 (doubled to (12, 24, 36) at 8) and an image-level
branch (global average pool, 1x1 convolution, upsampled back), each with batch norm and
ReLU, concatenated and projected by a 1x1 convolution to 256 channels. A 1x1 classifier
gives the logits, bilinearly upsampled to the input.

DeepLabv3+ is Chen, Zhu, Papandreou, Schroff and Adam (2018), "Encoder-Decoder with
Atrous Separable Convolution for Semantic Image Segmentation": the ASPP output is
upsampled 4x and concatenated with the stride-4 backbone features reduced to 48 channels
by a 1x1 convolution, refined by two 3x3 convolutions (256 channels), classified and
upsampled 4x to the input. (The paper's Xception backbone and depthwise-separable
decoder convolutions are replaced by a ResNet and plain convolutions, as in its ResNet-101
experiments and torchvision.)

The dropout after the projection defaults to 0.1, the authors' TensorFlow
implementation's ``keep_prob=0.9``.

Example:
    >>> import torch
    >>> m = deeplabv3plus(num_classes=5, backbone="resnet18", img_size=32, stem="small")
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 5, 32, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import init_weights
from ._dense import DenseModel, Encoder
from ._registry import register_model

__all__ = ["ASPP", "DeepLabV3", "aspp_rates"]

_V3_PAPER = ("Chen, Papandreou, Schroff and Adam 2017, Rethinking Atrous Convolution for "
             "Semantic Image Segmentation")
_V3PLUS_PAPER = ("Chen, Zhu, Papandreou, Schroff and Adam 2018, Encoder-Decoder with Atrous "
                 "Separable Convolution for Semantic Image Segmentation")


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP atrous rates of Chen et al. (2017): (6, 12, 18) at output stride 16, doubled at 8."""
    if output_stride not in (8, 16):
        raise ValueError(f"DeepLab output_stride must be 16 or 8, got {output_stride!r}")
    return (6, 12, 18) if output_stride == 16 else (12, 24, 36)


def conv_bn_relu(in_chs: int, out_chs: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    """Convolution (no bias), batch norm, ReLU; 3x3 ones padded to keep the size."""
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True))


class ASPPPooling(nn.Module):
    """Image-level features: global average pool, 1x1 conv-BN-ReLU, upsampled to the map."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn_relu(in_chs, out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn, relu = self.conv
        y = conv(self.pool(x))
        if self.training and y.shape[0] == 1:
            # One 1x1 map has no batch statistics (BatchNorm raises): a batch of one, e.g.
            # the last partial batch of an epoch, uses the running statistics instead.
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                             training=False, eps=bn.eps)
        else:
            y = bn(y)
        y = relu(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with image-level features (Chen et al. 2017).

    Args:
        in_chs: input channels.
        rates: atrous rates of the three 3x3 branches.
        out_chs: channels of every branch and of the projection (256 in the paper).
        drop_rate: dropout after the projection.

    Attributes:
        convs: the branches: 1x1, three atrous 3x3, image pooling.
        project: 1x1 conv-BN-ReLU over the concatenated branches, then dropout.
    """

    def __init__(self, in_chs: int, rates: tuple[int, int, int], out_chs: int = 256,
                 drop_rate: float = 0.1) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.convs = nn.ModuleList(
            [conv_bn_relu(in_chs, out_chs)]
            + [conv_bn_relu(in_chs, out_chs, 3, r) for r in rates]
            + [ASPPPooling(in_chs, out_chs)])
        self.project = nn.Sequential(conv_bn_relu(len(self.convs) * out_chs, out_chs),
                                     nn.Dropout(drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3(DenseModel):
    """DeepLabv3 (Chen et al. 2017) or, with ``decoder=True``, DeepLabv3+ (Chen et al. 2018).

    Args:
        num_classes: output classes, background included.
        in_chans: input channels.
        img_size: nominal input size (``default_cfg`` and the backbone's ``stem="auto"``).
        backbone: a registered ResNet (``resnet18`` ... ``wide_resnet101_2``).
        output_stride: 16 or 8: stride of the ASPP input with the ImageNet stem.
        stem: the backbone's stem; ``"small"`` divides every stride by 4 (64x64 inputs).
        decoder: add the DeepLabv3+ decoder on the stride-4 (``layer1``) features.
        aspp_width: channels of the ASPP branches and projection (256).
        drop_rate: dropout after the ASPP projection.

    Example:
        >>> m = DeepLabV3(num_classes=5, backbone="resnet18", img_size=32, stem="small")
        >>> m(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 5, 32, 32])
    """

    task = "segment"

    def __init__(self, num_classes: int = 21, in_chans: int = 3,
                 img_size: int | tuple[int, int] = 512, backbone: str = "resnet50",
                 output_stride: int = 16, stem: str = "auto", decoder: bool = False,
                 aspp_width: int = 256, drop_rate: float = 0.1) -> None:
        super().__init__()
        rates = aspp_rates(output_stride)
        if not (backbone.startswith("resnet") or backbone.startswith("wide_resnet")):
            raise ValueError(f"DeepLab needs an atrous ResNet backbone (resnet18 ... "
                             f"wide_resnet101_2), got {backbone!r}")
        self.num_classes, self.in_chans, self.output_stride = num_classes, in_chans, output_stride
        self.decoder = decoder
        # layer1 (stride 4: the paper's low-level "Conv2" features) and layer4.
        self.backbone = Encoder(backbone, in_chans, [0, -1], img_size=img_size,
                                         stem=stem, output_stride=output_stride)
        low_chs, high_chs = self.backbone.channels
        self.aspp = ASPP(high_chs, rates, aspp_width, drop_rate)
        if decoder:
            self.reduce = conv_bn_relu(low_chs, 48)
            self.fuse = nn.Sequential(conv_bn_relu(aspp_width + 48, 256, 3),
                                      conv_bn_relu(256, 256, 3))
            self.classifier = nn.Conv2d(256, num_classes, 1)
        else:
            self.classifier = nn.Conv2d(aspp_width, num_classes, 1)
        self._init_weights()

        self.describe_backbone(self.backbone, in_chans, img_size,
                               _V3PLUS_PAPER if decoder else _V3_PAPER)

    def _init_weights(self) -> None:
        # He init for the new convolutions, unit batch norms (the backbone keeps its own).
        for name, child in self.named_children():
            if name != "backbone":
                init_weights(child)
        # Small logits at first (a near-uniform prediction, loss ~ ln(num_classes)).
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        y = self.aspp(high)
        if self.decoder:
            y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
            y = self.fuse(torch.cat([y, self.reduce(low)], dim=1))
        y = self.classifier(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


@register_model(task="segment")
def deeplabv3(num_classes: int = 21, in_chans: int = 3, img_size: int | tuple[int, int] = 512,
              backbone: str = "resnet50", output_stride: int = 16, stem: str = "auto",
              drop_rate: float = 0.1) -> DeepLabV3:
    """DeepLabv3 (Chen et al. 2017, Rethinking Atrous Convolution): atrous ResNet + ASPP."""
    return DeepLabV3(num_classes, in_chans, img_size, backbone, output_stride, stem,
                     decoder=False, drop_rate=drop_rate)


@register_model(task="segment")
def deeplabv3plus(num_classes: int = 21, in_chans: int = 3,
                  img_size: int | tuple[int, int] = 512, backbone: str = "resnet50",
                  output_stride: int = 16, stem: str = "auto",
                  drop_rate: float = 0.1) -> DeepLabV3:
    """DeepLabv3+ (Chen et al. 2018, Encoder-Decoder with Atrous Separable Convolution).

    DeepLabv3 plus a decoder fusing the 4x-upsampled ASPP output with stride-4 features.
    """
    return DeepLabV3(num_classes, in_chans, img_size, backbone, output_stride, stem,
                     decoder=True, drop_rate=drop_rate)
