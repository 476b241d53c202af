"""Nets and data for the LRP tests: a small residual net and cnnkit's ResNet-18, with
BatchNorm statistics calibrated on image-like data as training would leave them."""

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.models import create_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as the zoo's default_cfg
# the normalised range of pixels in [0, 1]: the z^B bounds
PIXEL_LOW = [(0.0 - m) / s for m, s in zip(MEAN, STD, strict=True)]
PIXEL_HIGH = [(1.0 - m) / s for m, s in zip(MEAN, STD, strict=True)]


def images(n, size, seed):
    """``n`` normalised float64 images: smooth colour blobs (bilinearly upsampled 4x4 noise)
    plus fine texture, pixels in [0, 1] before normalisation, so that every channel and
    every layer sees correlated, non-centred inputs as with photographs."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64)
    x = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    x = (0.8 * x + 0.2 * torch.rand(n, 3, size, size, generator=g, dtype=torch.float64))
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean) / std


@torch.no_grad()
def calibrate(model, size, seed, batches=3, n=16):
    """Running BatchNorm statistics from forward passes in train mode over ``images``
    (cumulative averages: ``momentum=None``), then eval mode. A conv-BN output then has
    zero mean per channel: about half of it is negative, where it feeds a residual sum."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for b in range(batches):
        model(images(n, size, seed + b))
    assert all(bn.num_batches_tracked.item() == batches for bn in bns)
    return model.eval()


class Add(nn.Module):
    """``a + b`` as a module, so the zennit comparison can swap in its ``Sum`` layer."""

    def forward(self, a, b):
        return a + b


class ResNetlet(nn.Module):
    """conv-BN-ReLU, max pool, one basic residual block (conv-BN-ReLU-conv-BN, + skip,
    ReLU), global average pool, dense layer."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.conv_a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.add, self.relu = Add(), nn.ReLU()
        self.gap, self.flat, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        y = self.bn_b(self.conv_b(self.relu(self.bn_a(self.conv_a(x)))))
        return self.fc(self.flat(self.gap(self.relu(self.add(y, x)))))


def resnetlet():
    """A :class:`ResNetlet` (float64) with learned-looking BatchNorm scales and shifts and
    calibrated running statistics, in eval mode."""
    torch.manual_seed(4)
    net = ResNetlet().double()
    g = torch.Generator().manual_seed(5)
    for bn in (net.bn1, net.bn_a, net.bn_b):
        bn.weight.data = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
        bn.bias.data = torch.randn(4, generator=g, dtype=torch.float64) * 0.1
    return calibrate(net, 8, seed=6)


def resnet18():
    """cnnkit's ResNet-18 (small stem, 32x32 input, 10 classes, float64) with calibrated
    BatchNorm statistics, in eval mode."""
    torch.manual_seed(7)
    return calibrate(create_model("resnet18", num_classes=10, img_size=32).double(), 32,
                     seed=8)
