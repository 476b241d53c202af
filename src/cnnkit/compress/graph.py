"""Channel dependency analysis: which channels of which layers must be pruned together.

Removing output channel ``c`` of a convolution is only valid if every layer that sees that
channel drops it too: the BatchNorm after it, the next convolution's input channel ``c``,
a depthwise convolution (whose input and output channel are one), every operand of a
residual addition (``a + b`` pairs channel ``c`` of ``a`` with channel ``c`` of ``b``), the
slice ``[offset + c]`` of a concatenation's consumer, and the ``h * w`` features that
channel becomes after a flatten into a linear layer. Such a set of coupled channels is a
:class:`Group` (the "dependency graph" of Fang, Ma, Song, Mi, Wang 2023, "DepGraph:
Towards any structural pruning").

The analysis is read-only: one forward pass in eval mode under a
:class:`~torch.overrides.TorchFunctionMode` gives every tensor a channel *layout* (which
source groups its dim 1 is made of, in order) and records, for each convolution /
transposed convolution / norm / linear call, which group segment sits at which offset of
its channels. How each call couples channels is its operator's ``channels`` fact in the
operator registry (:mod:`cnnkit.layers.ops`, :data:`~cnnkit.layers.ops.CHANNELS`), and
layers are recognised by their weight tensors, so no per-architecture code is needed and
the analysis is the same in 1, 2 or 3 spatial dims. An ``"opaque"`` coupling (attention
gates, channel slicing, group norms), a grouped convolution or a norm without its layer
makes the groups it touches unprunable instead of producing a wrong plan; the model's
outputs are never pruned. A module or a function the registry does not know refuses
(:class:`~cnnkit.layers.ops.UnknownOperator`, one line): it is never skipped silently.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from cnnkit.layers.ops import arg, function_facts, operator_modules, resolve, tensors
from cnnkit.models._surgery import Member

__all__ = ["Group", "Member", "dependency_groups"]

_CONSUMER = "structured pruning"
# The couplings of layers that own channels (their weights name them in the trace).
_LAYERS = ("conv", "conv_transpose", "linear", "norm")


@dataclass(frozen=True)
class Group:
    """Channels that must be pruned together: ``channels`` indices shared by all members."""

    channels: int
    members: tuple[Member, ...]
    prunable: bool


@dataclass(frozen=True)
class _Layout:
    """A tensor's dim 1 as a sequence of whole source nodes, each channel ``span`` wide."""

    nodes: tuple[int, ...]
    span: int = 1


