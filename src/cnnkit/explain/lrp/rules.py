"""LRP rules: *how* one layer redistributes the relevance of its outputs to its inputs.

Montavon, Binder, Lapuschkin, Samek and Müller (2019), "Layer-Wise Relevance Propagation:
An Overview", in *Explainable AI: Interpreting, Explaining and Visualizing Deep Learning*.
For a layer ``z_j = sum_i x_i w_ij + b_j`` every rule has the form

    R_i = sum_j c_ij / d_j * R_j,

with contributions ``c_ij`` and a denominator ``d_j`` chosen by the rule (``d_j`` = the
sum of the ``c_ij``, plus a modified bias for some rules). Which rule runs on which layer
is not decided here but by a composite (:mod:`.composites`).

How a rule runs (the "gradient x input" trick of the overview, Sec. 10.2.3). Relevance is
never stored: the backward pass carries ``g = R / a`` for every activation ``a``, so that
``R = a * g`` everywhere. A rule replaces its layer's output ``z`` by

    out = z + (t - stop_grad(t)),   t = sum_k coef_k * lin_k(x) * stop_grad(m_k * z / d_k),

where ``lin_k`` is linear in ``x`` with ``x * d lin_k/dx`` giving the contributions
``c_ij`` and the mask ``m_k`` (1 if the term has none) picks the outputs the term serves.
The value of ``out`` is exactly ``z`` (``t - t`` is zero), so the forward pass is
unchanged; its gradient is ``g_in = sum_j (d lin/dx)_ij * m_j z_j g_j / d_j``, hence
``x_i g_in,i = sum_j c_ij R_j / d_j`` with ``R_j = z_j g_j``: the rule, exactly. (The
masks let a rule treat outputs of either sign differently: :class:`Gamma`.)
Everything a rule does not touch runs its ordinary gradient, which in this convention is
already an LRP rule (see :mod:`cnnkit.explain.lrp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Rule", "Term", "Epsilon", "Gamma", "ZPlus", "AlphaBeta", "ZBox", "stabilize",
           "linear"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``, so a denominator is never zero."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def linear(module: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """The module's linear map with the given parameters (weightless modules: as is)."""
    if isinstance(module, _CONV):
        return module._conv_forward(x, weight, bias)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    # average pools: linear with fixed positive weights (.forward: bypass the rule's hook)
    return module.forward(x)


class Term(NamedTuple):
    """One term of a rule (see the module docstring): contributions ``x * d lin/dx``, their
    denominator ``d`` (same shape as the output) and the outputs they serve (``mask``,
    boolean like the output; None: all)."""

    coef: float
    lin: torch.Tensor
    d: torch.Tensor
    mask: torch.Tensor | None = None


class Rule:
    """Base of the rules. A subclass returns its :class:`Term` list in :meth:`terms`;
    :meth:`__call__` turns them into the layer's output (see the module docstring).
    ``leaves`` collects extra tensors whose ``tensor * gradient`` is part of the input
    relevance (the bounds of :class:`ZBox`).

    Args:
        stabilizer: the ``eps`` of :func:`stabilize` for this rule's denominators.
    """

    needs_weight = True

    def __init__(self, stabilizer: float = 1e-6) -> None:
        if stabilizer <= 0:
            raise ValueError(f"stabilizer must be > 0, got {stabilizer}")
        self.stabilizer = stabilizer

    def terms(self, module: nn.Module, x: torch.Tensor, z: torch.Tensor,
              leaves: list[torch.Tensor]) -> list[Term]:
        """The rule's terms for input ``x`` and output ``z`` of ``module``."""
        raise NotImplementedError

    def __call__(self, module: nn.Module, x: torch.Tensor, z: torch.Tensor,
                 leaves: list[torch.Tensor]) -> torch.Tensor:
        if self.needs_weight and getattr(module, "weight", None) is None:
            raise ValueError(f"rule {type(self).__name__} needs a layer with weights, got "
                             f"{type(module).__name__}; give it Epsilon instead")
        z = z.detach()
        out = 0
        for coef, lin, d, mask in self.terms(module, x, z, leaves):
            scale = z / stabilize(d.detach(), self.stabilizer)
            if mask is not None:  # where, not a product: a masked-out ratio may be huge
                scale = torch.where(mask, scale, 0.0)
            out = out + coef * lin * scale
        return z + (out - out.detach())  # value exactly z, gradient the rule's

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight, getattr(module, "bias", None)


