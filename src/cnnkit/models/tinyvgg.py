"""Tiny VGG, the network of CNN Explainer.

Wang, Turko, Shaikh, Park, Das, Hohman, Kahng and Chau (2020), "CNN Explainer:
Learning Convolutional Neural Networks with Interactive Visualization", IEEE TVCG.
Two blocks of two 3x3 convolutions (10 filters, ReLU) and a 2x2 max-pool, then a
dense layer on the flattened 64x64 input's 10x13x13 map.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers import nd
from ._base import Classifier, to_2tuple
from ._registry import register_model


class TinyVGG(Classifier):
    """Tiny VGG; convolutions are unpadded at 64x64 (as in CNN Explainer), padded below."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3,
                 img_size: int | tuple[int, int] = 64, width: int = 10) -> None:
        super().__init__()
        h, w = to_2tuple(img_size)
        pad = 0 if min(h, w) >= 64 else 1
        self.num_classes, self.in_chans, self.width = num_classes, in_chans, width
        layers: list[tuple[str, nn.Module]] = []
        chans = in_chans
        for b in (1, 2):
            for c in (1, 2):
                layers += [(f"conv_{b}_{c}", nn.Conv2d(chans, width, 3, padding=pad)),
                           (f"relu_{b}_{c}", nn.ReLU(inplace=True))]
                chans = width
                h, w = h - 2 + 2 * pad, w - 2 + 2 * pad
            layers.append((f"max_pool_{b}", nn.MaxPool2d(2)))
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"img_size {img_size} is too small for tinyvgg (need at least 4x4)")
        self.features = nn.Sequential(OrderedDict(layers))
        self.flat_features = width * h * w
        self.fc = nn.Linear(self.flat_features, num_classes)
        self.feature_info = [dict(num_chs=width, reduction=2, module="features.max_pool_1"),
                             dict(num_chs=width, reduction=4, module="features.max_pool_2")]
        self.cam_layer = "features.relu_2_2"
        self.default_cfg = dict(input_size=(in_chans, *to_2tuple(img_size)),
                                mean=(0.5,) * in_chans, std=(0.5,) * in_chans,
                                num_classes=num_classes,
                                paper="Wang et al. 2020, CNN Explainer")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc



def _tinyvgg(num_classes: int, in_chans: int | None, img_size: int | tuple[int, int] | None,
             width: int, input_size: tuple[int, int, int] | None) -> TinyVGG:
    # 2D only: the dense layer is sized for the flattened 2D map (CNN Explainer's 64x64).
    in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size, default=(3, 64, 64),
                                              dims=(2,), family="tinyvgg")
    return TinyVGG(num_classes, in_chans, spatial, width)


@register_model
def tinyvgg(num_classes: int = 10, in_chans: int | None = None,
            img_size: int | tuple[int, int] | None = None, width: int = 10,
            input_size: tuple[int, int, int] | None = None) -> TinyVGG:
    """Tiny VGG of CNN Explainer (Wang et al. 2020): 2 x (conv-conv-pool), 10 filters."""
    return _tinyvgg(num_classes, in_chans, img_size, width, input_size)


@register_model
def tinyvgg_wide(num_classes: int = 10, in_chans: int | None = None,
                 img_size: int | tuple[int, int] | None = None, width: int = 64,
                 input_size: tuple[int, int, int] | None = None) -> TinyVGG:
    """Tiny VGG with 64 filters per convolution: the small default CNN of `cnnkit train`."""
    return _tinyvgg(num_classes, in_chans, img_size, width, input_size)
