"""U-Net.

Ronneberger, Fischer and Brox (2015), "U-Net: Convolutional Networks for Biomedical
Image Segmentation", MICCAI. A contracting path (two 3x3 convolutions + ReLU, then a
2x2 max-pool, doubling the channels at every level) and an expanding path (a 2x2
transposed convolution halving the channels, concatenation with the encoder map of the
same level, two 3x3 convolutions), ending in a 1x1 convolution to the class scores.

Options beyond the paper:

* ``norm="batch"`` (default) adds BatchNorm after every 3x3 convolution (Ioffe and
  Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift") so small models train fast; ``norm=None`` is the paper's
  plain conv-ReLU.
* ``padding=True`` (default) uses same-size convolutions, so the output has the input's
  size. ``padding=False`` is the paper's valid convolutions with centre-cropped skips;
  the input is then mirror-padded by the network's border (the paper's overlap-tile
  strategy, Fig. 2) so the output still covers exactly the input.
* ``attn="scse"`` puts a recalibration block after every encoder and decoder block, as
  Roy, Navab and Wachinger (2018), "Concurrent Spatial and Channel 'Squeeze &
  Excitation' in Fully Convolutional Networks", MICCAI, did in U-Net.
* ``backbone="resnet18"`` (any zoo classifier) replaces the contracting path by
  :class:`~cnnkit.models._dense.Encoder`; the decoder upsamples through its
  ``feature_info`` stages (one skip per stage) and then, without skips, to the input size.
* ``input_size=(C, L)`` or ``(C, D, H, W)`` builds the same network in 1D or 3D
  (:mod:`cnnkit.layers.nd`): 3x3x3 convolutions, 2x2x2 pools and up-convolutions, as the
  volumetric U-Nets of Cicek et al. (2016, :mod:`cnnkit.models.unet3d`, which also moves
  the channel doubling) and Milletari, Navab and Ahmadi (2016), "V-Net: Fully
  Convolutional Neural Networks for Volumetric Medical Image Segmentation", 3DV.

Example:
    >>> import torch
    >>> from cnnkit.models.unet import unet_small
    >>> m = unet_small(num_classes=5)
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 5, 32, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import nd
from ..layers.attention import create_attn
from ._base import imagenet_stats
from ._dense import DenseModel, Encoder
from ._registry import register_model

__all__ = ["DoubleConv", "UNet", "center_crop"]

_PAPER = ("Ronneberger, Fischer and Brox 2015, U-Net: Convolutional Networks for "
          "Biomedical Image Segmentation")
_NORMS = (None, "batch")


class DoubleConv(nn.Module):
    """Two 3x3 convolutions, each followed by (BatchNorm and) ReLU, then an optional gate.

    The building block of U-Net (Ronneberger et al. 2015) and, with ``dims=3``, of 3D U-Net
    (Cicek et al. 2016); its convolution and norm types come from
    :mod:`cnnkit.layers.nd`. Convolutions keep their bias only without normalisation (a
    bias before BatchNorm is cancelled by its mean subtraction).

    Args:
        in_chs: input channels.
        mid_chs: channels of the first convolution.
        out_chs: channels of the second convolution.
        norm: BatchNorm after each convolution.
        padding: same-size (True) or valid (False) convolutions.
        attn: recalibration block after the second ReLU; None for none.
        dims: 1, 2 or 3 spatial dimensions.
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, norm: bool = True,
                 padding: bool = True, attn: str | None = None, dims: int = 2) -> None:
        super().__init__()
        conv, bn = nd.conv(dims), nd.batch_norm(dims)
        pad = 1 if padding else 0
        self.conv1 = conv(in_chs, mid_chs, 3, padding=pad, bias=not norm)
        self.norm1 = bn(mid_chs) if norm else nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv(mid_chs, out_chs, 3, padding=pad, bias=not norm)
        self.norm2 = bn(out_chs) if norm else nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.attn = create_attn(attn, out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.conv1(x)))
        return self.attn(self.act2(self.norm2(self.conv2(x))))


