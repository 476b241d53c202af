"""Layer discovery and tracing: layers found per call with their sources, the pass left
unchanged, no hook left behind, the caller's training mode kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit.models import create_model
from cnnkit.web.layers import discover, layer_kind, trace


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_tinyvgg_layers_sources_and_kinds():
    model = create_model("tinyvgg", num_classes=3, in_chans=1, img_size=8)
    layers = discover(model, (1, 8, 8))
    assert [la.kind for la in layers] == ["conv", "activation"] * 2 + ["pool"] \
        + ["conv", "activation"] * 2 + ["pool", "linear"]
    assert [la.source for la in layers] == [-1, *range(10)]  # the fc reads the flattened pool
    assert layers[-1].input_shape == (40,) and layers[-2].shape == (10, 2, 2)


def test_a_reused_module_is_one_layer_per_call_and_a_sum_has_no_source():
    model = create_model("resnet18", num_classes=3, in_chans=1, img_size=8)
    layers = {la.name: la for la in discover(model, (1, 8, 8))}
    second = layers["layer1.0.relu#2"]  # relu(out + shortcut): its input is a functional sum
    assert second.module == "layer1.0.relu" and second.source is None
    assert layers["layer1.0.relu"].source == layers["layer1.0.bn1"].index


def test_trace_records_inputs_before_in_place_ops_and_leaves_the_pass_unchanged():
    torch.manual_seed(0)
    model = create_model("tinyvgg", num_classes=3, in_chans=1, img_size=8)
    layers = discover(model, (1, 8, 8))
    x = torch.randn(1, 1, 8, 8)
    t = trace(model, layers, x)
    conv = model.features.conv_1_1(x)[0].detach()
    torch.testing.assert_close(t.outputs[0], conv)  # not overwritten by the in-place ReLU
    torch.testing.assert_close(t.inputs[1], conv)
    torch.testing.assert_close(t.outputs[1], conv.clamp(min=0))
    with torch.no_grad():
        torch.testing.assert_close(t.logits, model(x)[0])


def test_no_hook_is_left_and_the_training_mode_is_kept_even_on_errors():
    model = create_model("tinyvgg", num_classes=3, in_chans=1, img_size=8).train()
    model.features.conv_1_1.eval()  # a mixed state must come back as it was
    layers = discover(model, (1, 8, 8))
    for _ in range(100):
        trace(model, layers, torch.randn(1, 1, 8, 8))
    with pytest.raises(RuntimeError):
        trace(model, layers, torch.randn(1, 2, 8, 8))  # wrong channels: the forward fails
    assert _hooks(model) == 0
    assert model.training and model.features.training and model.fc.training
    assert not model.features.conv_1_1.training


def test_int8_layers_are_recognised():
    from cnnkit.compress.quantize import quantize

    torch.manual_seed(0)
    model = create_model("tinyvgg", num_classes=3, in_chans=1, img_size=8).eval()
    qmodel = quantize(model, torch.randn(16, 1, 8, 8))
    layers = discover(qmodel, (1, 8, 8))
    assert [la.kind for la in layers] == ["conv", "conv", "pool", "conv", "conv", "pool",
                                          "linear"]
    assert layer_kind(nn.Dropout()) == "identity" and layer_kind(nn.Upsample()) == "other"


@pytest.mark.parametrize("input_size", [(1, 32), (1, 16, 16), (1, 8, 8, 8)],
                         ids=["1d", "2d", "3d"])
def test_kinds_come_from_the_registry_in_every_dims(input_size):
    model = create_model("resnet18", num_classes=3, input_size=input_size)
    layers = discover(model, input_size)
    kinds = {la.module: la.kind for la in layers}
    assert (kinds["conv1"], kinds["bn1"], kinds["avgpool"], kinds["fc"]) == (
        "conv", "norm", "pool", "linear")
    assert [la.kind for la in layers].count("conv") == 20  # 17 3x3 + 3 downsamples, as 2D
    assert layer_kind(nn.ConvTranspose3d(2, 2, 2)) == "other"  # no view: values only


def test_unknown_layer_with_parameters_refused(unknown_layer):
    Scale = unknown_layer
    model = nn.Sequential(nn.Conv2d(1, 2, 3), Scale(), nn.Flatten(), nn.Linear(72, 3))
    with pytest.raises(ValueError, match="Scale") as err:
        discover(model, (1, 8, 8))
    assert "\n" not in str(err.value)
    free = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.Flatten()), nn.Linear(72, 3))
    assert [la.kind for la in discover(free, (1, 8, 8))] == ["conv", "flatten", "linear"]