class Epsilon(Rule):
    """LRP-epsilon: ``c_ij = x_i w_ij``, ``d_j = z_j + eps * sign(z_j)`` (bias included).

    Bach et al. (2015), "On Pixel-Wise Explanations for Non-Linear Classifier Decisions
    by Layer-Wise Relevance Propagation", PLOS ONE; the overview's Eq. (LRP-eps). The
    epsilon absorbs the relevance of weak, contradictory contributions; ``epsilon -> 0``
    is LRP-0, which conserves relevance exactly in a bias-free layer. Also used for
    weightless linear layers (average pools).
    """

    needs_weight = False

    def __init__(self, epsilon: float = 1e-6) -> None:
        super().__init__(epsilon)
        self.epsilon = epsilon

    def terms(self, module, x, z, leaves):
        weight = getattr(module, "weight", None)
        lin = linear(module, x, weight, None)
        with torch.no_grad():
            bias = getattr(module, "bias", None)
            d = linear(module, x, weight, bias) if bias is not None else lin
        return [Term(1.0, lin, d)]


def _signed_parts(module: nn.Module, x: torch.Tensor, negative: bool = True,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum_i (x_i w_ij)+`` and (if ``negative``, else None) ``sum_i (x_i w_ij)-`` as
    functions of ``x``."""
    w = module.weight
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    pos = linear(module, xp, wp) + linear(module, xn, wn)
    neg = linear(module, xp, wn) + linear(module, xn, wp) if negative else None
    return pos, neg


def _plus_bias(part: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``part + bias`` broadcast over the output (no gradient: it only enters ``d_j``)."""
    return part.detach() + bias.detach().view(1, -1, *([1] * (part.ndim - 2)))


def _with_bias(module: nn.Module, part: torch.Tensor, sign: int) -> torch.Tensor:
    """``part`` plus the positive (``sign=1``) or negative (``sign=-1``) part of the
    module's bias."""
    bias = getattr(module, "bias", None)
    if bias is None:
        return part
    return _plus_bias(part, bias.clamp(min=0) if sign > 0 else bias.clamp(max=0))


class Gamma(Rule):
    """LRP-gamma, generalised to inputs and outputs of either sign: every output favours
    the contributions of its own sign.

    Montavon, Binder, Lapuschkin, Samek and Müller (2019), "Layer-Wise Relevance
    Propagation: An Overview", Sec. 10.2.2, for non-negative (ReLU) inputs:
    ``c_ij = x_i (w_ij + gamma w_ij+)`` and ``d_j = sum_i c_ij + b_j + gamma b_j+``. Its
    denominator is ``z_j`` plus a non-negative amount, so it crosses zero wherever ``z_j``
    is negative: a convolution whose output feeds a residual sum before the ReLU
    (ResNet's, with its BatchNorm folded in) then divides by near-zero numbers and the
    relevance explodes.

    Here the generalised rule of Andéol, Kawakami, Wada, Kanamori, Müller and Montavon
    (2021), "Learning Domain Invariant Representations by Joint Wasserstein Distance
    Minimization", arXiv:2106.04923 (zennit's ``Gamma``)::

        z_j > 0:  c_ij = x_i+ (w_ij + gamma w_ij+) + x_i- (w_ij + gamma w_ij-),
                  d_j  = sum_i c_ij + b_j + gamma b_j+;
        z_j < 0:  c_ij = x_i+ (w_ij + gamma w_ij-) + x_i- (w_ij + gamma w_ij+),
                  d_j  = sum_i c_ij + b_j + gamma b_j-,

    that is ``c_ij = z_ij + gamma (z_ij)+`` or ``z_ij + gamma (z_ij)-`` with
    ``z_ij = x_i w_ij``: the contributions of the output's own sign are favoured.
    Each output's relevance goes through the branch of its sign (``z_j = 0`` carries no
    relevance). Now ``d_j`` has the sign of ``z_j`` and ``|d_j| >= |z_j|``, so no
    denominator is near zero unless its output is; for ``x >= 0`` and ``z_j > 0`` this is
    the overview's rule.

    Args:
        gamma: how much the contributions of the output's sign are favoured (0: LRP-0).
        stabilizer: the ``eps`` of :func:`stabilize`.
    """

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        super().__init__(stabilizer)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def terms(self, module, x, z, leaves):
        weight, bias = _weights(module)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        bp, bn = (None, None) if bias is None else (bias.clamp(min=0), bias.clamp(max=0))
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        signed = bool((x < 0).any())  # behind a ReLU x- = 0: skip its convolutions
        terms = []
        for mask, own, other, b_own in ((z > 0, wp, wn, bp), (z < 0, wn, wp, bn)):
            lin = linear(module, xp, weight + self.gamma * own)
            if signed:
                lin = lin + linear(module, xn, weight + self.gamma * other)
            d = lin if bias is None else _plus_bias(lin, bias + self.gamma * b_own)
            terms.append(Term(1.0, lin, d, mask))
        return terms


class AlphaBeta(Rule):
    """LRP-alpha-beta: positive and negative contributions kept apart and weighted.

    Bach et al. (2015), "On Pixel-Wise Explanations for Non-Linear Classifier Decisions
    by Layer-Wise Relevance Propagation", PLOS ONE:
    ``R_i = sum_j (alpha z_ij+ / z_j+  -  beta z_ij- / z_j-) R_j`` with
    ``z_ij = x_i w_ij`` and ``alpha - beta = 1``.

    Biases. By default they take no relevance (as in the z+ rule of Deep Taylor
    Decomposition), so ``alpha=1, beta=0`` is exactly :class:`ZPlus` and conserves
    relevance. With ``bias=True`` the bias counts as one more input ``x_0 = 1`` with
    weight ``b_j`` (Bach et al. 2015, Eq. 60; Montavon et al. 2019, Sec. 10.2): ``b_j+``
    joins ``z_j+`` and ``b_j-`` joins ``z_j-``, and the bias share of the relevance is
    absorbed. This is zennit's convention.

    Args:
        alpha: weight of the positive contributions.
        beta: weight of the negative contributions (``alpha - beta = 1``).
        stabilizer: the ``eps`` of :func:`stabilize`.
        bias: let the biases enter the denominators (see above).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6,
                 bias: bool = False) -> None:
        super().__init__(stabilizer)
        if beta < 0 or abs(alpha - beta - 1.0) > 1e-9:
            raise ValueError(f"alpha-beta needs alpha - beta = 1 and beta >= 0, got "
                             f"alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.bias = alpha, beta, bias

    def terms(self, module, x, z, leaves):
        pos, neg = _signed_parts(module, x, negative=bool(self.beta))
        dpos = _with_bias(module, pos, 1) if self.bias else pos
        terms = [Term(self.alpha, pos, dpos)]
        if not self.beta:
            return terms
        return terms + [Term(-self.beta, neg, _with_bias(module, neg, -1) if self.bias else neg)]


class ZPlus(AlphaBeta):
    """LRP-z+: only positive contributions ``(x_i w_ij)+`` (``x_i w_ij+`` for x >= 0).

    Montavon, Lapuschkin, Binder, Samek and Müller (2017), "Explaining Nonlinear
    Classification Decisions with Deep Taylor Decomposition", Pattern Recognition; the
    overview's LRP-alpha1-beta0. Biases are ignored by default, as in the Deep Taylor
    derivation (which assumes ``b_j <= 0``), so relevance is conserved; ``bias=True``
    adds ``b_j+`` to the denominator (zennit's ``ZPlus``). For a non-negative input the
    map has the sign of the target score everywhere.

    Args:
        stabilizer: the ``eps`` of :func:`stabilize`.
        bias: add the positive part of the bias to the denominator.
    """

    def __init__(self, stabilizer: float = 1e-6, bias: bool = False) -> None:
        super().__init__(1.0, 0.0, stabilizer, bias)

    def __repr__(self) -> str:
        return f"ZPlus(stabilizer={self.stabilizer}, bias={self.bias})"


class ZBox(Rule):
    """LRP-z^B for the input layer, whose inputs are bounded pixels ``l <= x <= h``.

    Montavon et al. (2017), "Explaining Nonlinear Classification Decisions with Deep
    Taylor Decomposition", Pattern Recognition; the overview's Sec. 10.2.2:
    ``c_ij = x_i w_ij - l_i w_ij+ - h_i w_ij-`` and ``d_j = sum_i c_ij`` (no bias).
    ``l * w+`` and ``h * w-`` are not multiples of ``x``, so the bounds enter as extra
    leaf tensors appended to ``leaves``: the input relevance is
    ``x g_x + l g_l + h g_h``.

    Args:
        low: lowest input value, a float or per-channel values.
        high: highest input value, a float or per-channel values.
    """

    def __init__(self, low: float | Sequence[float] | torch.Tensor,
                 high: float | Sequence[float] | torch.Tensor, stabilizer: float = 1e-6) -> None:
        super().__init__(stabilizer)
        self.low, self.high = torch.as_tensor(low).double(), torch.as_tensor(high).double()
        if (self.low > self.high).any():
            raise ValueError(f"z^B bounds need low <= high, got low={low}, high={high}")

    def _bound(self, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b = b.to(x)
        if b.ndim == 1:  # per channel
            b = b.view(1, -1, *([1] * (x.ndim - 2)))
        return b.expand_as(x).clone().requires_grad_(True)

    def terms(self, module, x, z, leaves):
        w = module.weight
        low, high = self._bound(self.low, x), self._bound(self.high, x)
        leaves += [low, high]
        lin = (linear(module, x, w) - linear(module, low, w.clamp(min=0))
               - linear(module, high, w.clamp(max=0)))
        return [Term(1.0, lin, lin)]
