"""DenseNet-BC.

Huang, Liu, van der Maaten and Weinberger (2017), "Densely Connected Convolutional
Networks", CVPR. Inside a dense block every layer (BN-ReLU-1x1 conv to
``bn_size * growth_rate`` channels, BN-ReLU-3x3 conv to ``growth_rate``) reads the
concatenation of all earlier maps; transitions (BN-ReLU-1x1 conv halving the channels,
2x2 average pool) sit between blocks. Growth 32, bottleneck width 4, compression 0.5.

With the default ImageNet stem the module names, shapes and initialisation follow
torchvision (``features.conv0/norm0/relu0/pool0``, ``features.denseblockN.denselayerM``,
``features.transitionN``, ``features.norm5``, ``classifier``), so its checkpoints load
with ``strict=True``. torchvision applies a functional ReLU after ``norm5``; here it is
the parameter-free module ``features.relu5`` so Grad-CAM can hook it (same outputs,
same state_dict).

The ``"small"`` stem replaces the 7x7 stride-2 ``conv0`` by a 3x3 stride-1 convolution
and drops ``pool0``: only the three transitions downsample, so the total stride is 8.

``input_size=(C, L)`` or ``(C, D, H, W)`` builds the same network in 1D or 3D
(:mod:`cnnkit.layers.nd`), as the 3D DenseNets of Hara, Kataoka and Satoh (2018), "Can
Spatiotemporal 3D CNNs Retrace the History of 2D CNNs and ImageNet?", CVPR.

Example:
    >>> import torch
    >>> from cnnkit.models.densenet import densenet121
    >>> m = densenet121(num_classes=10, img_size=32)
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import nd
from ._base import Classifier, check_img_size, resolve_stem
from ._registry import register_model

_PAPER = ("Huang, Liu, van der Maaten and Weinberger 2017, Densely Connected "
          "Convolutional Networks")


class DenseLayer(nn.Module):
    """BN-ReLU-Conv(1x1)-BN-ReLU-Conv(3x3) on the concatenation of all earlier maps.

    ``conv_layer`` and ``norm_layer`` are the types of the network's number of dimensions.
    """

    def __init__(self, in_chs: int, growth_rate: int, bn_size: int, drop_rate: float,
                 conv_layer: type[nn.Module] = nn.Conv2d,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.norm1 = norm_layer(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv_layer(in_chs, bn_size * growth_rate, 1, bias=False)
        self.norm2 = norm_layer(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv_layer(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        x = self.conv2(self.relu2(self.norm2(x)))
        return F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; outputs the input concatenated with every new map."""

    def __init__(self, num_layers: int, in_chs: int, growth_rate: int, bn_size: int,
                 drop_rate: float, conv_layer: type[nn.Module] = nn.Conv2d,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(in_chs + i * growth_rate, growth_rate, bn_size, drop_rate,
                                       conv_layer, norm_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv(1x1) to ``out_chs`` (the compression), then a 2x2 average pool."""

    def __init__(self, in_chs: int, out_chs: int, conv_layer: type[nn.Module] = nn.Conv2d,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d,
                 pool_layer: type[nn.Module] = nn.AvgPool2d) -> None:
        super().__init__()
        self.norm = norm_layer(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv = conv_layer(in_chs, out_chs, 1, bias=False)
        self.pool = pool_layer(2, 2)


class DenseNet(Classifier):
    """DenseNet-BC with torchvision's layout; see the module docstring for the small stem.

    Args:
        block_config: dense layers per block.
        growth_rate: channels each dense layer adds (k in the paper).
        num_init_features: channels of ``conv0``.
        bn_size: bottleneck width, in multiples of ``growth_rate``.
        drop_rate: dropout after each dense layer.
        num_classes: classifier outputs.
        in_chans: input channels (3 unless ``input_size`` says otherwise).
        img_size: spatial size (224 unless ``input_size`` says otherwise): an int (2D)
            or 1 to 3 sizes, used to resolve ``stem="auto"`` and for ``default_cfg``.
        stem: ``"imagenet"`` (total stride 32), ``"small"`` (total stride 8) or ``"auto"``.
        input_size: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``: the network is built in
            that many dimensions.
    """

    def __init__(self, block_config: tuple[int, ...], growth_rate: int = 32,
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000, in_chans: int | None = None,
                 img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
                 input_size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                                  default=(3, 224, 224), family="DenseNet")
        self.dims = dims = len(spatial)
        conv, norm = nd.conv(dims), nd.batch_norm(dims)
        self.stem = resolve_stem(stem, spatial)
        self.num_classes, self.in_chans = num_classes, in_chans
        if self.stem == "imagenet":
            stem_layers = [("conv0", conv(in_chans, num_init_features, 7, 2, 3, bias=False)),
                           ("norm0", norm(num_init_features)),
                           ("relu0", nn.ReLU(inplace=True)),
                           ("pool0", nd.max_pool(dims)(3, 2, 1))]
            reduction = 4
        else:
            stem_layers = [("conv0", conv(in_chans, num_init_features, 3, 1, 1, bias=False)),
                           ("norm0", norm(num_init_features)),
                           ("relu0", nn.ReLU(inplace=True))]
            reduction = 1
        self.features = nn.Sequential(OrderedDict(stem_layers))
        self.feature_info = []
        chans = num_init_features
        for i, num_layers in enumerate(block_config, 1):
            self.features.add_module(f"denseblock{i}", DenseBlock(
                num_layers, chans, growth_rate, bn_size, drop_rate, conv, norm))
            chans += num_layers * growth_rate
            if i < len(block_config):
                self.feature_info.append(dict(num_chs=chans, reduction=reduction,
                                              module=f"features.denseblock{i}"))
                self.features.add_module(f"transition{i}", Transition(
                    chans, chans // 2, conv, norm, nd.avg_pool(dims)))
                chans //= 2
                reduction *= 2
        self.features.add_module("norm5", norm(chans))
        self.features.add_module("relu5", nn.ReLU())  # not in-place: norm5 stays hookable
        self.feature_info.append(dict(num_chs=chans, reduction=reduction, module="features.relu5"))
        check_img_size("DenseNet", spatial, self.stem, reduction)
        self.num_features = chans
        self.global_pool = nd.adaptive_avg_pool(dims)(1)
        self.classifier = nn.Linear(chans, num_classes)
        self.cam_layer = "features.relu5"
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if in_chans == 3 else \
            ((0.5,) * in_chans, (0.5,) * in_chans)
        self.default_cfg = dict(input_size=(in_chans, *spatial), mean=mean, std=std,
                                num_classes=num_classes, paper=_PAPER)
        # torchvision's scheme: He-normal convolutions, default Linear weights, zero biases.
        for m in self.modules():
            if isinstance(m, conv):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, norm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.classifier(x)

    def get_classifier(self) -> nn.Module:
        return self.classifier



@register_model
def densenet121(num_classes: int = 1000, in_chans: int | None = None,
                img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
                drop_rate: float = 0.0, input_size: tuple[int, ...] | None = None) -> DenseNet:
    """DenseNet-121, blocks (6, 12, 24, 16), k=32 (Huang et al. 2017, Densely Connected CNNs)."""
    return DenseNet((6, 12, 24, 16), drop_rate=drop_rate, num_classes=num_classes,
                    in_chans=in_chans, img_size=img_size, stem=stem, input_size=input_size)


@register_model
def densenet169(num_classes: int = 1000, in_chans: int | None = None,
                img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
                drop_rate: float = 0.0, input_size: tuple[int, ...] | None = None) -> DenseNet:
    """DenseNet-169, blocks (6, 12, 32, 32), k=32 (Huang et al. 2017, Densely Connected CNNs)."""
    return DenseNet((6, 12, 32, 32), drop_rate=drop_rate, num_classes=num_classes,
                    in_chans=in_chans, img_size=img_size, stem=stem, input_size=input_size)


@register_model
def densenet201(num_classes: int = 1000, in_chans: int | None = None,
                img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
                drop_rate: float = 0.0, input_size: tuple[int, ...] | None = None) -> DenseNet:
    """DenseNet-201, blocks (6, 12, 48, 32), k=32 (Huang et al. 2017, Densely Connected CNNs)."""
    return DenseNet((6, 12, 48, 32), drop_rate=drop_rate, num_classes=num_classes,
                    in_chans=in_chans, img_size=img_size, stem=stem, input_size=input_size)
