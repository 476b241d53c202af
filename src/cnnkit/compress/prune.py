"""Structured filter pruning: remove whole channels and return a smaller *dense* model.

Layers as in Torch-Pruning: :func:`~cnnkit.compress.graph.dependency_groups` (read-only
analysis) says which channels are coupled; a *criterion* scores each group's channels; the
lowest-scoring ones are removed from every member of their group by building new, smaller
``nn.Conv*d`` / ``nn.BatchNorm*d`` / ``nn.Linear`` modules (per-layer surgery). The plan is
kept as a JSON-safe ``pruning_history`` so a pruned model is rebuilt from
``create_model(name, **kwargs)`` + :func:`apply_history`, never from a pickle.

Criteria (a registry; :func:`register_criterion` adds more):

* ``"l1"`` / ``"l2"``: the norm of each filter (Li, Kadav, Durdanovic, Samet, Graf 2017,
  "Pruning filters for efficient ConvNets"), summed over the group's producing layers
  (``"out"`` rows of convs / linears and ``"dw"`` depthwise filters);
* ``"bn_scale"``: ``|gamma|`` of the group's BatchNorms (Liu, Li, Shen, Huang, Yan, Zhang
  2017, "Learning efficient convolutional networks through network slimming");
* ``"random"``: a seeded random baseline.
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

__all__ = ["Criterion", "apply_history", "criteria", "get_criterion", "prune",
           "register_criterion"]

Criterion = Callable[[Group, nn.Module, Any], torch.Tensor]
_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator registering ``fn(group, model, data) -> scores [group.channels]``.

    Higher scores are kept. Raises ValueError if ``name`` is already registered.
    """
    def wrap(fn: Criterion) -> Criterion:
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered; pick another name")
        _CRITERIA[name] = fn
        return fn
    return wrap


def criteria() -> list[str]:
    """Names of the registered criteria."""
    return sorted(_CRITERIA)


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``; ValueError naming the choices otherwise."""
    if name not in _CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose from {criteria()}")
    return _CRITERIA[name]


def member_rows(weight: torch.Tensor, member: Member, channels: int, dim: int = 0
                ) -> torch.Tensor:
    """``weight`` sliced to the member's channels along ``dim``: [channels, span, ...]."""
    index = _indices(member, torch.arange(channels))
    rows = weight.detach().index_select(dim, index.to(weight.device)).movedim(dim, 0)
    return rows.reshape(channels, -1)


def _filter_norm(group: Group, model: nn.Module, p: int) -> torch.Tensor:
    modules = dict(model.named_modules())
    score = torch.zeros(group.channels)
    for m in group.members:
        if m.kind in ("out", "dw"):
            rows = member_rows(modules[m.name].weight, m, group.channels)
            score += rows.float().norm(p=p, dim=1).cpu()
    return score


@register_criterion("l1")
def l1_norm(group: Group, model: nn.Module, data: Any = None) -> torch.Tensor:
    """Sum of |w| of each channel's filters (Li et al. 2017, "Pruning filters for
    efficient ConvNets")."""
    return _filter_norm(group, model, 1)


@register_criterion("l2")
def l2_norm(group: Group, model: nn.Module, data: Any = None) -> torch.Tensor:
    """Sum over producing layers of each filter's Euclidean norm (Li et al. 2017)."""
    return _filter_norm(group, model, 2)


@register_criterion("bn_scale")
def bn_scale(group: Group, model: nn.Module, data: Any = None) -> torch.Tensor:
    """Sum of |gamma| over the group's BatchNorms (Liu et al. 2017, "Learning efficient
    convolutional networks through network slimming"); zeros for a group without one,
    so ties keep the first channels."""
    modules = dict(model.named_modules())
    score = torch.zeros(group.channels)
    for m in group.members:
        bn = modules[m.name]
        if m.kind == "bn" and bn.weight is not None:
            score += member_rows(bn.weight, m, group.channels).abs().sum(1).float().cpu()
    return score


@register_criterion("random")
def random_scores(group: Group, model: nn.Module, data: Any = None) -> torch.Tensor:
    """Uniform random scores, seeded by ``data`` when it is an int (default 0)."""
    seed = data if isinstance(data, int) else 0
    # Mix the group's first member into the seed so that equal-sized groups differ.
    seed = (seed * 1_000_003 + sum(map(ord, group.members[0].name))) % 2**31
    return torch.rand(group.channels, generator=torch.Generator().manual_seed(seed))


def _keep_count(channels: int, ratio: float, round_to: int) -> int:
    keep = channels - int(ratio * channels)
    keep = math.ceil(keep / round_to) * round_to
    return max(1, min(channels, keep))


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, ascending; ties keep the lower index."""
    order = torch.sort(-scores, stable=True).indices[:keep]
    return sorted(order.tolist())


def _global_keep(scores: list[torch.Tensor], ratio: float, round_to: int) -> list[int]:
    """Per-group keep counts from one ranking of all mean-normalised scores.

    Dividing by the group's mean |score| makes groups of different sizes and member counts
    comparable; the ``ratio`` lowest channels overall are removed (as in :func:`_top`,
    ties keep the earlier channel).
    """
    normed = torch.cat([s / s.abs().mean().clamp_min(1e-12) for s in scores])
    n_keep = normed.numel() - int(ratio * normed.numel())
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
        data: passed to the criterion (e.g. a loader for data-driven scores).
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
    score_fn = get_criterion(criterion)
    if round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to}")
    if example_inputs is None:
        example_inputs = _default_inputs(model)
        if example_inputs is None:
            raise ValueError("model has no default_cfg['input_size']: pass example_inputs")
    groups = [g for g in dependency_groups(model, example_inputs) if g.prunable]
    scores = [score_fn(g, model, data).detach().float().cpu() for g in groups]
    for g, s in zip(groups, scores, strict=True):
        if s.shape != (g.channels,):
            raise ValueError(f"criterion {criterion!r} returned shape {tuple(s.shape)} "
                             f"for a group of {g.channels} channels; it must be 1-D")
    if global_ranking:
        counts = _global_keep(scores, ratio, round_to)
    else:
        counts = [_keep_count(g.channels, ratio, round_to) for g in groups]
    history = list(getattr(model, "pruning_history", []))
    step = max((h["step"] for h in history), default=-1) + 1
    for g, s, keep in zip(groups, scores, counts, strict=True):
        if keep < g.channels:
            history.append({"step": step, "channels": g.channels, "kept": _top(s, keep),
                            "members": [[m.name, m.kind, m.offset, m.span]
                                        for m in g.members]})
    pruned = copy.deepcopy(model)
    _apply(pruned, [h for h in history if h["step"] == step])
    pruned.pruning_history = history
    _refresh_metadata(pruned, example_inputs)
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


def _indices(member: Member, kept: torch.Tensor) -> torch.Tensor:
    """Positions in the member's dimension of channels ``kept`` of its group."""
    return (member.offset + kept[:, None] * member.span
            + torch.arange(member.span)[None, :]).reshape(-1)


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
            removed[(name, dim)].update(_indices(Member(name, kind, offset, span),
                                                 dropped).tolist())
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
