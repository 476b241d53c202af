"""LeNet-5.

LeCun, Bottou, Bengio and Haffner (1998), "Gradient-based learning applied to
document recognition", Proc. IEEE 86(11). C1 (6 maps, 5x5) -> S2 (2x2 subsampling)
-> C3 (16 maps, 5x5) -> S4 -> C5 (120) -> F6 (84) -> output, tanh activations.
The trainable subsampling of S2/S4 is an average pool here, and C3 connects to all
S2 maps (the common simplification of the paper's partial connection table).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers import nd
from ._base import Classifier, to_2tuple
from ._registry import register_model

_ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class LeNet5(Classifier):
    """LeNet-5 with a "same"-padding variant for inputs smaller than 32x32.

    At 32x32 the 5x5 convolutions are unpadded as in the paper and C5 (a 5x5
    convolution on a 5x5 map) is the equivalent fully connected layer. Below 32
    pixels the convolutions are padded by 2 so an 8x8 digit still fits.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1,
                 img_size: int | tuple[int, int] = 32, act: str = "tanh") -> None:
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(_ACTS)}")
        h, w = to_2tuple(img_size)
        pad = 0 if min(h, w) >= 32 else 2
        act_layer = _ACTS[act]
        self.num_classes, self.in_chans = num_classes, in_chans
        self.features = nn.Sequential(OrderedDict([
            ("c1", nn.Conv2d(in_chans, 6, 5, padding=pad)), ("act1", act_layer()),
            ("s2", nn.AvgPool2d(2)),
            ("c3", nn.Conv2d(6, 16, 5, padding=pad)), ("act3", act_layer()),
            ("s4", nn.AvgPool2d(2)),
        ]))
        for _ in range(2):  # each stage: conv (shrinks by 4 - 2*pad), then pool by 2
            h, w = (h - 4 + 2 * pad) // 2, (w - 4 + 2 * pad) // 2
        if h < 1 or w < 1:
            raise ValueError(f"img_size {img_size} is too small for lenet5 (need at least 4x4)")
        self.flat_features = 16 * h * w
        self.c5 = nn.Linear(self.flat_features, 120)
        self.f6 = nn.Linear(120, 84)
        self.act = act_layer()
        self.fc = nn.Linear(84, num_classes)
        self.feature_info = [dict(num_chs=6, reduction=2, module="features.s2"),
                             dict(num_chs=16, reduction=4, module="features.s4")]
        self.cam_layer = "features.act3"
        self.default_cfg = dict(input_size=(in_chans, *to_2tuple(img_size)), mean=(0.5,) * in_chans,
                                std=(0.5,) * in_chans, num_classes=num_classes,
                                paper="LeCun et al. 1998, Gradient-based learning applied "
                                      "to document recognition")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act(self.f6(self.act(self.c5(torch.flatten(x, 1)))))
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc



@register_model
def lenet5(num_classes: int = 10, in_chans: int | None = None,
           img_size: int | tuple[int, int] | None = None, act: str = "tanh",
           input_size: tuple[int, int, int] | None = None) -> LeNet5:
    """LeNet-5 (LeCun et al. 1998): two conv/subsampling stages and three dense layers.

    2D only (its dense layers are sized for a 2D map); the default input is 1x32x32.
    """
    in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size, default=(1, 32, 32),
                                              dims=(2,), family="lenet5")
    return LeNet5(num_classes, in_chans, spatial, act)
