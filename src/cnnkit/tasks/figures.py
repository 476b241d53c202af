"""Plotting helpers of the tasks' report sections: a figure as an inline PNG, an input
shown as an image. matplotlib is imported when a report is drawn, never before."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import torch

__all__ = ["png", "show", "fmt", "table"]


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
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table(title: str, head: list[str], rows: list[list[Any]]) -> str:
    """An HTML section: a heading and a table (cells escaped, floats to 4 places)."""
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>"
                    for r in rows)
    return (f"<h2>{html.escape(title)}</h2><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{cells}</table>")
