"""ResNet and the ImageNet Wide ResNets, torchvision-compatible.

He, Zhang, Ren and Sun (2016), "Deep Residual Learning for Image Recognition", CVPR.
Residual blocks ``y = relu(F(x) + shortcut(x))`` with a BasicBlock (two 3x3 convs,
ResNet-18/34) or a Bottleneck (1x1 reduce, 3x3, 1x1 expand by 4; ResNet-50/101/152).
This is "ResNet v1.5" as in torchvision: a downsampling Bottleneck puts its stride on
the 3x3 convolution rather than on the first 1x1 one, which is slightly more accurate.

The Wide ResNets ``wide_resnet50_2`` / ``wide_resnet101_2`` are Zagoruyko and
Komodakis (2016), "Wide Residual Networks", BMVC, in torchvision's ImageNet form:
the Bottleneck's inner width is doubled while its output width stays the same.

``output_stride`` 16 or 8 makes the backbone atrous for dense prediction (Chen,
Papandreou, Schroff and Adam 2017, "Rethinking Atrous Convolution for Semantic Image
Segmentation"), as torchvision's ``replace_stride_with_dilation``: the last one or two
stages keep their resolution (stride 1) and their 3x3 convolutions are dilated by 2,
then 4, so the receptive field grows as if they still downsampled. Parameters and keys
are unchanged, so ImageNet checkpoints load into an atrous backbone.
(The CIFAR WRN-d-k with pre-activation blocks lives in :mod:`cnnkit.models.wide_resnet`.)

With the default stem, ``attn=None`` and 1000 classes, module names, state_dict keys,
shapes and initialisation follow torchvision, so its checkpoints load with
``strict=True``.

The same description builds 1D and 3D ResNets (``input_size=(C, L)`` or ``(C, D, H, W)``;
:mod:`cnnkit.layers.nd`): every kxk kernel becomes k or kxkxk, the stem, strides,
widths and the classifier stay, as the 3D ResNets of Hara, Kataoka and Satoh (2018),
"Can Spatiotemporal 3D CNNs Retrace the History of 2D CNNs and ImageNet?", CVPR, and
the 1D ones of Wang, Yan and Oates (2017), "Time Series Classification from Scratch
with Deep Neural Networks: A Strong Baseline", IJCNN.

Example:
    >>> import torch
    >>> from cnnkit.models.resnet import resnet18
    >>> m = resnet18(num_classes=4, input_size=(1, 16, 32, 32))
    >>> m(torch.randn(2, 1, 16, 32, 32)).shape, m.conv1.weight.shape
    (torch.Size([2, 4]), torch.Size([64, 1, 3, 3, 3]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.layers import nd
from cnnkit.layers.attention import create_attn

from ._base import Classifier, imagenet_stats, resolve_stem
from ._registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]

_PAPER = "He et al. 2016, Deep Residual Learning for Image Recognition"


def conv3x3(in_chs: int, out_chs: int, stride: int = 1, groups: int = 1, dilation: int = 1,
            conv_layer: type[nn.Module] = nn.Conv2d) -> nn.Module:
    """3x3 (3, 3x3x3) convolution, padding = dilation (size-preserving at stride 1), no bias."""
    return conv_layer(in_chs, out_chs, 3, stride=stride, padding=dilation, groups=groups,
                      bias=False, dilation=dilation)


def conv1x1(in_chs: int, out_chs: int, stride: int = 1,
            conv_layer: type[nn.Module] = nn.Conv2d) -> nn.Module:
    """1x1 convolution, no bias (a BatchNorm follows)."""
    return conv_layer(in_chs, out_chs, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut.

    ``attn`` recalibrates the residual branch before the addition, as in SE-ResNet
    (Hu, Shen and Sun 2018, "Squeeze-and-Excitation Networks"). ``conv_layer`` and
    ``norm_layer`` are the types of the network's number of dimensions.
    """

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 attn: str | None = None, dilation: int = 1, first_dilation: int | None = None,
                 conv_layer: type[nn.Module] = nn.Conv2d,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64; "
                             "use the Bottleneck block for ResNeXt / wide variants")
        # The first block of a dilated stage enters with the previous stage's dilation
        # (torchvision's rule for Bottleneck, timm's for BasicBlock).
        self.conv1 = conv3x3(in_chs, planes, stride, dilation=first_dilation or dilation,
                             conv_layer=conv_layer)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation, conv_layer=conv_layer)
        self.bn2 = norm_layer(planes)
        self.attn = create_attn(attn, planes)
        self.downsample = downsample
        self.stride = stride

    def last_bn(self) -> nn.Module:
        """The BatchNorm closing the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attn(self.bn2(self.conv2(out)))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride: ResNet v1.5), 1x1 expand by 4.

    The inner width is ``planes * base_width / 64 * groups``: 64 and 1 give ResNet,
    ``base_width=128`` the Wide ResNet-50-2/101-2 of Zagoruyko and Komodakis (2016).
    ``attn`` acts on the expanded channels before the addition (SE-ResNet placement).
    """

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 attn: str | None = None, dilation: int = 1, first_dilation: int | None = None,
                 conv_layer: type[nn.Module] = nn.Conv2d,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out_chs = planes * self.expansion
        self.conv1 = conv1x1(in_chs, width, conv_layer=conv_layer)
        self.bn1 = norm_layer(width)
        # torchvision: the 3x3 of a dilated stage's first block keeps the previous dilation.
        self.conv2 = conv3x3(width, width, stride, groups, first_dilation or dilation, conv_layer)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, out_chs, conv_layer=conv_layer)
        self.bn3 = norm_layer(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.attn = create_attn(attn, out_chs)
        self.downsample = downsample
        self.stride = stride

    def last_bn(self) -> nn.Module:
        """The BatchNorm closing the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attn(self.bn3(self.conv3(out)))
        return self.relu(out + shortcut)


class ResNet(Classifier):
    """ResNet (He et al. 2016) with torchvision's module names and initialisation.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in each of the four stages.
        num_classes: classifier outputs.
        in_chans: input channels (3 unless ``input_size`` says otherwise).
        img_size: spatial size (224 unless ``input_size`` says otherwise): an int (2D)
            or 1 to 3 sizes, used to resolve ``stem="auto"`` and for ``default_cfg``.
        stem: ``"imagenet"`` (7x7 stride-2 conv and 3x3 max-pool, total stride 32),
            ``"small"`` (3x3 stride-1 conv, no pool, total stride 8, for 32x32 or 8x8
            inputs) or ``"auto"`` (small when the smallest side is under 64).
        attn: recalibration block name from :func:`cnnkit.layers.attention.list_attn`
            inserted in every residual block, or None.
        zero_init_residual: zero the last BatchNorm of each residual branch so every
            block starts as its shortcut (Goyal et al. 2017, "Accurate, Large
            Minibatch SGD: Training ImageNet in 1 Hour").
        groups: convolution groups of the Bottleneck's 3x3 conv.
        width_per_group: Bottleneck width per group (64 for ResNet, 128 for WRN-x-2).
        drop_rate: dropout probability before the classifier.
        output_stride: total stride of ``layer4`` with the ImageNet stem: 32 (plain),
            16 (``layer4`` dilated by 2) or 8 (``layer3`` by 2, ``layer4`` by 4), as
            torchvision's ``replace_stride_with_dilation`` (Chen et al. 2017, "Rethinking
            Atrous Convolution for Semantic Image Segmentation"). The small stem divides
            every reduction by 4 (16 gives 4, 8 gives 2).
        paper: citation stored in ``default_cfg``.
        input_size: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``: the network is built in
            that many dimensions (:func:`cnnkit.layers.nd.resolve_input_size`).

    Example:
        >>> import torch
        >>> from cnnkit.models.resnet import BasicBlock, ResNet
        >>> m = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10, img_size=32)
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 num_classes: int = 1000, in_chans: int | None = None,
                 img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
                 attn: str | None = None, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64, drop_rate: float = 0.0, output_stride: int = 32,
                 paper: str = _PAPER, input_size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give the block count of 4 stages, got {layers}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 32, 16 or 8, got {output_stride!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                                  default=(3, 224, 224), family="ResNet")
        self.dims = dims = len(spatial)
        self.stem = resolve_stem(stem, spatial)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.groups, self.base_width = groups, width_per_group
        self.inplanes, self.dilation, self.output_stride = 64, 1, output_stride
        # Registration order = torchvision's, so state_dict keys come in the same order.
        small = self.stem == "small"  # keep the resolution: a 32px input leaves 4x4 at layer4
        conv, norm = nd.conv(dims), nd.batch_norm(dims)
        self.conv1 = (conv(in_chans, 64, 3, stride=1, padding=1, bias=False) if small
                      else conv(in_chans, 64, 7, stride=2, padding=3, bias=False))
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.Identity() if small
                        else nd.max_pool(dims)(kernel_size=3, stride=2, padding=1))
        stem_reduction = 1 if small else 4
        # Stages 3 and 4 trade their stride for dilation when output_stride asks for it.
        dilate = {32: (False, False), 16: (False, True), 8: (True, True)}[output_stride]
        self.layer1 = self._make_layer(block, 64, layers[0], 1, attn)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, attn)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, attn, dilate[0])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, attn, dilate[1])
        self.avgpool = nd.adaptive_avg_pool(dims)((1,) * dims)
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights(zero_init_residual)

        reductions = [stem_reduction * min(2 ** i, output_stride // 4) for i in range(4)]
        self.feature_info = [
            dict(num_chs=planes * block.expansion, reduction=r, module=f"layer{i + 1}")
            for i, (planes, r) in enumerate(zip((64, 128, 256, 512), reductions, strict=True))
        ]
        self.cam_layer = "layer4"
        mean, std = imagenet_stats(in_chans)
        self.default_cfg = dict(input_size=(in_chans, *spatial), mean=mean,
                                std=std, num_classes=num_classes, paper=paper)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int, attn: str | None, dilate: bool = False) -> nn.Sequential:
        out_chs = planes * block.expansion
        previous_dilation = self.dilation
        if dilate:  # torchvision's replace_stride_with_dilation
            self.dilation *= stride
            stride = 1
        conv, norm = nd.conv(self.dims), nd.batch_norm(self.dims)
        downsample = None
        if stride != 1 or self.inplanes != out_chs:  # the shortcut must match shape
            downsample = nn.Sequential(conv1x1(self.inplanes, out_chs, stride, conv), norm(out_chs))
        types = dict(conv_layer=conv, norm_layer=norm)
        mods = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                      attn, dilation=self.dilation, first_dilation=previous_dilation, **types)]
        self.inplanes = out_chs
        mods += [block(out_chs, planes, groups=self.groups, base_width=self.base_width,
                       attn=attn, dilation=self.dilation, **types) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's scheme: He-normal (fan_out) convs, unit BN; fc keeps PyTorch's default.
        for name, m in self.named_modules():
            if ".attn" in name:  # recalibration blocks keep their own initialisation
                continue
            if isinstance(m, nd.conv(self.dims)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nd.batch_norm(self.dims), nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc



def _resnet(block: type[BasicBlock | Bottleneck], layers: list[int], **kwargs) -> ResNet:
    return ResNet(block, layers, **kwargs)


@register_model
def resnet18(num_classes: int = 1000, in_chans: int | None = None,
             img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
             attn: str | None = None, zero_init_residual: bool = False, drop_rate: float = 0.0,
             output_stride: int = 32, input_size: tuple[int, ...] | None = None) -> ResNet:
    """ResNet-18 (He et al. 2016): BasicBlocks [2, 2, 2, 2], 11.7M parameters."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans,
                   img_size=img_size, stem=stem, attn=attn,
                   zero_init_residual=zero_init_residual, drop_rate=drop_rate,
                   output_stride=output_stride, input_size=input_size)


@register_model
def resnet34(num_classes: int = 1000, in_chans: int | None = None,
             img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
             attn: str | None = None, zero_init_residual: bool = False, drop_rate: float = 0.0,
             output_stride: int = 32, input_size: tuple[int, ...] | None = None) -> ResNet:
    """ResNet-34 (He et al. 2016): BasicBlocks [3, 4, 6, 3], 21.8M parameters."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans,
                   img_size=img_size, stem=stem, attn=attn,
                   zero_init_residual=zero_init_residual, drop_rate=drop_rate,
                   output_stride=output_stride, input_size=input_size)


@register_model
def resnet50(num_classes: int = 1000, in_chans: int | None = None,
             img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
             attn: str | None = None, zero_init_residual: bool = False, drop_rate: float = 0.0,
             output_stride: int = 32, input_size: tuple[int, ...] | None = None) -> ResNet:
    """ResNet-50 v1.5 (He et al. 2016): Bottlenecks [3, 4, 6, 3], 25.6M parameters."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans,
                   img_size=img_size, stem=stem, attn=attn,
                   zero_init_residual=zero_init_residual, drop_rate=drop_rate,
                   output_stride=output_stride, input_size=input_size)


@register_model
def resnet101(num_classes: int = 1000, in_chans: int | None = None,
              img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
              attn: str | None = None, zero_init_residual: bool = False, drop_rate: float = 0.0,
              output_stride: int = 32, input_size: tuple[int, ...] | None = None) -> ResNet:
    """ResNet-101 v1.5 (He et al. 2016): Bottlenecks [3, 4, 23, 3], 44.5M parameters."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, in_chans=in_chans,
                   img_size=img_size, stem=stem, attn=attn,
                   zero_init_residual=zero_init_residual, drop_rate=drop_rate,
                   output_stride=output_stride, input_size=input_size)


@register_model
def resnet152(num_classes: int = 1000, in_chans: int | None = None,
              img_size: int | tuple[int, ...] | None = None, stem: str = "auto",
              attn: str | None = None, zero_init_residual: bool = False, drop_rate: float = 0.0,
              output_stride: int = 32, input_size: tuple[int, ...] | None = None) -> ResNet:
    """ResNet-152 v1.5 (He et al. 2016): Bottlenecks [3, 8, 36, 3], 60.2M parameters."""
    return _resnet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, in_chans=in_chans,
                   img_size=img_size, stem=stem, attn=attn,
                   zero_init_residual=zero_init_residual, drop_rate=drop_rate,
                   output_stride=output_stride, input_size=input_size)

