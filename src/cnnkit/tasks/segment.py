"""Semantic segmentation: one class per pixel (or voxel), scored by mean IoU.

Target ``[N, *spatial]`` masks of class indices (255: ignored); losses cross-entropy,
Dice, focal or their sums (:mod:`cnnkit.tasks.losses`); the report shows test images
beside their ground-truth and predicted masks and the per-class IoU and Dice. An
explanation explains a class's region (:class:`RegionScores`, after Seg-Grad-CAM).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnnkit.data._types import IGNORE_INDEX
from cnnkit.data.shards import all_reduce_sum, gather_shards, is_sharded
from cnnkit.data.volumes import file_stem, is_volume_file, save_volume
from cnnkit.layers import crf_refine
from cnnkit.models._dense import pad_to_multiple

from ._base import ReportParts, Task, TaskDefaults, eval_outputs
from ._registry import register_task
from .figures import png, show, table
from .losses import SegmentationLoss
from .metrics import confusion_matrix, segmentation_scores

__all__ = ["Segment", "RegionScores"]

_SAMPLES = 8  # test predictions kept for the report's figures


class RegionScores(nn.Module):
    """A segmentation model seen as a classifier, so that every method explains it.

    Class ``c``'s score is the sum of its logits over the pixels the model assigns to
    ``c`` (the whole input when it assigns none), the score Seg-Grad-CAM explains
    (Vinogradova, Dibrov and Myers 2020, "Towards interpretable semantic segmentation
    via gradient-weighted class activation mapping"). The region is the argmax of the
    logits being explained and is not differentiated through, so a perturbation that
    removes the object also shrinks its region, and the score falls.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes
        self.cam_layer = getattr(model, "cam_layer", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        dims = tuple(range(2, logits.ndim))
        with torch.no_grad():
            region = F.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1)
            region = region.to(logits.dtype)
            region = torch.where(region.sum(dims, keepdim=True) == 0, 1.0, region)
        return (logits * region).sum(dims)

    @torch.no_grad()
    def predicted(self, x: torch.Tensor) -> torch.Tensor:
        """Per input, the class covering most pixels, background (class 0) only if alone."""
        logits = self.model(x)
        area = F.one_hot(logits.argmax(1), logits.shape[1]).flatten(1, -2).sum(1)  # [B, K]
        fg = area[:, 1:].sum(1, keepdim=True) > 0
        area[:, :1] = torch.where(fg, -1, area[:, :1])
        return area.argmax(1)


@register_task
class Segment(Task):
    """Semantic segmentation: one label per pixel, scored by mean IoU."""

    name = "segment"
    description = "a class per pixel or voxel"
    metric = "miou"
    losses = ("ce+dice", "ce", "dice", "focal", "focal+dice")
    # Segmentation learns per step, not per epoch: small batches and SGD at 0.05 took
    # U-Net to 0.99 mIoU on shapes in 10 epochs on 2 CPU cores (docs/benchmarks.md).
    defaults = TaskDefaults(model="unet_small", data="shapes", loss="ce+dice", epochs=10,
                            batch_size=16, lr=0.05)
    data_targets = "masks"
    writes_predictions = True
    output_kind = "mask"
    train_metric, progress_tag = "pixel_accuracy", "pix_acc"

    def classes(self, data: Any) -> list[str]:
        return list(data.mask_classes)

    def targets(self, data: Any) -> torch.Tensor:
        return data.masks

    def prepare(self, data: Any, multiple: int) -> Any:
        """Pad inputs (reflected) and masks (ignored pixels) to a multiple of the stride,
        on every spatial axis."""
        spatial = data.images.shape[2:]
        if multiple <= 1 or all(s % multiple == 0 for s in spatial):
            return data
        images, _ = pad_to_multiple(data.images, multiple, dims=len(spatial))
        masks, size = pad_to_multiple(data.masks, multiple, mode="constant", dims=len(spatial))
        for axis, n in enumerate(size):  # everything past the original extent: ignored
            masks.narrow(axis + 1, n, masks.shape[axis + 1] - n).fill_(IGNORE_INDEX)
        out = data.subset(torch.arange(len(data)))
        out.images, out.masks = images, masks
        return out

    def align(self, data: Any, outputs: list[str], name: str) -> Any:
        if len(data.mask_classes) > len(outputs):
            raise ValueError(f"data {name!r} has {len(data.mask_classes)} mask classes but the "
                             f"run's model predicts {len(outputs)}; evaluate on data labelled "
                             "with the run's classes")
        return data

    def criterion(self) -> nn.Module:
        return SegmentationLoss(self.cfg.loss, ignore_index=IGNORE_INDEX)

    def batch_score(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        valid = y != IGNORE_INDEX
        return ((out.detach().argmax(1) == y) & valid).sum(), int(valid.sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 amp: torch.dtype | None = None) -> dict[str, Any]:
        """mIoU, per-class IoU and Dice, pixel accuracy and loss over ``loader``."""
        crit = self.criterion()
        k = getattr(model, "num_classes", None)  # an int8 graph has none: its outputs say
        cm = None if k is None else torch.zeros(k, k, dtype=torch.long, device=device)
        loss, n, kept = torch.zeros((), device=device), 0, []
        for out, y in eval_outputs(model, loader, device, amp):
            if cm is None:
                k = out.shape[1]
                cm = torch.zeros(k, k, dtype=torch.long, device=device)
            loss += crit(out, y) * len(y)
            n += len(y)
            pred = out.argmax(1)
            cm += confusion_matrix(pred, y, k)
            if sum(len(p) for p in kept) < _SAMPLES:
                kept.append(pred[:_SAMPLES].to(torch.uint8).cpu())
        preds = torch.cat(kept)[:_SAMPLES] if kept else None
        if is_sharded(loader):  # every rank has kept its first samples: interleave them back
            cm = all_reduce_sum(cm)
            loss, n = all_reduce_sum(torch.stack([loss, torch.tensor(float(n), device=device)]))
            preds = gather_shards(preds)[:_SAMPLES]
        scores = segmentation_scores(cm.cpu())
        return {"loss": float(loss) / max(1, float(n)), **scores, "cm": cm.cpu(),
                "preds": preds}

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        return {"test_miou": test["miou"], "test_pixel_accuracy": test["pixel_accuracy"],
                "test_mdice": test["mdice"], "test_iou": test["iou"], "test_loss": test["loss"]}

    def headline(self, result: dict[str, Any]) -> str:
        return (f"test_miou {result['test_miou']:.4f}  test_pixel_accuracy "
                f"{result['test_pixel_accuracy']:.4f}")

    def chance(self, targets: torch.Tensor, num_classes: int) -> float:
        """The mIoU of the majority class everywhere: its IoU is its share of the labelled
        pixels, every other class's is 0."""
        valid = targets[targets != IGNORE_INDEX].flatten().long()
        counts = torch.bincount(valid, minlength=num_classes)
        return float(counts.max()) / max(1, valid.numel()) / num_classes

    def report(self, summary: dict[str, Any], test: dict[str, Any], data: Any,
               test_idx: torch.Tensor) -> ReportParts:
        classes, figures = summary["classes"], []
        if test.get("preds") is not None and data.images.ndim in (4, 5):
            k = len(test["preds"])
            images, masks = data.images[test_idx[:k]], data.masks[test_idx[:k]]
            preds = test["preds"]
            title = "Sample predictions"
            if images.ndim == 5:  # volumes: their middle slice along the first axis
                mid = images.shape[2] // 2
                images, masks, preds = images[:, :, mid], masks[:, mid], preds[:, mid]
                title = "Sample predictions (middle slice of each volume)"
            figures.append((title, png(mask_figure(images, masks, preds, classes))))
        rows = [[c, iou, dice] for c, iou, dice in zip(classes, test["iou"], test["dice"],
                                                        strict=True)]
        return ReportParts(
            f"Test mIoU <b>{summary['test_miou']:.4f}</b> on {len(test_idx)} held-out images.",
            figures, table("Per-class test IoU and Dice", ["class", "IoU", "Dice"], rows))

    # -- explanation and prediction ------------------------------------------------------------

    @classmethod
    def explainable(cls, model: nn.Module) -> nn.Module:
        return RegionScores(model)

    @classmethod
    def predicted(cls, scorer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return scorer.predicted(x)

    @classmethod
    def confidence(cls, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The share of the input's pixels predicted as each class."""
        with torch.no_grad():
            pred = model(x).argmax(1)
        return F.one_hot(pred, model.num_classes).float().flatten(1, -2).mean(1)

    @classmethod
    def confidence_text(cls, value: float) -> str:
        return f"({value:.0%} of pixels)"

    def prediction_names(self, source: Path) -> list[str]:
        """The files :meth:`write_prediction` writes for the input file ``source``: a mask
        (a palette PNG for an image, a NIfTI label volume for a volume) and an overlay."""
        stem = file_stem(source)
        mask = f"{stem}_mask.nii.gz" if is_volume_file(source) else f"{stem}_mask.png"
        return [mask, f"{stem}_overlay.png"]

    def write_prediction(self, pred: torch.Tensor, image: torch.Tensor, out: Path, source: Path,
                         classes: list[str], crf: bool = False) -> dict[str, Any]:
        """A mask (values: class indices) and an overlay of one prediction (logits
        ``[K, *spatial]`` of ``image``, ``[C, *spatial]`` uint8 or float in [0, 1]).

        Images: a palette PNG mask; ``crf`` refines it with the dense CRF of DeepLab
        first. Volumes: a uint8 NIfTI label volume in the voxel grid of ``source``, and
        the overlay of its middle slice along the first axis.
        """
        mask_name, overlay_name = self.prediction_names(source)
        volume = pred.ndim == 4
        if crf and volume:
            raise ValueError("--crf refines 2D segmentations (DeepLab's dense CRF); leave it "
                             "out for volumes")
        if crf:
            mask = crf_refine(pred[None], _as_uint8(image)[None].float())[0].to(torch.uint8)
        else:
            mask = pred.argmax(0).to(torch.uint8)
        mask = mask.numpy()
        pal = palette(len(classes))
        if volume:
            save_volume(out / mask_name, mask, like=source)
            mid = mask.shape[0] // 2
            flat, base_image = mask[mid], image[:, mid]
        else:
            m = Image.fromarray(mask, mode="P")
            m.putpalette(pal)
            m.save(out / mask_name)
            flat, base_image = mask, image
        colours = np.array(pal, dtype=np.float32).reshape(256, 3)[flat]
        base = _as_uint8(base_image).permute(1, 2, 0).numpy().astype(np.float32)
        base = np.repeat(base, 3, 2) if base.shape[-1] == 1 else base[..., :3]
        alpha = np.where(flat[..., None] > 0, 0.5, 0.0)  # background stays as it was
        blend = (base * (1 - alpha) + colours * alpha).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(blend).save(out / overlay_name)
        counts = np.bincount(mask.ravel(), minlength=len(classes)) / mask.size
        return {"mask": str(out / mask_name), "overlay": str(out / overlay_name),
                "class_fractions": {classes[k]: round(float(v), 6)
                                    for k, v in enumerate(counts) if v > 0}}

    def prediction_line(self, result: dict[str, Any]) -> str:
        top = sorted(result["class_fractions"].items(), key=lambda kv: -kv[1])[:3]
        return f"{result['file']}: {result['mask']} (" + ", ".join(
            f"{c} {v:.1%}" for c, v in top) + ")"


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


def palette(k: int) -> list[int]:
    """Colours of classes 0..k-1 in overlays and palette masks: black, then matplotlib's
    tab20 (Pascal VOC's palette order is arbitrary; these are easier to tell apart)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    cols = [[0, 0, 0]] + [[round(255 * v) for v in cmap(i % 20)[:3]] for i in range(k - 1)]
    return [v for c in cols for v in c] + [0] * (3 * (256 - len(cols)))


def mask_figure(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor,
                classes: list[str]) -> Any:
    """Test images beside their true and predicted masks, in the colours of
    :func:`palette` (those of ``cnnkit predict``'s overlays and ``cnnkit serve``), with a
    legend naming the class of each colour (and ignored pixels, white, where there are any)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n, k = len(preds), len(classes)
    colours = np.array(palette(k)[:3 * k], dtype=np.float64).reshape(k, 3) / 255
    cmap = ListedColormap(colours).with_extremes(bad="white")
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    h, w = images.shape[-2:]
    ignored = False
    for i in range(n):
        show(axes[i, 0], images[i], "image" if i == 0 else "")
        for j, (m, title) in enumerate(((masks[i], "ground truth"), (preds[i], "prediction"))):
            m = m[:h, :w].float()
            off = m == IGNORE_INDEX
            ignored |= bool(off.any())
            m[off] = float("nan")
            axes[i, j + 1].imshow(m.numpy(), cmap=cmap, vmin=-0.5, vmax=k - 0.5,
                                  interpolation="nearest")
            axes[i, j + 1].set_title(title if i == 0 else "", fontsize=8)
            axes[i, j + 1].axis("off")
    handles = [Patch(facecolor=c, edgecolor="#888", label=name)
               for c, name in zip(colours, classes, strict=True)]
    if ignored:
        handles.append(Patch(facecolor="white", edgecolor="#888", label="ignored"))
    fig.suptitle("Test images: ground truth and predicted masks", fontsize=9)
    fig.tight_layout()
    # Below the panels; the PNG's tight bounding box takes it in.
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(handles), 5), fontsize=8, frameon=False, title="class colours",
               title_fontsize=8)
    return fig
