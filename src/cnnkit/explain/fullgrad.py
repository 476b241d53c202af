"""FullGrad: input-gradients plus the bias-gradients of every layer, one backward pass.

For a piecewise-linear network (ReLU, max/avg pooling, BatchNorm in eval mode) the
target logit decomposes exactly (completeness):
``f(x) = <grad_x f, x> + sum_layers <grad_{z_l} f, b_l>``, where ``b_l`` is the bias
added to the output ``z_l`` of a conv/linear layer, or BatchNorm's implicit bias
``beta - gamma * mu / sqrt(var + eps)``. :func:`full_gradients` returns those terms;
:class:`FullGrad` turns them into a saliency map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from cnnkit.layers.nd import interp_mode

from ._base import Explainer, register_method

__all__ = ["FullGrad", "full_gradients", "layer_bias"]


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a conv/linear/BatchNorm module adds to its output, ``[C]``; None if none.

    Raises:
        ValueError: a BatchNorm in train mode or without running statistics (it is not an
            affine map then).
    """
    if isinstance(module, (_ConvNd, nn.Linear)):
        return module.bias
    if isinstance(module, _BatchNorm):
        if module.training or module.running_mean is None:
            raise ValueError(f"{module} normalises with batch statistics; FullGrad needs "
                             "eval mode and running statistics (call model.eval())")
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -module.running_mean * scale
        return bias if module.bias is None else bias + module.bias
    return None


@contextlib.contextmanager
def _capture_biased_outputs(model: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(output, bias)`` for every call of a module that adds a bias."""
    store: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor | None:
        bias = layer_bias(module)
        if bias is None:
            return None
        store.append((out, bias.detach()))
        # An in-place op after the layer (ReLU(inplace=True)) would otherwise overwrite the
        # recorded tensor and turn its gradient into that of the op's output.
        return out.clone()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (_ConvNd, nn.Linear, _BatchNorm))]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def full_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The full-gradient terms of ``model(x)[b, targets[b, k]]``, one forward + one backward.

    Returns:
        ``grad_x`` ``[B, K, C, *spatial]``, and per biased layer call the bias-gradient term
        ``grad_z * b`` ``[B, K, *z.shape[1:]]`` (b broadcast over the channel axis 1), so that
        ``(grad_x * x).sum() + sum(t.sum() for t in terms)`` is the target logit for a
        piecewise-linear network in eval mode.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), _capture_biased_outputs(model) as store:
        scores = Explainer.select(model(x), targets)
        grads = Explainer.grads(scores, [x] + [out for out, _ in store])
    terms = [g * bias.view(1, 1, -1, *([1] * (g.ndim - 3))).to(g.dtype)
             for g, (_, bias) in zip(grads[1:], store, strict=True)]
    return grads[0], terms


def _normalise(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """FullGrad's post-processing: ``|t|`` min-max rescaled per map over ``[C, *s]``."""
    t = t.abs()
    ones = [1] * (t.ndim - 2)
    t = t - t.flatten(2).amin(2).view(*t.shape[:2], *ones)
    return t / (t.flatten(2).amax(2).view(*t.shape[:2], *ones) + eps)


@register_method("fullgrad")
class FullGrad(Explainer):
    """FullGrad saliency: input-gradient map plus every conv layer's bias-gradient map.

    Srinivas and Fleuret (2019), "Full-Gradient Representation for Neural Network
    Visualization", NeurIPS. The map (Eq. 4) is
    ``psi(|grad_x f * x|) + sum_l psi(upsample(|grad_{z_l} f * b_l|))`` summed over
    channels, with ``psi`` min-max normalisation per input as in the authors' code;
    conv and BatchNorm outputs (spatial, of the input's 1, 2 or 3 dims; upsampled by
    linear, bilinear or trilinear interpolation with aligned corners, as the authors'
    code in 2D) enter the map, linear-layer biases only the completeness sum
    (:func:`full_gradients`). All the gradients come from one forward and one batched
    backward, with hooks on every conv/linear/BatchNorm output.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> cnnkit.explain.create("fullgrad", model)(torch.rand(2, 3, 16, 16), [[0, 1]] * 2).shape
        torch.Size([2, 2, 16, 16])
    """

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        grad_x, terms = full_gradients(self.model, x, targets)
        size = tuple(x.shape[2:])
        cam = _normalise(grad_x * x[:, None]).sum(2)
        for t in terms:
            if t.ndim != grad_x.ndim:  # linear layers: no spatial map
                continue
            m = _normalise(t).sum(2)
            cam = cam + F.interpolate(m, size=size, mode=interp_mode(len(size)),
                                      align_corners=True)
        return cam
