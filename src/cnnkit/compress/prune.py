"""Structured filter pruning: remove whole channels and return a smaller *dense* model.

Layers as in Torch-Pruning: :func:`~cnnkit.compress.graph.dependency_groups` (read-only
analysis) says which channels are coupled; a criterion (:mod:`cnnkit.compress.importance`)
scores each group's channels; the lowest-scoring ones are removed from every member of
their group by building new, smaller ``nn.Conv*d`` / ``nn.BatchNorm*d`` / ``nn.Linear``
modules (per-layer surgery). The plan is kept as a JSON-safe ``pruning_history`` so a
pruned model is rebuilt from ``create_model(name, **kwargs)`` + :func:`apply_history`,
never from a pickle.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .graph import Group, Member, dependency_groups
from .importance import Criterion, criteria, get_criterion, register_criterion

__all__ = ["Criterion", "apply_history", "criteria", "get_criterion", "prune",
           "register_criterion"]

def _keep_count(channels: int, ratio: float, round_to: int) -> int:
    keep = channels - int(ratio * channels)
    keep = math.ceil(keep / round_to) * round_to
    return max(1, min(channels, keep))


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, ascending; ties keep the lower index."""
    order = torch.sort(-scores, stable=True).indices[:keep]
    return sorted(order.tolist())


def _global_keep(scores: list[torch.Tensor], n_keep: int, round_to: int) -> list[int]:
    """Per-group keep counts from one ranking of all mean-normalised scores.

    Dividing by the group's mean |score| makes groups of different sizes and member counts
    comparable; all but the ``n_keep`` highest channels overall are removed (as in
    :func:`_top`, ties keep the earlier channel).
    """
    normed = torch.cat([s / s.abs().mean().clamp_min(1e-12) for s in scores])
    dropped = torch.ones(normed.numel(), dtype=torch.bool)
    dropped[torch.sort(-normed, stable=True).indices[:n_keep]] = False
    counts = []
    for chunk in dropped.split([len(s) for s in scores]):
        keep = len(chunk) - int(chunk.sum())
        counts.append(max(1, min(len(chunk), math.ceil(keep / round_to) * round_to)))
    return counts


