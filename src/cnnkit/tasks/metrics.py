"""Dense-prediction metrics: segmentation scores from a confusion matrix, PSNR and SSIM.

Pure functions on tensors: they run on whatever device their inputs live on, with no
Python loop over pixels, so the evaluator can accumulate a confusion matrix batch by
batch on the GPU and score it once at the end.

Super-resolution conventions follow the SR literature (SRCNN, ESPCN, EDSR): the LR image
is the bicubic downscale of the HR image (:func:`bicubic_downscale`), PSNR and SSIM are
computed on the ITU-R BT.601 luminance (``y_channel=True``) after cropping ``border =
scale`` pixels from each side, and the bicubic upscale (:func:`bicubic_upscale`) is the
baseline reported beside the model. Values are not rounded to 8 bits first, so numbers
can differ from MATLAB-evaluated tables in the second decimal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cnnkit.data import downscale

__all__ = ["confusion_matrix", "segmentation_scores", "psnr", "ssim", "rgb_to_y",
           "bicubic_upscale", "bicubic_downscale"]


# ----------------------------------------------------------------------------- segmentation
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """Pixel confusion matrix: ``cm[t, p]`` counts pixels of target class t predicted as p.

    Args:
        pred: predicted labels of the same shape as ``target``, or logits with one extra
            class axis at dim 1 (``[B, K, H, W]`` for a ``[B, H, W]`` target), which are
            argmax-ed.
        target: integer labels in ``[0, num_classes)`` or ``ignore_index``.
        num_classes: K, the background class included.
        ignore_index: target value of pixels to skip (Pascal VOC's 255 object borders).

    Returns:
        A ``LongTensor[K, K]`` on the inputs' device; rows are target classes, columns
        predicted classes.

    Raises:
        ValueError: mismatched shapes, or a label outside ``[0, num_classes)`` (other
            than ``ignore_index`` in the target).

    Example:
        >>> import torch
        >>> from cnnkit.tasks.metrics import confusion_matrix
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2).tolist()
        [[1, 1], [0, 1]]
    """
    if pred.ndim == target.ndim + 1:
        pred = pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ; "
                         "pass labels of the target's shape or logits [B, K, ...]")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    for name, lab in (("target", target), ("pred", pred)):
        bad = (lab < 0) | (lab >= num_classes)
        if bool(bad.any()):
            raise ValueError(f"{name} has label {int(lab[bad][0])} outside [0, {num_classes}) "
                             f"(ignore_index={ignore_index}); check num_classes or the masks")
    idx = target * num_classes + pred
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def segmentation_scores(cm: torch.Tensor) -> dict:
    """Segmentation scores of a confusion matrix (rows target, columns prediction).

    A class that occurs in neither the target nor the prediction (union 0) has IoU and
    Dice NaN and is left out of the means, so an image set without, say, class "boat"
    is not rewarded or punished for it. IoU is the Jaccard index ``TP / (TP + FP + FN)``;
    Dice (F1) is ``2 TP / (2 TP + FP + FN)``.

    Returns:
        Plain Python values (JSON-ready, NaN where undefined): ``miou``, ``iou`` (per
        class), ``mdice``, ``dice`` (per class), ``pixel_accuracy`` (correct / all
        counted pixels) and ``mean_class_accuracy`` (recall averaged over classes present
        in the target).

    Example:
        >>> import torch
        >>> from cnnkit.tasks.metrics import segmentation_scores
        >>> s = segmentation_scores(torch.tensor([[2, 1], [0, 1]]))
        >>> s["iou"], s["miou"], s["pixel_accuracy"]
        ([0.6666666666666666, 0.5], 0.5833333333333333, 0.75)
    """
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square [K, K] matrix, got shape {tuple(cm.shape)}")
    cm = cm.detach().to("cpu", torch.float64)
    tp = cm.diagonal()
    rows, cols = cm.sum(1), cm.sum(0)  # target counts, prediction counts
    union = rows + cols - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan).tolist()
    dice = torch.where(union > 0, 2 * tp / (rows + cols).clamp(min=1), nan).tolist()
    recall = torch.where(rows > 0, tp / rows.clamp(min=1), nan).tolist()
    total = float(cm.sum())
    return dict(miou=_nanmean(iou), iou=iou, mdice=_nanmean(dice), dice=dice,
                pixel_accuracy=float(tp.sum()) / total if total > 0 else float("nan"),
                mean_class_accuracy=_nanmean(recall))


# ----------------------------------------------------------------------------- image quality
def rgb_to_y(x: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """ITU-R BT.601 luminance of RGB ``[B, 3, H, W]`` in ``[0, data_range]``, as MATLAB's rgb2ycbcr.

    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` on the 0-255 scale with R, G, B in
    [0, 1] (the studio-swing 16-235 range the SR literature evaluates on), returned on the
    input's scale: white maps to ``235/255 * data_range``, black to ``16/255 * data_range``.
    Returns ``[B, 1, H, W]``.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"y_channel needs RGB images [B, 3, H, W], got {tuple(x.shape)}")
    w = x.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    y = (16.0 + (x / data_range * w).sum(1, keepdim=True)) / 255.0
    return y * data_range


def _prepare(pred: torch.Tensor, target: torch.Tensor, data_range: float, border: int,
             y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have "
                         "the same shape; crop the HR image to scale x the LR size")
    if pred.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(pred.shape)}")
    if border < 0 or 2 * border >= min(pred.shape[-2:]):
        raise ValueError(f"border {border} leaves nothing of a {tuple(pred.shape[-2:])} image; "
                         "use 0 <= border < min(H, W) / 2")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    pred = pred if pred.is_floating_point() else pred.float()
    target = target.to(pred.dtype)
    if y_channel:
        pred, target = rgb_to_y(pred, data_range), rgb_to_y(target, data_range)
    if border:
        pred = pred[..., border:-border, border:-border]
        target = target[..., border:-border, border:-border]
    return pred, target


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, border: int = 0,
         y_channel: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(data_range^2 / MSE)`` in dB.

    Args:
        pred: images ``[B, C, H, W]``.
        target: reference images of the same shape.
        data_range: the value range (1 for [0, 1] floats, 255 for 8-bit values).
        border: pixels cropped from each side first (the SR convention crops ``scale``).
        y_channel: compare the BT.601 luminance (:func:`rgb_to_y`) of RGB images.

    Returns:
        ``Tensor[B]``; ``inf`` for identical images.

    Example:
        >>> import torch
        >>> from cnnkit.tasks.metrics import psnr
        >>> x = torch.zeros(1, 1, 4, 4)
        >>> round(float(psnr(x + 0.1, x)), 6)
        20.0
    """
    pred, target = _prepare(pred, target, data_range, border, y_channel)
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, border: int = 0,
         y_channel: bool = False) -> torch.Tensor:
    """Structural similarity per image (Wang, Bovik, Sheikh and Simoncelli 2004, "Image quality
    assessment: from error visibility to structural similarity").

    The paper's settings: an 11x11 Gaussian window with sigma 1.5, ``K1 = 0.01``,
    ``K2 = 0.03``, local statistics at every position where the window fits (valid
    convolution, population covariances), the SSIM map averaged over positions and
    channels. This equals scikit-image's ``structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``.

    Args:
        pred: images ``[B, C, H, W]``, at least 11x11 after cropping ``border``.
        target: reference images of the same shape.
        data_range: the value range (1 for [0, 1] floats).
        border: pixels cropped from each side first.
        y_channel: compare the BT.601 luminance of RGB images.

    Returns:
        ``Tensor[B]``; 1 for identical images.

    Example:
        >>> import torch
        >>> from cnnkit.tasks.metrics import ssim
        >>> x = torch.rand(2, 3, 16, 16)
        >>> ssim(x, x).tolist()
        [1.0, 1.0]
    """
    pred, target = _prepare(pred, target, data_range, border, y_channel)
    size = 11
    if min(pred.shape[-2:]) < size:
        raise ValueError(f"ssim needs images of at least {size}x{size} (after border), got "
                         f"{tuple(pred.shape[-2:])}; use a smaller border or larger images")
    c = pred.shape[1]
    win = _gaussian_window(size, 1.5, pred).expand(c, 1, size, size)

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, win, groups=c)

    mu_x, mu_y = filt(pred), filt(target)
    var_x = filt(pred * pred) - mu_x ** 2
    var_y = filt(target * target) - mu_y ** 2
    cov = filt(pred * target) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
            / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return smap.flatten(1).mean(1)


# ----------------------------------------------------------------------------- bicubic
def bicubic_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline: ``lr [B, C, h, w]`` in [0, 1] upscaled ``scale`` times.

    ``F.interpolate(mode="bicubic", align_corners=False)`` (Keys' kernel, a = -0.75),
    clamped to [0, 1] since the kernel's negative lobes overshoot at edges.
    """
    h, w = lr.shape[-2:]
    up = F.interpolate(lr, size=(h * scale, w * scale), mode="bicubic", align_corners=False)
    return up.clamp(0.0, 1.0)


def bicubic_downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The LR image of the SR literature: ``hr`` cropped to a multiple of ``scale``, then
    downscaled by an antialiased bicubic.

    ``hr[..., :H - H % scale, :W - W % scale]`` is shrunk to ``(H // scale, W // scale)``
    with ``F.interpolate(mode="bicubic", antialias=True)``: the kernel (a = -0.5) is
    stretched by ``scale`` so it low-pass filters before subsampling, as MATLAB's
    ``imresize`` and PIL's ``BICUBIC`` resize do (the MATLAB default the benchmarks' LR
    images come from). Clamped to [0, 1]. Compare the model's output with
    ``hr[..., :scale * h, :scale * w]``.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    if h < 1 or w < 1:
        raise ValueError(f"image {tuple(hr.shape[-2:])} is smaller than scale {scale}")
    return downscale(hr[..., :h * scale, :w * scale], scale)
