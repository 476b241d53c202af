"""Tiny networks of 1, 2 or 3 spatial dims for the explainer tests.

:class:`GapNet` is conv-BN-ReLU-maxpool-conv-ReLU, global average pooling and a linear
head: every method accepts it (CAM needs the pooling head, FullGrad the BatchNorm's
implicit bias, layer masking its conv and pool). :func:`lift` rebuilds a net one
dimension up with a leading axis of size-1 kernels, the same function of an input with
that axis of length 1, so a method's map in ``d + 1`` dims must equal its map in ``d``.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.layers.nd import batch_norm, conv, max_pool

#: small options for the methods whose defaults do many forwards per call
FAST = {
    "smoothgrad": dict(n_samples=3),
    "smoothgradcam++": dict(n_samples=3),
    "integrated_gradients": dict(steps=6),
    "occlusion": dict(window=3, stride=2),
    "scorecam": dict(batch_size=16),
}

#: inputs [B, C, *spatial] of each dimension
SHAPES = {1: (2, 2, 12), 2: (2, 2, 8, 10), 3: (2, 2, 4, 6, 6)}


class GapNet(nn.Module):
    """conv-BN-ReLU-maxpool-conv-ReLU, global average pooling, linear.

    Args:
        dims: spatial dims of the convolutions.
        flat: kernels, pools and padding of size 1 / 1 / 0 along the first spatial axis
            (the :func:`lift` of a ``dims - 1`` net).
    """

    cam_layer = "features.5"

    def __init__(self, dims: int, in_chans: int = 2, num_classes: int = 4, width: int = 6,
                 flat: bool = False) -> None:
        super().__init__()
        rest = dims - 1 if flat else dims
        lead = (1,) * (dims - rest)
        k, pad, pool = lead + (3,) * rest, (0,) * len(lead) + (1,) * rest, lead + (2,) * rest
        self.num_classes = num_classes
        self.features = nn.Sequential(
            conv(dims)(in_chans, width, k, padding=pad), batch_norm(dims)(width), nn.ReLU(),
            max_pool(dims)(pool), conv(dims)(width, width, k, padding=pad), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(tuple(range(2, x.ndim))))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def gap_net(dims: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> GapNet:
    """A :class:`GapNet` in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = GapNet(dims)
    bn = net.features[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return net.to(dtype).eval()


def lift(net: GapNet) -> GapNet:
    """``net`` one spatial dim up: the kernels get a leading axis of size 1, so the lifted
    net on ``x[:, :, None]`` computes ``net(x)``."""
    dims = net.features[0].weight.ndim - 2
    up = GapNet(dims + 1, net.features[0].in_channels, net.num_classes,
                net.features[0].out_channels, flat=True).to(net.fc.weight.dtype)
    state = {k: v.unsqueeze(2) if k.endswith("weight") and v.ndim == dims + 2 else v
             for k, v in net.state_dict().items()}
    up.load_state_dict(state)
    return up.eval()


def inputs(dims: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Inputs of :data:`SHAPES` ``[dims]``, normal noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPES[dims], generator=g, dtype=dtype)
