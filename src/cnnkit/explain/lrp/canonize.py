"""Canonizers: rewrite a *copy* of the model into an LRP-friendly equivalent.

After zennit's canonizers (Anders, Neumann, Samek, Müller and Lapuschkin 2021, "Software
for Dataset-wide XAI: From Local Explanations to Global Insights with Zennit, CoRelAy,
and ViRelAy", arXiv:2106.13200): a BatchNorm that directly follows a convolution is an
affine map per channel, so it folds into the convolution, ``w' = w * s`` and
``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``. The folded layer
then gets the convolution's rule, and the BatchNorm's shift is treated as the bias it is.

Which BatchNorm follows which convolution is found by running the model once (hooks in a
context manager): a BatchNorm is folded when its input *is* a convolution's output
tensor, with no per-architecture knowledge. Which modules are convolutions, norms and
layers with a rule is their operator's ``lrp`` fact (:mod:`cnnkit.layers.ops`); a module
the registry does not know, or without an LRP rule, refuses in one line. The caller's
model is never touched: all work happens on a deep copy, and the copy's outputs are
checked against the original's.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from cnnkit.layers.ops import operator_modules

from .composites import CONSUMER, Composite, slot

__all__ = ["canonize", "trace", "fold_batchnorm"]


@contextlib.contextmanager
def _hooks(modules: list[nn.Module], hook) -> Iterator[None]:
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def trace(model: nn.Module, x: torch.Tensor,
          ) -> tuple[list[nn.Module], list[tuple[nn.Module, nn.Module]], torch.Tensor]:
    """Run ``model(x)`` once; return the layers composites handle in execution order, the
    (convolution, BatchNorm) pairs where the BatchNorm reads the convolution's output, and
    the model's output."""
    order: list[nn.Module] = []
    produced: dict[int, tuple[torch.Tensor, nn.Module]] = {}  # id(output) -> (output, conv)
    pairs: dict[nn.Module, nn.Module | None] = {}  # bn -> conv (None: not foldable)

    slots = {m: slot(m) for _, m, _ in operator_modules(model, CONSUMER, functional_leaves=True)}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if Composite.handles(module) and module not in order:
            order.append(module)
        if slots[module] == "conv":
            produced[id(output)] = (output, module)  # keeping `output` keeps its id unique
        elif slots[module] == "norm":
            hit = produced.get(id(inputs[0]))
            conv = hit[1] if hit is not None and hit[0] is inputs[0] else None
            # a BatchNorm called on several inputs folds only if always after the same conv
            pairs[module] = conv if pairs.get(module, conv) is conv else None

    mods = [m for m, s in slots.items() if Composite.handles(m) or s == "norm"]
    with _hooks(mods, hook):
        out = model(x)
    convs = [c for c in pairs.values() if c is not None]
    folds = [(c, bn) for bn, c in pairs.items()
             if c is not None and convs.count(c) == 1
             and getattr(bn, "running_var", None) is not None]
    return order, folds, out


@torch.no_grad()
def fold_batchnorm(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval mode statistics) into ``conv`` in place."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.ndim - 1))))
    conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)


def canonize(model: nn.Module, x: torch.Tensor, fold: bool = True,
             ) -> tuple[nn.Module, list[nn.Module]]:
    """An eval-mode deep copy of ``model`` with BatchNorms folded into their convolutions.

    Args:
        model: the caller's model (left unchanged).
        x: a batch to trace the model with.
        fold: fold BatchNorms (False: the copy is just a copy).

    Returns:
        The copy, and its layers that composites handle in execution order (the first
        weighted one reads the pixels).

    Raises:
        ValueError: folding changed the outputs (a convolution's output was also used
            elsewhere than in its BatchNorm); pass ``canonize=False`` to ``lrp``.
    """
    copied = copy.deepcopy(model).eval()
    for p in copied.parameters():
        p.requires_grad_(False)
    order, folds, before = trace(copied, x)
    if not (fold and folds):
        return copied, order
    with torch.no_grad():
        for conv, bn in folds:
            fold_batchnorm(conv, bn)
            _replace(copied, bn, nn.Identity())
        after = copied(x)
    tol = 1e-4 if x.dtype == torch.float64 else 1e-2
    if not torch.allclose(before, after, rtol=tol, atol=tol * before.abs().max().item()):
        raise ValueError("folding BatchNorm into the preceding convolution changed the "
                         "model's outputs (a convolution output is reused elsewhere); "
                         "pass canonize=False")
    return copied, order
