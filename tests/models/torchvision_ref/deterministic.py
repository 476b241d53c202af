"""Name-keyed deterministic weights and a fixed input, shared by the reference script and the test.

``make_reference.py`` fills torchvision's models with :func:`fill_deterministic` and
records their logits on :func:`reference_input`; ``test_torchvision_compat.py`` fills
cnnkit's models the same way and compares. Every value depends only on the state_dict
key, the tensor's shape and its dtype, so two models with equal keys and shapes get equal
weights whatever library built them. No torchvision import here.

The numbers come from ``Tensor.uniform_`` with a CPU ``torch.Generator`` seeded by
``crc32(key)``: a Mersenne twister whose 32-bit outputs become floats by integer masking
and one affine map, so the stream does not depend on the thread count or the CPU's
instruction set. The reference was recorded with a newer torch than the test runs on;
``PROBE`` in reference.json lets the test tell a changed stream from a changed model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["WEIGHT_GAIN", "deterministic_tensor", "fill_state_dict", "fill_deterministic",
           "reference_input", "probe"]

# Conv / linear weights are uniform with variance WEIGHT_GAIN**2 / fan_in. In eval mode the
# batch norms are near identity, so nothing renormalises the signal: He's gain sqrt(2) makes
# resnet152's 50 residual sums grow to logits ~3e5, a gain of 1 starves vgg19 until its
# logits are mostly bias. At 1.2 (and the small biases below) the logits' rms lies between
# 0.06 (vgg19_bn) and 2e3 (resnet152) and at least 80% of it changes with the input on
# every architecture, so a wrong layer anywhere shows in the output.
WEIGHT_GAIN = 1.2


def _uniform(shape: tuple[int, ...], dtype: torch.dtype, low: float, high: float,
             seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.empty(shape, dtype=dtype).uniform_(low, high, generator=gen)


def deterministic_tensor(key: str, shape: Iterable[int],
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor :func:`fill_deterministic` puts under state_dict ``key``.

    The role is read from the key and the shape alone (a state_dict suffices, no module
    types), and every draw is uniform:

    * ``*running_mean``: on ``[-0.02, 0.02]``;
    * ``*running_var``: on ``[1, 1.2]`` (positive, near 1);
    * two or more dimensions (conv / linear weights): mean 0, variance
      ``WEIGHT_GAIN**2 / fan_in`` with ``fan_in = prod(shape[1:])``;
    * any other 1-d ``*weight`` (norm scales): on ``[0.9, 1.1]``;
    * anything else (biases): on ``[-0.01, 0.01]``.

    Integer tensors (``num_batches_tracked``) are zeros, as in a freshly built model.
    """
    shape = tuple(int(s) for s in shape)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    seed = zlib.crc32(key.encode("utf-8"))
    if key.endswith("running_mean"):
        low, high = -0.02, 0.02
    elif key.endswith("running_var"):
        low, high = 1.0, 1.2
    elif len(shape) >= 2:
        bound = WEIGHT_GAIN * math.sqrt(3.0 / math.prod(shape[1:]))
        low, high = -bound, bound
    elif key.endswith("weight"):
        low, high = 0.9, 1.1
    else:
        low, high = -0.01, 0.01
    return _uniform(shape, dtype, low, high, seed)


def fill_state_dict(spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
                    ) -> dict[str, torch.Tensor]:
    """The state_dict ``{key: deterministic_tensor(key, shape, dtype)}`` of a layout.

    Args:
        spec: ``{key: (shape, dtype)}``, e.g. read from reference.json.
    """
    return {key: deterministic_tensor(key, shape, dtype) for key, (shape, dtype) in spec.items()}


@torch.no_grad()
def fill_deterministic(model: nn.Module) -> nn.Module:
    """Overwrite every floating state_dict tensor of ``model`` in place; returns ``model``.

    Integer buffers (``num_batches_tracked``) are left untouched.
    """
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.dtype.is_floating_point:
            tensor.copy_(deterministic_tensor(key, tensor.shape, tensor.dtype))
    return model


def reference_input(seed: int = 0) -> torch.Tensor:
    """A fixed ``[2, 3, 64, 64]`` float32 input, uniform with zero mean and unit variance."""
    bound = math.sqrt(3.0)
    return _uniform((2, 3, 64, 64), torch.float32, -bound, bound, seed)


def probe() -> list[float]:
    """A few values of the stream, recorded beside the logits to detect a changed generator."""
    values = deterministic_tensor("probe.weight", (2, 3)).flatten().tolist()
    return values + reference_input()[0, 0, 0, :3].tolist()
