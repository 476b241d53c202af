"""Low-rank factor layers: what a factorised convolution or linear layer is made of.

A factorised layer is an ``nn.Sequential`` of plain layers under the original layer's name
(so the parent's ``forward`` still calls it):

* truncated SVD (Eckart and Young 1936) of a linear layer or a one-tap (1x1) convolution:
  ``(C_in -> R) -> (R -> C_out, bias)``;
* Tucker-2 (Kim et al. 2016, "Compression of deep convolutional neural networks for fast
  and low power mobile applications"): ``1x1 (C_in -> R_in) -> kxk (R_in -> R_out) ->
  1x1 (R_out -> C_out, bias)``;
* CP (Lebedev et al. 2015, "Speeding-up convolutional neural networks using fine-tuned
  CP-decomposition"): ``1x1 (C_in -> R) -> depthwise kx1 -> depthwise 1xk -> 1x1
  (R -> C_out, bias)``, one depthwise convolution per spatial axis.

Tucker-2 and SVD act on the channel modes only and CP gives one factor per kernel axis,
so all three are the same in 1, 2 or 3 spatial dims (a volume's CP has three depthwise
factors, a signal's one); the factor layers have the dims of the layer they replace.
Which factorisations a layer admits is its operator's ``lowrank`` fact in the registry
(:mod:`cnnkit.layers.ops`); a layer the registry does not know refuses.

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

from . import nd
from .ops import OpFacts, Unsupported, operator_modules

__all__ = ["svd_layers", "tucker2_layers", "cp_layers", "replace_module", "factorizable",
           "apply_lowrank_history", "fresh_factors", "factorize_model", "METHODS"]

METHODS = ("tucker", "cp", "svd", "auto")


def _one(conv: nn.Module) -> tuple[int, ...]:
    return (1,) * len(conv.kernel_size)


def svd_layers(layer: nn.Module, rank: int) -> nn.Sequential:
    """``(C_in -> rank) -> (rank -> C_out, bias)`` for a linear layer or a one-tap convolution
    of any dims (the stride and padding on the first convolution)."""
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, rank, bias=False)
        last = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    else:
        conv = nd.conv(len(layer.kernel_size))
        first = conv(layer.in_channels, rank, _one(layer), stride=layer.stride,
                     padding=layer.padding, padding_mode=layer.padding_mode, bias=False)
        last = conv(rank, layer.out_channels, _one(layer), bias=layer.bias is not None)
    return nn.Sequential(first, last).to(layer.weight.device)


def tucker2_layers(conv: nn.Module, r_in: int, r_out: int) -> nn.Sequential:
    """``1x1 -> kxk -> 1x1`` with ranks ``(r_in, r_out)``; the padding on the core (a
    bias-free 1x1 convolution commutes with padding)."""
    make = nd.conv(len(conv.kernel_size))
    first = make(conv.in_channels, r_in, _one(conv), bias=False)
    mid = make(r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
               dilation=conv.dilation, padding_mode=conv.padding_mode, bias=False)
    last = make(r_out, conv.out_channels, _one(conv), bias=conv.bias is not None)
    return nn.Sequential(first, mid, last).to(conv.weight.device)


def cp_layers(conv: nn.Module, rank: int) -> nn.Sequential:
    """``1x1 -> one depthwise convolution per axis -> 1x1``: ``kx1`` then ``1xk`` in 2D; the
    stride, padding and dilation of each axis on the depthwise convolution of that axis."""
    dims = len(conv.kernel_size)
    make = nd.conv(dims)

    def along(values: tuple, axis: int, other: object) -> tuple:
        return tuple(v if i == axis else other for i, v in enumerate(values))

    layers = [make(conv.in_channels, rank, _one(conv), bias=False)]
    for a in range(dims):
        pad = conv.padding if isinstance(conv.padding, str) else along(conv.padding, a, 0)
        layers.append(make(rank, rank, along(conv.kernel_size, a, 1),
                           stride=along(conv.stride, a, 1), padding=pad,
                           dilation=along(conv.dilation, a, 1), groups=rank,
                           padding_mode=conv.padding_mode, bias=False))
    layers.append(make(rank, conv.out_channels, _one(conv), bias=conv.bias is not None))
    return nn.Sequential(*layers).to(conv.weight.device)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _layer_method(name: str, module: nn.Module, facts: OpFacts, method: str) -> str | None:
    """The factorisation ``method`` applies to ``module`` by its registered facts, or None
    to leave it alone (nothing to factorise, a grouped convolution, a method that is not
    its kind)."""
    admits = facts.lowrank
    if isinstance(admits, Unsupported) or not admits or getattr(module, "groups", 1) != 1:
        return None
    if math.prod(getattr(module, "kernel_size", (1,))) == 1:  # a matrix, hence SVD
        return "svd" if method in ("svd", "auto") and "svd" in admits else None
    if method == "svd":
        return None
    kind = "tucker" if method == "auto" else method
    if kind not in admits:
        raise ValueError(f"{name} ({type(module).__name__}) admits {', '.join(admits)} only "
                         f"(its operator's lowrank fact), not {kind}; choose another method")
    return kind


def factorizable(model: nn.Module, method: str, layers: list[str] | None = None,
                 skip_first: bool = True) -> list[tuple[str, str]]:
    """``(name, method)`` for every layer to factorise, in module order: ``"tucker"`` or
    ``"cp"`` for ``kxk`` ``groups=1`` convolutions (of any dims), ``"svd"`` for linear
    layers and one-tap convolutions (``method="auto"``: Tucker-2 and SVD), as each
    operator's ``lowrank`` fact admits. Grouped convolutions are left alone, and so, with
    ``skip_first`` and no ``layers``, is the first convolution; so are layers whose fact
    is :class:`~cnnkit.layers.ops.Unsupported` (transposed convolutions), unless named in
    ``layers``, which refuses.

    Raises:
        ValueError: an unknown method, ``layers`` naming modules the model lacks or an
            unsupported layer, or a module the operator registry does not know.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    named = dict(model.named_modules())
    if layers is not None:
        missing = [n for n in layers if n not in named]
        if missing:
            raise ValueError(f"layers {missing} are not modules of the model; use names from "
                             "model.named_modules()")
    ops = operator_modules(model, "low-rank factorisation")
    first_conv = next((n for n, _, f in ops if f.channels == "conv"), None)
    plan = []
    for name, m, facts in ops:
        if layers is not None and name not in layers:
            continue
        if layers is None and skip_first and name == first_conv:
            continue
        if layers is not None and isinstance(facts.lowrank, Unsupported):
            raise ValueError(f"cannot factorise {name} ({type(m).__name__}): "
                             f"{facts.lowrank.reason}")
        kind = _layer_method(name, m, facts, method)
        if kind is not None:
            plan.append((name, kind))
    return plan


