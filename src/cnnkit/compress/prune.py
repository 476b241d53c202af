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
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cnnkit.models._surgery import apply_history, apply_step, default_inputs, refresh_metadata

from .graph import Group, dependency_groups
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
        >>> import torch
        >>> from cnnkit.compress import prune
        >>> from cnnkit.models import create_model
        >>> model = create_model("tinyvgg", img_size=32)
        >>> small = prune(model, 0.5)  # half the channels of each group: those of least L1 norm
        >>> model.features.conv_1_1.out_channels, small.features.conv_1_1.out_channels
        (10, 5)
        >>> sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters())
        (9420, 4040)
        >>> small(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> h = small.pruning_history[0]  # replayable: see apply_history
        >>> h["channels"], len(h["kept"]), h["members"]
        (10, 5, [['features.conv_1_1', 'out', 0, 1], ['features.conv_1_2', 'in', 0, 1]])
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
        example_inputs = default_inputs(model)
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
    apply_step(pruned, entries)
    pruned.pruning_history = history + entries
    device = next(pruned.parameters()).device  # the inputs may predate a move to a GPU
    refresh_metadata(pruned, tuple(t.to(device) for t in inputs))
    return pruned