def center_crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Crop the trailing spatial dims of ``x`` to ``size`` around the centre (the paper's
    cropping of the skip maps, "necessary due to the loss of border pixels").

    Written so torch.fx can trace it (for int8 quantisation): the number of axes comes
    from ``len(size)``, never from iterating a shape, and the crop is one slicing.
    """
    n = len(size)
    slices = []
    for i, want in enumerate(size):
        start = (x.shape[i - n] - want) // 2
        slices.append(slice(start, start + want))
    return x[(..., *slices)]


def _valid_output(n: int, depth: int) -> int | None:
    """Output size of the valid-convolution U-Net for input size ``n``, None if invalid
    (a map to pool must be even, every map must stay positive)."""
    for _ in range(depth):
        n -= 4
        if n <= 0 or n % 2:
            return None
        n //= 2
    n -= 4
    for _ in range(depth):
        n = 2 * n - 4
        if n <= 0:
            return None
    return n


def _init(model: nn.Module, dims: int = 2) -> None:
    # He normal on every convolution: the paper's "Gaussian with std sqrt(2/N)", N the
    # incoming nodes of one neuron (fan-in). The network's own types, and the 2D ones of
    # the recalibration gates (whose layout is the same in every number of dimensions).
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nd.conv(dims), nd.conv_transpose(dims))
    for m in model.modules():
        if isinstance(m, kinds):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class UNet(DenseModel):
    """U-Net (Ronneberger, Fischer and Brox 2015); see the module docstring.

    Args:
        num_classes: output channels (classes including the background).
        in_chans: input channels (3 unless ``input_size`` says otherwise).
        img_size: nominal input size for ``default_cfg``: an int (2D) or 1 to 3 sizes.
        depth: number of 2x2 poolings (4 in the paper).
        width: channels of the first level; doubled at every level (64 in the paper).
        norm: ``"batch"`` or None (the paper's plain conv-ReLU).
        padding: same-size (True) or the paper's valid convolutions (False).
        attn: recalibration block after every encoder and decoder block.
        backbone: a zoo classifier whose ``feature_info`` stages replace the contracting
            path; ``depth``, ``width`` and ``padding=False`` do not apply then.
        stem: the backbone's stem (``"auto"``, ``"imagenet"`` or ``"small"``).
        input_size: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``: the network (and the
            backbone) is built in that many dimensions.

    Attributes:
        encoder: a ModuleList of :class:`DoubleConv` (level 0 .. bottleneck), or an
            :class:`~cnnkit.models._dense.Encoder`.
        up: the upsampling layers, deepest first.
        decoder: the decoder blocks, deepest first (``decoder[-1]`` is the full-resolution one).
        head: the 1x1 classifier convolution.
    """

    def __init__(self, num_classes: int = 2, in_chans: int | None = None,
                 img_size: int | tuple[int, ...] | None = None, depth: int = 4,
                 width: int = 64, norm: str | None = "batch", padding: bool = True,
                 attn: str | None = None, backbone: str | None = None, stem: str = "auto",
                 input_size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                                  default=(3, 512, 512), family="U-Net")
        self.dims = dims = len(spatial)
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose 'batch' or None")
        if depth < 1 or width < 1:
            raise ValueError(f"depth ({depth}) and width ({width}) must be positive ints")
        if backbone is not None and not padding:
            raise ValueError("padding=False (valid convolutions) needs the plain encoder; "
                             "drop backbone or use padding=True")
        self.task, self.num_classes, self.in_chans, self.scale = "segment", num_classes, in_chans, 1
        self.padding, self.depth = padding, depth
        use_bn = norm == "batch"
        if backbone is None:
            chans = [width * 2 ** i for i in range(depth + 1)]
            self.encoder: nn.Module = nn.ModuleList(
                DoubleConv(c_in, c, c, use_bn, padding, attn, dims)
                for c_in, c in zip([in_chans, *chans[:-1]], chans, strict=True))
            self.pool = nd.max_pool(dims)(2, 2)
            self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
            for c in reversed(chans[:-1]):  # upconv halves the channels, as the paper
                self.up.append(nd.conv_transpose(dims)(2 * c, c, 2, stride=2))
                self.decoder.append(DoubleConv(2 * c, c, c, use_bn, padding, attn, dims))
            self.feature_info = [dict(num_chs=c, reduction=2 ** i, module=f"encoder.{i}")
                                 for i, c in enumerate(chans)]
            self.size_multiple = 2 ** depth
            last = chans[0]
        else:
            self.encoder = Encoder(backbone, in_chans=in_chans, img_size=spatial, stem=stem)
            chans, reds = self.encoder.channels, self.encoder.reductions
            last = chans[-1]
            self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
            for c, r_skip, r_deep in zip(chans[-2::-1], reds[-2::-1], reds[:0:-1], strict=True):
                self.up.append(self._upsampler(last, c, r_deep, r_skip, backbone, dims))
                self.decoder.append(DoubleConv(2 * c, c, c, use_bn, True, attn, dims))
                last = c
            r = reds[0]
            while r > 1:  # no skip above the shallowest stage: upsample by 2 to the input size
                if r % 2:
                    raise ValueError(f"backbone {backbone!r} has a first-stage stride {r}, "
                                     "not a power of 2; choose another backbone")
                self.up.append(nd.conv_transpose(dims)(last, max(last // 2, 1), 2, stride=2))
                last = max(last // 2, 1)
                self.decoder.append(DoubleConv(last, last, last, use_bn, True, attn, dims))
                r //= 2
            self.feature_info = [dict(s, module=f"encoder.model.{s['module']}")
                                 for s in self.encoder.stages]
            self.size_multiple = max(reds)
        self.head = nd.conv(dims)(last, num_classes, 1)
        self.cam_layer = f"decoder.{len(self.decoder) - 1}"
        if not padding:
            # Total border lost by valid convolutions: 4 px per block, in input pixels.
            self.border = 12 * 2 ** depth - 8
        mean, std = imagenet_stats(in_chans)
        self.default_cfg = dict(input_size=(in_chans, *spatial), mean=mean, std=std,
                                num_classes=num_classes, paper=_PAPER, task="segment")
        _init(self.decoder, dims)
        _init(self.up, dims)
        _init(self.head, dims)
        if backbone is None:
            _init(self.encoder, dims)

    @staticmethod
    def _upsampler(c_in: int, c_out: int, r_deep: int, r_skip: int, name: str,
                   dims: int = 2) -> nn.Module:
        if r_deep % r_skip:
            raise ValueError(f"backbone {name!r}: stage strides {r_skip} -> {r_deep} are not "
                             "integer multiples; choose another backbone")
        ratio = r_deep // r_skip
        if ratio == 1:  # two stages at one resolution: only match the channels
            return nd.conv(dims)(c_in, c_out, 1)
        return nd.conv_transpose(dims)(c_in, c_out, ratio, stride=ratio)

    def _mirror_pad(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Overlap-tile: mirror-pad so the valid network's output covers every input pixel.

        Returns the padded input and, per spatial dim, how many output pixels to drop at
        the start (the output is slightly larger when the input size is not a "valid" one).
        """
        pads, crops = [], []
        sizes = x.shape[2:]
        for n in sizes:
            extra = 0
            while (out := _valid_output(n + extra + self.border, self.depth)) is None \
                    or out < n + extra:
                extra += 2
            pads.append((self.border + extra) // 2)
            crops.append(extra // 2)
        mode = "reflect" if min(sizes) > max(pads) else "replicate"
        widths = [p for pad in reversed(pads) for p in (pad, pad)]  # last axis first
        return F.pad(x, widths, mode=mode), crops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [x.shape[d] for d in range(2, 2 + self.dims)]  # fx-traceable: no iteration
        if isinstance(self.encoder, Encoder):
            feats = self.encoder(x)
            y = feats[-1]
            skips = feats[-2::-1]
        else:
            if not self.padding:
                x, crops = self._mirror_pad(x)
            skips = []
            for i, block in enumerate(self.encoder):
                x = block(x)
                if i < self.depth:
                    skips.append(x)
                    x = self.pool(x)
            y = x
            skips = skips[::-1]
        for i, (up, block) in enumerate(zip(self.up, self.decoder, strict=True)):
            y = up(y)
            if i < len(skips):
                crop = [y.shape[d] for d in range(2, 2 + self.dims)]
                y = block(torch.cat([center_crop(skips[i], crop), y], dim=1))
            else:
                y = block(y)
        y = self.head(y)
        if not self.padding:
            y = y[(..., *(slice(c, c + n) for c, n in zip(crops, size, strict=True)))]
        return y


@register_model(task="segment")
def unet(num_classes: int = 2, in_chans: int | None = None,
         img_size: int | tuple[int, ...] | None = None, depth: int = 4, width: int = 64,
         norm: str | None = "batch", padding: bool = True, attn: str | None = None,
         backbone: str | None = None, stem: str = "auto",
         input_size: tuple[int, ...] | None = None) -> UNet:
    """U-Net with concatenated skips (Ronneberger, Fischer and Brox 2015, U-Net: ... Segmentation).

    Ronneberger, Fischer and Brox (2015), "U-Net: Convolutional Networks for Biomedical
    Image Segmentation", MICCAI. The paper's network is
    ``unet(in_chans=1, norm=None, padding=False)`` (2 classes, 572x572 tiles); the default
    img_size 512 is a multiple of the padded model's 16.
    """
    return UNet(num_classes, in_chans, img_size, depth, width, norm, padding, attn, backbone,
                stem, input_size)


@register_model(task="segment")
def unet_small(num_classes: int = 2, in_chans: int | None = None,
               img_size: int | tuple[int, ...] | None = None, norm: str | None = "batch",
               attn: str | None = None, input_size: tuple[int, ...] | None = None) -> UNet:
    """Small U-Net, width 16 and depth 4, for CPU training (Ronneberger, Fischer and Brox 2015).

    The default input is 3x64x64.
    """
    in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size,
                                              default=(3, 64, 64), family="U-Net")
    return UNet(num_classes, in_chans, spatial, depth=4, width=16, norm=norm, attn=attn)
