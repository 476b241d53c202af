"""LRP composites: *where* each rule runs (which rule on which layer).

A composite maps a layer to a rule from :mod:`.rules` by the layer's slot: the first
weighted layer (the one reading the pixels), other convolutions, dense layers and
average pools. Layers with no rule (ReLU, max pool, BatchNorm left unfolded,
concatenation, additions) run their ordinary gradient, which is itself an LRP rule in the
``g = R / a`` convention (see :mod:`cnnkit.explain.lrp`). A layer's slot is its
operator's ``lrp`` fact in the registry (:mod:`cnnkit.layers.ops`,
:data:`~cnnkit.layers.ops.LRP_SLOTS`), in any number of spatial dims; a module the
registry does not know, or one whose operator has no LRP rule, refuses in one line.

The named composites follow zennit (Anders et al. 2021, "Software for Dataset-wide XAI:
From Local Explanations to Global Insights with Zennit, CoRelAy, and ViRelAy") and the
recommendations of Montavon et al. (2019), "Layer-Wise Relevance Propagation: An
Overview" (Sec. 10.3): epsilon on the dense top layers, z+ / gamma / alpha-beta on the
convolutions, z^B on the pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from cnnkit.layers.ops import module_facts

from .rules import AlphaBeta, Epsilon, Gamma, Rule, ZBox, ZPlus

__all__ = ["Composite", "register_composite", "create_composite", "list_composites",
           "uniform_composite", "pixel_bounds", "slot", "RULES"]

CONSUMER = "LRP"
_WEIGHTED = ("conv", "dense")  # the slots whose layer reads the pixels when it comes first


def slot(module: nn.Module) -> str:
    """The composite slot of ``module``: its operator's ``lrp`` fact.

    Raises:
        UnknownOperator: the registry does not know the module (one line).
        ValueError: its operator has no LRP rule (``lrp=None``), as a bilinear layer or
            a binary convolution.
    """
    facts = module_facts(module, CONSUMER)
    if facts.lrp is None:
        raise ValueError(f"LRP has no rule for {type(module).__name__} (operator "
                         f"{facts.name!r}); explain the model with another method")
    return facts.lrp


@dataclass(frozen=True)
class Composite:
    """Rules by layer kind; ``first`` (if set) overrides the rule of the first weighted
    layer executed. Average pools keep LRP-epsilon under every composite: their weights
    are positive, so with non-negative inputs z+, gamma and alpha-beta all reduce to it."""

    conv: Rule
    dense: Rule
    pool: Rule
    first: Rule | None = None

    def rule_for(self, module: nn.Module, first: bool = False) -> Rule | None:
        """The rule of ``module``'s slot (None: its ordinary gradient)."""
        where = slot(module)
        if first and where in _WEIGHTED and self.first is not None:
            return self.first
        return {"conv": self.conv, "dense": self.dense, "pool": self.pool}.get(where)

    @staticmethod
    def handles(module: nn.Module) -> bool:
        """Whether composites give ``module`` a rule at all (its slot is conv, dense or
        pool)."""
        return slot(module) in (*_WEIGHTED, "pool")

    @staticmethod
    def weighted(module: nn.Module) -> bool:
        """Whether ``module`` is a weighted layer (a convolution or a dense layer)."""
        return slot(module) in _WEIGHTED


# One rule everywhere (the ``rule=`` option of ``lrp``); z^B only makes sense on the pixels.
# ``bias``: whether z+ and alpha-beta let biases into their denominators (zennit's way).
RULES: dict[str, Callable[[float, float, bool], Rule]] = {
    "epsilon": lambda epsilon, gamma, bias: Epsilon(epsilon),
    "gamma": lambda epsilon, gamma, bias: Gamma(gamma),
    "zplus": lambda epsilon, gamma, bias: ZPlus(bias=bias),
    "alpha1beta0": lambda epsilon, gamma, bias: AlphaBeta(1.0, 0.0, bias=bias),
    "alpha2beta1": lambda epsilon, gamma, bias: AlphaBeta(2.0, 1.0, bias=bias),
}

_COMPOSITES: dict[str, Callable[..., Composite]] = {}


