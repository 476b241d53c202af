"""Benchmarking explanation methods on a run's test split (behind ``cnnkit explain --benchmark``).

Every method explains the same test images (target: the true label) and is scored by

* **speed**: maps per second (wall clock of the explainer calls);
* **faithfulness**: deletion AUC (lower is better) and insertion AUC (higher is better) of
  Petsiuk, Das and Saenko 2018, "RISE: Randomized Input Sampling for Explanation of
  Black-box Models" (see :func:`cnnkit.explain.scores.deletion_insertion`);
* **localisation**, where the data has object masks (``shapes``): the pointing game of
  Zhang et al. 2018, "Top-down Neural Attention by Excitation Backprop", and the share of
  positive energy in the mask of Wang et al. 2020, "Score-CAM";
* optionally (``sanity=True``) the model-randomisation check of Adebayo et al. 2018,
  "Sanity Checks for Saliency Maps", cut to the top layers to stay affordable.

**Ranking rule.** For each quality score the successful methods are ranked (1 = best,
ties share the average rank); a method's ``mean_rank`` is the mean of its ranks over the
scores that were computed, and ``rank`` orders methods by ``mean_rank``, ties broken by
speed (faster first). Speed itself is reported, not averaged in: a fast method that
explains nothing should not outrank a slow faithful one. Methods that fail (e.g. ``cam``
on a model without global average pooling) get ``rank`` None and the error in ``note``.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cnnkit._files import atomic_write, refuse_existing
from cnnkit.explain import create, list_methods
from cnnkit.explain.scores import (
    deletion_insertion,
    energy_in_mask,
    pointing_game,
    rank_correlation,
)
from cnnkit.run import load_run, run_test_data
from cnnkit.run.report import put_section

__all__ = ["benchmark_methods", "sanity_correlation", "rank_rows", "format_table",
           "write_benchmark", "SCORES"]

# score key -> (column title, True when higher is better)
SCORES: dict[str, tuple[str, bool]] = {
    "deletion_auc": ("deletion AUC ↓", False),
    "insertion_auc": ("insertion AUC ↑", True),
    "pointing_game": ("pointing game ↑", True),
    "energy_in_mask": ("energy in mask ↑", True),
    "sanity_correlation": ("randomised corr ↓", False),
}
ROW_KEYS = ("method", "rank", "mean_rank", "maps_per_s", *SCORES, "n_images", "note")


def _pick(n_total: int, n: int) -> torch.Tensor:
    """``n`` indices spread evenly over ``range(n_total)`` (the split is sorted by index)."""
    n = min(n, n_total)
    return torch.linspace(0, n_total - 1, n).round().long().unique()


def _explain(method: str, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
             layer: str | None, batch_size: int) -> torch.Tensor:
    with create(method, model, layer=layer) as explainer:
        return torch.cat([explainer(x[i:i + batch_size], target[i:i + batch_size])
                          for i in range(0, len(x), batch_size)])


def sanity_correlation(method: str, model: torch.nn.Module, x: torch.Tensor,
                       target: torch.Tensor, layers: int = 2, layer: str | None = None,
                       seed: int = 0) -> float:
    """Mean Spearman correlation between a method's maps on the trained model and on a copy
    whose top ``layers`` parameterised layers are re-initialised (cascading randomisation,
    Adebayo et al. 2018, "Sanity Checks for Saliency Maps", cut to the top layers).

    Low means the maps depend on the learned weights (good); near 1 means they do not.
    :func:`cnnkit.explain.scores.randomization_check` runs the full cascade.
    """
    reference = _explain(method, model, x, target, layer, len(x))
    work = copy.deepcopy(model)
    params = [m for _, m in work.named_modules()
              if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in params[::-1][:layers]:
            module.reset_parameters()
    finally:
        torch.random.set_rng_state(state)
    maps = _explain(method, work, x, target, layer, len(x))
    return float(rank_correlation(reference, maps).mean())


def _score(run: Any, method: str, x: torch.Tensor, labels: torch.Tensor,
           masks: torch.Tensor | None, steps: int, batch_size: int, layer: str | None,
           baseline: Any, sanity: bool, sanity_images: int,
           sanity_layers: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(method=method, n_images=len(x), note="")
    model = run.model
    try:
        # a warm-up call on one image keeps one-off costs (allocation, lazy setup) out of
        # the timing, and shows a failing method before the full pass
        _explain(method, model, x[:1], labels[:1], layer, batch_size)
        start = time.perf_counter()
        maps = _explain(method, model, x, labels, layer, batch_size)
        seconds = time.perf_counter() - start
    except Exception as e:  # one failing method must not stop the benchmark
        row["note"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())}"
        return row
    if not torch.isfinite(maps).all():
        row["note"] = "failed: the maps hold NaN or infinite values"
        return row
    row["maps_per_s"] = len(x) / max(seconds, 1e-9)
    for mode in ("deletion", "insertion"):
        res = deletion_insertion(model, x, maps, labels, steps=steps, mode=mode,
                                 baseline=baseline, batch_size=batch_size)
        row[f"{mode}_auc"] = float(res["auc"].mean())
    if masks is not None:
        row["pointing_game"] = float(pointing_game(maps, masks).mean())
        row["energy_in_mask"] = float(energy_in_mask(maps, masks).mean())
    if sanity:
        k = min(sanity_images, len(x))
        row["sanity_correlation"] = sanity_correlation(method, model, x[:k], labels[:k],
                                                       layers=sanity_layers, layer=layer)
    return row


def _average_ranks(values: list[float], higher_better: bool) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: -values[i] if higher_better else values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``mean_rank`` and ``rank`` by the module's ranking rule; returns the rows sorted
    best first (failed methods last)."""
    ok = [r for r in rows if r["maps_per_s"] is not None]
    for r in ok:
        r["mean_rank"] = 0.0
    used = 0
    for key, (_, higher) in SCORES.items():
        if not ok or any(r[key] is None for r in ok):
            continue
        used += 1
        for r, rank in zip(ok, _average_ranks([r[key] for r in ok], higher), strict=True):
            r["mean_rank"] += rank
    for r in ok:
        r["mean_rank"] = r["mean_rank"] / used if used else None
    ok.sort(key=lambda r: (r["mean_rank"] or 0.0, -r["maps_per_s"]))
    for i, r in enumerate(ok, 1):
        r["rank"] = i
    return ok + [r for r in rows if r["maps_per_s"] is None]


