"""Unstructured magnitude pruning and the lottery-ticket procedure.

Han, Pool, Tran and Dally (2015), "Learning both weights and connections for efficient neural
networks", NeurIPS: remove the connections of smallest magnitude, then retrain the survivors.
Frankle and Carbin (2019), "The lottery ticket hypothesis: finding sparse, trainable neural
networks", ICLR: iterate train -> prune -> reset the survivors to their initial values; with
the rewinding of Frankle, Dziugaite, Roy and Carbin (2020), "Linear mode connectivity and the
lottery ticket hypothesis", ICML, to their values after ``k`` training iterations instead.

How masks act. Each pruned tensor ``name`` (``weight``, optionally ``bias``) gets a 0/1 buffer
``name_mask``; a forward pre-hook multiplies the parameter by its mask in place before every
forward, and a gradient hook multiplies its gradient by the mask, so SGD with momentum, weight
decay or Adam never move a pruned weight off zero. We chose this over
``torch.nn.utils.parametrize`` because parametrize replaces ``weight`` by a computed attribute
(the state-dict key becomes ``parametrizations.weight.original``, and an optimizer built before
pruning would hold a parameter the module no longer reads), and leaves the pruned values
non-zero in the stored tensor; here the parameter object and its key stay the same, and the
zeros are really in it, so sparsity is counted by counting zeros. A pruned model's state dict
has the extra ``*_mask`` keys: load one into ``magnitude_prune(create_model(...), 0.0)``.
:func:`remove_masks` bakes the zeros in and drops masks and hooks.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SCOPES = ("global", "layer")
_HANDLE = "_cnnkit_mask_grad_hook"  # attribute on a parameter holding its gradient-hook handle


def _mask_grad(module_ref: weakref.ref, name: str, grad: torch.Tensor) -> torch.Tensor:
    module = module_ref()
    return grad if module is None else grad * getattr(module, f"{name}_mask")


def _apply_masks(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: zero the pruned entries and make sure their gradients are masked."""
    for name in _masked_names(module):
        param = getattr(module, name)
        # .data: the pruned entries are already zero in the normal flow (their gradients are
        # masked), so this only re-asserts them, e.g. after loading dense weights; it must not
        # bump the version counter of a tensor a pending backward has saved.
        param.data.mul_(getattr(module, f"{name}_mask"))
        # A deep copy gives fresh parameters without tensor hooks: (re)attach lazily here.
        if param.requires_grad and getattr(param, _HANDLE, None) is None:
            hook = functools.partial(_mask_grad, weakref.ref(module), name)
            setattr(param, _HANDLE, param.register_hook(hook))


def _masked_names(module: nn.Module) -> list[str]:
    return [n for n in ("weight", "bias") if f"{n}_mask" in module._buffers]


def _prunable(model: nn.Module, include_bias: bool) -> Iterator[tuple[str, nn.Module, str]]:
    for mod_name, module in model.named_modules():
        if isinstance(module, _PRUNABLE):
            for name in ("weight", "bias") if include_bias else ("weight",):
                if getattr(module, name, None) is not None:
                    yield mod_name, module, name


