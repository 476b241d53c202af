"""Low-rank factorisation of convolutions and linear layers.

* Tucker-2 (Kim, Park, Yoo, Choi, Yang and Shin 2016, "Compression of deep convolutional neural
  networks for fast and low power mobile applications", ICLR): HOSVD of the kernel on its output
  and input channel modes, optionally refined by HOOI, gives
  ``1x1 (C_in->R_in) -> kxk (R_in->R_out) -> 1x1 (R_out->C_out, bias)``.
* CP (Lebedev, Ganin, Rakhuba, Oseledets and Lempitsky 2015, "Speeding-up convolutional neural
  networks using fine-tuned CP-decomposition", ICLR): a rank-R CP of the 4-way kernel by
  alternating least squares gives ``1x1 (C_in->R) -> depthwise kx1 -> depthwise 1xk ->
  1x1 (R->C_out, bias)``.
* Truncated SVD of a linear layer (or a 1x1 convolution) into two (Eckart and Young 1936,
  "The approximation of one matrix by another of lower rank").

Ranks are an ``int``, ``"energy:f"`` (the smallest rank whose leading singular values carry the
fraction ``f`` of the squared Frobenius energy of the relevant unfolding) or a per-layer
parameter ``compression`` factor solved for the rank. :func:`decompose` factorises a trained
model; :func:`factorize_model` builds freshly initialised factorised layers for training from
scratch. Grouped (and depthwise) convolutions are left alone: they are already cheap.

Example:
    >>> from cnnkit.models import create_model
    >>> model = create_model("resnet18", num_classes=10, img_size=32)
    >>> small, summary = decompose(model, method="tucker", compression=4.0)
    >>> sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .factorizations import (
    _check_rank_args,
    _effective_weight,
    cp_als,
    cp_conv,
    cp_params,
    select_rank,
    svd_conv1x1,
    svd_linear,
    svd_params,
    tucker2_conv,
    tucker2_params,
)

__all__ = ["LowRankRecord", "apply_lowrank_history", "cp_als", "cp_conv", "cp_params",
           "decompose", "factorize_model", "select_rank", "svd_conv1x1", "svd_linear",
           "svd_params", "tucker2_conv", "tucker2_params"]

_METHODS = ("tucker", "cp", "svd", "auto")


@dataclass(frozen=True)
class LowRankRecord:
    """One replaced layer: qualified name, method, rank(s), parameters and kernel error."""

    layer: str
    method: str
    rank: int | tuple[int, int]
    params_before: int
    params_after: int
    rel_error: float  # ||W - W_hat||_F / ||W||_F of the layer's weight


# ----------------------------------------------------------------------------- whole models
def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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


def _plan(model: nn.Module, method: str, layers: list[str] | None,
          skip_first: bool) -> list[tuple[str, str]]:
    """``(name, method)`` for every layer to factorise, in module order."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {_METHODS}")
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
        plan_kind = _layer_method(m, method)
        if plan_kind is not None:
            plan.append((name, plan_kind))
    return plan


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def decompose(model: nn.Module, method: str = "auto", rank: int | str | None = None,
              compression: float | None = None, layers: list[str] | None = None,
              skip_first: bool = True, hooi_iters: int = 0,
              keep_if_larger: bool = False,
              cp_iters: int = 200) -> tuple[nn.Module, list[LowRankRecord]]:
    """Replace layers of a deep copy of ``model`` by low-rank factor sequences.

    Methods: ``"tucker"`` (Kim et al. 2016) or ``"cp"`` (Lebedev et al. 2015) for ``kxk``
    convolutions, ``"svd"`` for linear layers and 1x1 convolutions, ``"auto"`` = Tucker-2 for
    ``kxk`` and SVD for the rest. Each replaced layer becomes an ``nn.Sequential`` under the
    same name, so the parent's ``forward`` still calls it. Grouped convolutions are skipped,
    and so, with ``skip_first``, is the first convolution (few input channels, little to gain).
    A factorisation that would not save parameters is skipped unless ``keep_if_larger``.

    Args:
        model: the model; it is not modified.
        method: ``"tucker"``, ``"cp"``, ``"svd"`` or ``"auto"``.
        rank: an int or ``"energy:f"`` (give this or ``compression``).
        compression: per-layer parameter reduction factor, solved for the rank.
        layers: qualified names to factorise (default: every eligible layer).
        skip_first: leave the first convolution alone when ``layers`` is None.
        hooi_iters: HOOI refinement iterations for Tucker-2.
        keep_if_larger: replace a layer even when the factors have more parameters.
        cp_iters: maximum ALS sweeps per CP decomposition.

    Returns:
        The new model and one :class:`LowRankRecord` per replaced layer. The model carries
        ``lowrank_history`` (JSON-safe ``{"layer", "method", "rank"}`` per replaced layer),
        so a run saved from it is rebuilt by :func:`apply_lowrank_history`, never unpickled.
    """
    _check_rank_args(rank, compression)
    if getattr(model, "lowrank_history", None):
        raise ValueError("the model is already decomposed; decompose the original model once "
                         "(with every layer you want in `layers`)")
    new = copy.deepcopy(model)
    records = []
    for name, kind in _plan(new, method, layers, skip_first):
        old = new.get_submodule(name)
        if kind == "svd":
            build = svd_linear if isinstance(old, nn.Linear) else svd_conv1x1
            seq = build(old, rank=rank, compression=compression)
            r = seq[0].out_features if isinstance(old, nn.Linear) else seq[0].out_channels
        elif kind == "tucker":
            seq = tucker2_conv(old, rank=rank, compression=compression, hooi_iters=hooi_iters)
            r = (seq[1].out_channels, seq[1].in_channels)
        else:
            seq = cp_conv(old, rank=rank, compression=compression, iters=cp_iters)
            r = seq[1].out_channels
        before, after = _n_params(old), _n_params(seq)
        if after >= before and not keep_if_larger:
            continue
        w = old.weight.detach().double()
        err = ((w - _effective_weight(seq)).norm() / w.norm().clamp_min(1e-300)).item()
        seq.train(old.training)
        _replace(new, name, seq)
        records.append(LowRankRecord(name, kind, r, before, after, err))
    new.lowrank_history = [{"layer": r.layer, "method": r.method,
                            "rank": list(r.rank) if isinstance(r.rank, tuple) else r.rank}
                           for r in records]
    return new, records


