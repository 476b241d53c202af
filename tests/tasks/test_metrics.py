"""Dense metrics: confusion matrix and segmentation scores by hand, PSNR/SSIM against references."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.tasks.metrics import (
    bicubic_downscale,
    bicubic_upscale,
    confusion_matrix,
    psnr,
    rgb_to_y,
    segmentation_scores,
    ssim,
)

# Two 2x3 masks written out; 255 marks an ignored pixel.
TARGET = torch.tensor([[[0, 0, 1],
                        [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1],
                      [1, 1, 0]]])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TARGET, num_classes=3)
    # target 0: predicted 0, 1; target 1: predicted 1, 1; target 2: predicted 1; (255, 0) skipped.
    assert cm.dtype == torch.long
    assert cm.tolist() == [[1, 1, 0],
                           [0, 2, 0],
                           [0, 1, 0]]


def test_confusion_matrix_from_logits_and_ignore_index():
    logits = torch.nn.functional.one_hot(PRED, 3).permute(0, 3, 1, 2).float()
    assert torch.equal(confusion_matrix(logits, TARGET, 3), confusion_matrix(PRED, TARGET, 3))
    # With no ignore value, 255 is an out-of-range label.
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(PRED, TARGET, 3, ignore_index=-1)
    # Changing the prediction at the ignored pixel changes nothing, even to a bad label.
    other = PRED.clone()
    other[0, 1, 2] = 7
    assert torch.equal(confusion_matrix(other, TARGET, 3), confusion_matrix(PRED, TARGET, 3))
    with pytest.raises(ValueError, match="pred"):
        confusion_matrix(PRED + 2, TARGET, 3)
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(PRED[:, :1], TARGET, 3)


def test_segmentation_scores_by_hand():
    s = segmentation_scores(confusion_matrix(PRED, TARGET, 3))
    # class 0: TP 1, FP 0, FN 1 -> IoU 1/2, Dice 2/3
    # class 1: TP 2, FP 2, FN 0 -> IoU 2/4, Dice 4/6
    # class 2: TP 0, FP 0, FN 1 -> IoU 0,   Dice 0
    assert s["iou"] == pytest.approx([1 / 2, 1 / 2, 0.0])
    assert s["dice"] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert s["miou"] == pytest.approx(1 / 3)
    assert s["mdice"] == pytest.approx(4 / 9)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)
    assert s["mean_class_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert all(isinstance(v, float) for k, v in s.items() if k not in ("iou", "dice"))


def test_miou_excludes_absent_classes():
    # Class 3 occurs in neither target nor prediction: NaN IoU, left out of the mean.
    s = segmentation_scores(confusion_matrix(PRED, TARGET, 4))
    assert math.isnan(s["iou"][3]) and math.isnan(s["dice"][3])
    assert s["miou"] == pytest.approx(1 / 3)
    assert s["mean_class_accuracy"] == pytest.approx(1 / 2)
    # A class only predicted (false positives) does count, with IoU 0.
    pred = torch.tensor([[0, 3], [1, 1]])
    target = torch.tensor([[0, 0], [1, 1]])
    s = segmentation_scores(confusion_matrix(pred, target, 4))
    assert s["iou"][3] == 0.0 and math.isnan(s["iou"][2])
    assert s["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    empty = segmentation_scores(torch.zeros(2, 2, dtype=torch.long))
    assert math.isnan(empty["miou"]) and math.isnan(empty["pixel_accuracy"])


@pytest.mark.parametrize("e", [0.1, 0.01, 0.25])
def test_psnr_analytic(e):
    target = torch.rand(2, 3, 8, 8) * 0.5
    pred = target + e
    expected = 10 * math.log10(1 / e ** 2)
    assert psnr(pred, target).tolist() == pytest.approx([expected] * 2, rel=1e-5)
    # data_range 255 with the error scaled alike gives the same dB
    assert psnr(pred * 255, target * 255, data_range=255).tolist() == pytest.approx(
        [expected] * 2, rel=1e-4)


def test_psnr_per_image_and_border():
    target = torch.zeros(2, 1, 8, 8)
    pred = target.clone()
    pred[0] += 0.1
    pred[1, :, 0, :] = 1.0  # error only in the first row of image 1
    out = psnr(pred, target, border=1)
    assert out[0].item() == pytest.approx(20.0, rel=1e-5)
    assert math.isinf(out[1].item())  # the border crop removed the whole error
    with pytest.raises(ValueError, match="border"):
        psnr(pred, target, border=4)


def test_y_channel_known_values():
    white, black = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert torch.allclose(rgb_to_y(white), torch.full((1, 1, 2, 2), 235 / 255))
    assert torch.allclose(rgb_to_y(black), torch.full((1, 1, 2, 2), 16 / 255))
    # PSNR of white vs black on Y: the error is (235 - 16) / 255 everywhere.
    expected = 10 * math.log10(1 / (219 / 255) ** 2)
    assert psnr(white, black, y_channel=True).item() == pytest.approx(expected, rel=1e-5)
    # Pure red: Y = 16 + 65.481 (MATLAB rgb2ycbcr gives 81 for uint8 255,0,0).
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert rgb_to_y(red).item() * 255 == pytest.approx(81.481, abs=1e-3)
    with pytest.raises(ValueError, match="RGB"):
        psnr(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), y_channel=True)


def ssim_numpy(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Straightforward SSIM, window by window (Wang et al. 2004, Gaussian 11x11, sigma 1.5)."""
    r = np.arange(11) - 5.0
    g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                a, b = x[c, i:i + 11, j:j + 11], y[c, i:i + 11, j:j + 11]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2)
                            / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def noisy_pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g)
    y = (x + 0.2 * torch.randn(*shape, generator=g)).clamp(0, 1)
    return x, y


