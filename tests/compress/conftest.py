"""Compression tests: tiny tensors, one thread; BatchNorm layers with non-trivial state."""

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: on the shared 2-core machine two OpenMP threads only contend
    (measured: 50 LeNet steps take 0.2 s on one thread, 3-13 s on two under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise_bn(model: nn.Module, mean: float = 1.0, bias: float = 1.0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (running mean in [-mean, mean], bias in
    [-bias, bias]), so a forgotten or mis-folded BN shows in the output; eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-mean, mean)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-bias, bias)
    return model.eval()


@pytest.fixture
def randomise_bn():
    """:func:`_randomise_bn`, handed out as a fixture (conftest modules are not imported)."""
    return _randomise_bn
