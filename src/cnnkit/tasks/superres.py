"""Single-image super-resolution: a ``scale`` times larger image, scored by PSNR.

The inputs are their own targets: the loader makes each low-resolution input by bicubic
downscaling of the (augmented) image. Loss MSE (as ESPCN, Shi et al. 2016) or L1; PSNR and
SSIM are reported beside bicubic upscaling's, borders of ``scale`` pixels cut.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from cnnkit.data import downscale
from cnnkit.data.shards import all_reduce_sum, gather_shards, is_sharded
from cnnkit.data.volumes import file_stem

from ._base import ReportParts, Task, TaskDefaults, eval_outputs
from ._registry import register_task
from .figures import png, show
from .metrics import bicubic_upscale, psnr, ssim

__all__ = ["SuperRes"]

_SAMPLES = 8


@register_task
class SuperRes(Task):
    """Single-image super-resolution: a ``scale`` times larger image, scored by PSNR."""

    name = "superres"
    description = "a scale times larger image"
    metric = "psnr"
    losses = ("mse", "l1")
    # ESPCN needs Adam and no weight decay to beat bicubic (docs/benchmarks.md).
    defaults = TaskDefaults(model="espcn", data="shapes", loss="mse", epochs=100,
                            batch_size=16, optimizer="adamw", lr=3e-3, weight_decay=0.0)
    data_targets = "images"
    writes_predictions = True
    output_kind = "image"
    train_metric, progress_tag = "psnr", "psnr"

    @property
    def scale(self) -> int:
        return int(getattr(self.cfg, "scale", 3))

    def classes(self, data: Any) -> list[str]:
        return []

    def targets(self, data: Any) -> torch.Tensor:
        return data.labels  # unused: the loader makes (low-res, image) pairs itself

    def prepare(self, data: Any, multiple: int) -> Any:
        """Crop the images (top-left) to a multiple of ``scale`` times the model's multiple."""
        m = self.scale * max(1, multiple)
        h, w = (s - s % m for s in data.images.shape[-2:])
        if min(h, w) < m:
            raise ValueError(f"images of {tuple(data.images.shape[-2:])} are too small for scale "
                             f"{self.scale}; use larger images (--image-size) or a smaller "
                             "--scale")
        if (h, w) == tuple(data.images.shape[-2:]):
            return data
        out = data.subset(torch.arange(len(data)))
        out.images = data.images[..., :h, :w].contiguous()
        return out

    def model_kwargs(self, data: Any) -> dict[str, Any]:
        c, *spatial = data.input_size
        return {"in_chans": c, "img_size": tuple(v // self.scale for v in spatial),
                "scale": self.scale}

    def builder_options(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def loader_kwargs(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def augment(self, data: Any) -> str:
        # Flips only: a shift's filled border is an edge no low-resolution input shows.
        return "flips"

    def criterion(self) -> nn.Module:
        return nn.MSELoss() if self.cfg.loss == "mse" else nn.L1Loss()

    def batch_score(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        return psnr(out.detach().float().clamp(0, 1), y).sum(), len(y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 amp: torch.dtype | None = None) -> dict[str, Any]:
        """PSNR and SSIM of the model and of bicubic upscaling, borders of ``scale`` px cut."""
        crit, s = self.criterion(), self.scale
        sums = dict.fromkeys(("loss", "psnr", "ssim", "psnr_bicubic", "ssim_bicubic"), 0.0)
        n, kept = 0, []
        for out, y in eval_outputs(model, loader, device, amp):
            out = out.clamp(0, 1)
            bic = bicubic_upscale(downscale(y, s), s)
            sums["loss"] += float(crit(out, y)) * len(y)
            for tag, img in (("", out), ("_bicubic", bic)):
                sums["psnr" + tag] += float(psnr(img, y, border=s).sum())
                sums["ssim" + tag] += float(ssim(img, y, border=s).sum())
            n += len(y)
            if sum(len(k[0]) for k in kept) < _SAMPLES:
                kept.append((out[:_SAMPLES].cpu(), bic[:_SAMPLES].cpu(), y[:_SAMPLES].cpu()))
        samples = tuple(torch.cat(parts)[:_SAMPLES] for parts in zip(*kept, strict=True))
        if is_sharded(loader):
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
                "test_loss": test["loss"], "scale": self.scale}

    def headline(self, result: dict[str, Any]) -> str:
        return (f"test_psnr {result['test_psnr']:.2f} dB (bicubic "
                f"{result['test_psnr_bicubic']:.2f} dB)  test_ssim {result['test_ssim']:.4f}")

    def report(self, summary: dict[str, Any], test: dict[str, Any], data: Any,
               test_idx: torch.Tensor) -> ReportParts:
        figures = []
        if "samples" in test:
            figures.append(("Sample predictions", _samples(*test["samples"])))
        return ReportParts(
            f"Test PSNR <b>{summary['test_psnr']:.2f} dB</b> (bicubic "
            f"{summary['test_psnr_bicubic']:.2f} dB) at x{summary['scale']} on "
            f"{len(test_idx)} held-out images.", figures)

    @classmethod
    def explainable(cls, model: nn.Module) -> nn.Module:
        raise ValueError("super-resolution models are not explained: their output is an "
                         "image, not a score per class; explain a classification or "
                         "segmentation run")

    def prediction_names(self, source: Path) -> list[str]:
        return [f"{file_stem(source)}_x{self.scale}.png"]

    def write_prediction(self, pred: torch.Tensor, image: torch.Tensor, out: Path, source: Path,
                         classes: list[str], crf: bool = False) -> dict[str, Any]:
        """The upscaled image (``pred`` in [0, 1], ``[C, sH, sW]``) as a PNG."""
        if crf:
            raise ValueError("--crf refines segmentations; this is a super-resolution run")
        path = out / self.prediction_names(source)[0]
        arr = (pred.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
        return {"output": str(path), "size": list(arr.shape[:2])}

    def prediction_line(self, result: dict[str, Any]) -> str:
        return f"{result['file']}: {result['output']} ({result['size'][1]}x{result['size'][0]})"


def _samples(out: torch.Tensor, bic: torch.Tensor, hr: torch.Tensor) -> str:
    import matplotlib.pyplot as plt

    n = min(4, len(out))
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        show(axes[i, 0], bic[i], f"bicubic {float(psnr(bic[i:i + 1], hr[i:i + 1])):.2f} dB")
        show(axes[i, 1], out[i], f"model {float(psnr(out[i:i + 1], hr[i:i + 1])):.2f} dB")
        show(axes[i, 2], hr[i], "ground truth")
    fig.suptitle("Test images: bicubic upscaling, the model, the original", fontsize=9)
    return png(fig)
