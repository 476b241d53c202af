"""Parameter groups, schedules and the weight EMA."""

import math

import pytest
import torch
from torch import nn

from cnnkit.training import TrainConfig
from cnnkit.training.optim import ModelEma, build_optimizer, lr_factor, param_groups


def test_no_weight_decay_on_norms_and_biases():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    m(torch.randn(1, 3, 5, 5))
    decay, no_decay = param_groups(m, 0.1)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(decay) == {id(m[0].weight), id(m[3].weight)}
    assert ids(no_decay) == {id(m[0].bias), id(m[1].weight), id(m[1].bias), id(m[3].bias)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_optimizer_choice_and_lr_scaling():
    m = nn.Linear(2, 2)
    sgd = build_optimizer(m, TrainConfig(batch_size=128, optimizer="sgd"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == pytest.approx(0.05)
    assert sgd.param_groups[0]["nesterov"]
    adamw = build_optimizer(m, TrainConfig(optimizer="adamw", lr=1e-3))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 1e-3
    # classification's own default: AdamW at 2e-3 with weight decay 0.05
    default = build_optimizer(m, TrainConfig(batch_size=128))
    assert isinstance(default, torch.optim.AdamW) and default.param_groups[0]["lr"] == 2e-3
    assert default.param_groups[0]["weight_decay"] == 0.05


def test_schedules_analytic_values():
    total, warm = 100, 10
    assert [lr_factor(s, total, warm, "cosine") for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, total, warm, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, total, warm, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, total, warm, "cosine") == pytest.approx(0.0, abs=1e-12)
    mid = lr_factor(32, total, warm, "cosine")
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
    assert lr_factor(55, total, warm, "onecycle") == pytest.approx(0.5)
    assert lr_factor(99, total, warm, "constant") == 1.0


def test_ema_update_formula():
    m = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = ModelEma(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # d = min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.state["weight"], torch.full((1, 3), 1 - d))
    for _ in range(200):
        ema.update(m)
    assert torch.allclose(ema.state["weight"], torch.ones(1, 3), atol=1e-6)


def test_config_validation_names_the_choices():
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="split"):
        TrainConfig(split=(0.5, 0.5, 0.5))


def test_amp_resolution():
    from cnnkit.training.device import _cpu_has_bf16, resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("auto", cpu) == (torch.bfloat16 if _cpu_has_bf16() else None)
    assert resolve_amp("auto", cpu, spatial_dims=1) == resolve_amp("auto", cpu)
    assert resolve_amp("auto", cpu, spatial_dims=3) is None  # bf16 conv3d grads went NaN
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA GPU"):
        resolve_amp("fp16", cpu)
