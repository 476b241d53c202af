"""3D U-Net.

Cicek, Abdulkadir, Lienkamp, Brox and Ronneberger (2016), "3D U-Net: Learning Dense
Volumetric Segmentation from Sparse Annotation", MICCAI. U-Net (Ronneberger et al.
2015) with every operation in 3-D: ``[B, C, D, H, W] -> [B, K, D, H, W]``. Each level
of the analysis path has two 3x3x3 convolutions, each followed by BatchNorm and ReLU,
and a 2x2x2 max-pool; unlike U-Net the channels double *before* each pooling (the
second convolution of a block doubles them: 32-64, 64-128, 128-256, 256-512 with three
poolings), which the paper does to avoid bottlenecks. The synthesis path has a 2x2x2
transposed convolution keeping the channels, concatenation with the analysis map of
the same level, and two 3x3x3 convolutions; a 1x1x1 convolution gives the class scores.

The paper uses valid convolutions (a 132x132x116 tile gives a 44x44x28 output); cnnkit
pads them so the output keeps the input's size (the trainer pads the input to a
multiple of ``2**depth``). Its layer types come from :mod:`cnnkit.layers.nd`; the
Ronneberger layout (channels doubled after pooling, halving up-convolutions) in 3D is
``unet(input_size=(C, D, H, W))``.

Example:
    >>> import torch
    >>> from cnnkit.models.unet3d import unet3d
    >>> m = unet3d(num_classes=4, in_chans=1, width=4)
    >>> m(torch.randn(1, 1, 16, 16, 16)).shape
    torch.Size([1, 4, 16, 16, 16])
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import nd
from ._dense import DenseModel
from ._registry import register_model
from .unet import DoubleConv, _init

__all__ = ["UNet3D"]

_PAPER = ("Cicek, Abdulkadir, Lienkamp, Brox and Ronneberger 2016, 3D U-Net: Learning Dense "
          "Volumetric Segmentation from Sparse Annotation")


class UNet3D(DenseModel):
    """3D U-Net (Cicek et al. 2016); see the module docstring.

    Args:
        num_classes: output channels (classes including the background; 3 in the paper).
        in_chans: input channels (3 in the paper, and unless ``input_size`` says otherwise).
        img_size: nominal ``(D, H, W)`` input size (an int: a cube) for ``default_cfg``
            (the paper's 116x132x132 tile rounded down to multiples of 8).
        depth: number of 2x2x2 poolings (3 in the paper).
        width: channels of the first convolution (32 in the paper); the block at level
            ``i`` has ``width * 2**i`` then ``width * 2**(i+1)`` channels.
        input_size: ``(C, D, H, W)``, instead of ``in_chans`` and ``img_size``.

    Attributes:
        encoder: :class:`~cnnkit.models.unet.DoubleConv` blocks, level 0 .. bottom.
        up: transposed convolutions, deepest first.
        decoder: decoder blocks, deepest first.
        head: the 1x1x1 classifier convolution.
    """

    def __init__(self, num_classes: int = 3, in_chans: int | None = None,
                 img_size: int | tuple[int, int, int] | None = None, depth: int = 3,
                 width: int = 32, input_size: tuple[int, int, int, int] | None = None) -> None:
        super().__init__()
        in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                                  default=(3, 112, 128, 128), dims=(3,),
                                                  family="3D U-Net")
        if depth < 1 or width < 1:
            raise ValueError(f"depth ({depth}) and width ({width}) must be positive ints")
        self.task, self.num_classes, self.in_chans, self.scale = "segment", num_classes, in_chans, 1
        self.depth, self.size_multiple = depth, 2 ** depth
        outs = [width * 2 ** (i + 1) for i in range(depth + 1)]  # 64, 128, 256, 512
        ins = [in_chans, *outs[:-1]]
        self.encoder = nn.ModuleList(DoubleConv(c_in, c // 2 if i == 0 else c_in, c, dims=3)
                                     for i, (c_in, c) in enumerate(zip(ins, outs, strict=True)))
        self.pool = nd.max_pool(3)(2, 2)
        self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
        c = outs[-1]
        for skip in reversed(outs[:-1]):  # upconv keeps the channels (512 -> 512 in Fig. 1)
            self.up.append(nd.conv_transpose(3)(c, c, 2, stride=2))
            self.decoder.append(DoubleConv(c + skip, skip, skip, dims=3))
            c = skip
        self.head = nd.conv(3)(c, num_classes, 1)
        self.feature_info = [dict(num_chs=c, reduction=2 ** i, module=f"encoder.{i}")
                             for i, c in enumerate(outs)]
        self.cam_layer = f"decoder.{depth - 1}"
        self.default_cfg = dict(input_size=(in_chans, *spatial),
                                mean=(0.0,) * in_chans, std=(1.0,) * in_chans,
                                num_classes=num_classes, paper=_PAPER, task="segment")
        _init(self, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.ndim != 5:  # not on torch.fx's symbolic proxies
            raise ValueError(f"3D U-Net takes [B, C, D, H, W] volumes, got shape {tuple(x.shape)}")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = block(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


@register_model(task="segment")
def unet3d(num_classes: int = 3, in_chans: int | None = None,
           img_size: int | tuple[int, int, int] | None = None, depth: int = 3,
           width: int = 16, input_size: tuple[int, int, int, int] | None = None) -> UNet3D:
    """3D U-Net for volumes (Cicek et al. 2016, 3D U-Net: Learning Dense Volumetric Segmentation).

    Cicek, Abdulkadir, Lienkamp, Brox and Ronneberger (2016), "3D U-Net: Learning Dense
    Volumetric Segmentation from Sparse Annotation", MICCAI. The default img_size is the
    paper's 116x132x132 input tile (``(D, H, W)``) rounded down to multiples of ``2**depth``.
    ``width=32`` gives the paper's channels (32-64, 64-128, 128-256, 256-512); the default
    16 halves every level, a quarter of the MACs, so that two CPU cores train it on
    ``shapes3d`` in minutes.
    """
    return UNet3D(num_classes, in_chans, img_size, depth, width, input_size)
