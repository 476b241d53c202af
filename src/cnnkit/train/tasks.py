"""What differs between classification, segmentation and super-resolution runs.

The :class:`~cnnkit.train.Trainer` loop is the same for every task; a :class:`Task`
supplies the rest: how the data is loaded and shaped for the model, the model's
output count, the loss, the per-batch training statistic, the evaluation and its
headline metric (the one that picks the best checkpoint):

========  ==============  ===============================  ======================
task      target          loss                             headline metric
========  ==============  ===============================  ======================
classify  class ``[B]``   cross-entropy (label smoothing)  accuracy
segment   mask ``[B,H,W]``  CE, Dice, focal or a sum       mIoU
superres  image (x scale)  MSE (ESPCN) or L1               PSNR (bicubic beside)
========  ==============  ===============================  ======================

Evaluation over a loader sharded across processes (``TensorLoader(world_size=W)``,
``cnnkit.train.distributed``) sums on each rank and all-reduces the sums (loss, correct
predictions, confusion matrix, PSNR/SSIM) before dividing by the global count, so the
metrics equal one process's; per-sample outputs are gathered back in the split's order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .device import autocast
from .distributed import all_reduce_sum, gather_shards

__all__ = ["Task", "Classify", "Segment", "SuperRes", "get_task", "evaluate_classify"]

_SAMPLES = 8  # test predictions kept for the report's figures


def _sharded(loader) -> bool:
    """The loader is one rank's share of a split: its sums must be reduced across ranks."""
    return getattr(loader, "world_size", 1) > 1


class Task:
    """Classification: one label per image."""

    name = "classify"
    metric = "accuracy"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    # -- data and model ---------------------------------------------------------------------

    def classes(self, data) -> list[str]:
        """The names of the model's outputs, stored with its weights."""
        return list(data.classes)

    def targets(self, data) -> torch.Tensor:
        """What the loader pairs with each image."""
        return data.labels

    def prepare(self, data, multiple: int):
        """Bring the data to a size the model takes (dense tasks pad or crop)."""
        return data

    def model_kwargs(self, data) -> dict[str, Any]:
        c, h, w = data.input_size
        return {"num_classes": len(self.classes(data)), "in_chans": c, "img_size": (h, w)}

    def loader_kwargs(self) -> dict[str, Any]:
        return {}

    def augment(self, data) -> str:
        """The augmentation policy of ``augment="auto"``: the data set's own."""
        return data.augment

    # -- training ---------------------------------------------------------------------------

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)

    def batch_score(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A running training statistic: (sum, count) of correct predictions."""
        return (out.detach().argmax(1) == y).sum(), y.numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device,
                 amp: torch.dtype | None = None) -> dict[str, Any]:
        return evaluate_classify(model, loader, device, amp)

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        return {"test_accuracy": test["accuracy"], "test_loss": test["loss"]}


Classify = Task


@torch.no_grad()
def evaluate_classify(model: nn.Module, loader, device: torch.device,
                      amp: torch.dtype | None = None,
                      label_smoothing: float = 0.0) -> dict[str, Any]:
    """Loss, accuracy, predictions, probabilities and targets of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    crit = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="sum")
    loss, preds, probs, targets = torch.zeros((), device=device), [], [], []
    for x, y in loader:
        with autocast(device, amp):
            out = model(x)
        loss += crit(out.float(), y)
        p = out.float().softmax(1)
        probs.append(p.cpu())
        preds.append(p.argmax(1).cpu())
        targets.append(y.cpu())
    model.train(was_training)
    preds_t, targets_t, probs_t = torch.cat(preds), torch.cat(targets), torch.cat(probs)
    if _sharded(loader):
        loss = all_reduce_sum(loss)
        preds_t, targets_t, probs_t = (gather_shards(t) for t in (preds_t, targets_t, probs_t))
    n = max(1, len(targets_t))
    return {"loss": float(loss) / n, "accuracy": float((preds_t == targets_t).float().mean()),
            "preds": preds_t, "probs": probs_t, "targets": targets_t}


