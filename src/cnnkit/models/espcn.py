"""ESPCN: the efficient sub-pixel convolutional network for super-resolution.

Shi, Caballero, Huszár, Totz, Aitken, Bishop, Rueckert and Wang (2016), "Real-time
single image and video super-resolution using an efficient sub-pixel convolutional
neural network", CVPR. Every convolution runs at the low (LR) resolution; the last one
outputs ``C * r^2`` channels that a periodic shuffle rearranges into the ``r``-times
larger image, so the upscaling filter is learned and costs ``r^2`` times less than
convolving an interpolated image (SRCNN).

Configuration of the paper: ``(f1, n1) = (5, 64)``, ``(f2, n2) = (3, 32)``, ``f3 = 3``,
tanh after the first two layers and none after the last. The convolutions are padded
("same") so an ``H x W`` input gives exactly ``rH x rW``; the paper trained on unpadded
17x17 LR patches, which only changes the border. One HR pixel sees ``5 + 2 + 2 = 9``
LR pixels per axis (receptive field 9x9 at the LR resolution). ``default_cfg["input_size"]``
is the LR input, ``(in_chans, 17, 17)`` after the paper's training patches (17r x 17r HR
crops); ``mean``/``std`` are 0/1 because the output lives in the input's value range.
Weights use PyTorch's default initialisation (the paper does not fix one).

The sub-pixel shuffle is :class:`torch.nn.PixelShuffle`, whose convention is
``out[c, r*h + i, r*w + j] = in[c*r^2 + i*r + j, h, w]``. The paper writes
``PS(T)[x, y, c] = T[x // r, y // r, C*r*(y mod r) + C*(x mod r) + c]``: with ``x`` the
column and ``y`` the row this is the same phase layout, but the paper's channel index is
phase-major (``c`` varies fastest) where PyTorch's is channel-major. The two differ by a
fixed permutation of the last layer's filters, so they define the same family of models
(``tests/models/test_espcn.py`` checks both statements).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import nd
from ._base import to_2tuple
from ._dense import DenseModel
from ._registry import register_model

__all__ = ["ESPCN", "espcn"]

_ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU}
PAPER = ("Shi et al. 2016, Real-time single image and video super-resolution using an "
         "efficient sub-pixel convolutional neural network")


class ESPCN(DenseModel):
    """ESPCN (Shi et al. 2016, "Real-time single image and video super-resolution using an
    efficient sub-pixel convolutional neural network").

    ``[B, in_chans, H, W] -> [B, in_chans, scale*H, scale*W]`` for any ``H, W``
    (``size_multiple = 1``); the output is in the input's value range (no clamp, so
    training sees the true error).

    Args:
        scale: upscaling factor ``r`` (the paper uses 2, 3 and 4), an int >= 2.
        in_chans: image channels; 1 is the paper's luminance (Y) channel, 3 for RGB.
        img_size: LR input size recorded in ``default_cfg`` (the paper's 17x17 patches).
        act: activation of the two hidden layers, ``"tanh"`` (paper) or ``"relu"``.
        widths: hidden channels ``(n1, n2)``.
    """

    task = "superres"

    def __init__(self, scale: int = 3, in_chans: int = 1, img_size: int | tuple[int, int] = 17,
                 act: str = "tanh", widths: tuple[int, int] = (64, 32)) -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
            raise ValueError(f"scale must be an int >= 2 (the paper uses 2, 3 or 4), got {scale!r}")
        if act not in _ACTS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(_ACTS)}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        n1, n2 = widths
        self.scale, self.in_chans, self.num_classes = scale, in_chans, in_chans
        self.size_multiple = 1
        # "Same" padding (k // 2) keeps the LR grid, so the output is exactly scale x input.
        self.conv1 = nn.Conv2d(in_chans, n1, 5, padding=2)
        self.act1 = _ACTS[act]()
        self.conv2 = nn.Conv2d(n1, n2, 3, padding=1)
        self.act2 = _ACTS[act]()
        self.conv3 = nn.Conv2d(n2, in_chans * scale * scale, 3, padding=1)
        self.pixel_shuffle = nn.PixelShuffle(scale)
        self.feature_info = [dict(num_chs=n1, reduction=1, module="act1"),
                             dict(num_chs=n2, reduction=1, module="act2")]
        self.cam_layer = "act2"
        self.default_cfg = dict(input_size=(in_chans, *to_2tuple(img_size)),
                                mean=(0.0,) * in_chans, std=(1.0,) * in_chans,
                                num_classes=in_chans, paper=PAPER, task="superres")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.pixel_shuffle(self.conv3(x))


@register_model(task="superres")
def espcn(scale: int = 3, in_chans: int | None = None, num_classes: int | None = None,
          img_size: int | tuple[int, int] | None = None, act: str = "tanh",
          input_size: tuple[int, int, int] | None = None) -> ESPCN:
    """ESPCN (Shi et al. 2016): three LR convolutions and a sub-pixel shuffle upscaling.

    Shi, Caballero, Huszár, Totz, Aitken, Bishop, Rueckert and Wang (2016), "Real-time
    single image and video super-resolution using an efficient sub-pixel convolutional
    neural network". ``num_classes`` is the number of output channels, which for
    super-resolution must equal ``in_chans``; it is accepted so generic callers can pass it.
    2D only (the sub-pixel shuffle is); the default LR input is 1x17x17.

    Example:
        >>> import torch
        >>> from cnnkit.models.espcn import espcn
        >>> m = espcn(scale=2, in_chans=3)
        >>> tuple(m(torch.rand(1, 3, 10, 12)).shape)
        (1, 3, 20, 24)
    """
    in_chans, spatial = nd.resolve_input_size(input_size, in_chans, img_size, default=(1, 17, 17),
                                              dims=(2,), family="espcn")
    if num_classes is not None and num_classes != in_chans:
        raise ValueError(f"espcn outputs an image with in_chans={in_chans} channels, so "
                         f"num_classes must be None or {in_chans}, got {num_classes}")
    return ESPCN(scale=scale, in_chans=in_chans, img_size=spatial, act=act)