def _set_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    if f"{name}_mask" in module._buffers:
        getattr(module, f"{name}_mask").copy_(mask)
    else:
        module.register_buffer(f"{name}_mask", mask)
    if not any(h is _apply_masks for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(_apply_masks)
    with torch.no_grad():
        getattr(module, name).mul_(mask)
    _apply_masks(module, ())  # attach the gradient hook now, before any forward


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global",
                    include_bias: bool = False, inplace: bool = False) -> nn.Module:
    """Zero the smallest-magnitude weights of every Linear/Conv layer (Han et al. 2015).

    ``sparsity`` is the fraction of the prunable entries that is zero afterwards, counting those
    an earlier call already masked (they are pruned first, whatever their value), so iterative
    pruning passes the cumulative target. Exactly ``round(sparsity * n)`` entries are masked;
    ties in magnitude break by position.

    Args:
        model: the network; copied unless ``inplace``.
        sparsity: target fraction in [0, 1].
        scope: ``"global"`` (one magnitude threshold over all layers) or ``"layer"`` (each
            tensor pruned to ``sparsity`` on its own).
        include_bias: prune biases too (with a ``bias_mask``).
        inplace: modify ``model`` itself.

    Returns:
        The pruned model, with ``weight_mask`` buffers and masking hooks.

    Raises:
        ValueError: a sparsity outside [0, 1] or below the current one, or an unknown scope.

    Example:
        >>> from cnnkit.compress import magnitude_prune, sparsity_report
        >>> from cnnkit.models import create_model
        >>> net = magnitude_prune(create_model("lenet5"), 0.9)
        >>> round(sparsity_report(net)["total"]["sparsity"], 3)
        0.9
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if scope not in _SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; choose one of {_SCOPES}")
    if not inplace:
        model = copy.deepcopy(model)
    targets = list(_prunable(model, include_bias))
    if not targets:
        raise ValueError("the model has no Linear or Conv layer to prune")
    # Already-pruned entries score -1 so they stay pruned and count towards the target.
    scores = []
    for _, module, name in targets:
        score = getattr(module, name).detach().abs().flatten().float()
        mask = module._buffers.get(f"{name}_mask")
        scores.append(score if mask is None else torch.where(mask.flatten() > 0, score, -1.0))
    groups = [torch.cat(scores)] if scope == "global" else scores
    masks = []
    for s in groups:
        n_prune = round(sparsity * s.numel())
        already = int((s < 0).sum())
        if n_prune < already:
            raise ValueError(f"sparsity {sparsity} is below the {already / s.numel():.4f} "
                             "already pruned; masks only grow: pass the cumulative target")
        keep = torch.ones_like(s)
        keep[torch.argsort(s, stable=True)[:n_prune]] = 0.0
        masks.append(keep)
    flat = torch.cat(masks) if scope == "global" else None
    offset = 0
    for i, (_, module, name) in enumerate(targets):
        param = getattr(module, name)
        if flat is not None:
            m, offset = flat[offset:offset + param.numel()], offset + param.numel()
        else:
            m = masks[i]
        _set_mask(module, name, m.view_as(param).to(param.dtype))
    return model


def sparsity_report(model: nn.Module) -> dict:
    """Zeros per prunable tensor and in total (counted in the tensors, masked or not).

    Returns:
        ``{"layers": {"<module>.<param>": {"numel", "zeros", "sparsity"}}, "total": {...},
        "all_params": {...}}``; ``total`` covers Linear/Conv weights (and masked biases),
        ``all_params`` every parameter (norm layers included).
    """
    def entry(tensors: list[torch.Tensor]) -> dict:
        numel = sum(t.numel() for t in tensors)
        zeros = sum(int((t == 0).sum()) for t in tensors)
        return dict(numel=numel, zeros=zeros, sparsity=zeros / numel if numel else 0.0)

    layers = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, _PRUNABLE):
            names = {"weight", *_masked_names(module)}
            for name in sorted(names):
                layers[f"{mod_name}.{name}" if mod_name else name] = getattr(module, name).detach()
    return dict(layers={k: entry([t]) for k, t in layers.items()},
                total=entry(list(layers.values())),
                all_params=entry([p.detach() for p in model.parameters()]))


def remove_masks(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Bake the masks into the weights and drop the ``*_mask`` buffers and hooks.

    The result is a plain model with the original state-dict keys (zeros included) that
    gives the same outputs.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        names = _masked_names(module)
        for name in names:
            param = getattr(module, name)
            with torch.no_grad():
                param.mul_(module._buffers.pop(f"{name}_mask"))
            handle = getattr(param, _HANDLE, None)
            if handle is not None:
                handle.remove()
                delattr(param, _HANDLE)
        for key in [k for k, h in module._forward_pre_hooks.items() if h is _apply_masks]:
            del module._forward_pre_hooks[key]
    return model


def _rewind(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for key, value in snapshot.items():
            state[key].copy_(value)
        for module in model.modules():
            for name in _masked_names(module):
                getattr(module, name).mul_(getattr(module, f"{name}_mask"))


def lottery_ticket(build_model: Callable[[], nn.Module], train_fn: Callable[[nn.Module], float],
                   rounds: int, sparsity_per_round: float, rewind_iteration: int = 0,
                   scope: str = "global", include_bias: bool = False,
                   ) -> tuple[nn.Module, list[dict]]:
    """Iterative magnitude pruning with rewinding: find a winning ticket.

    Frankle and Carbin (2019), "The lottery ticket hypothesis"; rewinding to iteration ``k``
    from Frankle et al. (2020), "Linear mode connectivity and the lottery ticket hypothesis".
    Round 0 trains the dense ``build_model()``; each of the ``rounds`` then prunes
    ``sparsity_per_round`` of the surviving weights by magnitude (the masks accumulate:
    sparsity ``1 - (1 - p)^r`` after round ``r``), resets every surviving parameter and buffer
    to its saved value, and retrains.

    The state at iteration ``k`` is saved just before the ``k+1``-th forward pass made in
    training mode during round 0, i.e. after ``k`` optimiser steps when ``train_fn`` does one
    training forward per step (evaluate in ``eval()`` mode).

    Args:
        build_model: returns a fresh network.
        train_fn: trains the model in place and returns its accuracy.
        rounds: number of prune-rewind-retrain rounds (>= 1).
        sparsity_per_round: fraction of the survivors pruned each round, in (0, 1).
        rewind_iteration: the iteration ``k`` to rewind to (0: the initialisation).
        scope, include_bias: as in :func:`magnitude_prune`.

    Returns:
        The last round's trained sparse model and a history: one dict per round with
        ``round``, ``sparsity`` (measured) and ``accuracy``.

    Raises:
        ValueError: bad rounds, sparsity or rewind iteration.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0.0 < sparsity_per_round < 1.0:
        raise ValueError(f"sparsity_per_round must be in (0, 1), got {sparsity_per_round}")
    if rewind_iteration < 0:
        raise ValueError(f"rewind_iteration must be >= 0, got {rewind_iteration}")
    model = build_model()
    snapshot: dict[str, torch.Tensor] = {}
    seen = [0]

    def save_at_k(module: nn.Module, args: tuple) -> None:
        if module.training:
            if seen[0] == rewind_iteration:
                snapshot.update({k: v.detach().clone() for k, v in module.state_dict().items()})
            seen[0] += 1

    handle = model.register_forward_pre_hook(save_at_k)
    try:
        accuracy = train_fn(model)
    finally:
        handle.remove()
    if not snapshot:
        raise ValueError(f"train_fn made only {seen[0]} training forwards, so there is no "
                         f"iteration {rewind_iteration} to rewind to; lower rewind_iteration")

    def measured() -> float:
        tensors = [getattr(mod, n) for _, mod, n in _prunable(model, include_bias)]
        return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)

    history = [dict(round=0, sparsity=measured(), accuracy=float(accuracy))]
    for r in range(1, rounds + 1):
        target = 1.0 - (1.0 - sparsity_per_round) ** r
        magnitude_prune(model, target, scope=scope, include_bias=include_bias, inplace=True)
        _rewind(model, snapshot)
        accuracy = train_fn(model)
        history.append(dict(round=r, sparsity=measured(), accuracy=float(accuracy)))
    return model, history
