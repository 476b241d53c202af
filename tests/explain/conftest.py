"""Test setup for the explainers: ``zennit``, the LRP reference, without torchvision."""

import importlib
import importlib.util
import sys
import types

import lrp_nets
import pytest
import torch
from torch import nn


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """``torchvision.models.resnet`` holding placeholder ``BasicBlock`` / ``Bottleneck``.

    zennit 0.5.1's ``__init__`` runs ``from . import torchvision``, whose only need is
    ``from torchvision.models.resnet import Bottleneck, BasicBlock`` for its torchvision
    ResNet canonizers (isinstance checks). torchvision itself must not be installed (it
    pulls a CUDA build of torch), and CI installs zennit with ``--no-deps``. The
    placeholders match no module, so those canonizers do nothing; the tests never use
    them (they merge BatchNorm with zennit's generic canonizers).
    """
    names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
    mods = {name: types.ModuleType(name) for name in names}
    resnet = mods["torchvision.models.resnet"]
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {"__module__": resnet.__name__})
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {"__module__": resnet.__name__})
    mods["torchvision"].models = mods["torchvision.models"]
    mods["torchvision.models"].resnet = resnet
    return mods


@pytest.fixture(scope="session")
def zennit() -> types.ModuleType:
    """The ``zennit`` package (skips when it is not installed). When torchvision is missing
    the stand-in lives in ``sys.modules`` only while zennit is imported, so no other test
    can mistake it for torchvision."""
    if importlib.util.find_spec("zennit") is None:
        pytest.skip("zennit is not installed (pip install --no-deps zennit==0.5.1)")
    try:
        importlib.import_module("torchvision")
        stand_in = {}
    except ImportError:
        stand_in = _torchvision_stand_in()
    added = [name for name in stand_in if name not in sys.modules]
    sys.modules.update({name: stand_in[name] for name in added})
    try:
        return importlib.import_module("zennit")
    finally:
        for name in added:
            sys.modules.pop(name, None)


# Built once per session (calibration runs the nets in train mode): tests must not
# modify them; ``create("lrp", ...)`` works on a copy.
@pytest.fixture(scope="session")
def calibrated_resnetlet() -> nn.Module:
    """The small residual net of :mod:`lrp_nets` with calibrated BatchNorm statistics."""
    return lrp_nets.resnetlet()


@pytest.fixture(scope="session")
def calibrated_resnet18() -> nn.Module:
    """cnnkit's ResNet-18 (32x32, float64) with calibrated BatchNorm statistics."""
    return lrp_nets.resnet18()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny convolutions only get contention from more on
    a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