def apply_lowrank_history(model: nn.Module, history: list[dict]) -> nn.Module:
    """Rebuild the factor structure :func:`decompose` recorded, on a copy of the original
    architecture (the weights are whatever the caller loads next).

    Example:
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
        with torch.no_grad():  # only the structure matters: the weights get overwritten
            if method == "svd":
                build = svd_linear if isinstance(old, nn.Linear) else svd_conv1x1
                seq = build(old, rank=int(rank))
            elif method == "tucker":
                seq = tucker2_conv(old, rank=(int(rank[0]), int(rank[1])))
            elif method == "cp":
                seq = cp_conv(old, rank=int(rank), iters=0)
            else:
                raise ValueError(f"unknown method {method!r} in the low-rank history")
        seq.train(old.training)
        _replace(new, name, seq)
    new.lowrank_history = [dict(e) for e in history]
    return new


def _fresh_factors(conv: nn.Conv2d, kind: str, rank_ratio: float) -> nn.Sequential:
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
        probe = nn.Conv2d(c_in, c_out, (kh, kw), stride=conv.stride, padding=conv.padding,
                          dilation=conv.dilation, padding_mode=conv.padding_mode,
                          bias=conv.bias is not None)
        seq = cp_conv(probe, rank=r, iters=0)  # only for the layer structure
        stds = [1 / math.sqrt(c_in), 1 / math.sqrt(kh), 1 / math.sqrt(kw), math.sqrt(2 / r)]
    else:
        r_in, r_out = max(1, round(rank_ratio * c_in)), max(1, round(rank_ratio * c_out))
        probe = nn.Conv2d(c_in, c_out, (kh, kw), stride=conv.stride, padding=conv.padding,
                          dilation=conv.dilation, padding_mode=conv.padding_mode,
                          bias=conv.bias is not None)
        seq = tucker2_conv(probe, rank=(r_out, r_in))
        stds = [1 / math.sqrt(c_in), 1 / math.sqrt(r_in * kh * kw), math.sqrt(2 / r_out)]
    with torch.no_grad():
        for m, std in zip(seq, stds, strict=True):
            m.weight.normal_(0.0, std)
        if seq[-1].bias is not None:
            seq[-1].bias.zero_()
    return seq.to(conv.weight.device)


def factorize_model(model: nn.Module, kind: str = "cp", rank_ratio: float = 0.25,
                    skip_first: bool = True, inplace: bool = False) -> nn.Module:
    """Replace every ``kxk`` (k>1), ``groups=1`` convolution by a freshly initialised factor
    sequence, for training a factorised network from scratch.

    ``kind="cp"`` (Lebedev et al. 2015) uses rank ``R = round(rank_ratio * max(C_in, C_out))``;
    ``kind="tucker"`` (Kim et al. 2016) uses ``R_in = round(rank_ratio * C_in)`` and
    ``R_out = round(rank_ratio * C_out)``. The factors are initialised so the product kernel
    has He's fan-in variance ``2/(C_in kh kw)`` (see :func:`_fresh_factors`).
    """
    if kind not in ("cp", "tucker"):
        raise ValueError(f"unknown kind {kind!r}; choose 'cp' or 'tucker'")
    if not 0.0 < rank_ratio <= 1.0:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    new = model if inplace else copy.deepcopy(model)
    plan = _plan(new, kind, None, skip_first)
    for name, _ in plan:
        _replace(new, name, _fresh_factors(new.get_submodule(name), kind, rank_ratio))
    return new
