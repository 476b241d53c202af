"""Leak test: every registered explainer, called 100 times, leaves nothing behind.

The issue's test: 100 calls per method, no growth in hooks or memory. After the calls: no
hook on any module (nor a global module hook), no growth in the number of live tensors
or in process memory between call 10 (after the warm-up: allocator caches, lazy state)
and call 100, no ``.grad`` on the parameters, and maps with no autograd graph attached.
Signals, images and volumes alike (1, 2 and 3 spatial dims); one small model and inputs of
8, 8x8 or 4x4x4 elements keep 100 calls of every method within the time budget; every
10th call explains a target function of the output instead of a class.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_mod

import cnnkit
import cnnkit.explain
from cnnkit.layers.nd import conv

# Small options for the methods whose defaults do many forwards per call.
OPTIONS = {
    "smoothgrad": dict(n_samples=2),
    "smoothgradcam++": dict(n_samples=2),
    "integrated_gradients": dict(steps=4),
    "occlusion": dict(window=4, stride=4),
}
CALLS, WARMUP = 100, 10  # growth is measured from call WARMUP to call CALLS


class _GapNet(nn.Module):
    """conv-relu-conv-relu, global average pooling, linear: a model every method accepts
    (CAM needs the global-average-pooling head), of ``dims`` spatial dims."""

    cam_layer = "features.3"

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(conv(dims)(3, 8, 3, padding=1), nn.ReLU(),
                                      conv(dims)(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(tuple(range(2, x.ndim))))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _hooks_left(model: nn.Module) -> list[str]:
    left = [f"{name or 'model'}.{attr}" for name, m in model.named_modules()
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                         "_backward_pre_hooks") if getattr(m, attr)]
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks"):
        if getattr(module_mod, attr, None):
            left.append(attr)
    return left


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


pytestmark = pytest.mark.usefixtures("one_thread")


SPATIAL = {1: (8,), 2: (8, 8), 3: (4, 4, 4)}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", cnnkit.explain.list_methods())
def test_no_leaks_over_many_calls(name, dims):
    torch.manual_seed(0)
    model = _GapNet(dims).eval()
    x = torch.randn(2, 3, *SPATIAL[dims])
    explainer = cnnkit.explain.create(name, model, **OPTIONS.get(name, {}))

    def target(i: int) -> object:
        # mostly one class per input; every 10th call K=2 classes (the batched backward),
        # every 10th call from the 5th a function of the output (a TargetScores wrapper)
        if i % 10 == 5:
            return lambda y: y[:, 1] - y[:, 0]
        return [[i % 5, (i + 1) % 5]] * 2 if i % 10 == 0 else i % 5

    for i in range(CALLS):
        if i == WARMUP:  # both target forms seen: measure from here
            tensors, rss = _live_tensors(), _rss_bytes()
        maps = explainer(x, target(i))
        assert maps.grad_fn is None and not maps.requires_grad
    del maps
    assert _hooks_left(model) == []
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    grown = _live_tensors() - tensors
    assert grown <= 2, f"{grown} more live tensors after {CALLS - WARMUP} calls"
    assert _rss_bytes() - rss < 20 * 2**20
