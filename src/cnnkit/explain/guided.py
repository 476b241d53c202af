"""Modified-backward explanations: guided backpropagation and the DeconvNet.

Both are the input gradient with a different backward rule at every ReLU, where
``x`` is the ReLU's input and ``g`` the gradient arriving from above:

* plain gradient:  ``(x > 0) * g``
* DeconvNet:       ``(g > 0) * g``  (Zeiler and Fergus 2014)
* guided backprop: ``(x > 0) * (g > 0) * g``  (Springenberg et al. 2015)

How the rule is installed: inside :func:`modified_relus` every ``nn.ReLU`` (and
``nn.ReLU6``) submodule is temporarily replaced, on its parent, by a module running a
custom autograd Function, and the original module objects are put back in ``finally``.
Replacement rather than backward hooks, because module backward hooks do not work with
``inplace=True`` ReLUs. The replacement computes out of place, so in-place ReLUs are safe.

Limitation: a ReLU called functionally inside ``forward`` (``F.relu``, ``torch.relu``,
``x.relu()``) is not a module and keeps its plain gradient; cnnkit's models use
``nn.ReLU`` modules throughout. Other activations (SiLU, GELU, ...) are left as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._base import register_method
from .gradient import Saliency, input_gradients

__all__ = ["modified_relus", "modified_gradients", "GuidedBackprop", "DeconvNet"]

_RULES = ("guided", "deconvnet")


class _ModifiedReLUFn(torch.autograd.Function):
    """``clamp(x, 0, upper)`` forward; the guided or DeconvNet rule backward."""

    @staticmethod
    def forward(x: torch.Tensor, upper: float | None, rule: str) -> torch.Tensor:
        return x.clamp(min=0) if upper is None else x.clamp(0, upper)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, upper, rule = inputs
        ctx.rule = rule
        if rule == "guided":
            # The forward's pass-through mask (0 < x < upper), from the input like autograd's
            # own ReLU6; for ReLU, x > 0 is the paper's rule.
            pass_mask = x > 0 if upper is None else (x > 0) & (x < upper)
            ctx.save_for_backward(pass_mask)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        positive = grad.clamp(min=0)  # (g > 0) * g
        if ctx.rule == "deconvnet":
            return positive, None, None
        (pass_mask,) = ctx.saved_tensors
        return positive * pass_mask, None, None


class _ModifiedReLU(nn.Module):
    """Stands in for an ``nn.ReLU``/``nn.ReLU6`` while a modified backward is active."""

    def __init__(self, upper: float | None, rule: str) -> None:
        super().__init__()
        self.upper, self.rule = upper, rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ModifiedReLUFn.apply(x, self.upper, self.rule)


@contextlib.contextmanager
def modified_relus(model: nn.Module, rule: str) -> Iterator[int]:
    """Swap every ``nn.ReLU``/``nn.ReLU6`` of ``model`` for the ``rule`` backward in the block.

    Yields the number of ReLU slots replaced; the original module objects are restored on
    exit, even on error. A ReLU object shared by several parents is replaced in each.
    """
    if rule not in _RULES:
        raise ValueError(f"unknown backward rule {rule!r}; choose from {_RULES}")
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            # _modules, not named_children(): the latter skips a module held under two names.
            for name, child in list(parent._modules.items()):
                if isinstance(child, nn.ReLU6):  # a Hardtanh, not a ReLU subclass
                    upper: float | None = 6.0
                elif isinstance(child, nn.ReLU):
                    upper = None
                else:
                    continue
                swapped.append((parent, name, child))
                setattr(parent, name, _ModifiedReLU(upper, rule))
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def modified_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                       rule: str) -> torch.Tensor:
    """Guided/DeconvNet gradients ``[B, K, C, *spatial]`` of the targets (for RGB pictures
    of the input itself)."""
    with modified_relus(model, rule):
        return input_gradients(model, x, targets)


class _ModifiedBackprop(Saliency):
    """Saliency whose ReLUs pass gradients by ``rule`` (same options and reduction)."""

    rule = ""

    def gradients(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return modified_gradients(self.model, x, targets, self.rule)


@register_method("guided_backprop")
class GuidedBackprop(_ModifiedBackprop):
    """Guided backpropagation: only positive gradients through active ReLUs.

    Springenberg, Dosovitskiy, Brox and Riedmiller (2015), "Striving for Simplicity: The
    All Convolutional Net", ICLR workshop. At each ReLU the backward is
    ``(x > 0) * (g > 0) * g``. The ``[C, *spatial]`` gradient is reduced to a map like
    :class:`~cnnkit.explain.gradient.Saliency` (``abs``, ``reduce``; default
    ``max_c |.|``); :func:`modified_gradients` gives the unreduced gradient. See the module
    docstring for how ReLUs are found (functional ReLUs are not).

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> cnnkit.explain.create("guided_backprop", model)(torch.rand(1, 3, 16, 16)).shape
        torch.Size([1, 16, 16])
    """

    rule = "guided"


@register_method("deconvnet")
class DeconvNet(_ModifiedBackprop):
    """DeconvNet: the backward pass through each ReLU keeps only the positive signal.

    Zeiler and Fergus (2014), "Visualizing and Understanding Convolutional Networks",
    ECCV. Their deconvolutional network equals the gradient with each ReLU's backward
    replaced by ``(g > 0) * g`` (Simonyan et al. 2014, Sec. 4); max-pool switches are
    the gradient's argmax routing. Maps are reduced as in :class:`GuidedBackprop`.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> cnnkit.explain.create("deconvnet", model)(torch.rand(1, 3, 16, 16)).shape
        torch.Size([1, 16, 16])
    """

    rule = "deconvnet"
