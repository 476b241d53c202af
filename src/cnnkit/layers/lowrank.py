"""Low-rank factor layers: what a factorised convolution or linear layer is made of.

A factorised layer is an ``nn.Sequential`` of plain layers under the original layer's name
(so the parent's ``forward`` still calls it):

* truncated SVD (Eckart and Young 1936) of a linear layer or a 1x1 convolution:
  ``(C_in -> R) -> (R -> C_out, bias)``;
* Tucker-2 (Kim et al. 2016, "Compression of deep convolutional neural networks for fast
  and low power mobile applications"): ``1x1 (C_in -> R_in) -> kxk (R_in -> R_out) ->
  1x1 (R_out -> C_out, bias)``;
* CP (Lebedev et al. 2015, "Speeding-up convolutional neural networks using fine-tuned
  CP-decomposition"): ``1x1 (C_in -> R) -> depthwise kx1 -> depthwise 1xk -> 1x1
  (R -> C_out, bias)``.

This module builds the *structure* (:func:`svd_layers`, :func:`tucker2_layers`,
:func:`cp_layers`), replays a recorded ``lowrank_history`` on an architecture
(:func:`apply_lowrank_history`, how a factorised run is rebuilt without a pickle) and
builds freshly initialised factorised networks (:func:`factorize_model`,
``create_model(conv="cp")``). Computing factors from trained weights is
:mod:`cnnkit.compress.factorizations`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["svd_layers", "tucker2_layers", "cp_layers", "replace_module", "factorizable",
           "apply_lowrank_history", "fresh_factors", "factorize_model", "METHODS"]

METHODS = ("tucker", "cp", "svd", "auto")


def svd_layers(layer: nn.Linear | nn.Conv2d, rank: int) -> nn.Sequential:
    """``(C_in -> rank) -> (rank -> C_out, bias)`` for a linear layer or a 1x1 convolution
    (the stride and padding on the first convolution)."""
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, rank, bias=False)
        last = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    else:
        first = nn.Conv2d(layer.in_channels, rank, 1, stride=layer.stride, padding=layer.padding,
                          padding_mode=layer.padding_mode, bias=False)
        last = nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None)
    return nn.Sequential(first, last).to(layer.weight.device)


def tucker2_layers(conv: nn.Conv2d, r_in: int, r_out: int) -> nn.Sequential:
    """``1x1 -> kxk -> 1x1`` with ranks ``(r_in, r_out)``; the padding on the core (a
    bias-free 1x1 convolution commutes with padding)."""
    first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False)
    mid = nn.Conv2d(r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, padding_mode=conv.padding_mode, bias=False)
    last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None)
    return nn.Sequential(first, mid, last).to(conv.weight.device)


def cp_layers(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """``1x1 -> depthwise kx1 -> depthwise 1xk -> 1x1``; the stride, padding and dilation of
    each axis on the depthwise convolution of that axis."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    pad = conv.padding
    pad_h, pad_w = (pad, pad) if isinstance(pad, str) else ((pad[0], 0), (0, pad[1]))
    first = nn.Conv2d(conv.in_channels, rank, 1, bias=False)
    vert = nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=pad_h, dilation=(dh, 1),
                     groups=rank, padding_mode=conv.padding_mode, bias=False)
    horiz = nn.Conv2d(rank, rank, (1, kw), stride=(1, sw), padding=pad_w, dilation=(1, dw),
                      groups=rank, padding_mode=conv.padding_mode, bias=False)
    last = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
    return nn.Sequential(first, vert, horiz, last).to(conv.weight.device)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _layer_method(module: nn.Module, method: str) -> str | None:
    """The factorisation ``method`` applies to ``module``, or None to leave it alone."""
    if isinstance(module, nn.Linear):
        return "svd" if method in ("svd", "auto") else None
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        return None
    if module.kernel_size == (1, 1):  # nothing spatial to factor: a matrix, hence SVD
        return "svd" if method in ("svd", "auto") else None
    if method == "svd":
        return None
    return "tucker" if method == "auto" else method


