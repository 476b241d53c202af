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
from cnnkit.tasks.figures import fmt, png

from .checkpoint import atomic_write
from .folder import RunPaths

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
    return png(fig)


def _page(paths: RunPaths, headline: str, summary: dict[str, Any],
          figures: list[tuple[str, str]], extra: str = "") -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt(v))}</td></tr>"
                   for k, v in summary.items() if k not in ("classes", "test_iou",
                                                            "test_r2_per_output"))
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


def write_report(paths: RunPaths, task: Task, summary: dict[str, Any], history: list[dict],
                 test: dict[str, Any], data: Any, test_idx: torch.Tensor) -> None:
    """Write ``report.html`` for a finished run: the curves, then the task's sections."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    parts = task.report(summary, test, data, test_idx)
    figures = [("Training curves", _curves(history)), *parts.figures]
    atomic_write(paths.report, _page(paths, parts.headline, summary, figures, parts.extra))
