"""Plotting helpers of the tasks' report sections: a figure as an inline PNG, an input
shown as an image, numbers and nested summaries as table rows. matplotlib is imported
when a report is drawn, never before."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import torch

__all__ = ["png", "show", "fmt", "flat_rows", "table", "integer_epochs"]


def png(fig: Any) -> str:
    """The figure as base64 PNG (for ``<img src='data:image/png;base64,...'>``), closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def show(ax: Any, img: torch.Tensor, title: str) -> None:
    """One image ``[C, H, W]`` (uint8, or float in [0, 1]) on ``ax``, grey or colour."""
    img = img.float() / 255 if img.dtype == torch.uint8 else img.float()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def fmt(v: Any) -> str:
    """A value as a table cell: floats to 4 decimals (scientific when tiny or huge),
    integers with thousands separators, lists joined by commas, booleans as yes or no.

    Example:
        >>> from cnnkit.tasks.figures import fmt
        >>> fmt(0.123456), fmt(2400), fmt(1e-6), fmt([3, 32, 32]), fmt(True)
        ('0.1235', '2,400', '1.000e-06', '3, 32, 32', 'yes')
    """
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:,.1f}" if abs(v) >= 1e3 else f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v) if v else "none"
    return "none" if v is None else str(v)


def flat_rows(summary: dict[str, Any], skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """``summary`` as ``(name, cell)`` rows a reader scans: nested dicts become one row per
    leaf named by its path (``"num_samples / train"``), lists of dicts one block per item
    (``"resumes / 1 / epochs"``), values formatted by :func:`fmt`; keys in ``skip`` left out.

    Example:
        >>> from cnnkit.tasks.figures import flat_rows
        >>> flat_rows({"num_samples": {"train": 2400, "val": 300}, "test_miou": 0.91234})
        [('num_samples / train', '2,400'), ('num_samples / val', '300'), ('test_miou', '0.9123')]
    """
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(f"{prefix} / {k}" if prefix else str(k), x)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v, 1):
                walk(f"{prefix} / {i}", x)
        else:
            rows.append((prefix, "none" if isinstance(v, dict) else fmt(v)))

    for k, v in summary.items():
        if k not in skip:
            walk(str(k), v)
    return rows


def integer_epochs(ax: Any) -> None:
    """Epochs on ``ax``'s x axis at whole numbers only (an epoch 1.5 does not exist)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def table(title: str, head: list[str], rows: list[list[Any]]) -> str:
    """An HTML section: a heading and a table (cells escaped, floats to 4 places)."""
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>"
                    for r in rows)
    return (f"<h2>{html.escape(title)}</h2><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{cells}</table>")
