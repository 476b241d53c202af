"""Dense inference on any image size: padding to the stride, sliding windows, region scores."""

import pytest
import torch
from torch import nn

from cnnkit.explain import create
from cnnkit.models._dense import DenseModel, pad_to_multiple
from cnnkit.tasks.dense import dense_forward, window_starts
from cnnkit.tasks.segment import RegionScores


class PointwiseSeg(DenseModel):
    """A 1x1-convolution segmenter with stride 8: its output at a pixel depends on that
    pixel only, so windows, padding and the whole image must all give the same logits."""

    def __init__(self, k=3, multiple=8):
        super().__init__()
        self.num_classes, self.in_chans, self.size_multiple = k, 2, multiple
        self.head = nn.Conv2d(2, k, 1)
        self.cam_layer = "head"

    def forward(self, x):
        assert x.shape[-1] % self.size_multiple == 0 and x.shape[-2] % self.size_multiple == 0
        return self.head(x)


class PointwiseSR(DenseModel):
    task = "superres"

    def __init__(self, scale=2):
        super().__init__()
        self.scale, self.in_chans, self.num_classes = scale, 1, 1
        self.conv = nn.Conv2d(1, scale * scale, 1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x):
        return self.shuffle(self.conv(x))


def test_window_starts_cover_everything():
    for length in range(1, 40):
        for tile in (4, 7, 16):
            starts = window_starts(length, tile, max(1, tile * 3 // 4))
            covered = torch.zeros(length, dtype=torch.bool)
            for s in starts:
                covered[s:s + tile] = True
            assert covered.all() and starts[0] == 0
            assert all(s + min(tile, length) <= length for s in starts)


def test_pad_to_multiple_reflects_and_reports_size():
    x = torch.arange(12.).view(1, 1, 3, 4)
    y, hw = pad_to_multiple(x, 4)
    assert hw == (3, 4) and y.shape == (1, 1, 4, 4)
    assert torch.equal(y[..., 3, :], x[..., 1, :])  # reflected, not zero


@pytest.mark.parametrize("size", [(8, 8), (13, 30), (45, 21)])
def test_sliding_window_equals_whole_image_for_pointwise_model(size):
    torch.manual_seed(0)
    model = PointwiseSeg().eval()
    x = torch.randn(2, 2, *size)
    ref = model.head(x)  # the model applied to every pixel directly
    for tile in (None, (8, 8), (16, 8)):
        out = dense_forward(model, x, tile=tile, overlap=0.5)
        assert out.shape == (2, 3, *size)
        assert torch.allclose(out, ref, atol=1e-6)


def test_sliding_window_superres_scale():
    torch.manual_seed(0)
    model = PointwiseSR(3).eval()
    x = torch.randn(1, 1, 11, 17)
    out = dense_forward(model, x, tile=(4, 4), overlap=0.25)
    assert out.shape == (1, 1, 33, 51)
    assert torch.allclose(out, model(x), atol=1e-6)


def test_region_scores_sum_logits_over_predicted_region():
    torch.manual_seed(0)
    model = PointwiseSeg().eval()
    x = torch.randn(2, 2, 8, 8)
    logits = model(x)
    pred = logits.argmax(1)
    scores = RegionScores(model)(x)
    for b in range(2):
        for c in range(3):
            region = pred[b] == c
            want = logits[b, c][region].sum() if region.any() else logits[b, c].sum()
            assert torch.allclose(scores[b, c], want, atol=1e-5)


def test_gradcam_on_segmentation_equals_from_scratch():
    # Seg-Grad-CAM: weights = spatial mean of d(sum of class-c logits over its region)/dA.
    torch.manual_seed(0)
    model = PointwiseSeg().double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 2])
    maps = create("gradcam", model, layer="head")(x, target)
    for b in range(2):
        xb = x[b:b + 1].clone()
        act = model.head(xb)
        act.retain_grad()
        region = act.argmax(1)[0] == target[b]
        score = act[0, target[b]][region].sum() if region.any() else act[0, target[b]].sum()
        score.backward()
        w = act.grad.mean((-2, -1), keepdim=True)
        ref = torch.relu((w * act).sum(1))[0]
        assert torch.allclose(maps[b], ref, atol=1e-10)


def test_predicted_target_prefers_foreground():
    model = PointwiseSeg().eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    x = torch.zeros(1, 2, 8, 8)
    assert RegionScores(model).predicted(x).tolist() == [0]  # only background: background
    with torch.no_grad():
        model.head.weight[2, 0] = 5.0
    x[0, 0, :2, :2] = 1.0  # four pixels of class 2, the rest background
    assert RegionScores(model).predicted(x).tolist() == [2]


@pytest.mark.parametrize("spatial", [(7,), (5, 6, 7)])
def test_pad_to_multiple_pads_every_axis_and_reports_sizes(spatial):
    x = torch.rand(2, 3, *spatial)
    y, sizes = pad_to_multiple(x, 4, dims=len(spatial))
    assert sizes == spatial and y.shape == (2, 3, *[-(-v // 4) * 4 for v in spatial])
    assert torch.equal(y[(..., *(slice(0, v) for v in spatial))], x)
    masks, _ = pad_to_multiple(torch.ones(2, *spatial, dtype=torch.uint8), 4, mode="constant",
                               dims=len(spatial))
    assert masks.dtype == torch.uint8 and int(masks.sum()) == 2 * int(torch.tensor(spatial).prod())


class _Pointwise3d(torch.nn.Module):
    """A per-voxel model (1x1x1 convolution): windowed inference must equal whole inference."""

    size_multiple, scale = 4, 1

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 3, 1)

    def forward(self, x):
        assert all(v % 4 == 0 for v in x.shape[2:])  # padded to the multiple
        return self.conv(x)


def test_dense_forward_tiles_volumes():
    torch.manual_seed(0)
    model = _Pointwise3d()
    x = torch.randn(1, 2, 9, 10, 11)
    whole = model.conv(x)
    tiled = dense_forward(model, x, tile=(4, 8, 8), overlap=0.5)
    assert tiled.shape == (1, 3, 9, 10, 11) and torch.allclose(tiled, whole, atol=1e-5)
    with pytest.raises(ValueError, match="one size per axis"):
        dense_forward(model, x, tile=(8, 8))