def benchmark_methods(run: Any, methods: Sequence[str] | None = None, n_images: int = 32,
                      steps: int = 32, batch_size: int = 32, layer: str | None = None,
                      baseline: torch.Tensor | float | str = "blur", sanity: bool = False,
                      sanity_images: int = 4, sanity_layers: int = 2,
                      data: Any = None) -> list[dict[str, Any]]:
    """Score every explanation method on a run's test split and rank them.

    Args:
        run: a :class:`cnnkit.training.Run` or its folder.
        methods: method names; all registered methods when None.
        n_images: test images explained (spread evenly over the split).
        steps: pixel fractions of the deletion/insertion curves.
        batch_size: images per explainer call and per perturbation forward pass.
        layer: the layer of layer methods; the model's ``cam_layer`` when None.
        baseline: what deleted pixels become (see
            :func:`cnnkit.explain.scores.deletion_insertion`): ``"blur"``, a number (in
            the model's normalised input space) or a tensor.
        sanity: also run the randomisation check on ``sanity_images`` images with the
            top ``sanity_layers`` parameterised layers re-initialised.
        data: the :class:`cnnkit.data.ImageData` to explain (masks used where present);
            the run's test split when None.

    Returns:
        One dict per method with the keys of ``ROW_KEYS``, best first (see the module's
        ranking rule); scores that do not apply (no masks, no ``sanity``) are None.
    """

    if n_images < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"n_images, steps and batch_size must be at least 1, got {n_images}, "
                         f"{steps} and {batch_size}")
    run = run if hasattr(run, "preprocess") else load_run(run)
    known = list_methods()
    methods = list(methods) if methods else known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown explanation method {unknown[0]!r} (choose from "
                         f"{', '.join(known)})")
    test = run_test_data(run) if data is None else data
    idx = _pick(len(test), n_images)
    images = test.images[idx]
    device = next(run.model.parameters(), torch.empty(0)).device  # cpu for parameter-free models
    x = run.preprocess(images)  # uint8 or [0, 1] floats -> the normalised model input
    x, labels = x.to(device), test.labels[idx].to(device)
    masks = None if test.masks is None else test.masks[idx].to(device)
    rows = [_score(run, m, x, labels, masks, steps, batch_size, layer, baseline, sanity,
                   sanity_images, sanity_layers) for m in methods]
    return rank_rows(rows)


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if key == "maps_per_s":
        return f"{v:.1f}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    cols = [("rank", "rank"), ("method", "method"), ("maps_per_s", "maps/s")]
    cols += [(k, t) for k, (t, _) in SCORES.items() if any(r[k] is not None for r in rows)]
    return cols + [("mean_rank", "mean rank"), ("note", "note")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table (what the CLI prints)."""
    cols = _columns(rows)
    cells = [[_fmt(r[k], k) for k, _ in cols] for r in rows]
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, (_, t) in enumerate(cols)]
    lines = ["  ".join(t.ljust(w) for (_, t), w in zip(cols, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _plot(rows: list[dict[str, Any]]) -> bytes:
    """Bars per score (best first) and insertion AUC against speed; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["rank"] is not None]
    keys = [k for k in SCORES if ok and all(r[k] is not None for r in ok)]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(3.2 * (len(keys) + 1), 0.8 + 0.3 * max(
        1, len(ok))), squeeze=False)
    names = [r["method"] for r in ok]
    for ax, key in zip(axes[0], keys, strict=False):
        ax.barh(range(len(ok)), [r[key] for r in ok], color="#4c72b0")
        ax.set_yticks(range(len(ok)), names if ax is axes[0, 0] else [""] * len(ok))
        ax.invert_yaxis()
        ax.set_title(SCORES[key][0], fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    ax = axes[0, -1]
    ax.scatter([r["maps_per_s"] for r in ok], [r["insertion_auc"] for r in ok], color="#dd8452")
    for r in ok:
        ax.annotate(r["method"], (r["maps_per_s"], r["insertion_auc"]), fontsize=7)
    ax.set(xscale="log", xlabel="maps / s (log)", ylabel="insertion AUC")
    ax.set_title("faithfulness vs speed", fontsize=9)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _section(rows: list[dict[str, Any]], png: bytes) -> str:
    cols = _columns(rows)
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[k], k))}</td>" for k, _ in cols)
                   + "</tr>" for r in rows)
    n = next((r["n_images"] for r in rows), 0)
    src = base64.b64encode(png).decode("ascii")
    return (f"<h2>Explanation benchmark</h2>\n<p>{n} test images, target the true "
            "label. Methods are ranked by their mean rank over the quality scores (deletion "
            "AUC lower is better, the others higher, randomised correlation lower); ties go "
            "to the faster method.</p>\n"
            f"<table><tr>{head}</tr>{body}</table>\n"
            f"<img alt='Explanation benchmark' src='data:image/png;base64,{src}'>")


def benchmark_files(run_dir: str | Path) -> list[Path]:
    """The files :func:`write_benchmark` writes besides the report section."""
    return [Path(run_dir) / "benchmark.json", Path(run_dir) / "explain_benchmark.png"]


def write_benchmark(run_dir: str | Path, rows: list[dict[str, Any]],
                    overwrite: bool = False) -> list[Path]:
    """Write ``benchmark.json``, ``explain_benchmark.png`` and the report section.

    The section "Explanation benchmark" of ``report.html`` replaces an earlier one; the rest
    of the report is kept. The two files of an earlier benchmark are replaced only with
    ``overwrite`` (else FileExistsError).
    """
    root = Path(run_dir)
    refuse_existing(benchmark_files(root), overwrite)
    png = _plot(rows)
    atomic_write(root / "benchmark.json", json.dumps(rows, indent=2) + "\n")
    atomic_write(root / "explain_benchmark.png", png)
    report = root / "report.html"
    put_section(report, "explain-benchmark", _section(rows, png))
    return [root / "benchmark.json", root / "explain_benchmark.png", report]
