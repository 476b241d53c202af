"""``report.html``: a static, self-contained page per run (figures inlined as PNG).

Loss and metric curves, then per task: the test confusion matrix and a grid of test
images with their true and predicted labels (classification); test images beside
their ground-truth and predicted masks, and per-class IoU (segmentation); bicubic,
model and ground truth side by side (super-resolution). No script and no external
resource: the file opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write
from .run import RunPaths

__all__ = ["write_report", "put_section"]


def put_section(report: Path, key: str, body: str) -> None:
    """Put ``body`` into ``report`` (an HTML page) as the section named ``key``.

    The section sits between marker comments before ``</body>``: writing the same key again
    replaces it, the rest of the page is kept (a run's report gains the explanation
    benchmark, the compression sweep ...). A missing page is started.
    """
    start, end = f"<!-- cnnkit:{key}:start -->", f"<!-- cnnkit:{key}:end -->"
    section = f"{start}\n{body}\n{end}"
    page = (report.read_text(encoding="utf-8") if report.is_file() else
            "<!doctype html><html><head><meta charset='utf-8'></head><body></body></html>")
    if start in page and end in page:
        before, rest = page.split(start, 1)
        page = before + section + rest.split(end, 1)[1]
    elif "</body>" in page:
        at = page.rindex("</body>")
        page = page[:at] + section + "\n" + page[at:]
    else:
        page += section
    atomic_write(report, page)


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
    a.set(xlabel="epoch", ylabel="loss", title="Loss (train: augmented)")
    train_key = next(k for k in history[0] if k.startswith("train_") and k != "train_loss")
    val_key = next(k for k in history[0] if k.startswith("val_") and k != "val_loss")
    b.plot(ep, [m[train_key] for m in history], label=train_key.replace("_", " "))
    b.plot(ep, [m[val_key] for m in history], label=val_key.replace("_", " "))
    b.set(xlabel="epoch", ylabel=val_key[4:], title=val_key[4:].replace("_", " "))
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


def _show(ax, img: torch.Tensor, title: str) -> None:
    img = img.float() / 255 if img.dtype == torch.uint8 else img.float()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _segment_samples(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor,
                     classes: list[str]) -> str:
    import matplotlib.pyplot as plt

    n, k = len(preds), len(classes)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    h, w = images.shape[-2:]
    for i in range(n):
        _show(axes[i, 0], images[i], "image" if i == 0 else "")
        for j, (m, title) in enumerate(((masks[i], "ground truth"), (preds[i], "prediction"))):
            m = m[:h, :w].float()
            m[m == 255] = float("nan")  # ignored pixels
            axes[i, j + 1].imshow(m.numpy(), cmap="tab20", vmin=0, vmax=max(19, k - 1),
                                  interpolation="nearest")
            axes[i, j + 1].set_title(title if i == 0 else "", fontsize=8)
            axes[i, j + 1].axis("off")
    fig.suptitle("Test images: ground truth and predicted masks (same colour = same class)",
                 fontsize=9)
    return _png(fig)


def _superres_samples(out: torch.Tensor, bic: torch.Tensor, hr: torch.Tensor) -> str:
    import matplotlib.pyplot as plt

    from .metrics import psnr

    n = min(4, len(out))
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], bic[i], f"bicubic {float(psnr(bic[i:i + 1], hr[i:i + 1])):.2f} dB")
        _show(axes[i, 1], out[i], f"model {float(psnr(out[i:i + 1], hr[i:i + 1])):.2f} dB")
        _show(axes[i, 2], hr[i], "ground truth")
    fig.suptitle("Test images: bicubic upscaling, the model, the original", fontsize=9)
    return _png(fig)


def _page(paths: RunPaths, headline: str, summary: dict[str, Any],
          figures: list[tuple[str, str]], extra: str = "") -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in summary.items() if k not in ("classes", "test_iou"))
    body = "".join(f"<h2>{t}</h2><img alt='{t}' src='data:image/png;base64,{b}'>"
                   for t, b in figures)
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>cnnkit run {html.escape(paths.root.name)}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ddd;padding:3px 8px;
text-align:left;font-size:14px}} img{{max-width:100%}}</style></head><body>
<h1>Run {html.escape(paths.root.name)}</h1>
<p>{headline}</p>
<table>{rows}</table>{body}{extra}</body></html>"""


def _write_dense(paths: RunPaths, summary: dict[str, Any], history: list[dict],
                 test: dict[str, Any], data, test_idx: torch.Tensor) -> None:
    figures = [("Training curves", _curves(history))]
    n = len(test_idx)
    if summary["task"] == "segment":
        classes = summary["classes"]
        if test.get("preds") is not None:
            k = len(test["preds"])
            figures.append(("Sample predictions", _segment_samples(
                data.images[test_idx[:k]], data.masks[test_idx[:k]], test["preds"], classes)))
        per_class = "".join(
            f"<tr><td>{html.escape(c)}</td><td>{_fmt(iou)}</td><td>{_fmt(dice)}</td></tr>"
            for c, iou, dice in zip(classes, test["iou"], test["dice"], strict=True))
        extra = ("<h2>Per-class test IoU and Dice</h2><table><tr><th>class</th><th>IoU</th>"
                 f"<th>Dice</th></tr>{per_class}</table>")
        headline = f"Test mIoU <b>{summary['test_miou']:.4f}</b> on {n} held-out images."
    else:
        if "samples" in test:
            figures.append(("Sample predictions", _superres_samples(*test["samples"])))
        extra = ""
        headline = (f"Test PSNR <b>{summary['test_psnr']:.2f} dB</b> (bicubic "
                    f"{summary['test_psnr_bicubic']:.2f} dB) at x{summary['scale']} on {n} "
                    "held-out images.")
    atomic_write(paths.report, _page(paths, headline, summary, figures, extra))


def write_report(paths: RunPaths, summary: dict[str, Any], history: list[dict],
                 test: dict[str, Any], data, test_idx: torch.Tensor) -> None:
    """Write ``report.html`` for a finished run."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    if summary.get("task", "classify") != "classify":
        _write_dense(paths, summary, history, test, data, test_idx)
        return
    classes = summary["classes"]
    from .metrics import confusion_matrix

    cm = confusion_matrix(test["preds"], test["targets"], len(classes), ignore_index=-1)
    figures = [("Training curves", _curves(history)),
               ("Confusion matrix", _confusion(cm, classes)),
               ("Sample predictions", _samples(data.images[test_idx], test["targets"],
                                               test["preds"], test["probs"], classes))]
    per_class = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{int(cm[i].sum())}</td>"
        f"<td>{float(cm[i, i]) / max(1, int(cm[i].sum())):.3f}</td></tr>"
        for i, c in enumerate(classes))
    extra = ("<h2>Per-class test accuracy</h2><table><tr><th>class</th><th>samples</th>"
             f"<th>accuracy</th></tr>{per_class}</table>")
    headline = (f"Test accuracy <b>{summary['test_accuracy']:.4f}</b> on {len(test_idx)} "
                "held-out images.")
    atomic_write(paths.report, _page(paths, headline, summary, figures, extra))


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
