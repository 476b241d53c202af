"""What cnnkit knows of the operators a network calls: one registry of operator facts.

An operator is a set of module types and/or torch functions (by the ``__name__`` a
:class:`~torch.overrides.TorchFunctionMode` sees: ``F.conv3d`` is ``"conv3d"``, ``x + y``
is ``"__add__"``). It is registered once, as an :class:`OpFacts`, and every consumer reads
its facts from here instead of keeping a table of its own:

============================================  ==========================================
consumer                                      fact
============================================  ==========================================
``analysis.summary`` (the forward tracer)     ``macs``, ``field`` (receptive field per axis)
``compress.dependency_groups``, surgery       ``channels`` (how channels couple)
(``models._surgery.shrink``)
``explain.lrp`` composites and canonizer      ``lrp`` (which composite slot)
``web.layers`` (the explorer's layer kinds)   ``view``
``layers.lowrank``, ``compress.lowrank``,     ``lowrank`` (which factorisations apply)
``compress.factorizations``
``layers.binary``                             ``binary`` (the conversion, or a refusal)
``compress.quantize`` (``check_int8``)        ``int8`` (whether the engine runs it)
============================================  ==========================================

So a new operator (Conv1d, Conv3d, a later graph convolution) is registered once with
:func:`register_op` and every consumer sees it; a consumer that meets an operator the
registry does not know refuses with one line (:class:`UnknownOperator`, a ValueError),
and a registered fact that says no is an :class:`Unsupported` with its reason. The
operators of torch that the zoo uses are registered by :mod:`cnnkit.layers.torch_ops`;
the per-call rules their facts point to (MACs, spatial maps) are
:mod:`cnnkit.layers.op_rules`. Also here: helpers to read a functional call's arguments.

Example:
    >>> from torch import nn
    >>> from cnnkit.layers.ops import function_facts, module_facts
    >>> facts = module_facts(nn.Conv3d(1, 1, 3))
    >>> facts.name, facts.dims, facts.channels, facts.lrp, facts.view
    ('conv3d', 3, 'conv', 'conv', 'conv')
    >>> function_facts("conv3d") is facts
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "OpFacts", "Unsupported", "UnknownOperator", "register_op", "module_facts",
    "function_facts", "find_module", "find_function", "registered_ops", "operator_modules",
    "resolve", "CHANNELS", "LRP_SLOTS", "VIEWS", "Window", "Transposed", "Resample", "Shift",
    "GLOBAL", "KEEP", "tensors", "arg", "ntuple",
]

# How an operator couples the channels of its inputs and outputs (structured pruning).
CHANNELS = {
    "conv": "weight [C_out, C_in / groups, *k]: output and input channels; a depthwise "
            "convolution's input and output channel are one; other groupings are kept whole",
    "conv_transpose": "weight [C_in, C_out / groups, *k]: input and output channels",
    "linear": "weight [out, in]: rows and input features (h*w features per channel after a "
              "flatten)",
    "norm": "per-channel statistics and affine parameters (BatchNorm, InstanceNorm)",
    "pass": "channel c in is channel c out and a zero channel stays zero (activations with "
            "f(0) = 0, pools, dropout, resampling, zero padding, copies)",
    "merge": "operands paired channel by channel, element-wise (additions, unpooling values "
             "and indices)",
    "concat": "a concatenation: channel segments side by side along dim 1",
    "flatten": "[N, C, *s] -> [N, C * prod(s)] (view, reshape, flatten)",
    "opaque": "couples channels in a way the analysis does not model (gates, group norms, "
              "permutes, channel reductions): every group it touches is kept whole",
}
# Where an LRP composite puts the operator (explain.lrp.composites).
LRP_SLOTS = {
    "conv": "the composite's convolution rule (z+, gamma, alpha-beta; z^B on the pixels)",
    "dense": "the composite's dense-layer rule (epsilon)",
    "pool": "the average-pool rule (epsilon): a linear map with positive weights",
    "norm": "a per-channel affine map: folded into the convolution before it, else its "
            "gradient (LRP-0, the shift absorbing its share)",
    "gradient": "its ordinary gradient, which in the g = R / a convention is the LRP rule "
                "(ReLU, max-pool, identity, concatenation; for other activations and gates "
                "an approximation, as in zennit's default)",
}
# How the explorer explains one neuron of the operator (web.neuron); None: by value only.
VIEWS = ("conv", "linear", "norm", "max_pool", "avg_pool", "adaptive_max_pool",
         "adaptive_avg_pool", "activation", "flatten", "identity")


@dataclass(frozen=True)
class Unsupported:
    """A fact that says no, with the reason (one sentence, shown to the user)."""

    reason: str


# -- the spatial maps a ``field`` rule returns (read by the receptive-field tracer) -------
class Window(NamedTuple):
    """A convolution or pooling window per spatial axis (padding may be fractional)."""

    kernel: tuple[float, ...]
    stride: tuple[float, ...]
    padding: tuple[float, ...]
    dilation: tuple[float, ...]


class Transposed(NamedTuple):
    """A transposed convolution per spatial axis."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]


