"""Model facts for the explorer: per-layer parameters, MACs and receptive fields, and
what compression did to a run.

The per-layer numbers come from :func:`cnnkit.analysis.summary` (receptive fields after
Araujo, Norris and Sim 2019, "Computing Receptive Fields of Convolutional Neural
Networks", Distill). An int8 model is summarised through the float model it was
quantised from (same layers, same MACs; its weights take one byte instead of four),
plus each quantised layer's int8 grid (Jacob et al. 2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference"). A pruned run shows
its ``pruning_history``: per group of coupled channels, how many were kept (Li et al.
2017, "Pruning Filters for Efficient ConvNets"); a compressed run folder's
``compress.json`` gives the measured before/after table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.analysis import summary

from .layers import Layer

__all__ = ["layer_facts", "compression_facts"]


def layer_facts(model: nn.Module, input_size: Sequence[int], layers: Sequence[Layer],
                ) -> dict[str, Any]:
    """Per layer (by index) ``params``, ``macs``, ``receptive_field``, ``jump``; totals.

    Summary rows are one per leaf-module call in call order, so the k-th call of a
    module here is its k-th row there.

    Example:
        >>> from cnnkit.models import create_model
        >>> from cnnkit.web.facts import layer_facts
        >>> from cnnkit.web.layers import discover
        >>> model = create_model("tinyvgg", in_chans=1, img_size=8)
        >>> facts = layer_facts(model, (1, 8, 8), discover(model, (1, 8, 8)))
        >>> facts["layers"][0]["params"], facts["layers"][0]["receptive_field"]
        (100, 3)
    """
    result = summary(model, tuple(input_size))
    rows: dict[tuple[str, int], Any] = {}
    calls: dict[str, int] = {}
    for r in result.rows:
        rows[(r.name, calls.setdefault(r.name, 0))] = r
        calls[r.name] += 1
    per_layer = []
    calls.clear()
    for la in layers:
        r = rows.get((la.module, calls.setdefault(la.module, 0)))
        calls[la.module] += 1
        per_layer.append(None if r is None else {
            "params": r.params, "macs": r.macs, "receptive_field": r.receptive_field,
            "jump": r.jump, "activation_bytes": r.activation_bytes})
    return {"layers": per_layer, "total_params": result.total_params,
            "total_macs": result.total_macs, "param_bytes": result.param_bytes,
            "peak_activation_bytes": result.peak_activation_bytes}


def _int8_layers(qmodel: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantised module: weight scheme and scales, output scale and zero point."""
    found = {}
    for name, m in qmodel.named_modules():
        if not (hasattr(m, "scale") and hasattr(m, "zero_point") and callable(
                getattr(m, "weight", None))):
            continue
        w = m.weight()
        per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        scales = w.q_per_channel_scales() if per_channel else torch.tensor([w.q_scale()])
        found[name] = {"weight_dtype": str(w.dtype).removeprefix("torch."),
                       "per_channel": per_channel, "weight_scale_min": scales.min().item(),
                       "weight_scale_max": scales.max().item(),
                       "output_scale": float(m.scale), "output_zero_point": int(m.zero_point)}
    return found


def compression_facts(run_path: Path, float_model: nn.Module, int8_model: nn.Module | None,
                      ) -> dict[str, Any] | None:
    """What was pruned or quantised in this run, or None for a plain trained run."""
    history = getattr(float_model, "pruning_history", None) or []
    table_path = run_path / "compress.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else None
    if not history and table is None and int8_model is None:
        return None
    pruned = [{"step": h["step"], "channels": h["channels"], "kept": len(h["kept"]),
               "kept_indices": h["kept"],
               "members": [f"{name} ({kind})" for name, kind, *_ in h["members"]]}
              for h in history]
    facts: dict[str, Any] = {"pruned_groups": pruned, "measured": None, "int8": None}
    if table is not None:
        facts["measured"] = {"from": table.get("run"), "prune": table.get("prune"),
                             "criterion": table.get("criterion"),
                             "quantize": table.get("quantize"), "models": table.get("models")}
    if int8_model is not None:
        facts["int8"] = {"config": getattr(int8_model, "quant_config", None),
                         "layers": _int8_layers(int8_model)}
    return facts
