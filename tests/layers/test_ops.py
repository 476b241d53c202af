"""The operator registry: one description per operator, in 1, 2 and 3 dims, read by every
consumer; unknown operators refuse in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit.layers.ops import (
    CHANNELS,
    LRP_SLOTS,
    VIEWS,
    OpFacts,
    UnknownOperator,
    function_facts,
    module_facts,
    operator_modules,
    register_op,
    registered_ops,
)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_facts_are_the_same_in_every_dims(dims):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](2, 3, 3)
    facts = module_facts(conv)
    assert facts.dims == dims and function_facts(f"conv{dims}d") is facts
    assert (facts.channels, facts.lrp, facts.view) == ("conv", "conv", "conv")
    assert set(facts.lowrank) == {"svd", "tucker", "cp"}
    bn = module_facts((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](3))
    assert (bn.channels, bn.lrp, bn.view) == ("norm", "norm", "norm")
    t = module_facts((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1])
    assert t.channels == "conv_transpose" and t.int8(
        (torch.zeros(1, 2, *(4,) * dims), torch.zeros(2, 2, *(2,) * dims)), {}, "fbgemm") is True


def test_every_registered_fact_is_a_known_choice():
    for facts in registered_ops().values():
        assert isinstance(facts, OpFacts)
        assert callable(facts.channels) or facts.channels in CHANNELS
        assert facts.lrp is None or facts.lrp in LRP_SLOTS
        assert facts.view is None or facts.view in VIEWS


def test_subclass_inherits_its_base_facts():
    class MyConv(nn.Conv3d):
        pass

    assert module_facts(MyConv(1, 1, 1)).name == "conv3d"


def test_unknown_module_and_function_refuse_in_one_line(unknown_layer):
    with pytest.raises(UnknownOperator) as err:
        module_facts(unknown_layer(), "the test")
    msg = str(err.value)
    assert "Scale" in msg and "the test" in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnknownOperator, match="'fft_fft'"):
        function_facts("fft_fft")


def test_operator_modules_refuses_unknown_leaves_with_parameters(unknown_layer):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(unknown_layer()))
    with pytest.raises(UnknownOperator, match="'1.0'"):
        operator_modules(model)

    class Add(nn.Module):  # no parameters: its torch functions are what consumers see
        def forward(self, x):
            return x + x

    free = nn.Sequential(nn.Conv2d(1, 2, 3), Add())
    with pytest.raises(UnknownOperator, match="Add"):
        operator_modules(free)
    assert [n for n, _, _ in operator_modules(free, functional_leaves=True)] == ["0"]
    with pytest.raises(UnknownOperator, match="Scale"):
        operator_modules(model, functional_leaves=True)


def test_registering_twice_raises(unknown_layer):
    with pytest.raises(ValueError, match="registered already"):
        register_op(OpFacts("conv2d_again", (nn.Conv2d,)))
    with pytest.raises(ValueError, match="unknown channels"):
        OpFacts("bad", (unknown_layer,), channels="sideways")
