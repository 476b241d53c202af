"""The layers of any classifier, found generically, and their values for one input.

CNN Explainer (Wang et al. 2020, "CNN Explainer: Learning Convolutional Neural Networks
with Interactive Visualization", IEEE TVCG) draws one fixed Tiny VGG layer by layer.
Here the layers of any cnnkit classifier (float, pruned or int8) are found by one
forward pass with hooks on every module that is a layer: a module the operator registry
knows (:mod:`cnnkit.layers.ops`; quantised ones too), whose children are not visited and
whose ``view`` fact says how the explorer explains it (convolution, activation, pooling,
normalisation, linear, flatten, identity; kind ``"other"``: values only), or any other
leaf module without parameters (kind ``"other"``). A leaf with parameters the registry
does not know refuses in one line. A module called twice (ResNet's ReLU) gives one
layer per call.

Each layer also knows its *source*: the layer whose output is its input (``-1``: the
image), found by storage identity during the pass, so in-place operations and views
(a flatten) are followed; ``None`` means the input was computed outside any module
(a residual sum, a functional quantisation) and only the recorded input is exact.
Inputs are cloned by a pre-hook (before an in-place ReLU overwrites them) and outputs
by the hook, all detached, and quantised tensors are stored dequantised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnkit.layers.ops import find_module, module_facts

__all__ = ["Layer", "Trace", "layer_kind", "layer_modules", "discover", "trace"]

_CONSUMER = "the explorer"
# The registry's views (cnnkit.layers.ops.VIEWS) as the kinds the web app explains.
_KIND_OF_VIEW = {"conv": "conv", "linear": "linear", "norm": "norm", "max_pool": "pool",
                 "avg_pool": "pool", "adaptive_max_pool": "pool", "adaptive_avg_pool": "pool",
                 "activation": "activation", "flatten": "flatten", "identity": "identity"}


def layer_kind(module: nn.Module) -> str:
    """``conv``, ``linear``, ``norm``, ``pool``, ``activation``, ``flatten``, ``identity``
    (Identity, Dropout: no-ops at inference) or ``other``, from the ``view`` fact of the
    module's operator; ``other`` for an operator without a view or an unregistered module."""
    facts = find_module(module)
    return _KIND_OF_VIEW.get(facts.view, "other") if facts is not None else "other"


def layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that are layers: registered operators (not descended into) and other
    leaves without parameters.

    A quantised Linear has a child (its packed parameters), so stopping at registered
    operators is what keeps it one layer.

    Raises:
        UnknownOperator: a leaf module with parameters that the registry does not know.
    """
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = list(module.named_children())
        if find_module(module) is not None or not children:
            if next(module.parameters(), None) is not None:
                module_facts(module, _CONSUMER)  # refuses a layer with weights it cannot read
            found.append((prefix, module))
            return
        for name, child in children:
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


@dataclass(frozen=True)
class Layer:
    """One call of one layer module, in call order.

    Attributes:
        index: position in call order (the column in the overview).
        name: the module's qualified name, with ``#k`` for its k-th reuse (k >= 2).
        module: the module's qualified name.
        type: the module's class name.
        kind: see :func:`layer_kind`.
        shape: per-sample output shape, ``(C, H, W)`` for maps or ``(N,)`` for vectors.
        input_shape: per-sample input shape.
        source: index of the layer whose output is this input (``-1``: the image;
            ``None``: computed outside modules).
    """

    index: int
    name: str
    module: str
    type: str
    kind: str
    shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    source: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "module": self.module,
                "type": self.type, "kind": self.kind, "shape": list(self.shape),
                "input_shape": list(self.input_shape), "source": self.source}


@dataclass
class Trace:
    """One input's pass: per layer call the input and output (float, detached, batch 1)."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None


