"""Pruning criteria: how important each channel of a coupled group is.

A registry of functions ``fn(group, model, data) -> scores`` (one score per channel of the
group, higher = keep); :func:`register_criterion` adds more, :func:`criteria` lists them.

* ``"l1"`` / ``"l2"``: the norm of each filter (Li, Kadav, Durdanovic, Samet, Graf 2017,
  "Pruning filters for efficient ConvNets"), summed over the group's producing layers
  (``"out"`` rows of convs / linears and ``"dw"`` depthwise filters);
* ``"bn_scale"``: ``|gamma|`` of the group's BatchNorms (Liu, Li, Shen, Huang, Yan, Zhang
  2017, "Learning efficient convolutional networks through network slimming");
* ``"random"``: a seeded random baseline;
* ``"taylor"`` (data-driven): first-order Taylor estimate of the loss change (Molchanov,
  Mallya, Tyree, Frosio, Kautz 2019, "Importance estimation for neural network pruning");
* ``"beta_rank"`` (data-driven): filter magnitude times output-over-input variability
  (Homayounfar, Koohi-Moghadam, Rawassizadeh, Vardhanabhuti 2023, "Beta-Rank: a robust
  convolutional filter pruning method for imbalanced medical image analysis").

Data-driven criteria take ``data``: a tuple ``(images, labels)`` or an iterable of such
batches (a loader). They run the model in eval mode, so BatchNorm statistics are not
updated, and leave no hooks, no ``.grad`` and every module's train/eval flag as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .graph import Group, Member, evaluating

__all__ = ["Criterion", "criteria", "get_criterion", "member_rows", "register_criterion"]

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
    index = member.indices(torch.arange(channels))
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


def _batches(data: Any, name: str, model: nn.Module
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(images, labels or None)`` on the model's device from one batch or a loader."""
    hint = f"criterion {name!r} needs data: pass data=(images, labels) or a loader"
    if data is None or isinstance(data, (int, float, str)):
        raise ValueError(hint)
    if isinstance(data, torch.Tensor) or (isinstance(data, (tuple, list)) and data
                                          and isinstance(data[0], torch.Tensor)):
        data = [data]  # one batch, not a loader
    device = next(model.parameters()).device
    count = 0
    for batch in data:
        x, *rest = (batch,) if isinstance(batch, torch.Tensor) else batch
        count += 1
        yield x.to(device), (rest[0].to(device) if rest else None)
    if count == 0:
        raise ValueError(f"{hint}; the data given has no batches")


@register_criterion("taylor")
def taylor(group: Group, model: nn.Module, data: Any = None) -> torch.Tensor:
    """First-order Taylor importance (Molchanov, Mallya, Tyree, Frosio, Kautz 2019,
    "Importance estimation for neural network pruning", CVPR), eq. (8) per mini-batch:

        I_c = (sum over s in S_c of  dL/dw_s * w_s) ** 2,

    averaged over the batches of ``data`` with ``L`` the cross-entropy. ``S_c`` is every
    parameter that removing channel ``c`` deletes: the rows (and biases) of its producing
    convs / linears / depthwise convs and BatchNorms, and the consumers' input columns,
    so the score is the first-order change of the loss when the whole coupled channel is
    zeroed. Gradients come from :func:`torch.autograd.grad`, so ``.grad`` is untouched;
    the model runs in eval mode (running BN statistics, no dropout). One forward and
    backward pass over ``data`` per group: a few batches are enough.
    """
    modules = dict(model.named_modules())
    # (member, tensor, dim): the tensors whose rows (dim 0) or columns (dim 1) it owns.
    parts = []
    for m in group.members:
        module = modules[m.name]
        names = ("weight",) if m.kind == "in" else ("weight", "bias")
        for t in (getattr(module, n, None) for n in names):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                parts.append((m, t, 1 if m.kind == "in" else 0))
    params = list({id(t): t for _, t, _ in parts}.values())
    total, batches = torch.zeros(group.channels, dtype=torch.float64), 0
    with evaluating(model), torch.enable_grad():
        for x, y in _batches(data, "taylor", model):
            if y is None:
                raise ValueError("criterion 'taylor' needs labels: pass data=(images, labels)")
            batches += 1
            if not params:
                continue
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            gw = {id(p): g.detach() * p.detach() for p, g in zip(params, grads, strict=True)
                  if g is not None}
            first = torch.zeros(group.channels, dtype=torch.float64)
            for m, t, dim in parts:
                if id(t) in gw:
                    first += member_rows(gw[id(t)], m, group.channels, dim).double().sum(1).cpu()
            total += first ** 2
    return (total / batches).float()


