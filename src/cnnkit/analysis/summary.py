"""Per-layer summary of a model: output shapes, parameters, MACs, memory and receptive fields.

One forward pass on zeros, in eval mode and without gradients, with hooks on every leaf
module (one row per call, in call order) and a :class:`~cnnkit.analysis.tracer.ForwardTracer`
following every tensor between them, so receptive fields are right for branched networks
too. Counting conventions:

* **MACs** (multiply-accumulates): convolutions cost ``output elements x C_in / groups x
  prod(kernel)`` (transposed ones the same per *input* element), linear layers
  ``rows x in x out``, and normalisation layers one per output element (at inference a
  BatchNorm is the affine map ``x * scale + shift``); activations, pooling and additions
  are not multiply-accumulates and count 0. ResNet-18 at 3x224x224 has 1,814,073,344
  convolution and linear MACs (torchvision's table prints "1.81 GFLOPS", leaving the norms
  out) plus 2,483,712 BatchNorm MACs: 1,816,557,056, "1.82 G" as ptflops also reports.
* **Parameters** of a module are counted in the row of its first call only, so a reused
  module (or a parameter shared by two modules) is counted once.
* **Activation memory** of a row is the bytes of the module's output tensor(s); the peak
  is the most memory held at once by the tensors the pass produced (input included),
  i.e. what an inference forward pass needs, not a training step.
* **Receptive field** and **jump** (the product of strides) of each output, in input
  pixels (Araujo, Norris and Sim 2019, "Computing Receptive Fields of Convolutional Neural
  Networks", Distill); see :mod:`cnnkit.analysis.receptive_field`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnkit.layers.ops import tensors
from cnnkit.models import create_model, model_info

from .receptive_field import ReceptiveField
from .tracer import ForwardTracer

__all__ = ["LayerSummary", "ModelSummary", "summary", "format_count", "format_bytes"]

Shape = tuple[int, ...] | tuple[tuple[int, ...], ...]
# A per-dim value shown as a single number when equal along every dim, else (h, w).
Extent = int | float | tuple[int | float, ...] | None


def format_count(n: float) -> str:
    """Human count with SI units: ``11689512 -> "11.69 M"``, ``1814073344 -> "1.81 G"``.

    Example:
        >>> from cnnkit.analysis import format_count
        >>> format_count(11_689_512), format_count(512), format_count(999_999)
        ('11.69 M', '512', '1.00 M')
    """
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if round(abs(n) / scale, 2) >= 1:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def format_bytes(n: float) -> str:
    """Human size in decimal units: ``3_211_264 -> "3.21 MB"``."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if round(abs(n) / scale, 2) >= 1:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _compact(values: Sequence[float]) -> int | float | tuple[int | float, ...]:
    vals = tuple(int(v) if float(v).is_integer() else round(float(v), 3) for v in values)
    return vals[0] if len(set(vals)) == 1 else vals


def _field_values(field: ReceptiveField | None) -> tuple[Extent, Extent]:
    if field is None:
        return None, None
    return _compact(field.size), _compact(field.jump)


@dataclass(frozen=True)
class LayerSummary:
    """One call of one leaf module.

    Attributes:
        name: qualified module name (``""`` when the model itself is a leaf).
        type: module class name.
        output_shape: shape of the output, or a tuple of shapes for several outputs.
        params: parameters counted in this row (0 after a module's first call).
        macs: multiply-accumulates of this call.
        activation_bytes: bytes of the output tensor(s).
        receptive_field: receptive-field size of the output in input pixels; an int when
            equal along every spatial dim, else an ``(h, w)`` tuple; None when the output
            does not depend on the input.
        jump: distance in input pixels between neighbouring output pixels, same format.
    """

    name: str
    type: str
    output_shape: Shape
    params: int
    macs: int
    activation_bytes: int
    receptive_field: Extent
    jump: Extent