def _float(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.dequantize() if t.is_quantized else t.clone()


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _storage_key(t: torch.Tensor) -> tuple[int, int, int]:
    # Same storage, offset and size: the same values, whatever the view's shape.
    ptr = t.data_ptr() if t.is_quantized else t.untyped_storage().data_ptr()
    return ptr, 0 if t.is_quantized else t.storage_offset(), t.numel()


@contextlib.contextmanager
def _hooks(modules: Sequence[tuple[str, nn.Module]], on_input: Any, on_output: Any,
           ) -> Iterator[None]:
    """Pre- and post-hooks on ``modules`` for the block; removed on exit, whatever happens."""
    handles = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: on_input(name, m, args)))
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: on_output(name, m, out)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the block; the modules' training flags restored."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def discover(model: nn.Module, input_size: Sequence[int]) -> list[Layer]:
    """The layers of ``model`` in call order, from one pass on zeros.

    Example:
        >>> from cnnkit.models import create_model
        >>> from cnnkit.web.layers import discover
        >>> layers = discover(create_model("tinyvgg", in_chans=1, img_size=8), (1, 8, 8))
        >>> [(la.name, la.kind, la.source) for la in layers][:2]
        [('features.conv_1_1', 'conv', -1), ('features.relu_1_1', 'activation', 0)]
    """
    modules = layer_modules(model)
    calls: dict[str, int] = {}
    layers: list[Layer] = []
    keep: list[torch.Tensor] = []  # held so no storage is freed and reused during the pass
    producers: dict[tuple[int, int, int], int] = {}
    pending: list[tuple[tuple[int, ...], int | None]] = []

    def on_input(name: str, module: nn.Module, args: Any) -> None:
        x = _first_tensor(args)
        if x is None:
            raise ValueError(f"layer {name!r} takes no tensor; cnnkit serve needs modules "
                             "that map tensors to tensors")
        keep.append(x)
        pending.append((tuple(x.shape[1:]), producers.get(_storage_key(x))))

    def on_output(name: str, module: nn.Module, out: Any) -> None:
        y = _first_tensor(out)
        in_shape, source = pending.pop()
        k = calls[name] = calls.get(name, 0) + 1
        layers.append(Layer(len(layers), name if k == 1 else f"{name}#{k}", name,
                            type(module).__name__, layer_kind(module),
                            tuple(y.shape[1:]), in_shape, source))
        keep.append(y)
        producers[_storage_key(y)] = len(layers) - 1

    x = torch.zeros(1, *input_size)
    producers[_storage_key(x)] = -1
    with _eval(model), _hooks(modules, on_input, on_output):
        model(x)
    return layers


def trace(model: nn.Module, layers: Sequence[Layer], x: torch.Tensor) -> Trace:
    """Every layer's input and output for one image ``x`` ``[1, C, H, W]`` (normalised).

    Example:
        >>> import torch
        >>> from cnnkit.models import create_model
        >>> from cnnkit.web.layers import discover, trace
        >>> model = create_model("tinyvgg", in_chans=1, img_size=8)
        >>> t = trace(model, discover(model, (1, 8, 8)), torch.rand(1, 1, 8, 8))
        >>> len(t.outputs), tuple(t.logits.shape)
        (11, (10,))
    """
    modules = {la.module for la in layers}
    result = Trace()

    def on_input(name: str, module: nn.Module, args: Any) -> None:
        result.inputs.append(_float(_first_tensor(args))[0])

    def on_output(name: str, module: nn.Module, out: Any) -> None:
        result.outputs.append(_float(_first_tensor(out))[0])

    named = [(n, m) for n, m in layer_modules(model) if n in modules]
    with _eval(model), _hooks(named, on_input, on_output):
        logits = model(x)
    if len(result.outputs) != len(layers):
        raise ValueError(f"the model ran {len(result.outputs)} layer calls for this input but "
                         f"{len(layers)} for zeros; cnnkit serve needs a fixed layer sequence")
    result.logits = _float(logits)[0]
    return result
