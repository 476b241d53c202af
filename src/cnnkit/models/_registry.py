"""The model registry: one decorator to register a builder, one function to create a model.

Builders are small functions ``name(**kwargs) -> nn.Module`` registered with
:func:`register_model`. :func:`create_model` is the single entry point the rest of
cnnkit (trainer, CLI, explain, compress) uses, so a model registered here works
everywhere.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from cnnkit.layers.binary import binarize
from cnnkit.layers.lowrank import factorize_model

from ._pretrained import load_pretrained, read_state_dict

__all__ = ["ModelInfo", "register_model", "create_model", "list_models", "model_info",
           "suggest"]


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a registered model.

    Attributes:
        name: registry name.
        family: module the builder lives in (``"resnet"``, ``"vgg"`` ...).
        builder: the registered function.
        doc: first line of the builder's docstring.
        task: the key of the task the model serves in the task registry
            (:mod:`cnnkit.tasks`): ``"classify"`` (a class per sample), ``"segment"``
            (a class per pixel), ``"superres"`` (a larger image) ...
    """

    name: str
    family: str
    builder: Callable[..., nn.Module]
    doc: str
    task: str = "classify"


# Filled by the package's __init__, which imports every built-in module and which Python
# runs to its end before code outside the package can call this module's functions.
_MODELS: dict[str, ModelInfo] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, task: str = "classify"):
    """Register a model builder under its function name.

    Use it bare (``@register_model``) for classifiers, or with the key of the task it
    serves (``@register_model(task="segment")``); the task registry, one layer up, checks
    that every model's task exists (``tests/tasks``).

    Raises:
        ValueError: if a model of that name is already registered.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from cnnkit.models import create_model, list_models, register_model
        >>> @register_model
        ... def two_layer_mlp(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
        ...     "A two-layer perceptron for 8x8 inputs."
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 64, 32), nn.ReLU(),
        ...                          nn.Linear(32, num_classes))
        >>> list_models("two_layer_*")
        ['two_layer_mlp']
        >>> create_model("two_layer_mlp", num_classes=3)(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice ({fn.__module__} and "
                             f"{_MODELS[name].builder.__module__}); rename one of them")
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        _MODELS[name] = ModelInfo(name, fn.__module__.rsplit(".", 1)[-1], fn, doc, task)
        return fn

    return deco if fn is None else deco(fn)


def suggest(name: str, choices: list[str], n: int = 3) -> str:
    """Return ``"; did you mean: a, b?"`` for the closest names, or ``""``."""
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    return f"; did you mean: {', '.join(close)}?" if close else ""


def model_info(name: str) -> ModelInfo:
    """Metadata of a registered model; raises ValueError naming the nearest names."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}{suggest(name, list(_MODELS))} "
                         "(run `cnnkit models` to list them all)")
    return _MODELS[name]


def list_models(pattern: str | None = None, task: str | None = None) -> list[str]:
    """Names of registered models, sorted, optionally filtered by a shell-style pattern and task.

    Example:
        >>> from cnnkit.models import list_models
        >>> list_models("resnet*")
        ['resnet101', 'resnet152', 'resnet18', 'resnet34', 'resnet50']
        >>> list_models("fcn*", task="segment")
        ['fcn16s', 'fcn32s', 'fcn8s']
    """
    names = sorted(_MODELS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if task is not None:
        names = [n for n in names if _MODELS[n].task == task]
    return names


def create_model(name: str, num_classes: int | None = None, in_chans: int | None = None,
                 conv: str = "standard", conv_rank: float = 0.25, binary: str | None = None,
                 weights: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Create a registered model.

    Args:
        name: registry name, see :func:`list_models`.
        num_classes: classifier outputs; the builder's default (1000 for ImageNet
            architectures) when None.
        in_chans: input channels; the builder's default when None.
        conv: ``"standard"``, or ``"cp"`` / ``"tucker"`` for a network whose ``kxk``
            convolutions (all but the first) are low-rank factor sequences from the start
            (a-priori compression, Lebedev et al. 2015 / Kim et al. 2016; see
            :func:`cnnkit.layers.lowrank.factorize_model`).
        conv_rank: the factorised convolutions' rank as a fraction of their channels.
        binary: ``"bwn"`` (binary weights) or ``"xnor"`` (binary weights and inputs,
            Rastegari et al. 2016) for a network whose convolutions, all but the first and
            the classifier, are binary from the start; see
            :func:`cnnkit.layers.binary.binarize`.
        weights: a torchvision ``.pth`` state dict or a ``.safetensors`` file to start from
            (read without unpickling code; the classifier and the first convolution
            adapted to ``num_classes`` and ``in_chans``: :mod:`cnnkit.models._pretrained`).
        **kwargs: passed to the builder (``img_size``, ``stem``, ``attn``, widths ...).

    Raises:
        ValueError: unknown name (with the nearest names) or an option the model lacks.

    Example:
        >>> import torch
        >>> from cnnkit.models import create_model
        >>> m = create_model("resnet18", num_classes=10, in_chans=1, img_size=32)
        >>> m(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    info = model_info(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    params = inspect.signature(info.builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"model {name!r} has no option {', '.join(unknown)}; "
                             f"its options: {', '.join(params)}")
    if conv not in ("standard", "cp", "tucker"):
        raise ValueError(f"unknown conv {conv!r}; choose 'standard', 'cp' or 'tucker'")
    if binary not in (None, "bwn", "xnor"):
        raise ValueError(f"unknown binary {binary!r}; choose 'bwn' or 'xnor'")
    model = info.builder(**kwargs)
    if weights is not None:
        load_pretrained(model, read_state_dict(weights), str(weights))
    # Compressed layer types from the start (a-priori compression): layers of cnnkit.layers.
    if conv != "standard":
        model = factorize_model(model, kind=conv, rank_ratio=conv_rank, inplace=True)
    if binary is not None:
        model = binarize(model, mode=binary)
    model.model_name = name
    return model