def test_ssim_identical_is_one():
    x = torch.rand(2, 3, 16, 16)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert ssim(x, x, y_channel=True, border=2).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_ssim_matches_numpy_reference():
    x, y = noisy_pair((2, 2, 15, 17))
    ours = ssim(x.double(), y.double()).tolist()
    ref = [ssim_numpy(x[i].double().numpy(), y[i].double().numpy()) for i in range(2)]
    assert ours == pytest.approx(ref, abs=1e-10)
    assert ssim(x, y).tolist() == pytest.approx(ref, abs=1e-5)  # float32 too
    assert max(ref) < 0.9  # the noise is visible: not a trivially-1 comparison
    # y_channel and border: the reference on the cropped luminance.
    x3, y3 = noisy_pair((1, 3, 16, 16), seed=1)
    yx, yy = rgb_to_y(x3.double())[:, :, 2:-2, 2:-2], rgb_to_y(y3.double())[:, :, 2:-2, 2:-2]
    ours = ssim(x3.double(), y3.double(), border=2, y_channel=True).item()
    assert ours == pytest.approx(ssim_numpy(yx[0].numpy(), yy[0].numpy()), abs=1e-10)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = noisy_pair((1, 3, 24, 20))
    ref = metrics.structural_similarity(
        x[0].double().numpy(), y[0].double().numpy(), channel_axis=0, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, data_range=1)
    assert ssim(x.double(), y.double()).item() == pytest.approx(ref, abs=1e-8)


def test_ssim_too_small_raises():
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 1, 10, 12), torch.rand(1, 1, 10, 12))


def test_bicubic_downscale_matches_pil_and_crops():
    hr = torch.rand(1, 1, 25, 31)  # not multiples of 3: cropped to 24x30 first
    lr = bicubic_downscale(hr, 3)
    assert lr.shape == (1, 1, 8, 10)
    ref = Image.fromarray(hr[0, 0, :24, :30].numpy(), mode="F").resize((10, 8), Image.BICUBIC)
    expected = torch.from_numpy(np.asarray(ref).copy()).clamp(0, 1)
    assert torch.allclose(lr[0, 0], expected, atol=1e-5)


def test_bicubic_upscale_shape_range_and_constant():
    lr = torch.rand(2, 3, 5, 7)
    up = bicubic_upscale(lr, 4)
    assert up.shape == (2, 3, 20, 28)
    assert up.min() >= 0 and up.max() <= 1
    flat = torch.full((1, 1, 4, 4), 0.3)  # interpolation reproduces a constant exactly
    assert torch.allclose(bicubic_upscale(flat, 3), torch.full((1, 1, 12, 12), 0.3))
    # down then up on a smooth image is close: the baseline the SR models must beat.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    smooth = (0.5 + 0.3 * torch.sin(3 * xx + 2 * yy))[None, None]
    assert psnr(bicubic_upscale(bicubic_downscale(smooth, 2), 2), smooth, border=2) > 40
