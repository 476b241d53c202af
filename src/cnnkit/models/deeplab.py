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
implementation's ``keep_prob=0.9``. ``input_size=(C, L)`` or ``(C, D, H, W)`` builds
the model and its ResNet in 1D or 3D (:mod:`cnnkit.layers.nd`; linear or trilinear
upsampling).

Example:
    >>> import torch
    >>> from cnnkit.models.deeplab import deeplabv3plus
    >>> m = deeplabv3plus(num_classes=5, backbone="resnet18", img_size=32, stem="small")
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 5, 32, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import nd
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


def conv_bn_relu(in_chs: int, out_chs: int, kernel: int = 1, dilation: int = 1,
                 dims: int = 2) -> nn.Sequential:
    """Convolution (no bias), batch norm, ReLU; 3x3 ones padded to keep the size."""
    return nn.Sequential(
        nd.conv(dims)(in_chs, out_chs, kernel, padding=dilation * (kernel // 2),
                      dilation=dilation, bias=False),
        nd.batch_norm(dims)(out_chs), nn.ReLU(inplace=True))


def _upsample(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """(Bi/tri)linear interpolation of ``x`` to the spatial ``size``."""
    return F.interpolate(x, size=size, mode=nd.interp_mode(x.ndim - 2), align_corners=False)


class ASPPPooling(nn.Module):
    """Image-level features: global average pool, 1x1 conv-BN-ReLU, upsampled to the map."""

    def __init__(self, in_chs: int, out_chs: int, dims: int = 2) -> None:
        super().__init__()
        self.pool = nd.adaptive_avg_pool(dims)(1)
        self.conv = conv_bn_relu(in_chs, out_chs, dims=dims)

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
        return _upsample(relu(y), x.shape[2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with image-level features (Chen et al. 2017).

    Args:
        in_chs: input channels.
        rates: atrous rates of the three 3x3 branches.
        out_chs: channels of every branch and of the projection (256 in the paper).
        drop_rate: dropout after the projection.
        dims: spatial dimensions (1, 2 or 3).

    Attributes:
        convs: the branches: 1x1, three atrous 3x3, image pooling.
        project: 1x1 conv-BN-ReLU over the concatenated branches, then dropout.
    """

    def __init__(self, in_chs: int, rates: tuple[int, int, int], out_chs: int = 256,
                 drop_rate: float = 0.1, dims: int = 2) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.convs = nn.ModuleList(
            [conv_bn_relu(in_chs, out_chs, dims=dims)]
            + [conv_bn_relu(in_chs, out_chs, 3, r, dims) for r in rates]
            + [ASPPPooling(in_chs, out_chs, dims)])
        self.project = nn.Sequential(conv_bn_relu(len(self.convs) * out_chs, out_chs, dims=dims),
                                     nn.Dropout(drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3(DenseModel):
    """DeepLabv3 (Chen et al. 2017) or, with ``decoder=True``, DeepLabv3+ (Chen et al. 2018).

    Args:
        num_classes: output classes, background included.
        in_chans: input channels (3 unless ``input_size`` says otherwise).
        img_size: nominal input size (``default_cfg`` and the backbone's ``stem="auto"``):
            an int (2D) or 1 to 3 sizes.
        backbone: a registered ResNet (``resnet18`` ... ``wide_resnet101_2``).
        output_stride: 16 or 8: stride of the ASPP input with the ImageNet stem.
        stem: the backbone's stem; ``"small"`` divides every stride by 4 (64x64 inputs).
        decoder: add the DeepLabv3+ decoder on the stride-4 (``layer1``) features.
        aspp_width: channels of the ASPP branches and projection (256).
        drop_rate: dropout after the ASPP projection.
        input_size: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``: the model and its
            backbone are built in that many dimensions.

    Example:
        >>> import torch
        >>> from cnnkit.models.deeplab import DeepLabV3
        >>> m = DeepLabV3(num_classes=5, backbone="resnet18", img_size=32, stem="small")
        >>> m(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 5, 32, 32])
    """

    task = "segment"

    def __init__(self, num_classes: int = 21, in_chans: int | None = None,
                 img_size: int | tuple[int, ...] | None = None, backbone: str = "resnet50",
                 output_stride: int = 16, stem: str = "auto", decoder: bool = False,
                 aspp_width: int = 256, drop_rate: float = 0.1,
                 input_size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                                  default=(3, 512, 512), family="DeepLab")
        self.dims = dims = len(spatial)
        rates = aspp_rates(output_stride)
        if not (backbone.startswith("resnet") or backbone.startswith("wide_resnet")):
            raise ValueError(f"DeepLab needs an atrous ResNet backbone (resnet18 ... "
                             f"wide_resnet101_2), got {backbone!r}")
        self.num_classes, self.in_chans, self.output_stride = num_classes, in_chans, output_stride
        self.decoder = decoder
        # layer1 (stride 4: the paper's low-level "Conv2" features) and layer4.
        self.backbone = Encoder(backbone, in_chans, [0, -1], img_size=spatial, stem=stem,
                                output_stride=output_stride)
        low_chs, high_chs = self.backbone.channels
        self.aspp = ASPP(high_chs, rates, aspp_width, drop_rate, dims)
        if decoder:
            self.reduce = conv_bn_relu(low_chs, 48, dims=dims)
            self.fuse = nn.Sequential(conv_bn_relu(aspp_width + 48, 256, 3, dims=dims),
                                      conv_bn_relu(256, 256, 3, dims=dims))
            self.classifier = nd.conv(dims)(256, num_classes, 1)
        else:
            self.classifier = nd.conv(dims)(aspp_width, num_classes, 1)
        self._init_weights()

        self.describe_backbone(self.backbone, in_chans, spatial,
                               _V3PLUS_PAPER if decoder else _V3_PAPER)

    def _init_weights(self) -> None:
        # He init for the new convolutions, unit batch norms (the backbone keeps its own).
        for name, child in self.named_children():
            if name != "backbone":
                init_weights(child, self.dims)
        # Small logits at first (a near-uniform prediction, loss ~ ln(num_classes)).
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        y = self.aspp(high)
        if self.decoder:
            y = self.fuse(torch.cat([_upsample(y, low.shape[2:]), self.reduce(low)], dim=1))
        return _upsample(self.classifier(y), x.shape[2:])


@register_model(task="segment")
def deeplabv3(num_classes: int = 21, in_chans: int | None = None,
              img_size: int | tuple[int, ...] | None = None, backbone: str = "resnet50",
              output_stride: int = 16, stem: str = "auto", drop_rate: float = 0.1,
              input_size: tuple[int, ...] | None = None) -> DeepLabV3:
    """DeepLabv3 (Chen et al. 2017, Rethinking Atrous Convolution): atrous ResNet + ASPP."""
    return DeepLabV3(num_classes, in_chans, img_size, backbone, output_stride, stem,
                     decoder=False, drop_rate=drop_rate, input_size=input_size)


@register_model(task="segment")
def deeplabv3plus(num_classes: int = 21, in_chans: int | None = None,
                  img_size: int | tuple[int, ...] | None = None, backbone: str = "resnet50",
                  output_stride: int = 16, stem: str = "auto", drop_rate: float = 0.1,
                  input_size: tuple[int, ...] | None = None) -> DeepLabV3:
    """DeepLabv3+ (Chen et al. 2018, Encoder-Decoder with Atrous Separable Convolution).

    DeepLabv3 plus a decoder fusing the 4x-upsampled ASPP output with stride-4 features.
    """
    return DeepLabV3(num_classes, in_chans, img_size, backbone, output_stride, stem,
                     decoder=True, drop_rate=drop_rate, input_size=input_size)