def factorizable(model: nn.Module, method: str, layers: list[str] | None = None,
                 skip_first: bool = True) -> list[tuple[str, str]]:
    """``(name, method)`` for every layer to factorise, in module order: ``"tucker"`` or
    ``"cp"`` for ``kxk`` ``groups=1`` convolutions, ``"svd"`` for linear layers and 1x1
    convolutions (``method="auto"``: Tucker-2 and SVD). Grouped convolutions are left
    alone, and so, with ``skip_first`` and no ``layers``, is the first convolution.

    Raises:
        ValueError: an unknown method, or ``layers`` naming modules the model lacks.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    named = dict(model.named_modules())
    if layers is not None:
        missing = [n for n in layers if n not in named]
        if missing:
            raise ValueError(f"layers {missing} are not modules of the model; use names from "
                             "model.named_modules()")
    convs = [n for n, m in named.items() if isinstance(m, nn.Conv2d)]
    first_conv = convs[0] if convs else None
    plan = []
    for name, m in named.items():
        if layers is not None and name not in layers:
            continue
        if layers is None and skip_first and name == first_conv:
            continue
        kind = _layer_method(m, method)
        if kind is not None:
            plan.append((name, kind))
    return plan


def apply_lowrank_history(model: nn.Module, history: list[dict]) -> nn.Module:
    """Rebuild the factor structure a ``lowrank_history`` records (``{"layer", "method",
    "rank"}`` per replaced layer), on a copy of the original architecture; the weights are
    whatever the caller loads next.

    Example:
        >>> from cnnkit.compress import decompose
        >>> from cnnkit.models import create_model
        >>> small, _ = decompose(create_model("tinyvgg", img_size=32), rank=2)
        >>> again = apply_lowrank_history(create_model("tinyvgg", img_size=32),
        ...                               small.lowrank_history)
        >>> again.state_dict().keys() == small.state_dict().keys()
        True
    """
    new = copy.deepcopy(model)
    named = dict(new.named_modules())
    for entry in history:
        name, method, rank = entry["layer"], entry["method"], entry["rank"]
        old = named.get(name)
        if old is None:
            raise ValueError(f"low-rank history names layer {name!r} that the model lacks; "
                             "apply it to the architecture it was recorded on")
        if method == "svd":
            seq = svd_layers(old, int(rank))
        elif method == "tucker":
            seq = tucker2_layers(old, int(rank[1]), int(rank[0]))  # recorded (R_out, R_in)
        elif method == "cp":
            seq = cp_layers(old, int(rank))
        else:
            raise ValueError(f"unknown method {method!r} in the low-rank history")
        seq.train(old.training)
        replace_module(new, name, seq)
    new.lowrank_history = [dict(e) for e in history]
    return new


def fresh_factors(conv: nn.Conv2d, kind: str, rank_ratio: float) -> nn.Sequential:
    """Randomly initialised factor sequence whose product has He's variance ``2/fan_in``.

    Every factor but the last is variance preserving (``N(0, 1/fan_in)`` of that factor); the
    last 1x1 convolution gets He's ``N(0, 2/R)``. The entries of the product are sums of
    products of independent zero-mean factors, so for CP
    ``Var = R (1/C_in)(1/kh)(1/kw)(2/R) = 2/(C_in kh kw)`` and for Tucker-2
    ``Var = R_out R_in (1/C_in)(1/(R_in kh kw))(2/R_out) = 2/(C_in kh kw)``: He et al. (2015),
    "Delving deep into rectifiers", fan-in mode, for the original convolution.
    """
    c_out, c_in, kh, kw = conv.weight.shape
    if kind == "cp":
        r = max(1, round(rank_ratio * max(c_in, c_out)))
        seq = cp_layers(conv, r)
        stds = [1 / math.sqrt(c_in), 1 / math.sqrt(kh), 1 / math.sqrt(kw), math.sqrt(2 / r)]
    else:
        r_in, r_out = max(1, round(rank_ratio * c_in)), max(1, round(rank_ratio * c_out))
        seq = tucker2_layers(conv, r_in, r_out)
        stds = [1 / math.sqrt(c_in), 1 / math.sqrt(r_in * kh * kw), math.sqrt(2 / r_out)]
    with torch.no_grad():
        for m, std in zip(seq, stds, strict=True):
            m.weight.normal_(0.0, std)
        if seq[-1].bias is not None:
            seq[-1].bias.zero_()
    return seq


def factorize_model(model: nn.Module, kind: str = "cp", rank_ratio: float = 0.25,
                    skip_first: bool = True, inplace: bool = False) -> nn.Module:
    """Replace every ``kxk`` (k>1), ``groups=1`` convolution by a freshly initialised factor
    sequence, for training a factorised network from scratch.

    ``kind="cp"`` (Lebedev et al. 2015) uses rank ``R = round(rank_ratio * max(C_in, C_out))``;
    ``kind="tucker"`` (Kim et al. 2016) uses ``R_in = round(rank_ratio * C_in)`` and
    ``R_out = round(rank_ratio * C_out)``. The factors are initialised so the product kernel
    has He's fan-in variance ``2/(C_in kh kw)`` (see :func:`fresh_factors`).

    Raises:
        ValueError: an unknown kind, a rank ratio outside (0, 1], or a model with 1D or 3D
            convolutions (the factor layers are 2D).
    """
    if kind not in ("cp", "tucker"):
        raise ValueError(f"unknown kind {kind!r}; choose 'cp' or 'tucker'")
    if not 0.0 < rank_ratio <= 1.0:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    other = sorted({type(m).__name__ for m in model.modules()
                    if isinstance(m, (nn.Conv1d, nn.Conv3d))})
    if other:
        raise ValueError(f"factorised convolutions are 2D; this model has {', '.join(other)} "
                         "layers: factorise 2D networks only")
    new = model if inplace else copy.deepcopy(model)
    for name, _ in factorizable(new, kind, None, skip_first):
        replace_module(new, name, fresh_factors(new.get_submodule(name), kind, rank_ratio))
    return new
