"""Low-rank factorisation of convolutions and linear layers.

* Tucker-2 (Kim, Park, Yoo, Choi, Yang and Shin 2016, "Compression of deep convolutional neural
  networks for fast and low power mobile applications", ICLR): HOSVD of the kernel on its output
  and input channel modes, optionally refined by HOOI, gives
  ``1x1 (C_in->R_in) -> kxk (R_in->R_out) -> 1x1 (R_out->C_out, bias)``.
* CP (Lebedev, Ganin, Rakhuba, Oseledets and Lempitsky 2015, "Speeding-up convolutional neural
  networks using fine-tuned CP-decomposition", ICLR): a rank-R CP of the 4-way kernel by
  alternating least squares gives ``1x1 (C_in->R) -> depthwise kx1 -> depthwise 1xk ->
  1x1 (R->C_out, bias)``, one depthwise convolution per kernel axis.
* Truncated SVD of a linear layer (or a 1x1 convolution) into two (Eckart and Young 1936,
  "The approximation of one matrix by another of lower rank").

Ranks are an ``int``, ``"energy:f"`` (the smallest rank whose leading singular values carry the
fraction ``f`` of the squared Frobenius energy of the relevant unfolding) or a per-layer
parameter ``compression`` factor solved for the rank. :func:`decompose` factorises a trained
model; :func:`cnnkit.layers.lowrank.factorize_model` builds freshly initialised factorised layers
for training from scratch, and :func:`~cnnkit.layers.lowrank.apply_lowrank_history` replays a
recorded factorisation. Grouped (and depthwise) convolutions are left alone: they are already cheap.
All three work on convolutions of 1, 2 or 3 spatial dims; which layers admit which
factorisation is their operator's ``lowrank`` fact (:mod:`cnnkit.layers.ops`), and a layer
the registry does not know refuses.

Example:
    >>> from cnnkit.compress import decompose
    >>> from cnnkit.models import create_model
    >>> model = create_model("resnet18", num_classes=10, img_size=32)
    >>> small, summary = decompose(model, method="tucker", compression=4.0)
    >>> sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters())
    (11173962, 2919650)
    >>> summary[0].layer, summary[0].rank, summary[0].params_before, summary[0].params_after
    ('layer1.0.conv1', (25, 25), 36864, 8825)
    >>> small.layer1[0].conv1  # the 3x3 convolution as 1x1, a 3x3 core, 1x1 (Tucker-2)
    Sequential(
      (0): Conv2d(64, 25, kernel_size=(1, 1), stride=(1, 1), bias=False)
      (1): Conv2d(25, 25, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
      (2): Conv2d(25, 64, kernel_size=(1, 1), stride=(1, 1), bias=False)
    )
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from cnnkit.layers.lowrank import (
    apply_lowrank_history,
    factorizable,
    factorize_model,
    replace_module,
)
from cnnkit.layers.ops import module_facts

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


def decompose(model: nn.Module, method: str = "auto", rank: int | str | None = None,
              compression: float | None = None, layers: list[str] | None = None,
              skip_first: bool = True, hooi_iters: int = 0,
              keep_if_larger: bool = False,
              cp_iters: int = 200) -> tuple[nn.Module, list[LowRankRecord]]:
    """Replace layers of a deep copy of ``model`` by low-rank factor sequences.

    Methods: ``"tucker"`` (Kim et al. 2016) or ``"cp"`` (Lebedev et al. 2015) for ``kxk``
    convolutions (``k``, ``kxkxk`` in 1D and 3D), ``"svd"`` for linear layers and one-tap
    convolutions, ``"auto"`` = Tucker-2 for ``kxk`` and SVD for the rest. Each replaced
    layer becomes an ``nn.Sequential`` under the same name, so the parent's ``forward``
    still calls it. Grouped convolutions are skipped,
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
    for name, kind in factorizable(new, method, layers, skip_first):
        old = new.get_submodule(name)
        if kind == "svd":
            dense = module_facts(old, "low-rank factorisation").channels == "linear"
            seq = (svd_linear if dense else svd_conv1x1)(old, rank=rank, compression=compression)
            r = seq[0].out_features if dense else seq[0].out_channels
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
        replace_module(new, name, seq)
        records.append(LowRankRecord(name, kind, r, before, after, err))
    new.lowrank_history = [{"layer": r.layer, "method": r.method,
                            "rank": list(r.rank) if isinstance(r.rank, tuple) else r.rank}
                           for r in records]
    return new, records