def prune(model: nn.Module, ratio: float, criterion: str = "l1",
          example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
          data: Any = None, global_ranking: bool = False, round_to: int = 1) -> nn.Module:
    """A new, smaller dense copy of ``model`` with ``ratio`` of its channels removed.

    Args:
        model: the network (left untouched).
        ratio: fraction of each prunable group's channels to remove, in [0, 1).
        criterion: a registered criterion name (see :func:`criteria`).
        example_inputs: inputs for the dependency trace; default a random batch of one
            at ``model.default_cfg["input_size"]``.
        data: for the data-driven criteria (``"taylor"``, ``"beta_rank"``) a tuple
            ``(images, labels)`` or a loader of such batches; the seed of ``"random"``.
        global_ranking: one threshold over all groups' mean-normalised scores instead of
            the same ratio per group; every group keeps at least one channel.
        round_to: kept channel counts are rounded up to a multiple of this.

    Returns:
        The pruned copy, with ``pruning_history`` (list of JSON-safe dicts) appended to
        any history ``model`` already carried.

    Example:
        >>> from cnnkit.models import create_model
        >>> small = prune(create_model("tinyvgg", img_size=32), 0.5)
        >>> small.features.conv_1_1.out_channels
        5
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to}")
    groups, scores, inputs = _scored_groups(model, criterion, example_inputs, data)
    if global_ranking:
        total = sum(g.channels for g in groups)
        counts = _global_keep(scores, total - int(ratio * total), round_to)
    else:
        counts = [_keep_count(g.channels, ratio, round_to) for g in groups]
    return _commit(model, _plan(groups, scores, counts), inputs)


def _scored_groups(model: nn.Module, criterion: str, example_inputs: Any, data: Any
                   ) -> tuple[list[Group], list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """The prunable groups, their criterion scores and the trace inputs (on the model's
    device; a random batch at ``default_cfg["input_size"]`` when None)."""
    score_fn = get_criterion(criterion)
    if example_inputs is None:
        example_inputs = _default_inputs(model)
        if example_inputs is None:
            raise ValueError("model has no default_cfg['input_size']: pass example_inputs")
    device = next(model.parameters()).device
    inputs = tuple(t.to(device) for t in ((example_inputs,) if isinstance(
        example_inputs, torch.Tensor) else example_inputs))
    groups = [g for g in dependency_groups(model, inputs) if g.prunable]
    scores = [score_fn(g, model, data).detach().float().cpu() for g in groups]
    for g, s in zip(groups, scores, strict=True):
        if s.shape != (g.channels,):
            raise ValueError(f"criterion {criterion!r} returned shape {tuple(s.shape)} "
                             f"for a group of {g.channels} channels; it must be 1-D")
    return groups, scores, inputs


def _plan(groups: list[Group], scores: list[torch.Tensor], counts: list[int]) -> list[dict]:
    """History entries (without their step) keeping the ``counts`` best of each group."""
    return [{"channels": g.channels, "kept": _top(s, keep),
             "members": [[m.name, m.kind, m.offset, m.span] for m in g.members]}
            for g, s, keep in zip(groups, scores, counts, strict=True) if keep < g.channels]


def _commit(model: nn.Module, plan: list[dict], inputs: Any) -> nn.Module:
    """A pruned copy of ``model`` with ``plan`` applied as its next history step."""
    history = list(getattr(model, "pruning_history", []))
    step = max((h["step"] for h in history), default=-1) + 1
    entries = [{"step": step, **entry} for entry in plan]
    pruned = copy.deepcopy(model)
    _apply(pruned, entries)
    pruned.pruning_history = history + entries
    device = next(pruned.parameters()).device  # the inputs may predate a move to a GPU
    _refresh_metadata(pruned, tuple(t.to(device) for t in inputs))
    return pruned


def apply_history(base_model: nn.Module, history: list[dict]) -> nn.Module:
    """Replay a ``pruning_history`` on a fresh copy of the unpruned architecture.

    Example:
        >>> from cnnkit.models import create_model
        >>> small = prune(create_model("tinyvgg", img_size=32), 0.5)
        >>> again = apply_history(create_model("tinyvgg", img_size=32), small.pruning_history)
        >>> again.fc.in_features == small.fc.in_features
        True
    """
    model = copy.deepcopy(base_model)
    for step in sorted({h["step"] for h in history}):
        _apply(model, [h for h in history if h["step"] == step])
    model.pruning_history = list(history)
    _refresh_metadata(model, _default_inputs(model))
    return model


def _default_inputs(model: nn.Module) -> torch.Tensor | None:
    cfg = getattr(model, "default_cfg", None)
    if not isinstance(cfg, dict) or "input_size" not in cfg:
        return None
    return torch.randn(1, *cfg["input_size"])


def _refresh_metadata(model: nn.Module, inputs: Any) -> None:
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


def _apply(model: nn.Module, entries: list[dict]) -> None:
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
        new = _shrink(old, removed.get((name, "out"), set()), removed.get((name, "in"), set()))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, new)


def _keep(size: int, drop: set[int]) -> torch.Tensor:
    if any(i >= size for i in drop):
        raise ValueError(f"pruning history removes index {max(drop)} of a dimension of "
                         f"size {size}; it does not match this model")
    return torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long)


def _shrink(old: nn.Module, drop_out: set[int], drop_in: set[int]) -> nn.Module:
    """A new module of ``old``'s type without the dropped output / input channels."""
    w = old.weight if getattr(old, "weight", None) is not None else None
    kw = dict(device=w.device if w is not None else None, dtype=w.dtype if w is not None else None)
    if isinstance(old, _ConvNd) and not old.transposed:
        keep_out = _keep(old.out_channels, drop_out)
        depthwise = old.groups > 1
        # Depthwise: channel c is input c and output c at once ("dw" members drop both).
        keep_in = keep_out if depthwise else _keep(old.in_channels, drop_in)
        new = type(old)(len(keep_in), len(keep_out), old.kernel_size, old.stride, old.padding,
                        old.dilation, len(keep_out) if depthwise else 1, old.bias is not None,
                        old.padding_mode, **kw)
        weight = old.weight.detach()[keep_out]
        new.weight.data.copy_(weight if depthwise else weight[:, keep_in])
    elif isinstance(old, nn.Linear):
        keep_out, keep_in = _keep(old.out_features, drop_out), _keep(old.in_features, drop_in)
        new = nn.Linear(len(keep_in), len(keep_out), old.bias is not None, **kw)
        new.weight.data.copy_(old.weight.detach()[keep_out][:, keep_in])
    elif isinstance(old, _BatchNorm):
        keep_out = _keep(old.num_features, drop_out)
        new = type(old)(len(keep_out), old.eps, old.momentum, old.affine,
                        old.track_running_stats, **kw)
        for key in ("weight", "running_mean", "running_var"):
            if getattr(old, key, None) is not None:
                getattr(new, key).data.copy_(getattr(old, key).detach()[keep_out])
        if old.track_running_stats:
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    else:
        raise ValueError(f"cannot prune a {type(old).__name__}; structured pruning supports "
                         "Conv1d/2d/3d, Linear and BatchNorm layers")
    if getattr(old, "bias", None) is not None:
        new.bias.data.copy_(old.bias.detach()[keep_out])
    new.train(old.training)
    return new