class _ChannelTracer(TorchFunctionMode):
    """Propagates channel layouts through one forward pass and records group members."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.owner: dict[int, tuple[str, str]] = {}  # id(weight) -> (layer, coupling)
        for name, module, facts in operator_modules(model, _CONSUMER, functional_leaves=True):
            if facts.channels in _LAYERS:
                for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                    self.owner[id(t)] = (name, facts.channels)
        self.layouts = WeakIdKeyDictionary()
        self.length: list[int] = []
        self.parent: list[int] = []
        self.blocked: set[int] = set()
        self.members: dict[int, list[Member]] = defaultdict(list)
        self.out_nodes: dict[str, int] = {}

    # -- union-find over source nodes -------------------------------------------------
    def new_node(self, length: int) -> int:
        self.length.append(length)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, n: int) -> int:
        while self.parent[n] != n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
            if max(a, b) in self.blocked:
                self.blocked.add(min(a, b))

    def block(self, layout: _Layout | None) -> None:
        for n in layout.nodes if layout else ():
            self.blocked.add(self.find(n))

    def add_members(self, layout: _Layout, name: str, kind: str, span: int = 1) -> None:
        offset = 0
        for n in layout.nodes:
            self.members[n].append(Member(name, kind, offset * span, span))
            offset += self.length[n]

    # -- the mode ---------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = next(tensors(out), None)
        if first is None:  # sizes, shapes, dims: nothing flows
            return out
        every = list(tensors((args, kwargs)))
        ins = [t for t in every if t in self.layouts]
        if not ins and not any(id(t) in self.owner for t in every):
            return out  # constants, or the input before the first layer: no channels yet
        facts = function_facts(getattr(func, "__name__", repr(func)), _CONSUMER)
        coupling = resolve(facts.channels, args, kwargs)
        if coupling == "conv":
            self._conv(args, kwargs, first)
        elif coupling == "conv_transpose":
            self._conv_transpose(args, kwargs, first)
        elif coupling == "norm":
            self._norm(args, kwargs, first)
        elif coupling == "linear":
            self._linear(args, kwargs, first)
        elif not ins:
            pass
        elif coupling == "pass":
            for t in tensors(out):  # pooling indices too: max_unpool pairs them with x
                self._unary(args[0], t)
        elif coupling == "merge":
            self._add(args, first)
        elif coupling == "concat":
            self._cat(args, kwargs, first)
        elif coupling == "flatten":
            self._reshape(args[0], first)
        else:  # "opaque": keep its channels whole
            for t in ins:
                self.block(self.layouts[t])
        return out

    def _out_node(self, name: str, channels: int) -> int:
        if name not in self.out_nodes:
            self.out_nodes[name] = self.new_node(channels)
        return self.out_nodes[name]

    def _layer(self, weight: Any, coupling: str) -> str | None:
        owner = self.owner.get(id(weight))
        return owner[0] if owner and owner[1] == coupling else None

    def _conv(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x, weight = args[0], arg(args, kwargs, 1, "weight")
        groups = arg(args, kwargs, 6, "groups", 1)
        layout = self.layouts.get(x)
        name = self._layer(weight, "conv")
        if name is None or (layout is not None and layout.span != 1):
            self.block(layout)
            return
        if groups == 1:
            if layout is not None:
                self.add_members(layout, name, "in")
            node = self._out_node(name, weight.shape[0])
            self.members[node].append(Member(name, "out"))
            self.layouts[out] = _Layout((node,))
        elif groups == x.shape[1] == weight.shape[0] and layout is not None:
            self.add_members(layout, name, "dw")
            self.layouts[out] = layout
        else:  # grouped or channel-multiplying convolutions are not pruned
            self.block(layout)

    def _conv_transpose(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        """Weight ``[C_in, C_out / groups, *k]``: only ungrouped ones are pruned."""
        x, weight = args[0], arg(args, kwargs, 1, "weight")
        layout = self.layouts.get(x)
        name = self._layer(weight, "conv_transpose")
        if name is None or arg(args, kwargs, 6, "groups", 1) != 1 or (
                layout is not None and layout.span != 1):
            self.block(layout)
            return
        if layout is not None:
            self.add_members(layout, name, "in")
        node = self._out_node(name, weight.shape[1])
        self.members[node].append(Member(name, "out"))
        self.layouts[out] = _Layout((node,))

    def _norm(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        """Per-channel statistics (batch_norm and instance_norm share the argument order)."""
        layout = self.layouts.get(args[0])
        stats = [arg(args, kwargs, i, key) for i, key in
                 ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
        if all(t is None for t in stats):  # no per-channel state: a zero channel stays zero
            self._unary(args[0], out)
            return
        name = next((n for t in stats if (n := self._layer(t, "norm")) is not None), None)
        if layout is None or name is None or layout.span != 1:
            self.block(layout)
            return
        self.add_members(layout, name, "bn")
        self.layouts[out] = layout

    def _linear(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x, weight = args[0], arg(args, kwargs, 1, "weight")
        layout = self.layouts.get(x)
        name = self._layer(weight, "linear")
        if name is None or x.dim() != 2:
            self.block(layout)
            return
        if layout is not None:
            self.add_members(layout, name, "in", layout.span)
        node = self._out_node(name, weight.shape[0])
        self.members[node].append(Member(name, "out"))
        self.layouts[out] = _Layout((node,))

    def _unary(self, x: Any, out: torch.Tensor) -> None:
        layout = self.layouts.get(x) if isinstance(x, torch.Tensor) else None
        if layout is None:
            return
        if out.dim() == x.dim() and out.shape[1] == x.shape[1]:
            self.layouts[out] = layout
        else:
            self.block(layout)

    def _merge(self, layouts: Sequence[_Layout | None], out: torch.Tensor) -> None:
        """Operands whose channels meet element-wise: pair their segments or give up."""
        first = layouts[0]
        same = all(
            lay is not None and lay.span == first.span
            and [self.length[n] for n in lay.nodes] == [self.length[n] for n in first.nodes]
            for lay in layouts
        ) if first is not None else False
        if not same:
            for lay in layouts:
                self.block(lay)
            return
        for lay in layouts[1:]:
            for a, b in zip(first.nodes, lay.nodes, strict=True):
                self.union(a, b)
        self.layouts[out] = first

    def _add(self, args: tuple, out: torch.Tensor) -> None:
        operands = args[:2]
        if not all(isinstance(t, torch.Tensor) for t in operands):
            # x + scalar shifts a zeroed channel away from zero
            for t in tensors(operands):
                self.block(self.layouts.get(t))
            return
        if any(t.dim() < 2 or t.shape[1] != out.shape[1] for t in operands):
            for t in operands:
                self.block(self.layouts.get(t))
            return
        self._merge([self.layouts.get(t) for t in operands], out)

    def _cat(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        parts = list(arg(args, kwargs, 0, "tensors"))
        dim = arg(args, kwargs, 1, "dim", 0)
        dim = dim + out.dim() if dim < 0 else dim
        layouts = [self.layouts.get(t) for t in parts]
        if dim != 1:
            self._merge(layouts, out)
        elif all(lay is not None and lay.span == 1 for lay in layouts):
            self.layouts[out] = _Layout(tuple(n for lay in layouts for n in lay.nodes))
        else:
            for lay in layouts:
                self.block(lay)

    def _reshape(self, x: Any, out: torch.Tensor) -> None:
        layout = self.layouts.get(x) if isinstance(x, torch.Tensor) else None
        if layout is None:
            return
        if out.shape == x.shape:
            self.layouts[out] = layout
        elif (x.dim() > 2 and out.dim() == 2 and out.shape[0] == x.shape[0]
              and layout.span == 1):  # flatten(x, 1): channel c -> features c*hw + [0, hw)
            self.layouts[out] = _Layout(layout.nodes, math.prod(x.shape[2:]))
        else:
            self.block(layout)

    # -- result -----------------------------------------------------------------------
    def groups(self) -> list[Group]:
        by_root: dict[int, list[Member]] = defaultdict(list)
        for node, members in sorted(self.members.items()):
            by_root[self.find(node)].extend(members)
        blocked = {self.find(n) for n in self.blocked}
        # A layer dimension claimed by two groups at overlapping indices (a layer called
        # twice on different inputs) cannot follow both plans: keep both whole.
        claims: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
        for root, members in by_root.items():
            for m in members:
                dim = "in" if m.kind == "in" else "out"
                span = (m.offset, m.offset + self.length[root] * m.span)
                claims[(m.name, dim)].append((root, *span))
        for spans in claims.values():
            for i, (ra, a0, a1) in enumerate(spans):
                for rb, b0, b1 in spans[i + 1:]:
                    if ra != rb and a0 < b1 and b0 < a1:
                        blocked |= {ra, rb}
        result = []
        for root, members in by_root.items():
            unique = tuple(dict.fromkeys(members))
            has_out = any(m.kind == "out" for m in unique)
            result.append(Group(self.length[root], unique, has_out and root not in blocked))
        return result


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, every module's own train/eval flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def dependency_groups(model: nn.Module,
                      example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[Group]:
    """Groups of coupled channels of ``model``, found by tracing one forward pass.

    Args:
        model: the network; left untouched (traced in eval mode without gradients, its
            training flag restored).
        example_inputs: one input tensor or a tuple of positional inputs.

    Returns:
        Every group in order of first appearance; ``prunable`` is False for groups that
        reach the model output or an operation the analysis does not model.

    Raises:
        UnknownOperator: a module or a function the operator registry does not know.

    Example:
        >>> import torch
        >>> from cnnkit.compress import dependency_groups
        >>> from cnnkit.models import create_model
        >>> m = create_model("tinyvgg", img_size=32)
        >>> [g.channels for g in dependency_groups(m, torch.randn(1, 3, 32, 32))]
        [10, 10, 10, 10, 10]
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    tracer = _ChannelTracer(model)
    with evaluating(model), torch.no_grad(), tracer:
        out = model(*inputs)
    for t in tensors(out):  # the model's outputs (logits) are never pruned
        tracer.block(tracer.layouts.get(t))
    return tracer.groups()
