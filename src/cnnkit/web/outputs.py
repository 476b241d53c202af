"""What the explorer shows after a network's last layer, by the kind of the run's output.

A run's task says what its model's output is (:attr:`cnnkit.tasks.Task.output_kind`);
a :class:`Head` per kind turns the output into the page's last column and its
prediction panel:

==============  ====================================  =================================
output kind     last column (neuron view)             prediction panel
==============  ====================================  =================================
probabilities   the softmax (its arithmetic)          probability per class
values          none: the last layer is the output    the values
mask            the argmax mask (a position's scores) share of positions per class
image           none: the last layer is the output    none
==============  ====================================  =================================

A new kind of output is one :func:`register_head`; the explorer never asks which task
a run has.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from cnnkit.tasks.segment import palette

from .codec import pack
from .layers import Layer
from .neuron import argmax_neuron, softmax_neuron
from .views import LayerPlan, plan_layers, sent_values

__all__ = ["Head", "register_head", "create_head"]

_HEADS: dict[str, type[Head]] = {}


def register_head(cls: type[Head]) -> type[Head]:
    """Register a :class:`Head` for its ``kind`` of output.

    Raises:
        ValueError: a head of that kind is registered already.
    """
    if cls.kind in _HEADS:
        raise ValueError(f"an explorer head for {cls.kind!r} outputs is registered twice")
    _HEADS[cls.kind] = cls
    return cls


def create_head(kind: str, classes: list[str], output_shape: tuple[int, ...],
                options: dict[str, int]) -> Head:
    """The head for outputs of ``kind`` (a task's ``output_kind``).

    Raises:
        ValueError: no head for that kind (naming the registered ones).
    """
    if kind not in _HEADS:
        raise ValueError(f"cnnkit serve cannot show {kind!r} outputs; it shows "
                         f"{', '.join(sorted(_HEADS))}")
    return _HEADS[kind](classes, output_shape, options)


class Head:
    """The part of the page after the last layer, for one kind of output.

    Args:
        classes: the names of the model's outputs.
        output_shape: the model's output for one input.
        options: the explorer's ``max_channels``, ``max_side`` and ``max_values``.
    """

    kind: ClassVar[str]
    name: ClassVar[str | None] = None  # the column's name; None: no column of its own

    def __init__(self, classes: list[str], output_shape: tuple[int, ...],
                 options: dict[str, int]) -> None:
        self.classes, self.output_shape = classes, tuple(output_shape)
        self.plan = self._plan(options)

    def _plan(self, options: dict[str, int]) -> LayerPlan | None:
        return None

    def row(self, index: int, last: Layer | None) -> dict[str, Any] | None:
        """The head's row in the layer list (``index``: after the last layer)."""
        return None

    def info(self) -> dict[str, Any]:
        """What the page needs to draw the head, once per run."""
        return {}

    def predicted(self, logits: torch.Tensor) -> int | None:
        """The class the output names, if it names one (an explanation's default target)."""
        return None

    def explained(self, logits: torch.Tensor, target: int) -> dict[str, Any]:
        """What an explanation of output ``target`` explains, beyond its class: nothing
        by default."""
        return {}

    def answer(self, logits: torch.Tensor, k: int, input_depth: int) -> dict[str, Any]:
        """Its part of an activations answer: ``scores`` per class for the prediction
        panel (None: no panel), ``predicted`` (None: no single class), ``head`` (the
        column's values, None without a column)."""
        return {"scores": None, "score_kind": None, "predicted": None, "head": None}

    def neuron(self, logits: torch.Tensor, position: tuple[int, ...]) -> dict[str, Any]:
        raise ValueError(f"the {self.kind} output has no column of its own; pick a layer")


@register_head
class Probabilities(Head):
    """A classifier: the softmax of the logits, with its arithmetic."""

    kind, name = "probabilities", "softmax"

    def row(self, index: int, last: Layer | None) -> dict[str, Any]:
        n = len(self.classes)
        return {"index": index, "name": "softmax", "module": "", "type": "Softmax",
                "kind": "softmax", "shape": [n], "input_shape": [n],
                "source": last.index if last is not None and last.shape == (n,) else None,
                "channels": n, "stride": 1, "hidden": False, "depth": None, "facts": None,
                "source_shape": [n]}

    def predicted(self, logits: torch.Tensor) -> int | None:
        return int(logits.argmax())

    def answer(self, logits: torch.Tensor, k: int, input_depth: int) -> dict[str, Any]:
        probs = torch.softmax(logits, 0)
        return {"logits": logits.tolist(), "probabilities": probs.tolist(),
                "scores": probs.tolist(), "score_kind": "probability",
                "predicted": self.predicted(logits),
                "head": {"index": None, "min": 0.0, "max": 1.0, "data": pack(probs)}}

    def neuron(self, logits: torch.Tensor, position: tuple[int, ...]) -> dict[str, Any]:
        if len(position) != 1:
            raise ValueError("a softmax neuron is one class: give c only")
        return {**softmax_neuron(logits, position[0]), "class": self.classes[position[0]]}


@register_head
class Values(Head):
    """A regression: the last layer's outputs are the values."""

    kind = "values"

    def answer(self, logits: torch.Tensor, k: int, input_depth: int) -> dict[str, Any]:
        values = logits.reshape(-1).tolist()
        return {"logits": values, "scores": values, "score_kind": "value", "predicted": None,
                "head": None}


@register_head
class Mask(Head):
    """A segmentation: the class of each position (the argmax of its scores), drawn in the
    class colours over the input, and the share of positions per class."""

    kind, name = "mask", "mask"

    def _plan(self, options: dict[str, int]) -> LayerPlan:
        return plan_layers([(1, *self.output_shape[1:])], [False], 1, options["max_side"],
                           options["max_values"])[0]

    def row(self, index: int, last: Layer | None) -> dict[str, Any]:
        shape = [1, *self.output_shape[1:]]
        return {"index": index, "name": "mask", "module": "", "type": "argmax over classes",
                "kind": "mask", "shape": shape, "input_shape": list(self.output_shape),
                "source": last.index if last is not None and last.shape == self.output_shape
                else None, **self.plan.to_dict(), "facts": None,
                "source_shape": list(self.output_shape)}

    def info(self) -> dict[str, Any]:
        """The class colours: those of ``cnnkit predict``'s overlays."""
        flat = palette(len(self.classes))
        return {"palette": [flat[3 * i:3 * i + 3] for i in range(len(self.classes))]}

    def explained(self, logits: torch.Tensor, target: int) -> dict[str, Any]:
        """The region explained: the share of positions predicted as ``target`` (the
        explainers score a class over its region, :class:`cnnkit.tasks.segment.RegionScores`;
        an empty region means the whole input)."""
        mask = logits.argmax(0)
        return {"region": float((mask == target).double().mean())}

    def answer(self, logits: torch.Tensor, k: int, input_depth: int) -> dict[str, Any]:
        mask = logits.argmax(0)
        shares = torch.bincount(mask.reshape(-1), minlength=len(self.classes)).double() \
            / max(1, math.prod(mask.shape))
        sent, index = sent_values(mask[None].float(), self.plan, k, input_depth)
        return {"scores": shares.tolist(), "score_kind": "share", "predicted": None,
                "head": {"index": None, "min": 0.0, "max": float(len(self.classes) - 1),
                         "data": pack(sent), "slice": index}}

    def neuron(self, logits: torch.Tensor, position: tuple[int, ...]) -> dict[str, Any]:
        if len(position) != logits.ndim or position[0] != 0:
            raise ValueError(f"a mask position is c=0 and {logits.ndim - 1} coordinates "
                             f"inside {list(logits.shape[1:])}")
        view = argmax_neuron(logits, position[1:])
        return {**view, "class": self.classes[view["result"]]}


@register_head
class Image(Head):
    """Super-resolution: the last layer's output is the image; nothing to add."""

    kind = "image"
