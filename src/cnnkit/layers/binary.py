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

:func:`binarize` swaps convolutions for these subclasses in a copy of a model, under the same
names and with the same ``weight``/``bias`` keys, so state dicts load both ways. The layers
exist in 1, 2 and 3 spatial dims (``BinaryWeightConv1d`` ... ``XNORConv3d``); which module
becomes which is read from the operator registry (:mod:`cnnkit.layers.ops`, the ``binary``
fact of each operator), so an operator without a binary form refuses instead of being left
real-valued without a word.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ops import KEEP, Unsupported, operator_modules

__all__ = ["SignSTE", "sign_ste", "binarize_weight", "BinaryWeightConv1d", "BinaryWeightConv2d",
           "BinaryWeightConv3d", "XNORConv1d", "XNORConv2d", "XNORConv3d", "conversion",
           "binarize"]

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


class _BinaryWeight:
    """A convolution of a Binary-Weight-Network (Rastegari et al. 2016, XNOR-Net): weights
    ``sign(W) alpha`` per output channel, real-valued inputs. Same parameters as the
    convolution it subclasses, in any number of dims."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, binarize_weight(self.weight), self.bias)


class BinaryWeightConv1d(_BinaryWeight, nn.Conv1d):
    """Conv1d with binary weights (see :class:`BinaryWeightConv2d`)."""


class BinaryWeightConv2d(_BinaryWeight, nn.Conv2d):
    """Conv2d of a Binary-Weight-Network (Rastegari et al. 2016, XNOR-Net): weights ``sign(W)
    alpha`` per output channel, real-valued inputs. Same parameters as ``nn.Conv2d``."""


class BinaryWeightConv3d(_BinaryWeight, nn.Conv3d):
    """Conv3d with binary weights (see :class:`BinaryWeightConv2d`)."""


_CONV_FNS = (F.conv1d, F.conv2d, F.conv3d)


class _XNOR:
    """A convolution of an XNOR-Net (Rastegari et al. 2016): binary weights and binary inputs.

    Computes ``conv(sign(I), sign(W) alpha) * K`` (plus the real bias). With
    ``input_scale="box"`` (the paper's, default) ``K = box_k(mean_c |I|)``: the channel mean of
    ``|I|`` convolved with a filter the size of the kernel of value ``1 / prod(kernel)`` under
    the layer's own stride, padding and dilation, one scale per output position (in any
    number of dims). ``input_scale="mean"`` is the common simplification: one scalar
    ``mean |I|`` per sample. Binary zero-padding pads ``sign(I)`` with zeros. The paper's
    block order (BN -> binary activation -> binary conv -> pool) is not imposed: the layer
    binarises whatever its input is. That order matters: measured on digits (50 Adam steps),
    LeNet-5 (tanh, zero-centred inputs) and BN-first blocks train to 76-98% test accuracy as
    XNOR nets, but tinyvgg (conv -> ReLU, no BN) stays at chance, its {0, 1} inputs and
    unnormalised outputs letting the biases dominate; use ``"bwn"`` there.
    """

    def __init__(self, *args, input_scale: str = "box", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if input_scale not in _INPUT_SCALES:
            raise ValueError(f"unknown input_scale {input_scale!r}; choose one of {_INPUT_SCALES}")
        if self.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__} supports padding_mode='zeros' only, got "
                             f"{self.padding_mode!r}; use binary weights (bwn) for this layer")
        self.input_scale = input_scale

    def input_scaling(self, x: torch.Tensor) -> torch.Tensor:
        """The scale ``K`` of the binarised input: ``[N, 1, *out]`` or ``[N, 1, 1, ...]``."""
        a = x.abs().mean(dim=1, keepdim=True)
        if self.input_scale == "mean":
            return a.mean(dim=tuple(range(2, a.ndim)), keepdim=True)
        box = a.new_full((1, 1, *self.kernel_size), 1.0 / math.prod(self.kernel_size))
        return _CONV_FNS[len(self.kernel_size) - 1](a, box, None, self.stride, self.padding,
                                                    self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _CONV_FNS[len(self.kernel_size) - 1](
            sign_ste(x), binarize_weight(self.weight), None, self.stride, self.padding,
            self.dilation, self.groups)
        out = out * self.input_scaling(x)
        if self.bias is None:
            return out
        return out + self.bias.view(1, -1, *(1,) * len(self.kernel_size))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_scale={self.input_scale!r}"


class XNORConv1d(_XNOR, nn.Conv1d):
    """Conv1d of an XNOR-Net (see :class:`XNORConv2d`)."""


class XNORConv2d(_XNOR, nn.Conv2d):
    """Conv2d of an XNOR-Net (Rastegari et al. 2016): binary weights and binary inputs, the
    input scaled by ``K``, the box-filtered channel mean of ``|I|`` (see :class:`_XNOR`)."""


class XNORConv3d(_XNOR, nn.Conv3d):
    """Conv3d of an XNOR-Net (see :class:`XNORConv2d`)."""


Conversion = Callable[[nn.Module, str, str], nn.Module]


def conversion(bwn: type[nn.Module], xnor: type[nn.Module]) -> Conversion:
    """The ``binary`` fact of a convolution type: ``(conv, mode, input_scale) ->`` its
    ``bwn`` or ``xnor`` counterpart with the same weights (a circular- or reflect-padded
    convolution has no binary-input form here: it keeps binary weights)."""

    def convert(conv: nn.Module, mode: str, input_scale: str) -> nn.Module:
        kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      groups=conv.groups, bias=conv.bias is not None,
                      padding_mode=conv.padding_mode, device=conv.weight.device,
                      dtype=conv.weight.dtype)
        if mode == "xnor" and conv.padding_mode == "zeros":
            new = xnor(conv.in_channels, conv.out_channels, conv.kernel_size,
                       input_scale=input_scale, **kwargs)
        else:
            new = bwn(conv.in_channels, conv.out_channels, conv.kernel_size, **kwargs)
        new.load_state_dict(conv.state_dict())
        new.train(conv.training)
        return new

    return convert


def binarize(model: nn.Module, mode: str = "bwn", skip_first_last: bool = True,
             input_scale: str = "box") -> nn.Module:
    """A copy of ``model`` whose convolutions are binary (Rastegari et al. 2016, XNOR-Net).

    Which layers convert, and to what, is each operator's ``binary`` fact in the registry
    (:mod:`cnnkit.layers.ops`): convolutions of 1, 2 or 3 dims become their binary
    counterparts; linear layers, norms and activations stay real; an operator whose fact is
    :class:`~cnnkit.layers.ops.Unsupported` (a transposed convolution) or that the registry
    does not know refuses the whole model in one line. The paper keeps the first
    convolution and the classifier real-valued; with ``skip_first_last`` so does this (the
    first convertible layer in module order, and any layer inside
    ``model.get_classifier()``). Names and state-dict keys are unchanged, so the copy loads
    the original's weights.

    Args:
        model: any module; it is not modified.
        mode: ``"bwn"`` (binary weights) or ``"xnor"`` (binary weights and inputs).
        skip_first_last: keep the first conv and the classifier real-valued.
        input_scale: ``"box"`` or ``"mean"``, see :class:`XNORConv2d` (``mode="xnor"`` only).

    Raises:
        ValueError: an unknown mode or input scale, or an operator without a binary form.

    Example:
        >>> from cnnkit.layers.binary import binarize
        >>> from cnnkit.models import create_model
        >>> net = binarize(create_model("tinyvgg", in_chans=1, img_size=8), mode="xnor")
        >>> type(net.features.conv_1_2).__name__, type(net.features.conv_1_1).__name__
        ('XNORConv2d', 'Conv2d')
    """
    if mode not in _MODES:
        raise ValueError(f"unknown binarization mode {mode!r}; choose one of {_MODES}")
    if input_scale not in _INPUT_SCALES:
        raise ValueError(f"unknown input_scale {input_scale!r}; choose one of {_INPUT_SCALES}")
    ops = operator_modules(model, "binarize")
    for name, module, facts in ops:
        if isinstance(facts.binary, Unsupported):  # refused, not left real-valued silently
            raise ValueError(f"binarize cannot convert {name or 'the model'} "
                             f"({type(module).__name__}): {facts.binary.reason}")
    convs = [name for name, _, facts in ops if facts.binary is not KEEP]
    model = copy.deepcopy(model)
    skip: set[str] = set()
    if skip_first_last and convs:
        skip.add(convs[0])
        get_classifier = getattr(model, "get_classifier", None)
        head = get_classifier() if callable(get_classifier) else None
        if isinstance(head, nn.Module):
            head_modules = {id(m) for m in head.modules()}
            skip |= {n for n, m in model.named_modules() if id(m) in head_modules}
    facts_of = {name: facts for name, _, facts in ops}
    for name in convs:
        if name in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child) if child else model
        new = facts_of[name].binary(old, mode, input_scale)
        if not child:  # the model itself is one convolution
            return new
        setattr(parent, child, new)
    return model
