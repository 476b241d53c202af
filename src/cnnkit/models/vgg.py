"""VGG.

Simonyan and Zisserman (2015), "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR. Stacks of 3x3 convolutions (configurations A, B, D, E =
VGG-11/13/16/19), a 2x2 max-pool after each of five stages, and three dense layers.
The ``_bn`` variants add batch normalisation after every convolution (Ioffe and
Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift").

With the default ImageNet stem the module names, shapes and initialisation follow
torchvision (``features.N``, ``avgpool``, ``classifier.0/3/6``), so its checkpoints
load with ``strict=True``.

The ``"small"`` stem is the CIFAR-style variant: the first two max-pools are dropped
(total stride 8, so 32x32 gives a 4x4 map and 8x8 a 1x1 map) and the 120M-parameter
dense head, sized for a 7x7 map of ImageNet features, is replaced by a global average
pool and a single ``Linear(512, num_classes)``, as in most CIFAR VGG recipes.

``input_size=(C, L)`` or ``(C, D, H, W)`` builds the same network in 1D or 3D
(:mod:`cnnkit.layers.nd`): 3, 3x3x3 kernels and 2, 2x2x2 pools, as the 3D VGG-style
C3D of Tran, Bourdev, Fergus, Torresani and Paluri (2015), "Learning Spatiotemporal
Features with 3D Convolutional Networks", ICCV. The ImageNet head pools to 7 per
axis, so its first dense layer reads ``512 * 7**dims`` features (25,088 in 2D,
175,616 in 3D: 719M weights; the small stem's global pool avoids that).

Example:
    >>> import torch
    >>> from cnnkit.models.vgg import vgg11
    >>> m = vgg11(num_classes=10, img_size=32)
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> vgg11(num_classes=10, input_size=(12, 96))(torch.randn(2, 12, 96)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import nd
from ..layers.attention import create_attn
from ._base import Classifier, check_img_size, imagenet_stats, init_weights, resolve_stem
from ._registry import register_model

# Convolution widths per stage; every stage ends with a 2x2 max-pool.
_STAGES: dict[str, list[list[int]]] = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}
_PAPER = ("Simonyan and Zisserman 2015, Very Deep Convolutional Networks for "
          "Large-Scale Image Recognition")


class VGG(Classifier):
    """VGG with torchvision's layout; see the module docstring for the small stem.

    Args:
        stages: convolution widths per stage.
        batch_norm: BatchNorm after every convolution.
        num_classes: classifier outputs.
        in_chans: input channels (3 unless ``input_size`` says otherwise).
        img_size: spatial size (224 unless ``input_size`` says otherwise): an int (2D)
            or 1 to 3 sizes, used to resolve ``stem="auto"`` and for ``default_cfg``.
        stem: ``"imagenet"`` (five pools, total stride 32, 7x7 pool + three dense
            layers), ``"small"`` (three pools, total stride 8, global pool + one
            linear layer) or ``"auto"`` (small when the smallest side is under 64).
        attn: recalibration block (``cnnkit.layers.attention``) inserted after the
            last convolution (+BN+ReLU) of each stage; None keeps torchvision's indices.
        drop_rate: dropout of the ImageNet head.
        input_size: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``: the network is built in
            that many dimensions.
    """

    def __init__(self, stages: list[list[int]], batch_norm: bool, num_classes: int = 1000,
                 in_chans: int | None = None, img_size: int | tuple[int, ...] | None = None,
                 stem: str = "auto", attn: str | None = None, drop_rate: float = 0.5,
                 input_size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                                  default=(3, 224, 224), family="VGG")
        self.dims = dims = len(spatial)
        conv, norm, pool = nd.conv(dims), nd.batch_norm(dims), nd.max_pool(dims)
        self.stem = resolve_stem(stem, spatial)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        layers: list[nn.Module] = []
        self.feature_info = []
        chans, reduction = in_chans, 1
        for i, widths in enumerate(stages):
            for width in widths:
                layers.append(conv(chans, width, 3, padding=1))
                if batch_norm:
                    layers.append(norm(width))
                layers.append(nn.ReLU(inplace=True))
                chans = width
            last_relu = len(layers) - 1
            gate = create_attn(attn, chans)
            if not isinstance(gate, nn.Identity):  # attn=None keeps torchvision's indices
                layers.append(gate)
            if self.stem == "imagenet" or i >= 2:
                layers.append(pool(2, 2))
                reduction *= 2
            self.feature_info.append(dict(num_chs=chans, reduction=reduction,
                                          module=f"features.{len(layers) - 1}"))
        check_img_size("VGG", spatial, self.stem, reduction)
        self.features = nn.Sequential(*layers)
        self.cam_layer = f"features.{last_relu}"
        self.num_features = chans
        if self.stem == "imagenet":
            self.avgpool = nd.adaptive_avg_pool(dims)((7,) * dims)
            self.classifier = nn.Sequential(
                nn.Linear(chans * 7 ** dims, 4096), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
                nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
                nn.Linear(4096, num_classes))
        else:
            self.avgpool = nd.adaptive_avg_pool(dims)(1)
            self.classifier = nn.Linear(chans, num_classes)
        mean, std = imagenet_stats(in_chans)
        self.default_cfg = dict(input_size=(in_chans, *spatial), mean=mean, std=std,
                                num_classes=num_classes, paper=_PAPER)
        init_weights(self, dims)  # torchvision's scheme, so a fresh model matches its statistics

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        if self.stem == "imagenet":
            x = self.classifier[:-1](x)  # fc6, fc7 with their ReLU and dropout
        return x if pre_logits else self.get_classifier()(x)

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1] if self.stem == "imagenet" else self.classifier



def _vgg(name: str, batch_norm: bool, **kwargs) -> VGG:
    return VGG(_STAGES[name], batch_norm, **kwargs)


@register_model
def vgg11(num_classes: int = 1000, in_chans: int | None = None,
          img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
          attn: str | None = None, drop_rate: float = 0.5,
          input_size: tuple[int, ...] | None = None) -> VGG:
    """VGG-11, configuration A (Simonyan and Zisserman 2015, Very Deep Convolutional Networks)."""
    return _vgg("vgg11", False, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                stem=stem, attn=attn, drop_rate=drop_rate, input_size=input_size)


@register_model
def vgg11_bn(num_classes: int = 1000, in_chans: int | None = None,
             img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
             attn: str | None = None, drop_rate: float = 0.5,
             input_size: tuple[int, ...] | None = None) -> VGG:
    """VGG-11 with batch norm (Simonyan and Zisserman 2015; Ioffe and Szegedy 2015)."""
    return _vgg("vgg11", True, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                stem=stem, attn=attn, drop_rate=drop_rate, input_size=input_size)


@register_model
def vgg13(num_classes: int = 1000, in_chans: int | None = None,
          img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
          attn: str | None = None, drop_rate: float = 0.5,
          input_size: tuple[int, ...] | None = None) -> VGG:
    """VGG-13, configuration B (Simonyan and Zisserman 2015, Very Deep Convolutional Networks)."""
    return _vgg("vgg13", False, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                stem=stem, attn=attn, drop_rate=drop_rate, input_size=input_size)


@register_model
def vgg13_bn(num_classes: int = 1000, in_chans: int | None = None,
             img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
             attn: str | None = None, drop_rate: float = 0.5,
             input_size: tuple[int, ...] | None = None) -> VGG:
    """VGG-13 with batch norm (Simonyan and Zisserman 2015; Ioffe and Szegedy 2015)."""
    return _vgg("vgg13", True, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                stem=stem, attn=attn, drop_rate=drop_rate, input_size=input_size)


@register_model
def vgg16(num_classes: int = 1000, in_chans: int | None = None,
          img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
          attn: str | None = None, drop_rate: float = 0.5,
          input_size: tuple[int, ...] | None = None) -> VGG:
    """VGG-16, configuration D (Simonyan and Zisserman 2015, Very Deep Convolutional Networks)."""
    return _vgg("vgg16", False, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                stem=stem, attn=attn, drop_rate=drop_rate, input_size=input_size)


@register_model
def vgg16_bn(num_classes: int = 1000, in_chans: int | None = None,
             img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
             attn: str | None = None, drop_rate: float = 0.5,
             input_size: tuple[int, ...] | None = None) -> VGG:
    """VGG-16 with batch norm (Simonyan and Zisserman 2015; Ioffe and Szegedy 2015)."""
    return _vgg("vgg16", True, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                stem=stem, attn=attn, drop_rate=drop_rate, input_size=input_size)


@register_model
def vgg19(num_classes: int = 1000, in_chans: int | None = None,
          img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
          attn: str | None = None, drop_rate: float = 0.5,
          input_size: tuple[int, ...] | None = None) -> VGG:
    """VGG-19, configuration E (Simonyan and Zisserman 2015, Very Deep Convolutional Networks)."""
    return _vgg("vgg19", False, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                stem=stem, attn=attn, drop_rate=drop_rate, input_size=input_size)


@register_model
def vgg19_bn(num_classes: int = 1000, in_chans: int | None = None,
             img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
             attn: str | None = None, drop_rate: float = 0.5,
             input_size: tuple[int, ...] | None = None) -> VGG:
    """VGG-19 with batch norm (Simonyan and Zisserman 2015; Ioffe and Szegedy 2015)."""
    return _vgg("vgg19", True, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                stem=stem, attn=attn, drop_rate=drop_rate, input_size=input_size)
