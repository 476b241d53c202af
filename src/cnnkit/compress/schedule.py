"""Pruning interleaved with training: when channels go, and how training prepares them.

Both orchestrate :mod:`cnnkit.compress.prune` (groups, criteria, surgery) around a
training function that the caller owns (a :class:`~cnnkit.training.Trainer`, a hand loop):

* :func:`iterative_prune` removes channels in several smaller steps with fine-tuning in
  between instead of all at once (Han, Pool, Tran, Dally 2015, "Learning both weights and
  connections for efficient neural networks"; Li, Kadav, Durdanovic, Samet, Graf 2017,
  "Pruning filters for efficient ConvNets", prune-and-retrain iteratively);
* :class:`MaskSparsity` chooses the channels first and then pushes only those towards zero
  during training, so that removing them afterwards costs little (Jiang, Zhao, Zhao, An,
  Tang, Wang 2022, "Pruning-aware sparse regularization for network pruning").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .graph import Member
from .prune import _commit, _global_keep, _keep_count, _plan, _scored_groups

__all__ = ["MaskSparsity", "iterative_prune"]


def _check(ratio: float, round_to: int) -> None:
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to}")


def iterative_prune(model: nn.Module, target_ratio: float, steps: int,
                    finetune_fn: Callable[[nn.Module], nn.Module], criterion: str = "l1",
                    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
                    data: Any = None, global_ranking: bool = False,
                    round_to: int = 1) -> nn.Module:
    """Prune to ``target_ratio`` in ``steps`` geometric stages, fine-tuning after each.

    Stage ``s`` (1-based) brings every group to ``(1 - target_ratio) ** (s / steps)`` of
    its *original* channels, so each stage removes the same fraction of what is left and
    the last one lands exactly where one-shot ``prune(model, target_ratio)`` would (the
    same kept counts, chosen by re-scoring the fine-tuned network at every stage). The
    iterative schedule of Han et al. 2015 ("Learning both weights and connections for
    efficient neural networks") applied to filters as in Li et al. 2017 ("Pruning filters
    for efficient ConvNets"): small steps let training recover before the next cut.

    Args:
        model: the network (left untouched; ``finetune_fn`` gets the pruned copies).
        target_ratio: fraction of each group's channels gone at the end, in [0, 1).
        steps: number of prune-then-fine-tune stages, at least 1.
        finetune_fn: ``f(model) -> model`` training the pruned network (in place or not);
            the model it returns is scored in the next stage. A returned model without a
            ``pruning_history`` gets the pruned one's.
        criterion: a registered criterion (see :func:`cnnkit.compress.prune.criteria`).
        example_inputs: inputs for the dependency trace (see :func:`~.prune.prune`).
        data: passed to the criterion at every stage.
        global_ranking: one threshold over all groups per stage; the total channel count
            then follows the geometric schedule instead of each group's.
        round_to: kept channel counts are rounded up to a multiple of this.

    Returns:
        The last fine-tuned model; its ``pruning_history`` has one step per stage that
        removed channels, and :func:`~.prune.apply_history` on the unpruned
        architecture rebuilds its shapes (load its ``state_dict`` for its weights).

    Example:
        >>> from cnnkit.compress import iterative_prune
        >>> from cnnkit.models import create_model
        >>> small = iterative_prune(create_model("tinyvgg", img_size=32), 0.5, 2,
        ...                         lambda m: m)
        >>> small.features.conv_1_1.out_channels, len({h["step"] for h in small.pruning_history})
        (5, 2)
    """
    _check(target_ratio, round_to)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    keep_fraction = 1 - target_ratio
    original: dict[tuple[str, ...], int] = {}  # group (its producing layers) -> channels
    current = model
    for stage in range(1, steps + 1):
        groups, scores, inputs = _scored_groups(current, criterion, example_inputs, data)
        # The last stage uses the target itself: no rounding drift from the powers.
        removed = target_ratio if stage == steps else 1 - keep_fraction ** (stage / steps)
        sizes = []
        for g in groups:
            key = tuple(sorted(m.name for m in g.members if m.kind == "out"))
            sizes.append(original.setdefault(key, g.channels))
        if global_ranking:
            total = sum(sizes)
            counts = _global_keep(scores, total - int(removed * total), round_to)
        else:
            counts = [_keep_count(c0, removed, round_to) for c0 in sizes]
        counts = [min(g.channels, c) for g, c in zip(groups, counts, strict=True)]
        pruned = _commit(current, _plan(groups, scores, counts), inputs)
        tuned = finetune_fn(pruned)
        if not isinstance(tuned, nn.Module):
            raise ValueError(f"finetune_fn must return the fine-tuned model, got "
                             f"{type(tuned).__name__}")
        if not hasattr(tuned, "pruning_history"):
            tuned.pruning_history = pruned.pruning_history
        current = tuned
    return current


class MaskSparsity:
    """Pruning-aware sparse regularisation (Jiang, Zhao, Zhao, An, Tang, Wang 2022,
    "Pruning-aware sparse regularization for network pruning"; MaskSparsity).

    Network slimming puts an L1 penalty on *every* BatchNorm scale and then prunes the
    smallest; MaskSparsity first chooses the channels to remove (here with any registered
    criterion, once, at construction) and penalises only those, so the channels that stay
    are trained without the penalty:

        penalty(model) = strength * sum over selected channels c of |gamma_c|

    over every BatchNorm of the channel's group. A group without BatchNorm penalises the
    Euclidean norm of each selected channel's filters instead (the rows of its producing
    convs / linears / depthwise convs; a group lasso, biases not included).

    Args:
        model: the (trained) network to choose channels in; not modified.
        ratio: fraction of each prunable group's channels to select, in [0, 1).
        criterion: a registered criterion for the choice (the paper ranks BN scales).
        example_inputs: inputs for the dependency trace (see :func:`~.prune.prune`).
        data: passed to the criterion.
        strength: the penalty weight (lambda).
        global_ranking: choose with one threshold over all groups.
        round_to: kept channel counts are rounded up to a multiple of this.

    Example:
        >>> from cnnkit.compress import MaskSparsity
        >>> from cnnkit.models import create_model
        >>> model = create_model("tinyvgg", img_size=32)
        >>> reg = MaskSparsity(model, 0.5, strength=1e-4)
        >>> reg(model).shape, reg.prune(model).features.conv_1_1.out_channels
        (torch.Size([]), 5)
    """

    def __init__(self, model: nn.Module, ratio: float, criterion: str = "l1",
                 example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 data: Any = None, strength: float = 1e-4, global_ranking: bool = False,
                 round_to: int = 1) -> None:
        _check(ratio, round_to)
        groups, scores, self.example_inputs = _scored_groups(model, criterion,
                                                             example_inputs, data)
        if global_ranking:
            total = sum(g.channels for g in groups)
            counts = _global_keep(scores, total - int(ratio * total), round_to)
        else:
            counts = [_keep_count(g.channels, ratio, round_to) for g in groups]
        self.strength = strength
        self.plan = _plan(groups, scores, counts)  # pruning-history entries, minus the step
        # (layer name, "bn" | "filter", positions of the selected channels in its dim 0)
        self.targets: list[tuple[str, str, torch.Tensor]] = []
        for entry in self.plan:
            dropped = torch.tensor(sorted(set(range(entry["channels"])) - set(entry["kept"])))
            members = [Member(*m) for m in entry["members"]]
            bns = [m for m in members if m.kind == "bn"]
            for m in bns or [m for m in members if m.kind in ("out", "dw")]:
                self.targets.append((m.name, "bn" if bns else "filter",
                                     m.indices(dropped)))
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The penalty on ``model`` (the model selected in, or one with its layer names)."""
        modules = dict(model.named_modules())
        terms = []
        for i, (name, kind, index) in enumerate(self.targets):
            weight = modules[name].weight
            key = (i, weight.device)
            if key not in self._on_device:
                self._on_device[key] = index.to(weight.device)
            rows = weight.index_select(0, self._on_device[key])
            if kind == "bn":
                terms.append(rows.abs().sum())
            else:
                terms.append(torch.linalg.vector_norm(rows.reshape(len(index), -1), dim=1).sum())
        if not terms:
            return next(model.parameters()).new_zeros(())
        return self.strength * torch.stack(terms).sum()

    def prune(self, model: nn.Module) -> nn.Module:
        """A pruned copy of ``model`` without exactly the penalised channels (the next step
        of its ``pruning_history``)."""
        return _commit(model, self.plan, self.example_inputs)