class Segment(Task):
    """Semantic segmentation: one label per pixel, scored by mean IoU."""

    name = "segment"
    metric = "miou"

    def classes(self, data) -> list[str]:
        return list(data.mask_classes)

    def targets(self, data) -> torch.Tensor:
        return data.masks

    def prepare(self, data, multiple: int):
        """Pad images (reflected) and masks (ignored pixels) to a multiple of the model's stride."""
        from cnnkit.data._types import IGNORE_INDEX
        from cnnkit.models._dense import pad_to_multiple

        if multiple <= 1 or all(s % multiple == 0 for s in data.images.shape[-2:]):
            return data
        images, _ = pad_to_multiple(data.images, multiple)
        masks, (h, w) = pad_to_multiple(data.masks, multiple, mode="constant")
        masks[..., h:, :] = IGNORE_INDEX
        masks[..., :, w:] = IGNORE_INDEX
        out = data.subset(torch.arange(len(data)))
        out.images, out.masks = images, masks
        return out

    def criterion(self) -> nn.Module:
        from cnnkit.data._types import IGNORE_INDEX

        from .losses import SegmentationLoss

        return SegmentationLoss(self.cfg.loss, ignore_index=IGNORE_INDEX)

    def batch_score(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        from cnnkit.data._types import IGNORE_INDEX

        valid = y != IGNORE_INDEX
        return ((out.detach().argmax(1) == y) & valid).sum(), int(valid.sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device,
                 amp: torch.dtype | None = None) -> dict[str, Any]:
        """mIoU, per-class IoU and Dice, pixel accuracy and loss over ``loader``."""
        from .metrics import confusion_matrix, segmentation_scores

        was_training = model.training
        model.eval()
        crit = self.criterion()
        k = model.num_classes
        cm = torch.zeros(k, k, dtype=torch.long, device=device)
        loss, n, kept = torch.zeros((), device=device), 0, []
        for x, y in loader:
            with autocast(device, amp):
                out = model(x)
            out = out.float()
            loss += crit(out, y) * len(y)
            n += len(y)
            pred = out.argmax(1)
            cm += confusion_matrix(pred, y, k)
            if sum(len(p) for p in kept) < _SAMPLES:
                kept.append(pred[:_SAMPLES].to(torch.uint8).cpu())
        model.train(was_training)
        preds = torch.cat(kept)[:_SAMPLES] if kept else None
        if _sharded(loader):  # every rank has kept its first samples: interleave them back
            cm = all_reduce_sum(cm)
            loss, n = all_reduce_sum(torch.stack([loss, torch.tensor(float(n), device=device)]))
            preds = gather_shards(preds)[:_SAMPLES]
        scores = segmentation_scores(cm.cpu())
        return {"loss": float(loss) / max(1, float(n)), **scores, "cm": cm.cpu(),
                "preds": preds}

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        return {"test_miou": test["miou"], "test_pixel_accuracy": test["pixel_accuracy"],
                "test_mdice": test["mdice"], "test_iou": test["iou"], "test_loss": test["loss"]}


class SuperRes(Task):
    """Single-image super-resolution: a ``scale`` times larger image, scored by PSNR."""

    name = "superres"
    metric = "psnr"

    def classes(self, data) -> list[str]:
        return []

    def targets(self, data) -> torch.Tensor:
        return data.labels  # unused: the loader makes (low-res, image) pairs itself

    def prepare(self, data, multiple: int):
        """Crop the images (top-left) to a multiple of ``scale`` times the model's multiple."""
        m = self.cfg.scale * max(1, multiple)
        h, w = (s - s % m for s in data.images.shape[-2:])
        if min(h, w) < m:
            raise ValueError(f"images of {tuple(data.images.shape[-2:])} are too small for scale "
                             f"{self.cfg.scale}; use larger images (--image-size) or a smaller "
                             "--scale")
        if (h, w) == tuple(data.images.shape[-2:]):
            return data
        out = data.subset(torch.arange(len(data)))
        out.images = data.images[..., :h, :w].contiguous()
        return out

    def model_kwargs(self, data) -> dict[str, Any]:
        c, h, w = data.input_size
        s = self.cfg.scale
        return {"in_chans": c, "img_size": (h // s, w // s), "scale": s}

    def loader_kwargs(self) -> dict[str, Any]:
        return {"scale": self.cfg.scale}

    def augment(self, data) -> str:
        # Flips only: a shift's filled border is an edge no low-resolution input shows.
        return "flips"

    def criterion(self) -> nn.Module:
        return nn.MSELoss() if self.cfg.loss == "mse" else nn.L1Loss()

    def batch_score(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        from .metrics import psnr

        return psnr(out.detach().float().clamp(0, 1), y).sum(), len(y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device,
                 amp: torch.dtype | None = None) -> dict[str, Any]:
        """PSNR and SSIM of the model and of bicubic upscaling, borders of ``scale`` px cut."""
        from cnnkit.data import downscale

        from .metrics import bicubic_upscale, psnr, ssim

        was_training = model.training
        model.eval()
        crit, s = self.criterion(), self.cfg.scale
        sums = dict.fromkeys(("loss", "psnr", "ssim", "psnr_bicubic", "ssim_bicubic"), 0.0)
        n, kept = 0, []
        for x, y in loader:
            with autocast(device, amp):
                out = model(x)
            out = out.float().clamp(0, 1)
            bic = bicubic_upscale(downscale(y, s), s)
            sums["loss"] += float(crit(out, y)) * len(y)
            for tag, img in (("", out), ("_bicubic", bic)):
                sums["psnr" + tag] += float(psnr(img, y, border=s).sum())
                sums["ssim" + tag] += float(ssim(img, y, border=s).sum())
            n += len(y)
            if sum(len(k[0]) for k in kept) < _SAMPLES:
                kept.append((out[:_SAMPLES].cpu(), bic[:_SAMPLES].cpu(), y[:_SAMPLES].cpu()))
        model.train(was_training)
        samples = tuple(torch.cat(parts)[:_SAMPLES] for parts in zip(*kept, strict=True))
        if _sharded(loader):
            total = all_reduce_sum(torch.tensor([*sums.values(), n], dtype=torch.float64,
                                                device=device)).tolist()
            sums, n = dict(zip(sums, total[:-1], strict=True)), total[-1]
            samples = tuple(gather_shards(t)[:_SAMPLES] for t in samples)
        res = {k: v / max(1, n) for k, v in sums.items()}
        if samples:
            res["samples"] = samples
        return res

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        return {"test_psnr": test["psnr"], "test_psnr_bicubic": test["psnr_bicubic"],
                "test_ssim": test["ssim"], "test_ssim_bicubic": test["ssim_bicubic"],
                "test_loss": test["loss"], "scale": self.cfg.scale}


_TASKS = {t.name: t for t in (Task, Segment, SuperRes)}


def get_task(cfg: TrainConfig) -> Task:
    """The :class:`Task` of a configuration."""
    return _TASKS[cfg.task](cfg)