def apply_lowrank_history(model: nn.Module, history: list[dict]) -> nn.Module:
    """Rebuild the factor structure a ``lowrank_history`` records (``{"layer", "method",
    "rank"}`` per replaced layer), on a copy of the original architecture; the weights are
    whatever the caller loads next.

    Example:
        >>> from cnnkit.compress import decompose
        >>> from cnnkit.layers.lowrank import apply_lowrank_history
        >>> from cnnkit.models import create_model
        >>> small, _ = decompose(create_model("tinyvgg", img_size=32), rank=2)
        >>> small.lowrank_history[0]  # JSON-safe: saved with the run
        {'layer': 'features.conv_1_2', 'method': 'tucker', 'rank': [2, 2]}
        >>> again = apply_lowrank_history(create_model("tinyvgg", img_size=32),
        ...                               small.lowrank_history)
        >>> again.state_dict().keys() == small.state_dict().keys(), again.features.conv_1_2[1]
        (True, Conv2d(2, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False))
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


def fresh_factors(conv: nn.Module, kind: str, rank_ratio: float) -> nn.Sequential:
    """Randomly initialised factor sequence whose product has He's variance ``2/fan_in``.

    Every factor but the last is variance preserving (``N(0, 1/fan_in)`` of that factor); the
    last 1x1 convolution gets He's ``N(0, 2/R)``. The entries of the product are sums of
    products of independent zero-mean factors, so for CP (2D)
    ``Var = R (1/C_in)(1/kh)(1/kw)(2/R) = 2/(C_in kh kw)`` and for Tucker-2
    ``Var = R_out R_in (1/C_in)(1/(R_in kh kw))(2/R_out) = 2/(C_in kh kw)``, one ``1/k`` per
    kernel axis in any dims: He et al. (2015), "Delving deep into rectifiers", fan-in mode,
    for the original convolution.
    """
    c_out, c_in, *kernel = conv.weight.shape
    if kind == "cp":
        r = max(1, round(rank_ratio * max(c_in, c_out)))
        seq = cp_layers(conv, r)
        stds = [1 / math.sqrt(c_in), *(1 / math.sqrt(k) for k in kernel), math.sqrt(2 / r)]
    else:
        r_in, r_out = max(1, round(rank_ratio * c_in)), max(1, round(rank_ratio * c_out))
        seq = tucker2_layers(conv, r_in, r_out)
        stds = [1 / math.sqrt(c_in), 1 / math.sqrt(r_in * math.prod(kernel)),
                math.sqrt(2 / r_out)]
    with torch.no_grad():
        for m, std in zip(seq, stds, strict=True):
            m.weight.normal_(0.0, std)
        if seq[-1].bias is not None:
            seq[-1].bias.zero_()
    return seq


def factorize_model(model: nn.Module, kind: str = "cp", rank_ratio: float = 0.25,
                    skip_first: bool = True, inplace: bool = False) -> nn.Module:
    """Replace every ``kxk`` (k>1), ``groups=1`` convolution (of any dims) by a freshly
    initialised factor sequence, for training a factorised network from scratch.

    ``kind="cp"`` (Lebedev et al. 2015) uses rank ``R = round(rank_ratio * max(C_in, C_out))``;
    ``kind="tucker"`` (Kim et al. 2016) uses ``R_in = round(rank_ratio * C_in)`` and
    ``R_out = round(rank_ratio * C_out)``. The factors are initialised so the product kernel
    has He's fan-in variance ``2/(C_in kh kw)`` (see :func:`fresh_factors`).

    Raises:
        ValueError: an unknown kind, a rank ratio outside (0, 1], or a module the operator
            registry does not know.
    """
    if kind not in ("cp", "tucker"):
        raise ValueError(f"unknown kind {kind!r}; choose 'cp' or 'tucker'")
    if not 0.0 < rank_ratio <= 1.0:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    new = model if inplace else copy.deepcopy(model)
    for name, _ in factorizable(new, kind, None, skip_first):
        replace_module(new, name, fresh_factors(new.get_submodule(name), kind, rank_ratio))
    return new
