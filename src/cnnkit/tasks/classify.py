"""Classification: one class per sample, scored by accuracy.

Target ``[N]`` class indices; cross-entropy with label smoothing (Szegedy et al. 2016,
"Rethinking the Inception Architecture for Computer Vision"); the report shows the test
confusion matrix, misclassified samples first, and the per-class accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnkit.data.shards import all_reduce_sum, gather_shards, is_sharded

from ._base import ReportParts, Task, TaskDefaults, eval_outputs
from ._registry import register_task
from .figures import png, show, table
from .metrics import confusion_matrix

__all__ = ["Classify", "evaluate_classify"]


@torch.no_grad()
def evaluate_classify(model: nn.Module, loader: Any, device: torch.device,
                      amp: torch.dtype | None = None,
                      label_smoothing: float = 0.0) -> dict[str, Any]:
    """Loss, accuracy, predictions, probabilities and targets of ``model`` over ``loader``."""
    crit = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="sum")
    loss, preds, probs, targets = torch.zeros((), device=device), [], [], []
    for out, y in eval_outputs(model, loader, device, amp):
        loss += crit(out, y)
        p = out.softmax(1)
        probs.append(p.cpu())
        preds.append(p.argmax(1).cpu())
        targets.append(y.cpu())
    preds_t, targets_t, probs_t = torch.cat(preds), torch.cat(targets), torch.cat(probs)
    if is_sharded(loader):
        loss = all_reduce_sum(loss)
        preds_t, targets_t, probs_t = (gather_shards(t) for t in (preds_t, targets_t, probs_t))
    n = max(1, len(targets_t))
    return {"loss": float(loss) / n, "accuracy": float((preds_t == targets_t).float().mean()),
            "preds": preds_t, "probs": probs_t, "targets": targets_t}


@register_task
class Classify(Task):
    """Classification: one label per sample."""

    name = "classify"
    description = "a class per sample"
    metric = "accuracy"
    losses = ("ce",)
    # AdamW rather than SGD: one rate (2e-3, Loshchilov and Hutter 2019) that every small
    # model of the zoo learns the built-in data sets with, normalised or not (LeNet-5,
    # Tiny VGG and All-CNN have no BatchNorm, and SGD at 0.1 x batch/256 left them at chance
    # for epochs: bench/learns.py).
    defaults = TaskDefaults(model="tinyvgg_wide", data="digits", loss="ce", epochs=30,
                            batch_size=64, optimizer="adamw", lr=2e-3)
    train_metric, progress_tag = "accuracy", "acc"

    def align(self, data: Any, outputs: list[str], name: str) -> Any:
        """Another data set's labels mapped onto the run's classes, by class name."""
        if data.classes == outputs:
            return data
        unknown = sorted(set(data.classes) - set(outputs))
        if unknown:
            raise ValueError(f"classes {', '.join(unknown)} are not among the run's classes "
                             f"({', '.join(outputs)}); evaluate on data with the same class names")
        lookup = torch.tensor([outputs.index(c) for c in data.classes])
        out = data.subset(torch.arange(len(data)))
        out.labels, out.classes = lookup[data.labels], list(outputs)
        return out

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)

    def batch_score(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        return (out.detach().argmax(1) == y).sum(), y.numel()

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 amp: torch.dtype | None = None) -> dict[str, Any]:
        return evaluate_classify(model, loader, device, amp)

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        return {"test_accuracy": test["accuracy"], "test_loss": test["loss"]}

    def headline(self, result: dict[str, Any]) -> str:
        return f"test_accuracy {result['test_accuracy']:.4f}"

    def chance(self, targets: torch.Tensor, num_classes: int) -> float:
        """The majority class's share: the accuracy of always predicting it."""
        counts = torch.bincount(targets.flatten().long(), minlength=num_classes)
        return float(counts.max()) / max(1, targets.numel())

    def predict_row(self, out: torch.Tensor, outputs: list[str], topk: int) -> dict[str, Any]:
        """The ``topk`` classes and their probabilities (softmax of the logits)."""
        probs = out.float().softmax(0)
        top = probs.topk(min(topk, len(probs)))
        return {"predictions": [{"class": outputs[i], "index": int(i), "probability": float(p)}
                                for p, i in zip(top.values.tolist(), top.indices.tolist(),
                                                strict=True)]}

    def prediction_line(self, result: dict[str, Any]) -> str:
        return f"{result['file']}: " + ", ".join(
            f"{p['class']} {p['probability']:.3f}" for p in result["predictions"])

    def report(self, summary: dict[str, Any], test: dict[str, Any], data: Any,
               test_idx: torch.Tensor) -> ReportParts:
        classes = summary["classes"]
        cm = confusion_matrix(test["preds"], test["targets"], len(classes), ignore_index=-1)
        figures = [("Confusion matrix", _confusion(cm, classes))]
        if data.images.ndim == 4:  # samples shown as pictures: images only
            figures.append(("Sample predictions", _samples(
                data.images[test_idx], test["targets"], test["preds"], test["probs"], classes)))
        rows = [[c, int(cm[i].sum()), float(cm[i, i]) / max(1, int(cm[i].sum()))]
                for i, c in enumerate(classes)]
        return ReportParts(
            f"Test accuracy <b>{summary['test_accuracy']:.4f}</b> on {len(test_idx)} held-out "
            "samples.", figures, table("Per-class test accuracy", ["class", "samples",
                                                                    "accuracy"], rows))


def _confusion(cm: torch.Tensor, classes: list[str]) -> str:
    import matplotlib.pyplot as plt

    k = len(classes)
    size = min(12, 2 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm.numpy(), cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title="Test confusion matrix")
    ax.set_xticklabels(classes, rotation=90 if k > 6 else 0)
    ax.set_yticklabels(classes)
    if k <= 20:
        vmax = float(cm.max())
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > vmax / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return png(fig)


def _samples(images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
             probs: torch.Tensor, classes: list[str], n: int = 24) -> str:
    import matplotlib.pyplot as plt

    # Misclassified samples first: they are what a reader wants to see.
    order = torch.argsort((preds == targets).int(), stable=True)[:n]
    cols = 8
    rows = max(1, (len(order) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.75), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order.tolist(), strict=False):
        ok = bool(preds[i] == targets[i])
        show(ax, images[i], "")
        ax.set_title(f"{classes[targets[i]]} → {classes[preds[i]]}\n{float(probs[i].max()):.2f}",
                     fontsize=7, color="green" if ok else "red")
    fig.suptitle("Test samples: true → predicted (confidence); errors first", fontsize=9)
    return png(fig)
