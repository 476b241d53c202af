"""Model facts for the explorer: per-layer numbers from ``cnnkit summary`` matched to the
layers by call, and what pruning changed."""

from __future__ import annotations

import json

import torch

from cnnkit.analysis import summary
from cnnkit.compress.prune import prune
from cnnkit.models import create_model
from cnnkit.web.facts import compression_facts, layer_facts
from cnnkit.web.layers import discover


def test_layer_facts_follow_reused_modules_call_by_call():
    model = create_model("lenet5", num_classes=10, in_chans=1, img_size=32)  # `act` runs twice
    layers = discover(model, (1, 32, 32))
    facts = layer_facts(model, (1, 32, 32), layers)
    rows = summary(model, (1, 32, 32)).rows
    assert [la.name for la in layers] == [r.name if k == 0 else f"{r.name}#{k + 1}"
                                          for r, k in zip(rows, _calls(rows), strict=True)]
    assert [f["macs"] for f in facts["layers"]] == [r.macs for r in rows]
    assert facts["total_params"] == sum(p.numel() for p in model.parameters())


def _calls(rows):
    seen: dict[str, int] = {}
    for r in rows:
        seen[r.name] = seen.get(r.name, -1) + 1
        yield seen[r.name]


def test_a_pruned_model_reports_its_groups_and_a_plain_one_nothing(tmp_path):
    torch.manual_seed(0)
    model = create_model("tinyvgg", num_classes=4, in_chans=1, img_size=8)
    assert compression_facts(tmp_path, model, None) is None
    small = prune(model, 0.5, example_inputs=torch.randn(1, 1, 8, 8))
    (tmp_path / "compress.json").write_text(json.dumps(
        {"run": "runs/base", "prune": 0.5, "criterion": "l1", "quantize": None,
         "models": {"original": {"params": 1}, "pruned": {"params": 2}}}))
    facts = compression_facts(tmp_path, small, None)
    groups = facts["pruned_groups"]
    assert len(groups) == len(small.pruning_history) > 0
    assert all(g["kept"] == 5 and g["channels"] == 10 for g in groups)
    assert groups[0]["members"][0] == "features.conv_1_1 (out)"
    assert facts["measured"]["models"]["pruned"] == {"params": 2} and facts["int8"] is None
