"""The neuron arithmetic of ``cnnkit serve`` against independent references: for every
registered classifier, sampled neurons of every layer reproduce the recorded activation,
and convolution neurons equal ``F.conv2d`` on the recorded input; padding modes, dilation,
groups and pooling edge cases are checked on purpose-built layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.models import create_model, list_models, model_info
from cnnkit.web.layers import discover, layer_modules, trace
from cnnkit.web.neuron import filters, neuron, softmax_neuron


def _randomise_norms(model: nn.Module) -> None:
    """BatchNorm statistics away from (0, 1), so the norm arithmetic is really exercised."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))


def _conv_reference(module: nn.Conv2d, x: torch.Tensor, c: int) -> torch.Tensor:
    """Output channel ``c`` by F.conv2d in float64 on the filter's group of input channels,
    padding applied by F.pad for the non-zero modes."""
    cin = module.in_channels // module.groups
    first = c // (module.out_channels // module.groups) * cin
    x = x[first:first + cin][None].double()
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    bias = None if module.bias is None else module.bias[c:c + 1].double()
    return F.conv2d(x, module.weight[c:c + 1].double(), bias, module.stride, padding,
                    module.dilation)[0, 0]


def _check_model(model: nn.Module, input_size: tuple[int, ...], per_layer: int) -> dict[str, int]:
    """Check sampled neurons of every layer; returns the views checked per kind."""
    model.eval()
    layers = discover(model, input_size)
    modules = dict(layer_modules(model))
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(1))
    t = trace(model, layers, x)
    with torch.no_grad():
        torch.testing.assert_close(t.logits, model(x)[0])  # the hooks change nothing
    g = torch.Generator().manual_seed(2)
    seen: dict[str, int] = {}
    for la in layers:
        out, inp, module = t.outputs[la.index], t.inputs[la.index], modules[la.module]
        for _ in range(per_layer):
            index = tuple(int(torch.randint(n, (1,), generator=g)) for n in out.shape)
            view = neuron(la, module, inp, out, index)
            assert view["value"] == out[index].item()
            if view["matches"] is not None:
                assert view["matches"], (la.name, index, view["result"], view["value"])
            if view["kind"] == "conv":
                ref = _conv_reference(module, inp, index[0])[index[1:]].item()
                assert view["result"] == pytest.approx(ref, rel=1e-9, abs=1e-9)
                assert view["sum"] + view["bias"] == pytest.approx(ref, rel=1e-9, abs=1e-9)
                products = torch.tensor(view["products"])
                torch.testing.assert_close(products, torch.tensor(view["patch"])
                                           * torch.tensor(view["kernel"]))
                torch.testing.assert_close(torch.tensor(view["kernel"], dtype=torch.float64),
                                           module.weight[index[0]].double())
            seen[view["kind"]] = seen.get(view["kind"], 0) + 1
    return seen


def _one_per_family() -> list[tuple[str, dict]]:
    """The smallest-named classifier of every registered family (the web code sees layer
    types, which a family shares), a recalibration block, and a slim WRN for speed."""
    chosen: dict[str, str] = {}
    for name in sorted(list_models(task="classify"), key=lambda n: (len(n), n)):
        chosen.setdefault(model_info(name).family, name)
    options = {"wide_resnet": {"depth": 10, "widen_factor": 2}}
    return [(n, options.get(n, {})) for n in chosen.values()] + [("resnet18", {"attn": "se"})]


@pytest.mark.parametrize(("name", "options"), _one_per_family(),
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_every_family_neuron_reproduces_its_activation(name, options):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=3, img_size=16, **options)
    _randomise_norms(model)
    seen = _check_model(model, (3, 16, 16), per_layer=2)
    assert seen.get("conv", 0) > 0 and (seen.get("linear", 0) > 0 or name == "allconv")


