"""Layer-wise Relevance Propagation (LRP): the ``lrp`` explainer.

Bach, Binder, Montavon, Klauschen, Müller and Samek (2015), "On Pixel-Wise Explanations
for Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation", PLOS ONE; rules
and composites as in Montavon, Binder, Lapuschkin, Samek and Müller (2019),
"Layer-Wise Relevance Propagation: An Overview". The design follows zennit: rules
(:mod:`.rules`, *how* a layer redistributes relevance) are kept apart from composites
(:mod:`.composites`, *where* each rule runs) and canonizers (:mod:`.canonize`, BatchNorm
folding on a deep copy of the model).

Why the rest of the network needs no rules. The backward pass carries ``g = R / a`` for
every activation ``a`` (the rules in :mod:`.rules` maintain ``R = a * g``). Starting from
the target logit with ``g = 1`` (``R = f_c(x)``), the ordinary gradient of every other
operation is then an LRP rule:

* ReLU ``a = max(z, 0)``: ``g_z = g_a 1[z > 0]``, so ``R_z = z g_z = R_a`` (relevance
  passes unchanged);
* max pool: the gradient goes to the winner ``x_w = y``: ``R_w = x_w g = R_y``;
* residual addition ``y = a + b``: both terms get ``g_y``, so ``R_a = a / y * R_y`` and
  ``R_b = b / y * R_y`` (proportional split, ``R_a + R_b = R_y``), and where a tensor
  feeds several branches the gradients add, so the relevances add; no division happens,
  so nothing blows up where ``y ~ 0`` (then ``R_y = y g_y ~ 0`` too);
* concatenation: each part keeps its channels' relevance;
* an unfolded BatchNorm ``y = s x + t``: ``R_x = s x / y * R_y`` (LRP-0, the shift ``t``
  absorbing its share).

Hence, with bias-free layers and epsilon -> 0, ``sum R_input = f_c(x)`` for any ResNet or
DenseNet; the tests check it. Not handled: multiplicative gates (squeeze-and-excitation
blocks) get their plain gradient, which is not an LRP rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._base import Explainer, register_method
from .canonize import canonize
from .composites import (
    Composite,
    create_composite,
    list_composites,
    pixel_bounds,
    uniform_composite,
)
from .rules import AlphaBeta, Epsilon, Gamma, Rule, ZBox, ZPlus

__all__ = ["LRP", "Rule", "Epsilon", "Gamma", "ZPlus", "AlphaBeta", "ZBox", "Composite",
           "create_composite", "list_composites", "canonize", "lrp_relevance"]


def lrp_relevance(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                  composite: Composite, order: Sequence[nn.Module]) -> torch.Tensor:
    """Input relevance ``[B, K, C, ...]`` of ``model`` (already canonized, eval mode).

    One forward with the rules attached as forward hooks (removed on exit) and one
    batched backward for all ``K`` targets.

    Args:
        model: the (copied) model.
        x: inputs ``[B, C, ...]``.
        targets: ``[B, K]`` classes.
        composite: which rule on which layer.
        order: the layers composites handle, in execution order (``order[0]`` reads x).
    """
    weighted = [m for m in order if Composite.weighted(m)]
    rules = {m: composite.rule_for(m, first=bool(weighted) and m is weighted[0])
             for m in order}
    leaves: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return rules[module](module, inputs[0], output, leaves)

    handles = [m.register_forward_hook(hook) for m, r in rules.items() if r is not None]
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            scores = Explainer.select(model(xg), targets)
            if any(leaf.shape != x.shape for leaf in leaves):
                raise ValueError("the z^B rule must run on the layer reading the input; "
                                 "put it on the first layer only")
            grads = Explainer.grads(scores, [xg, *leaves])
    finally:
        for h in handles:
            h.remove()
    return sum(t.detach()[:, None] * g for t, g in zip([xg, *leaves], grads, strict=True))



@register_method("lrp")
class LRP(Explainer):
    """Layer-wise Relevance Propagation: the target logit redistributed layer by layer
    onto the pixels, summed over the colour channels.

    Bach et al. (2015), "On Pixel-Wise Explanations for Non-Linear Classifier Decisions
    by Layer-Wise Relevance Propagation", PLOS ONE; rules and composites of Montavon et
    al. (2019), "Layer-Wise Relevance Propagation: An Overview". Each call works on a
    deep copy of the model with its BatchNorms folded (the caller's model is untouched).

    Conventions, as in the papers: the relevance starts from the target logit,
    ``R = f_c(x)`` (Bach et al. 2015; the overview, Sec. 10.1), so the map sums to the
    logit in a bias-free net. zennit's ``Gradient`` fed a bare one-hot starts from 1
    instead: its map is cnnkit's divided by the logit, with the sign flipped wherever
    the logit is negative; give it ``attr_output=lambda out: out * one_hot`` to compare.
    z+ and alpha-beta leave the biases out unless ``zplus_bias=True`` (zennit's
    default). With those two settings cnnkit and zennit agree to float64 precision, every
    rule and composite (the tests check it on residual nets with calibrated BatchNorm;
    LRP-gamma is the generalised rule of Andéol et al. 2021, as in zennit).

    Args:
        model: the classifier.
        layer: ignored (relevance is taken at the input).
        composite: ``"epsilon_plus"`` (z+ on convolutions, epsilon on dense layers),
            ``"epsilon_gamma_box"`` (z^B on the pixels, gamma on the other
            convolutions) or ``"epsilon_alpha2_beta1"``.
        rule: one rule everywhere instead of a composite: ``"epsilon"``, ``"gamma"``,
            ``"zplus"``, ``"alpha1beta0"`` or ``"alpha2beta1"``.
        epsilon: the epsilon of LRP-epsilon (dense layers and pools).
        gamma: the gamma of LRP-gamma (generalised to signed inputs and outputs, see
            :class:`~cnnkit.explain.lrp.rules.Gamma`).
        low: lowest normalised input value for z^B (float or per channel); None: pixels
            in [0, 1] normalised by the model's ``default_cfg`` mean/std.
        high: highest normalised input value for z^B, likewise.
        canonize: fold each BatchNorm that follows a convolution into it.
        zplus_bias: let the biases into the denominators of z+ and alpha-beta (the
            bias as an input ``x_0 = 1``; zennit's convention, which absorbs the bias
            share of the relevance). Default False: biases take no relevance, as in Deep
            Taylor Decomposition, so relevance is conserved.

    Example:
        >>> import torch
        >>> from cnnkit.explain import create
        >>> from cnnkit.models import create_model
        >>> model = create_model("tinyvgg", num_classes=3, img_size=16)
        >>> create("lrp", model)(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 16, 16])
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None,
                 composite: str = "epsilon_plus", rule: str | None = None,
                 epsilon: float = 1e-6, gamma: float = 0.25, low: Any = None,
                 high: Any = None, canonize: bool = True, zplus_bias: bool = False) -> None:
        super().__init__(model, layer)
        if rule is not None:
            self.composite = uniform_composite(rule, epsilon, gamma, zplus_bias)
        else:
            if composite == "epsilon_gamma_box" and (low is None or high is None):
                low, high = pixel_bounds(model)
            self.composite = create_composite(composite, epsilon, gamma, low, high, zplus_bias)
        self.canonize = canonize

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        model, order = canonize(self.model, x, fold=self.canonize)
        return lrp_relevance(model, x, targets, self.composite, order).sum(2)
