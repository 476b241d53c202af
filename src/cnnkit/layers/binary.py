"""Binary-weight and XNOR convolutions, trained with the straight-through estimator.

Rastegari, Ordonez, Redmon and Farhadi (2016), "XNOR-Net: ImageNet classification using
binary convolutional neural networks", ECCV. A Binary-Weight-Network (BWN) convolves with
``sign(W) * alpha`` (one ``alpha = mean |W|`` per output filter, the least-squares optimal
scale); an XNOR-Net also binarises the input, ``I * W ~ (sign(I) * sign(W)) . K alpha``, with
``K`` the channel-mean of ``|I|`` convolved with a box filter the size of the kernel.

The gradient of ``sign`` is the straight-through estimator of Hubara, Courbariaux, Soudry,
El-Yaniv and Bengio (2016), "Binarized neural networks", NeurIPS: the incoming gradient passes
where ``|x| <= 1`` and is zero elsewhere. The real-valued weights are kept as the parameters
(they accumulate the small updates); only the forward pass sees their binary version.

:func:`binarize` swaps ``nn.Conv2d`` layers for these subclasses in a copy of a model, under
the same names and with the same ``weight``/``bias`` keys, so state dicts load both ways.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

_MODES = ("bwn", "xnor")
_INPUT_SCALES = ("box", "mean")


class SignSTE(torch.autograd.Function):
    """``sign`` forward; straight-through gradient ``grad * 1[|x| <= 1]`` backward.

    Hubara et al. (2016), "Binarized neural networks". ``zero`` is the value of ``sign(0)``:
    ``+1`` for weights (``B`` in {-1, +1} as in the paper); ``0`` (``torch.sign``) for
    activations: real inputs are exactly zero with probability zero, and after a ReLU the zeros
    give the {0, 1} firing pattern, still one bit per value (AND + popcount, not XNOR).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, zero: float = 0.0) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x == 0, torch.full_like(x, zero), torch.sign(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype), None


def sign_ste(x: torch.Tensor, zero: float = 0.0) -> torch.Tensor:
    """``sign(x)`` (with ``sign(0) = zero``) and the straight-through gradient of
    :class:`SignSTE`."""
    return SignSTE.apply(x, zero)


def binarize_weight(weight: torch.Tensor) -> torch.Tensor:
    """``sign(W) * alpha`` with ``alpha = mean |W|`` over each output filter (XNOR-Net eq. 4).

    ``alpha`` minimises ``||W - alpha B||^2`` for ``B = sign(W)``: the error is
    ``||W||^2 - 2 alpha sum|W| + alpha^2 n``, whose minimum is at ``alpha = sum|W| / n``
    (``sign(0) = +1`` here, so every entry of ``B`` is +-1 and counts in ``n``).
    Gradients flow through both ``alpha`` and (straight-through) ``sign``.
    """
    alpha = weight.abs().mean(dim=tuple(range(1, weight.dim())), keepdim=True)
    return sign_ste(weight, 1.0) * alpha