class _BetaStats:
    """Running moments of one layer's outputs (per channel and position) and of its input
    receptive fields (per position and channel group), in float64."""

    def __init__(self) -> None:
        self.out = self.inp = None  # [sum, sum of squares, count]

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # float64: the spreads come from E[v^2] - E[v]^2
        x, y = inputs[0].detach().double(), output.detach().double()
        y = y.reshape(y.shape[0], y.shape[1], -1)  # [N, out, positions]
        if isinstance(module, nn.Linear):  # one "position": every input feature
            s1, s2, n = x.sum().reshape(1, 1), (x * x).sum().reshape(1, 1), x.numel()
        else:  # window sums: the conv itself (stride, padding...) with all-one weights
            ones = x.new_ones(module.groups, module.in_channels // module.groups,
                              *module.kernel_size)
            win = [module._conv_forward(t, ones, None) for t in (x, x * x)]
            s1, s2 = (w.reshape(w.shape[0], w.shape[1], -1).sum(0) for w in win)
            n = x.shape[0] * ones[0].numel()
        self.out = self._add(self.out, [y.sum(0), (y * y).sum(0), y.shape[0]])
        self.inp = self._add(self.inp, [s1, s2, n])

    @staticmethod
    def _add(acc: list | None, new: list) -> list:
        return new if acc is None else [a + b for a, b in zip(acc, new, strict=True)]

    @staticmethod
    def _std(acc: list) -> torch.Tensor:
        mean = acc[0] / acc[2]
        return (acc[1] / acc[2] - mean * mean).clamp_min(0).sqrt()

    def beta(self, module: nn.Module) -> torch.Tensor:
        """Per output channel: mean |w| x sum over positions of std(out) / std(in)."""
        if self.out is None:
            raise ValueError("beta_rank saw no call of a layer of the group; does the data "
                             "reach it?")
        sd_out, sd_in = self._std(self.out), self._std(self.inp)  # [out, P], [groups, P]
        sd_in = sd_in.repeat_interleave(sd_out.shape[0] // sd_in.shape[0], dim=0).to(sd_out)
        ratio = torch.where(sd_in > 1e-12, sd_out / sd_in.clamp_min(1e-12), 0.0)
        w = module.weight.detach().double()
        return w.reshape(w.shape[0], -1).abs().mean(1).cpu() * ratio.sum(1).cpu()


@register_criterion("beta_rank")
def beta_rank(group: Group, model: nn.Module, data: Any = None) -> torch.Tensor:
    """Beta-Rank (Homayounfar, Koohi-Moghadam, Rawassizadeh, Vardhanabhuti 2023, "Beta-Rank:
    a robust convolutional filter pruning method for imbalanced medical image analysis").

    A filter's importance is its magnitude scaled by how much variability it creates:
    for output channel ``k`` of each producing layer of the group,

        beta_k = mean|W_k| * sum_p  std(y[:, k, p]) / std(x over the receptive field of p),

    where ``std(y[:, k, p])`` is the spread of output ``k`` at position ``p`` over the
    samples of ``data`` and the input spread is taken over the samples and every input
    value (all input channels, the whole kernel window, zero padding included) that
    produces position ``p`` (for a depthwise conv: only its own channel; a linear layer
    is one position). Scores are min-max normalised per layer, as in the authors' ranking,
    and summed over the group's producing layers. The output spread is measured before any
    BatchNorm / activation; positions whose input does not vary count 0.

    Note: the ratio std(out) / std(in) is the "beta" (a volatility ratio, as in finance), not
    a beta distribution. The paper's equation is an image we could not read; this follows
    its text (filter L1 value with input and output information) and the ranking computed
    by the authors' public release. Two choices are ours: moments accumulate over all
    batches (the release ranks one batch), and the receptive field follows the layer's
    stride, padding and dilation exactly.
    """
    modules = dict(model.named_modules())
    producers = [m for m in group.members if m.kind in ("out", "dw")]
    stats = {m.name: _BetaStats() for m in producers}
    handles = [modules[n].register_forward_hook(s) for n, s in stats.items()]
    try:
        with evaluating(model), torch.no_grad():
            for x, _ in _batches(data, "beta_rank", model):
                model(x)
    finally:
        for h in handles:
            h.remove()
    score = torch.zeros(group.channels, dtype=torch.float64)
    for m in producers:
        beta = stats[m.name].beta(modules[m.name])[m.indices(torch.arange(group.channels))]
        low, high = beta.min(), beta.max()
        if high > low:
            score += (beta - low) / (high - low)
    return score.float()