def register_composite(name: str) -> Callable[[Callable[..., Composite]], Callable[..., Composite]]:
    """Register a composite factory ``f(epsilon, gamma, low, high, bias) -> Composite``."""

    def deco(factory: Callable[..., Composite]) -> Callable[..., Composite]:
        if name in _COMPOSITES:
            raise ValueError(f"LRP composite {name!r} is registered twice")
        _COMPOSITES[name] = factory
        return factory

    return deco


def list_composites() -> list[str]:
    """Names of the registered composites, sorted."""
    return sorted(_COMPOSITES)


def create_composite(name: str, epsilon: float = 1e-6, gamma: float = 0.25,
                     low: Any = None, high: Any = None, bias: bool = False) -> Composite:
    """The composite ``name`` with the given rule parameters (``bias``: z+ and alpha-beta
    let the biases into their denominators, zennit's convention).

    Raises:
        ValueError: unknown name, or a z^B composite without pixel bounds.
    """
    if name not in _COMPOSITES:
        raise ValueError(f"unknown LRP composite {name!r}; choose from "
                         f"{', '.join(list_composites())}")
    return _COMPOSITES[name](epsilon=epsilon, gamma=gamma, low=low, high=high, bias=bias)


def uniform_composite(rule: str, epsilon: float = 1e-6, gamma: float = 0.25,
                      bias: bool = False) -> Composite:
    """One rule on every convolution and dense layer (pools: epsilon)."""
    if rule not in RULES:
        hint = "; z^B is for the first layer only: use composite='epsilon_gamma_box'" \
            if rule in ("zbox", "zb", "z_box") else ""
        raise ValueError(f"unknown LRP rule {rule!r}; choose from {', '.join(RULES)}{hint}")
    r = RULES[rule](epsilon, gamma, bias)
    return Composite(conv=r, dense=r, pool=Epsilon(epsilon))


@register_composite("epsilon_plus")
def epsilon_plus(epsilon: float, gamma: float, low: Any, high: Any,
                 bias: bool = False) -> Composite:
    """z+ on convolutions, epsilon on dense layers (zennit's EpsilonPlus)."""
    return Composite(conv=ZPlus(bias=bias), dense=Epsilon(epsilon), pool=Epsilon(epsilon))


@register_composite("epsilon_gamma_box")
def epsilon_gamma_box(epsilon: float, gamma: float, low: Any, high: Any,
                      bias: bool = False) -> Composite:
    """z^B on the pixels, gamma on the other convolutions, epsilon on dense layers
    (zennit's EpsilonGammaBox; gamma in its generalised form, which stays stable where a
    convolution's output is negative, as before a residual sum)."""
    if low is None or high is None:
        raise ValueError("composite 'epsilon_gamma_box' needs the pixel range: pass low= and "
                         "high= (floats or per-channel values of the normalised input)")
    return Composite(conv=Gamma(gamma), dense=Epsilon(epsilon), pool=Epsilon(epsilon),
                     first=ZBox(low, high))


@register_composite("epsilon_alpha2_beta1")
def epsilon_alpha2_beta1(epsilon: float, gamma: float, low: Any, high: Any,
                         bias: bool = False) -> Composite:
    """alpha=2, beta=1 on convolutions, epsilon on dense layers."""
    return Composite(conv=AlphaBeta(2.0, 1.0, bias=bias), dense=Epsilon(epsilon),
                     pool=Epsilon(epsilon))


def pixel_bounds(model: nn.Module) -> tuple[Sequence[float], Sequence[float]]:
    """The range of the normalised input when pixels lie in [0, 1]: from the model's
    ``default_cfg`` mean and std, ``((0 - mean) / std, (1 - mean) / std)`` per channel.

    Raises:
        ValueError: the model declares no mean/std.
    """
    cfg = getattr(model, "default_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        raise ValueError(f"{type(model).__name__} has no default_cfg mean/std to derive the "
                         "z^B pixel range from; pass low= and high=")
    low = [(0.0 - m) / s for m, s in zip(cfg["mean"], cfg["std"], strict=True)]
    high = [(1.0 - m) / s for m, s in zip(cfg["mean"], cfg["std"], strict=True)]
    return low, high
