"""Structural surgery on a model: channels removed from its layers, and replayed.

A pruning history (:func:`cnnkit.compress.prune.prune` records it) is a JSON-safe list of
steps; each entry names a group's members (layer, which dimension, offset, span) and the
channels kept. :func:`apply_history` replays it on a fresh copy of the unpruned
architecture: every member layer is rebuilt smaller (:func:`shrink`) with the kept
slices of its weights. This is how a pruned run is rebuilt from ``create_model(name)`` +
history, never from a pickle, so it lives with the models, below everything that loads
runs; the pruning itself (dependency analysis, criteria) is the compress package's.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from cnnkit.layers.ops import module_facts

__all__ = ["Member", "apply_history", "apply_step", "shrink", "refresh_metadata",
           "default_inputs"]


@dataclass(frozen=True)
class Member:
    """One layer's share of a group: channels ``offset + c * span + [0, span)``, c < channels.

    ``kind`` is ``"out"`` (output channels of a conv / rows of a linear), ``"in"`` (input
    channels of a conv / input features of a linear), ``"bn"`` (a BatchNorm's channels) or
    ``"dw"`` (a depthwise conv, whose input and output channel are the same). ``span`` is
    1 except for a linear layer after a flatten, where one channel is ``h * w`` features.
    """

    name: str
    kind: str
    offset: int = 0
    span: int = 1

    def indices(self, channels: torch.Tensor) -> torch.Tensor:
        """Positions in this layer's dimension of the group's ``channels``."""
        return (self.offset + channels[:, None] * self.span
                + torch.arange(self.span)[None, :]).reshape(-1)


def apply_history(base_model: nn.Module, history: list[dict]) -> nn.Module:
    """Replay a ``pruning_history`` on a fresh copy of the unpruned architecture.

    Example:
        >>> from cnnkit.compress import apply_history, prune
        >>> from cnnkit.models import create_model
        >>> small = prune(create_model("tinyvgg", img_size=32), 0.5)
        >>> again = apply_history(create_model("tinyvgg", img_size=32), small.pruning_history)
        >>> again.features.conv_1_1.out_channels, again.fc.in_features, small.fc.in_features
        (5, 320, 320)
        >>> again.state_dict().keys() == small.state_dict().keys()  # load the weights into it
        True
    """
    model = copy.deepcopy(base_model)
    for step in sorted({h["step"] for h in history}):
        apply_step(model, [h for h in history if h["step"] == step])
    model.pruning_history = list(history)
    refresh_metadata(model, default_inputs(model))
    return model


def default_inputs(model: nn.Module) -> torch.Tensor | None:
    cfg = getattr(model, "default_cfg", None)
    if not isinstance(cfg, dict) or "input_size" not in cfg:
        return None
    return torch.randn(1, *cfg["input_size"])


def refresh_metadata(model: nn.Module, inputs: Any) -> None:
    """Keep the Classifier contract true after surgery: ``feature_info`` channel counts
    (measured by one forward with hooks) and ``num_features`` / ``flat_features``."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        for attr in ("num_features", "flat_features"):
            if isinstance(getattr(model, attr, None), int):
                setattr(model, attr, head.in_features)
    info = getattr(model, "feature_info", None)
    if not info or inputs is None:
        return
    modules, chans = dict(model.named_modules()), {}

    def record(key: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
            chans[key] = out.shape[1]  # returns None: the output itself is left alone
        return hook

    handles = [modules[f["module"]].register_forward_hook(record(f["module"]))
               for f in info if f.get("module") in modules]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(*((inputs,) if isinstance(inputs, torch.Tensor) else inputs))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    for f in info:
        f["num_chs"] = chans.get(f.get("module"), f.get("num_chs"))


def apply_step(model: nn.Module, entries: list[dict]) -> None:
    """Surgery for one step: entries index the channels of the model as it is now."""
    modules = dict(model.named_modules())
    removed: dict[tuple[str, str], set[int]] = defaultdict(set)
    for entry in entries:
        dropped = torch.tensor(sorted(set(range(entry["channels"])) - set(entry["kept"])),
                               dtype=torch.long)
        for name, kind, offset, span in entry["members"]:
            if name not in modules:
                raise ValueError(f"pruning history names layer {name!r} that the model lacks; "
                                 "apply it to the architecture it was recorded on")
            dim = "in" if kind == "in" else "out"
            removed[(name, dim)].update(Member(name, kind, offset, span).indices(dropped)
                                        .tolist())
    for name in sorted({n for n, _ in removed}):
        old = modules[name]
        new = shrink(old, removed.get((name, "out"), set()), removed.get((name, "in"), set()))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, new)


def keep_indices(size: int, drop: set[int]) -> torch.Tensor:
    if any(i >= size for i in drop):
        raise ValueError(f"pruning history removes index {max(drop)} of a dimension of "
                         f"size {size}; it does not match this model")
    return torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long)


