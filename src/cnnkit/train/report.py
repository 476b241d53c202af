"""``report.html``: a static, self-contained page per run (figures inlined as PNG).

Loss and accuracy curves, the test confusion matrix and a grid of test images with
their true and predicted labels. No script and no external resource: the file
opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import torch

from .checkpoint import atomic_write
from .run import RunPaths

__all__ = ["write_report", "confusion_matrix"]


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[i, j]`` = number of samples of true class i predicted as j."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _curves(history: list[dict]) -> str:
    import matplotlib.pyplot as plt

    ep = [m["epoch"] for m in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ep, [m["train_loss"] for m in history], label="train")
    a.plot(ep, [m["val_loss"] for m in history], label="validation")
    # Train loss carries label smoothing and augmentation, so it sits above validation.
    a.set(xlabel="epoch", ylabel="loss", title="Loss (train: with label smoothing, augmented)")
    b.plot(ep, [m["train_accuracy"] for m in history], label="train")
    b.plot(ep, [m["val_accuracy"] for m in history], label="validation")
    b.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


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
    return _png(fig)


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
        img = images[i]
        img = img.float() / 255 if img.dtype == torch.uint8 else img.float()
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        ok = bool(preds[i] == targets[i])
        ax.set_title(f"{classes[targets[i]]} → {classes[preds[i]]}\n{float(probs[i].max()):.2f}",
                     fontsize=7, color="green" if ok else "red")
    fig.suptitle("Test samples: true → predicted (confidence); errors first", fontsize=9)
    return _png(fig)


def write_report(paths: RunPaths, summary: dict[str, Any], history: list[dict],
                 test: dict[str, Any], data, test_idx: torch.Tensor) -> None:
    """Write ``report.html`` for a finished run."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    classes = summary["classes"]
    cm = confusion_matrix(test["preds"], test["targets"], len(classes))
    figures = [("Training curves", _curves(history)),
               ("Confusion matrix", _confusion(cm, classes)),
               ("Sample predictions", _samples(data.images[test_idx], test["targets"],
                                               test["preds"], test["probs"], classes))]
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in summary.items() if k != "classes")
    per_class = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{int(cm[i].sum())}</td>"
        f"<td>{float(cm[i, i]) / max(1, int(cm[i].sum())):.3f}</td></tr>"
        for i, c in enumerate(classes))
    body = "".join(f"<h2>{t}</h2><img alt='{t}' src='data:image/png;base64,{b}'>"
                   for t, b in figures)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>cnnkit run {html.escape(paths.root.name)}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ddd;padding:3px 8px;
text-align:left;font-size:14px}} img{{max-width:100%}}</style></head><body>
<h1>Run {html.escape(paths.root.name)}</h1>
<p>Test accuracy <b>{summary['test_accuracy']:.4f}</b> on {len(test_idx)} held-out images.</p>
<table>{rows}</table>{body}
<h2>Per-class test accuracy</h2><table><tr><th>class</th><th>samples</th><th>accuracy</th></tr>
{per_class}</table></body></html>"""
    atomic_write(paths.report, page)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
