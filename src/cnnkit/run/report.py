"""``report.html``: a static, self-contained page per run (figures inlined as PNG).

Loss and metric curves, then the task's own sections (:meth:`cnnkit.tasks.Task.report`:
the confusion matrix and samples of a classifier, masks of a segmentation, bicubic beside
the model for super-resolution, predicted against true values for regression). Other
commands add sections to a run's page (:func:`put_section`). No script and no external
resource: the file opens offline in any browser.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from cnnkit.tasks import Task
from cnnkit.tasks.figures import flat_rows, integer_epochs, png

from .checkpoint import atomic_write
from .folder import RunPaths

__all__ = ["write_report", "put_section", "curve_panels", "curve_figure"]

# Per-class lists: the task's own tables show them by class name.
_PER_CLASS = ("classes", "test_iou", "test_r2_per_output")


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


# How the curves name the metrics of metrics.jsonl (others: their key, underscores as spaces).
_LABELS = {"miou": "mIoU", "mdice": "mean Dice", "psnr": "PSNR (dB)", "ssim": "SSIM",
           "mse": "MSE", "mae": "MAE", "r2": "R²"}


def _label(name: str) -> str:
    return _LABELS.get(name, name.replace("_", " "))


def curve_panels(history: list[dict]) -> list[tuple[str, str | None, str | None]]:
    """The panels of the training curves as ``(metric, train key, val key)``: the loss
    first, then each metric with its train and validation values on one axis when both
    were recorded, or alone on its own panel (a task whose running training statistic is
    not its validation metric, as segmentation's pixel accuracy and mIoU, gets two panels,
    never one axis with two meanings)."""
    keys = [k for k in history[0] if isinstance(history[0][k], (int, float))] if history else []
    names = list(dict.fromkeys(k.split("_", 1)[1] for k in keys
                               if k.startswith(("train_", "val_"))))
    names.sort(key=lambda n: n != "loss")
    return [(n, f"train_{n}" if f"train_{n}" in keys else None,
             f"val_{n}" if f"val_{n}" in keys else None) for n in names]


def curve_figure(history: list[dict]) -> Any:
    """The training curves of ``history`` (the rows of ``metrics.jsonl``) as a matplotlib
    figure: one panel per :func:`curve_panels` entry, epochs on whole-number ticks."""
    import matplotlib.pyplot as plt

    panels = curve_panels(history)
    ep = [m["epoch"] for m in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    marker = "o" if len(ep) < 12 else None  # a run of one or two epochs is still visible
    for ax, (name, train, val) in zip(axes[0], panels, strict=True):
        for key, who in ((train, "train"), (val, "validation")):
            if key is not None:
                ax.plot(ep, [m.get(key, float("nan")) for m in history], marker=marker,
                        label=f"{who} {_label(name)}", color="C0" if who == "train" else "C1")
        only = "" if train and val else " (train)" if train else " (validation)"
        # Train loss carries label smoothing and augmentation, so it sits above validation.
        title = "Loss (train: augmented)" if name == "loss" else f"{_label(name)}{only}"
        ax.set(xlabel="epoch", ylabel=_label(name), title=title)
        integer_epochs(ax)
        ax.ticklabel_format(axis="y", useOffset=False)  # 0.181 reads as itself, not 1e-6 + ...
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def _page(paths: RunPaths, headline: str, summary: dict[str, Any],
          figures: list[tuple[str, str]], extra: str = "") -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in flat_rows(summary, skip=_PER_CLASS))
    body = "".join(f"<h2>{t}</h2><img alt='{t}' src='data:image/png;base64,{b}'>"
                   for t, b in figures)
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>cnnkit run {html.escape(paths.root.name)}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ddd;padding:3px 8px;
text-align:left;font-size:14px}} th{{font-weight:600;background:#f6f7f9}}
table.summary td{{text-align:right;font-variant-numeric:tabular-nums}}
img{{max-width:100%}}</style></head><body>
<h1>Run {html.escape(paths.root.name)}</h1>
<p>{headline}</p>
<table class="summary">{rows}</table>{body}{extra}</body></html>"""


def write_report(paths: RunPaths, task: Task, summary: dict[str, Any], history: list[dict],
                 test: dict[str, Any], data: Any, test_idx: torch.Tensor) -> None:
    """Write ``report.html`` for a finished run: the curves, then the task's sections."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    parts = task.report(summary, test, data, test_idx)
    figures = [("Training curves", png(curve_figure(history))), *parts.figures]
    atomic_write(paths.report, _page(paths, parts.headline, summary, figures, parts.extra))
