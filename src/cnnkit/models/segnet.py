"""SegNet.

Badrinarayanan, Kendall and Cipolla (2017), "SegNet: A Deep Convolutional
Encoder-Decoder Architecture for Image Segmentation", IEEE TPAMI 39(12). The encoder is
the 13 convolutions of VGG-16 with batch norm (Simonyan and Zisserman 2015); each 2x2
max-pool stores its argmax *indices*, and the decoder upsamples with them
(``nn.MaxUnpool2d``): every pooled value goes back exactly where its maximum was, the
other positions are zero, and the following trainable convolutions densify the sparse
map. Storing indices instead of whole encoder maps (as U-Net does) is the paper's memory
saving. The decoder mirrors the encoder conv-BN-ReLU by conv-BN-ReLU; its last
convolution is the classifier (3x3, as in the authors' Caffe model, no BN or ReLU).

The encoder keeps torchvision's ``vgg16_bn.features`` layout (``encoder.0`` ...
``encoder.43``), so ``create_model("vgg16_bn").features`` weights load into it with
``strict=True`` when ``width=64``, ``depth=5`` and ``in_chans=3``.

``input_size=(C, L)`` or ``(C, D, H, W)`` builds it in 1D or 3D (:mod:`cnnkit.layers.nd`):
pooling indices invert in any number of dimensions (``nn.MaxUnpool1d/3d``).

Example:
    >>> import torch
    >>> from cnnkit.models.segnet import segnet
    >>> m = segnet(num_classes=5, width=8, depth=3)
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 5, 32, 32])
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import nd
from ._base import imagenet_stats, init_weights
from ._dense import DenseModel
from ._registry import register_model

__all__ = ["SegNet"]

_PAPER = ("Badrinarayanan, Kendall and Cipolla 2017, SegNet: A Deep Convolutional "
          "Encoder-Decoder Architecture for Image Segmentation")
# VGG-16 (configuration D) convolutions per stage, in units of the first stage's width.
_VGG16 = ((1, 1), (2, 2), (4, 4, 4), (8, 8, 8), (8, 8, 8))


def _conv_bn_relu(c_in: int, c_out: int, dims: int) -> list[nn.Module]:
    return [nd.conv(dims)(c_in, c_out, 3, padding=1), nd.batch_norm(dims)(c_out),
            nn.ReLU(inplace=True)]


class SegNet(DenseModel):
    """SegNet (Badrinarayanan, Kendall and Cipolla 2017); see the module docstring.

    Args:
        num_classes: output channels (11 CamVid classes in the paper).
        in_chans: input channels (3 unless ``input_size`` says otherwise).
        img_size: nominal input size for ``default_cfg`` (the paper's CamVid 360x480):
            an int (2D) or 1 to 3 sizes.
        width: channels of the first stage (64 as VGG-16); later stages scale with it.
        depth: number of pool/unpool stages, 1 to 5 (5 in the paper); fewer stages take
            the first ones of VGG-16.
        input_size: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``: the network is built in
            that many dimensions.

    Attributes:
        encoder: the VGG-16-bn ``features`` layers up to the ``depth``-th pool, which
            returns indices.
        decoder: one ``nn.Sequential`` per stage, deepest first; each runs after the
            unpooling of its stage. The last one ends with the classifier convolution.
        unpool: the ``nn.MaxUnpool2d(2, 2)`` (1d, 3d) shared by every stage (no weights).
    """

    def __init__(self, num_classes: int = 11, in_chans: int | None = None,
                 img_size: int | tuple[int, ...] | None = None, width: int = 64,
                 depth: int = 5, input_size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                                  default=(3, 360, 480), family="SegNet")
        self.dims = dims = len(spatial)
        if not 1 <= depth <= len(_VGG16):
            raise ValueError(f"depth {depth} is out of range; choose 1 to {len(_VGG16)}")
        if width < 1:
            raise ValueError(f"width must be a positive int, got {width}")
        self.task, self.num_classes, self.in_chans, self.scale = "segment", num_classes, in_chans, 1
        # Pooling needs even sizes to invert exactly; forward also copes with odd ones.
        self.size_multiple = 2 ** depth
        stages = [[m * width for m in s] for s in _VGG16[:depth]]
        layers: list[nn.Module] = []
        self.feature_info = []
        c = in_chans
        for i, widths in enumerate(stages):
            for w in widths:
                layers += _conv_bn_relu(c, w, dims)
                c = w
            layers.append(nd.max_pool(dims)(2, 2, return_indices=True))
            self.feature_info.append(dict(num_chs=c, reduction=2 ** (i + 1),
                                          module=f"encoder.{len(layers) - 2}"))
        self.encoder = nn.Sequential(*layers)
        # The decoder mirrors the encoder: stage i's convolutions in reverse, the last one
        # narrowing to the width of the stage above (to the classes for the first stage).
        self.decoder = nn.ModuleList()
        for i in reversed(range(depth)):
            widths = stages[i]
            outs = [*widths[:-1], stages[i - 1][-1] if i > 0 else num_classes]
            mods: list[nn.Module] = []
            for j, out in enumerate(outs):
                if i == 0 and j == len(outs) - 1:
                    mods.append(nd.conv(dims)(widths[0], num_classes, 3, padding=1))
                else:
                    mods += _conv_bn_relu(widths[-1] if j == 0 else widths[j - 1], out, dims)
            self.decoder.append(nn.Sequential(*mods))
        self.unpool = nd.max_unpool(dims)(2, 2)
        # Grad-CAM reads the last decoder ReLU (the classifier's input).
        self.cam_layer = f"decoder.{depth - 1}.{len(self.decoder[-1]) - 2}"
        mean, std = imagenet_stats(in_chans)
        self.default_cfg = dict(input_size=(in_chans, *spatial), mean=mean, std=std,
                                num_classes=num_classes, paper=_PAPER, task="segment")
        init_weights(self, dims)  # torchvision's VGG scheme, the encoder's origin

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Size]]]:
        """Run the encoder; return its output and, per pool, (indices, size before pooling)."""
        pools = []
        for layer in self.encoder:
            if isinstance(layer, nd.max_pool(self.dims)):
                size = x.shape
                x, idx = layer(x)
                pools.append((idx, size))
            else:
                x = layer(x)
        return x, pools

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, pools = self.encode(x)
        for stage, (idx, size) in zip(self.decoder, reversed(pools), strict=True):
            # output_size restores odd sizes that the floor of pooling dropped.
            x = stage(self.unpool(x, idx, output_size=size[2:]))
        return x


@register_model(task="segment")
def segnet(num_classes: int = 11, in_chans: int | None = None,
           img_size: int | tuple[int, ...] | None = None, width: int = 64, depth: int = 5,
           input_size: tuple[int, ...] | None = None) -> SegNet:
    """SegNet: decoder unpools with the encoder's max-pool indices (Badrinarayanan et al. 2017).

    Badrinarayanan, Kendall and Cipolla (2017), "SegNet: A Deep Convolutional
    Encoder-Decoder Architecture for Image Segmentation", IEEE TPAMI. Default 11 classes
    and 360x480 inputs, the paper's CamVid setting.
    """
    return SegNet(num_classes, in_chans, img_size, width, depth, input_size)