class Resample(NamedTuple):
    """Resampling: ``taps`` input pixels feed one output; output pixel 0 is centred on
    input coordinate ``offset`` per axis."""

    taps: int
    offset: tuple[float, ...]


class Shift(NamedTuple):
    """Padding (or a crop: negative) by ``before`` pixels at the start of each axis."""

    before: tuple[int, ...]


GLOBAL = "global"  # a ``field`` fact: the output sees the whole input (a linear layer)
KEEP = "keep"  # a ``binary`` fact: left as it is (no weights, or real-valued by design)

MacsRule = Callable[[tuple, dict, torch.Tensor], int]
FieldRule = Callable[[tuple, dict, tuple[int, ...], tuple[int, ...]], Any]
Conversion = Callable[..., nn.Module]


@dataclass(frozen=True)
class OpFacts:
    """Everything cnnkit knows of one operator.

    Attributes:
        name: the operator's name (unique).
        modules: module types that are this operator (a subclass inherits the facts of its
            nearest registered base unless registered itself).
        functions: torch function / method names that are this operator.
        dims: the number of spatial dims it acts on (``Conv3d``: 3); None: any.
        macs: ``(args, kwargs, output) -> multiply-accumulates`` of one functional call;
            None: 0.
        field: ``(args, kwargs, extent_in, extent_out) ->`` a :class:`Window`,
            :class:`Transposed`, :class:`Resample`, :class:`Shift` or None, for an input
            that keeps its spatial layout (rules: :mod:`cnnkit.layers.op_rules`);
            :data:`GLOBAL`: every output sees the whole input (a linear layer); None: the
            output pixel sees the union of its inputs' pixels (element-wise operators).
        channels: a key of :data:`CHANNELS`, or ``(args, kwargs) ->`` one (a coupling that
            depends on the call: ``x + 1`` is not a merge).
        lrp: a key of :data:`LRP_SLOTS`; None: LRP has no rule for it and refuses.
        view: one of :data:`VIEWS`; None: the explorer shows its values only.
        lowrank: the factorisations its layers admit (``"svd"``, ``"tucker"``, ``"cp"``);
            ``()``: nothing to factorise; :class:`Unsupported`: refused.
        binary: ``(module, mode, input_scale) -> module``, its binary counterpart
            (Rastegari et al. 2016, "XNOR-Net"); :data:`KEEP`: left as it is (no weights,
            or real-valued by design, as the paper's linear layers); :class:`Unsupported`:
            refused.
        int8: whether the int8 engines run it (True), an :class:`Unsupported`, or
            ``(args, kwargs, backend) ->`` one of those.
    """

    name: str
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[str, ...] = ()
    dims: int | None = None
    macs: MacsRule | None = None
    field: FieldRule | str | None = None
    channels: str | Callable[[tuple, dict], str] = "opaque"
    lrp: str | None = None
    view: str | None = None
    lowrank: tuple[str, ...] | Unsupported = ()
    binary: Conversion | Unsupported | str = KEEP
    int8: bool | Unsupported | Callable[[tuple, dict, str], bool | Unsupported] = True

    def __post_init__(self) -> None:
        if not self.modules and not self.functions:
            raise ValueError(f"operator {self.name!r} names no module type and no function; "
                             "give modules=(...) or functions=(...)")
        if isinstance(self.channels, str) and self.channels not in CHANNELS:
            raise ValueError(f"operator {self.name!r}: unknown channels {self.channels!r}; "
                             f"choose from {', '.join(CHANNELS)}")
        if self.lrp is not None and self.lrp not in LRP_SLOTS:
            raise ValueError(f"operator {self.name!r}: unknown lrp slot {self.lrp!r}; "
                             f"choose from {', '.join(LRP_SLOTS)} or None")
        if self.view is not None and self.view not in VIEWS:
            raise ValueError(f"operator {self.name!r}: unknown view {self.view!r}; "
                             f"choose from {', '.join(VIEWS)} or None")