@dataclass(frozen=True)
class ModelSummary:
    """Result of :func:`summary`: the rows and the model totals.

    Attributes:
        rows: one :class:`LayerSummary` per leaf-module call, in call order.
        input_size: per-sample input size ``(C, H, W)``.
        batch_size: batch size of the pass (MACs and activations scale with it).
        output_shape: shape of the model output.
        total_params: distinct parameters of the model (``sum(p.numel())``).
        trainable_params: of those, the ones with ``requires_grad``.
        param_bytes: bytes of the parameters.
        total_macs: multiply-accumulates of the pass (also convolutions and linear layers
            called functionally outside leaf modules).
        total_activation_bytes: sum of the rows' ``activation_bytes``.
        peak_activation_bytes: most bytes held at once by tensors of the pass.
        receptive_field: receptive field of the model output (a global output sees
            its whole input map; the size may exceed the image, counting padding).
        jump: jump of the model output.
    """

    rows: list[LayerSummary]
    input_size: tuple[int, ...]
    batch_size: int
    output_shape: Shape
    total_params: int
    trainable_params: int
    param_bytes: int
    total_macs: int
    total_activation_bytes: int
    peak_activation_bytes: int
    receptive_field: Extent
    jump: Extent

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of lists, ints, floats and strings (``json.dumps`` round-trips it)."""
        return _jsonable(dataclasses.asdict(self))

    def __str__(self) -> str:
        header = ("Layer", "Type", "Output shape", "Params", "MACs", "Activations", "RF", "Jump")
        table = [header] + [(r.name or "(model)", r.type, _fmt_shape(r.output_shape),
                             format_count(r.params) if r.params else "-",
                             format_count(r.macs) if r.macs else "-",
                             format_bytes(r.activation_bytes), _fmt(r.receptive_field),
                             _fmt(r.jump)) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        left = 3  # name, type and shape read left-aligned, the numbers right-aligned

        def line(row: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

        rule = "-" * len(line(["x" * w for w in widths]))
        totals = [
            f"Input: {_fmt_shape((self.batch_size, *self.input_size))}   "
            f"Output: {_fmt_shape(self.output_shape)}",
            f"Params: {format_count(self.total_params)} ({self.total_params:,}), trainable "
            f"{format_count(self.trainable_params)} ({self.trainable_params:,}), "
            f"{format_bytes(self.param_bytes)}",
            f"MACs: {format_count(self.total_macs)} ({self.total_macs:,}) "
            "(convolutions, linear layers, norms; activations, pools, additions: 0)",
            f"Activations: {format_bytes(self.total_activation_bytes)} in all layer outputs, "
            f"peak {format_bytes(self.peak_activation_bytes)} live",
            f"Output receptive field: {_fmt(self.receptive_field)}, jump {_fmt(self.jump)}",
        ]
        return "\n".join([rule, line(header), rule, *map(line, table[1:]), rule, *totals])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(v) for v in obj]
    return obj


def _fmt(value: Extent) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(str, value)) + ")"
    return str(value)


def _fmt_shape(shape: Shape) -> str:
    if shape and isinstance(shape[0], tuple):
        return ", ".join(_fmt_shape(s) for s in shape)
    return "[" + ", ".join(map(str, shape)) + "]"


def _shape_of(output: Any) -> Shape:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    return tuple(tuple(t.shape) for t in tensors(output))


def _check_input_size(input_size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(input_size) if isinstance(input_size, (tuple, list, torch.Size)) else ()
    if not (2 <= len(size) <= 4) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"input_size must be (C, H, W) (channels then 1 to 3 spatial sizes, "
                         f"positive ints, no batch dim), got {input_size!r}")
    return size


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    held = list(itertools.chain(model.parameters(), model.buffers()))
    device = held[0].device if held else torch.device("cpu")
    dtype = next((t.dtype for t in held if t.is_floating_point()), torch.float32)
    return device, dtype


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the pass (batch norm must not update its running statistics), then
    every module's own ``training`` flag back."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


@contextmanager
def _leaf_hooks(leaves: Sequence[tuple[str, nn.Module]], pre_hook: Any,
                post_hook: Any) -> Iterator[None]:
    """Hooks on every leaf module, removed on exit even when the forward pass raises."""
    handles = []
    try:
        for name, module in leaves:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(functools.partial(post_hook, name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def summary(model: nn.Module | str, input_size: Sequence[int], batch_size: int = 1,
            device: torch.device | str | None = None) -> ModelSummary:
    """Per-layer analysis of ``model`` from one forward pass on zeros.

    Args:
        model: any module taking one ``[B, C, *spatial]`` tensor. It is not modified:
            hooks are removed and training flags restored afterwards; if ``device``
            differs from the model's, a copy is moved there. Or a registered model's name
            (``"resnet18"``): the model built for ``input_size``, as ``cnnkit summary``
            does.
        input_size: per-sample size ``(C, H, W)`` (``(C, L)`` and ``(C, D, H, W)`` work too).
        batch_size: batch of the pass.
        device: where to run; the model's device when None.

    Returns:
        A :class:`ModelSummary`; ``print`` it for the table.

    Raises:
        ValueError: malformed ``input_size`` or ``batch_size``, or an unknown model name
            (the message lists the nearest).

    Example:
        >>> from torch import nn
        >>> from cnnkit.analysis import summary
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        >>> s = summary(net, (3, 32, 32))
        >>> s.total_params, s.total_macs, s.rows[2].receptive_field, s.rows[2].jump
        (224, 221184, 4, 2)
        >>> print(s)
        -------------------------------------------------------------------------
        Layer  Type       Output shape    Params      MACs  Activations  RF  Jump
        -------------------------------------------------------------------------
        0      Conv2d     [1, 8, 32, 32]     224  221.18 K     32.77 KB   3     1
        1      ReLU       [1, 8, 32, 32]       -         -     32.77 KB   3     1
        2      MaxPool2d  [1, 8, 16, 16]       -         -      8.19 KB   4     2
        -------------------------------------------------------------------------
        Input: [1, 3, 32, 32]   Output: [1, 8, 16, 16]
        Params: 224 (224), trainable 224 (224), 896 B
        MACs: 221.18 K (221,184) (convolutions, linear layers, norms; activations, pools,
        additions: 0)
        Activations: 73.73 KB in all layer outputs, peak 77.82 KB live
        Output receptive field: 4, jump 2
    """
    size = _check_input_size(input_size)
    if isinstance(model, str):
        model_info(model)  # an unknown name: one line with the nearest names
        model = create_model(model, input_size=size)
    elif not isinstance(model, nn.Module):
        raise ValueError(f"summary takes a torch.nn.Module or a model name (see `cnnkit "
                         f"models`), got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model_device, dtype = _device_and_dtype(model)
    target = torch.device(device) if device is not None else model_device
    if target.type != model_device.type or (target.index is not None
                                            and target.index != model_device.index):
        model = copy.deepcopy(model).to(target)  # never move the caller's model

    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    tracer = ForwardTracer(spatial_dims=len(size) - 1)
    rows: list[LayerSummary] = []
    counted: set[int] = set()  # ids of parameters already counted in a row
    macs_before: list[int] = []  # a stack, in case a leaf calls another module

    def pre_hook(module: nn.Module, args: Any) -> None:
        macs_before.append(tracer.macs)

    def post_hook(name: str, module: nn.Module, args: Any, output: Any) -> None:
        new = [p for p in module.parameters() if id(p) not in counted]
        counted.update(id(p) for p in new)
        outs = list(tensors(output))
        field = tracer.field(outs[0]) if outs else None
        rows.append(LayerSummary(
            name, type(module).__name__, _shape_of(output), sum(p.numel() for p in new),
            tracer.macs - macs_before.pop(), sum(t.numel() * t.element_size() for t in outs),
            *_field_values(field)))

    x = torch.zeros(batch_size, *size, device=target, dtype=dtype)
    with _leaf_hooks(leaves, pre_hook, post_hook), _eval_mode(model), torch.no_grad():
        tracer.watch_input(x)
        try:
            with tracer:
                out = model(x)
            outs = list(tensors(out))
            out_field = tracer.field(outs[0]) if outs else None
        finally:
            tracer.close()

    params = list(model.parameters())
    return ModelSummary(
        rows=rows, input_size=size, batch_size=batch_size, output_shape=_shape_of(out),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        total_macs=tracer.macs,
        total_activation_bytes=sum(r.activation_bytes for r in rows),
        peak_activation_bytes=tracer.peak_bytes,
        receptive_field=_field_values(out_field)[0], jump=_field_values(out_field)[1])
