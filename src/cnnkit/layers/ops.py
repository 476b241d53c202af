"""What cnnkit knows of the operators a network calls: the shared vocabulary of every
consumer that follows a forward pass operator by operator (the summary's MACs and
receptive fields, the pruning dependency trace).

For now: helpers to read a functional call's arguments. The registry of operator facts
(issue 13, point 4) grows here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["tensors", "arg", "ntuple"]


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
    if isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    return value if len(value) == n else (value[0],) * n