class UnknownOperator(ValueError):
    """An operator the registry does not know; the message is one line."""


_OPS: dict[str, OpFacts] = {}
_BY_MODULE: dict[type, OpFacts] = {}
_BY_FUNCTION: dict[str, OpFacts] = {}


def register_op(facts: OpFacts) -> OpFacts:
    """Register ``facts``; every consumer sees the operator from now on.

    Raises:
        ValueError: the name, a module type or a function name is registered already.
    """
    taken = ([f"name {facts.name!r}"] if facts.name in _OPS else []) + [
        f"module {m.__name__}" for m in facts.modules if m in _BY_MODULE] + [
        f"function {f!r}" for f in facts.functions if f in _BY_FUNCTION]
    if taken:
        raise ValueError(f"operator {facts.name!r}: {', '.join(taken)} registered already; "
                         "an operator is registered once")
    _OPS[facts.name] = facts
    _BY_MODULE.update(dict.fromkeys(facts.modules, facts))
    _BY_FUNCTION.update(dict.fromkeys(facts.functions, facts))
    return facts


def registered_ops() -> dict[str, OpFacts]:
    """Every registered operator by name (a copy)."""
    return dict(_OPS)


def find_module(module: nn.Module | type) -> OpFacts | None:
    """The facts of ``module``'s type or of its nearest registered base; None if none."""
    cls = module if isinstance(module, type) else type(module)
    return next((_BY_MODULE[c] for c in cls.__mro__ if c in _BY_MODULE), None)


def find_function(name: str) -> OpFacts | None:
    """The facts of the torch function or method ``name``; None if unknown."""
    return _BY_FUNCTION.get(name)


def _unknown(what: str, consumer: str) -> UnknownOperator:
    return UnknownOperator(
        f"{consumer} does not know the operator {what}; register it once with "
        "cnnkit.layers.ops.register_op(OpFacts(...)) so that every consumer sees it")


def module_facts(module: nn.Module | type, consumer: str = "cnnkit") -> OpFacts:
    """The facts of a module; :class:`UnknownOperator` (one line) if it is not registered."""
    facts = find_module(module)
    if facts is None:
        cls = module if isinstance(module, type) else type(module)
        raise _unknown(f"{cls.__module__}.{cls.__qualname__} (a module)", consumer)
    return facts


def function_facts(name: str, consumer: str = "cnnkit") -> OpFacts:
    """The facts of a torch function; :class:`UnknownOperator` (one line) if unknown."""
    facts = _BY_FUNCTION.get(name)
    if facts is None:
        raise _unknown(f"{name!r} (a torch function)", consumer)
    return facts


def operator_modules(model: nn.Module, consumer: str = "cnnkit",
                     functional_leaves: bool = False,
                     ) -> list[tuple[str, nn.Module, OpFacts]]:
    """The modules of ``model`` that are operators, in module order, with their facts.

    A registered module is an operator and its children are not visited (a quantised
    linear layer holds its packed weights in a child); a module with children that is
    not registered is a container (``Sequential``, a residual block) and is visited; a
    leaf module that is not registered refuses (:class:`UnknownOperator`). With
    ``functional_leaves``, an unregistered leaf without parameters (``a + b`` wrapped in
    a module) is passed over instead, for consumers that see the torch functions it
    calls (pruning's trace, LRP's gradient); one with parameters still refuses.
    """
    found: list[tuple[str, nn.Module, OpFacts]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        facts = find_module(module)
        children = list(module.named_children())
        if facts is not None:
            found.append((prefix, module, facts))
        elif not children:
            if functional_leaves and next(module.parameters(), None) is None:
                return
            where = f" at {prefix!r}" if prefix else ""
            raise _unknown(f"{type(module).__module__}.{type(module).__qualname__} "
                           f"(a module{where})", consumer)
        else:
            for name, child in children:
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


def resolve(fact: Any, args: tuple, kwargs: dict) -> Any:
    """A fact that depends on the call (a callable) evaluated on it; others as they are."""
    return fact(args, kwargs) if callable(fact) else fact


# -- reading a functional call's arguments -----------------------------------------------
def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tuple / list / dict, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors(item)


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a functional call, passed by position ``index`` or by keyword."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def ntuple(value: Any, n: int) -> tuple:
    """``value`` as an ``n``-tuple (an int repeated; a one-entry sequence too)."""
    if isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    return value if len(value) == n else (value[0],) * n