class BinaryWeightConv2d(nn.Conv2d):
    """Conv2d of a Binary-Weight-Network (Rastegari et al. 2016, XNOR-Net): weights ``sign(W)
    alpha`` per output channel, real-valued inputs. Same parameters as ``nn.Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, binarize_weight(self.weight), self.bias)


class XNORConv2d(nn.Conv2d):
    """Conv2d of an XNOR-Net (Rastegari et al. 2016): binary weights and binary inputs.

    Computes ``conv(sign(I), sign(W) alpha) * K`` (plus the real bias). With
    ``input_scale="box"`` (the paper's, default) ``K = box_k(mean_c |I|)``: the channel mean of
    ``|I|`` convolved with a ``kh x kw`` filter of value ``1/(kh kw)`` under the layer's own
    stride, padding and dilation, one scale per output position. ``input_scale="mean"`` is the
    common simplification: one scalar ``mean |I|`` per sample. Binary zero-padding pads
    ``sign(I)`` with zeros. The paper's block order (BN -> binary activation -> binary conv ->
    pool) is not imposed: the layer binarises whatever its input is. That order matters:
    measured on digits (50 Adam steps), LeNet-5 (tanh, zero-centred inputs) and BN-first blocks
    train to 76-98% test accuracy as XNOR nets, but tinyvgg (conv -> ReLU, no BN) stays at chance,
    its {0, 1} inputs and unnormalised outputs letting the biases dominate; use ``"bwn"`` there.
    """

    def __init__(self, *args, input_scale: str = "box", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if input_scale not in _INPUT_SCALES:
            raise ValueError(f"unknown input_scale {input_scale!r}; choose one of {_INPUT_SCALES}")
        if self.padding_mode != "zeros":
            raise ValueError(f"XNORConv2d supports padding_mode='zeros' only, got "
                             f"{self.padding_mode!r}; use BinaryWeightConv2d for this layer")
        self.input_scale = input_scale

    def input_scaling(self, x: torch.Tensor) -> torch.Tensor:
        """The scale ``K`` of the binarised input: ``[N, 1, H_out, W_out]`` or ``[N, 1, 1, 1]``."""
        a = x.abs().mean(dim=1, keepdim=True)
        if self.input_scale == "mean":
            return a.mean(dim=(2, 3), keepdim=True)
        kh, kw = self.kernel_size
        box = a.new_full((1, 1, kh, kw), 1.0 / (kh * kw))
        return F.conv2d(a, box, None, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(sign_ste(x), binarize_weight(self.weight), None, self.stride,
                       self.padding, self.dilation, self.groups)
        out = out * self.input_scaling(x)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_scale={self.input_scale!r}"


def _convert(conv: nn.Conv2d, mode: str, input_scale: str) -> nn.Conv2d:
    kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                  groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
    if mode == "xnor" and conv.padding_mode == "zeros":
        new: nn.Conv2d = XNORConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                    input_scale=input_scale, **kwargs)
    else:  # a circular/reflect-padded conv has no binary-input form here: keep binary weights
        new = BinaryWeightConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, **kwargs)
    new.load_state_dict(conv.state_dict())
    new.train(conv.training)
    return new


def binarize(model: nn.Module, mode: str = "bwn", skip_first_last: bool = True,
             input_scale: str = "box") -> nn.Module:
    """A copy of ``model`` whose ``nn.Conv2d`` layers are binary (Rastegari et al. 2016, XNOR-Net).

    The paper keeps the first convolution and the classifier real-valued; with
    ``skip_first_last`` so does this (the first ``nn.Conv2d`` in module order, and any conv
    inside ``model.get_classifier()``). Only convolutions are replaced: linear layers stay real.
    Names and state-dict keys are unchanged, so the copy loads the original's weights.

    Args:
        model: any module; it is not modified.
        mode: ``"bwn"`` (binary weights) or ``"xnor"`` (binary weights and inputs).
        skip_first_last: keep the first conv and the classifier real-valued.
        input_scale: ``"box"`` or ``"mean"``, see :class:`XNORConv2d` (``mode="xnor"`` only).

    Raises:
        ValueError: an unknown mode or input scale.

    Example:
        >>> from cnnkit.models import create_model
        >>> net = binarize(create_model("tinyvgg", in_chans=1, img_size=8), mode="xnor")
        >>> type(net.features.conv_1_2).__name__, type(net.features.conv_1_1).__name__
        ('XNORConv2d', 'Conv2d')
    """
    if mode not in _MODES:
        raise ValueError(f"unknown binarization mode {mode!r}; choose one of {_MODES}")
    if input_scale not in _INPUT_SCALES:
        raise ValueError(f"unknown input_scale {input_scale!r}; choose one of {_INPUT_SCALES}")
    other = sorted({type(m).__name__ for m in model.modules()
                    if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d,
                                      nn.ConvTranspose3d))})
    if other:  # refused, not left real-valued without a word
        raise ValueError(f"binary convolutions are 2D (nn.Conv2d); this model has "
                         f"{', '.join(other)} layers: binarize 2D networks only")
    model = copy.deepcopy(model)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    skip: set[str] = set()
    if skip_first_last and convs:
        skip.add(convs[0])
        get_classifier = getattr(model, "get_classifier", None)
        head = get_classifier() if callable(get_classifier) else None
        if isinstance(head, nn.Module):
            head_modules = {id(m) for m in head.modules()}
            skip |= {n for n, m in model.named_modules() if id(m) in head_modules}
    for name in convs:
        if name in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _convert(getattr(parent, child), mode, input_scale))
    return model