class _Odd(nn.Module):
    """Every convolution and pooling option the arithmetic must honour."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2, groups=3,
                           padding_mode="reflect")
        self.b = nn.Conv2d(6, 4, (3, 5), padding="same", padding_mode="circular", dilation=(1, 2))
        self.c = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.d = nn.Conv2d(4, 4, 2, padding=1, padding_mode="replicate", bias=False)
        self.e = nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True)
        self.f = nn.AvgPool2d(2, ceil_mode=True, padding=1)
        self.g = nn.AdaptiveMaxPool2d((3, 2))
        self.acts = nn.ModuleList([nn.LeakyReLU(0.1), nn.GELU(approximate="tanh"), nn.GELU(),
                                   nn.Hardswish(), nn.PReLU(4), nn.ELU(0.7), nn.SiLU(), nn.Mish(),
                                   nn.Sigmoid(), nn.Tanh(), nn.Hardsigmoid(), nn.ReLU6()])
        self.pool = nn.AdaptiveAvgPool2d((2, 3))
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(self.b(self.a(x)))
        for act in self.acts:
            x = act(x)
        x = self.pool(self.g(self.f(self.e(self.d(x)))))
        return self.fc(x.flatten(1))


def test_padding_modes_dilation_groups_and_pooling_edges():
    torch.manual_seed(0)
    seen = _check_model(_Odd(), (3, 23, 19), per_layer=12)
    assert seen == {"conv": 36, "pool": 60, "activation": 144, "linear": 12}


def test_conv_patch_marks_padding_and_group_channels():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    la = discover(conv, (4, 5, 5))[0]
    x = torch.randn(4, 5, 5)
    view = neuron(la, conv, x, conv(x[None])[0].detach(), (4, 0, 4))
    assert view["in_channels"] == [2, 4]  # filter 4 is in the second group
    assert view["rows"] == [-1, 0, 1] and view["cols"] == [3, 4, 5]  # row -1, col 5: padding
    assert view["patch"][0][0] == [0.0, 0.0, 0.0] and view["patch"][1][1][2] == 0.0
    assert view["patch"][1][1][1] == pytest.approx(x[3, 0, 4].item())


def test_a_conv_whose_forward_differs_is_flagged():
    class SignConv(nn.Conv2d):  # a binary-weight convolution: not the plain arithmetic
        def forward(self, x):
            return F.conv2d(x, self.weight.sign(), self.bias, self.stride, self.padding)

    conv = SignConv(2, 3, 3)
    la = discover(conv, (2, 6, 6))[0]
    x = torch.randn(2, 6, 6)
    assert neuron(la, conv, x, conv(x[None])[0].detach(), (0, 1, 1))["matches"] is False


def test_softmax_view_is_the_analytic_softmax():
    z = torch.tensor([2.0, -1.0, 0.5, 3.0])
    view = softmax_neuron(z, 3)
    e = [math.exp(v) for v in z.tolist()]
    assert view["shift"] == 0 and view["exps"] == pytest.approx(e)
    assert view["result"] == pytest.approx(e[3] / sum(e)) and view["matches"]
    big = softmax_neuron(torch.tensor([1000.0, 999.0]), 1)  # e^1000 overflows: shifted
    assert big["shift"] == 1000 and big["result"] == pytest.approx(1 / (1 + math.e))


def test_neuron_outside_the_layer_is_refused():
    conv = nn.Conv2d(1, 2, 3)
    la = discover(conv, (1, 5, 5))[0]
    x = torch.randn(1, 5, 5)
    with pytest.raises(ValueError, match="outside layer"):
        neuron(la, conv, x, conv(x[None])[0].detach(), (2, 0, 0))


def test_filters_of_a_linear_layer_after_flatten_are_maps():
    model = create_model("tinyvgg", num_classes=3, in_chans=1, img_size=8)
    layers = discover(model, (1, 8, 8))
    fc = layers[-1]
    data = filters(fc, model.fc, layers[fc.source].shape, max_out=2, max_in=4)
    assert data["shape"] == [3, 10, 2, 2] and data["weights"]["shape"] == [2, 4, 2, 2]
    conv = filters(layers[0], model.features.conv_1_1, (1, 8, 8), max_out=64, max_in=16)
    assert conv["shape"] == [10, 1, 3, 3] and conv["bias"] == pytest.approx(
        model.features.conv_1_1.bias.tolist())
    with pytest.raises(ValueError, match="only convolution and linear"):
        filters(layers[1], model.features.relu_1_1, None, 1, 1)