def shrink(old: nn.Module, drop_out: set[int], drop_in: set[int]) -> nn.Module:
    """A new module of ``old``'s type without the dropped output / input channels.

    How the layer's weights hold its channels is its operator's ``channels`` fact in the
    registry (:mod:`cnnkit.layers.ops`): ``"conv"`` (``[C_out, C_in / groups, *k]``, any
    dims), ``"conv_transpose"`` (``[C_in, C_out, *k]``), ``"linear"`` or ``"norm"``.
    """
    coupling = module_facts(old, "structured pruning").channels
    w = old.weight if getattr(old, "weight", None) is not None else None
    kw = dict(device=w.device if w is not None else None, dtype=w.dtype if w is not None else None)
    if coupling in ("conv", "conv_transpose") and not isinstance(old, _ConvNd):
        raise ValueError(f"cannot prune a {type(old).__name__}: its surgery rebuilds torch "
                         "convolutions (nn.ConvNd / nn.ConvTransposeNd) only")
    if coupling == "conv":
        keep_out = keep_indices(old.out_channels, drop_out)
        depthwise = old.groups > 1
        # Depthwise: channel c is input c and output c at once ("dw" members drop both).
        keep_in = keep_out if depthwise else keep_indices(old.in_channels, drop_in)
        new = type(old)(len(keep_in), len(keep_out), old.kernel_size, old.stride, old.padding,
                        old.dilation, len(keep_out) if depthwise else 1, old.bias is not None,
                        old.padding_mode, **kw)
        weight = old.weight.detach()[keep_out]
        new.weight.data.copy_(weight if depthwise else weight[:, keep_in])
    elif coupling == "conv_transpose":  # weight [C_in, C_out, *k]; only ungrouped ones
        keep_out = keep_indices(old.out_channels, drop_out)
        keep_in = keep_indices(old.in_channels, drop_in)
        new = type(old)(len(keep_in), len(keep_out), old.kernel_size, old.stride, old.padding,
                        old.output_padding, 1, old.bias is not None, old.dilation,
                        old.padding_mode, **kw)
        new.weight.data.copy_(old.weight.detach()[keep_in][:, keep_out])
    elif coupling == "linear":
        keep_out = keep_indices(old.out_features, drop_out)
        keep_in = keep_indices(old.in_features, drop_in)
        new = nn.Linear(len(keep_in), len(keep_out), old.bias is not None, **kw)
        new.weight.data.copy_(old.weight.detach()[keep_out][:, keep_in])
    elif coupling == "norm":
        keep_out = keep_indices(old.num_features, drop_out)
        new = type(old)(len(keep_out), old.eps, old.momentum, old.affine,
                        old.track_running_stats, **kw)
        for key in ("weight", "running_mean", "running_var"):
            if getattr(old, key, None) is not None:
                getattr(new, key).data.copy_(getattr(old, key).detach()[keep_out])
        if old.track_running_stats:
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    else:
        raise ValueError(f"cannot prune a {type(old).__name__}: its operator couples channels "
                         f"as {coupling!r}; structured pruning rebuilds convolutions, "
                         "transposed convolutions, linear layers and norms (any dims)")
    if getattr(old, "bias", None) is not None:
        new.bias.data.copy_(old.bias.detach()[keep_out])
    new.train(old.training)
    return new
