"""``cnnkit compress RUN --sweep``: a grid of compressions measured side by side, and its
Pareto front of the task's metric against batch-32 latency, written into the run's report."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cnnkit._files import atomic_write, refuse_existing
from cnnkit.compress.prune import prune as prune_model
from cnnkit.compress.quantize import quantize as quantize_model
from cnnkit.run import claim_run_folder, load_run, write_json
from cnnkit.run.report import put_section
from cnnkit.tasks import create_task

from .compress import (
    DATA_CRITERIA,
    _calibration,
    _check_criterion,
    _criterion_data,
    _finetune,
    _measure,
    _test_tensors,
)
from .latency import NOISE_SPREAD, load_average

__all__ = ["pareto_front", "sweep_run"]


def pareto_front(rows: dict[str, dict[str, Any]], cost: str = "latency_b32",
                 gain: str = "accuracy", higher_is_better: bool = True,
                 noisy: str | None = "noisy_b32") -> list[str]:
    """Names of the rows no other row beats: none has lower-or-equal ``cost`` and an
    equal-or-better ``gain`` with one of them strictly better. Sorted by ``cost``.

    Rows whose ``noisy`` field is set (a latency the machine was too busy to measure, see
    :func:`cnnkit.workflows.latency.latency_stats`) take no part: they are neither on
    the front nor allowed to push others off it.

    Example:
        >>> from cnnkit.workflows.sweep import pareto_front
        >>> rows = {"a": {"latency_b32": 1.0, "mse": 0.3}, "b": {"latency_b32": 2.0, "mse": 0.1},
        ...         "c": {"latency_b32": 3.0, "mse": 0.2}}
        >>> pareto_front(rows, gain="mse", higher_is_better=False)
        ['a', 'b']
    """
    sign = 1.0 if higher_is_better else -1.0
    rows = {n: r for n, r in rows.items() if not (noisy and r.get(noisy))}
    front = [a for a, ra in rows.items()
             if not any(rb[cost] <= ra[cost] and sign * rb[gain] >= sign * ra[gain]
                        and (rb[cost] < ra[cost] or sign * rb[gain] > sign * ra[gain])
                        for b, rb in rows.items() if b != a)]
    return sorted(front, key=lambda n: rows[n][cost])


def sweep_run(run: Any, *, ratios: tuple[float, ...] = (0.25, 0.5, 0.75),
              quantize: bool = True, criterion: str = "l1", finetune: int = 0,
              observer: str = "minmax", progress: bool | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """Measure a grid of compressions of a run (any task) and find its Pareto front.

    Every pruning ratio (0 included), each in float and, with ``quantize``, in int8, is
    measured side by side in this process: the task's test metric, parameters, MACs, file
    size and latency at batch 1 and 32 (interleaved repeats). The points no other point
    beats on both the metric and batch-32 latency form the Pareto front; points whose
    batch-32 latency is flagged noisy are left out of it (and marked). Written into the
    run folder: ``compress_sweep.json``, ``compress_sweep.png`` and a "Compression sweep"
    section of ``report.html``.

    Args:
        run: a run folder or a loaded run.
        ratios: structured pruning ratios to try besides 0.
        quantize: also measure the int8 model of every point.
        criterion: the pruning criterion.
        finetune: epochs of fine-tuning of each pruned model (0: none; the fine-tuned
            runs go to a temporary folder).
        observer: int8 activation calibration.
        overwrite: replace the run's ``compress_sweep.json`` / ``.png`` of an earlier sweep
            (without it, their presence stops the call before anything is measured).

    Returns:
        The ``compress_sweep.json`` contents: ``rows`` (name -> measurements, ``pareto``;
        the latency fields as :func:`~cnnkit.workflows.compress.compress_run`'s),
        ``pareto`` (names on the front, fastest first), ``load_average`` and ``cpus``.
    """
    run = run if hasattr(run, "preprocess") else load_run(run)
    task = create_task(run.config.task, run.config)
    _check_criterion(task, criterion)
    refuse_existing([Path(run.path) / "compress_sweep.json", Path(run.path) / "compress_sweep.png"],
                    overwrite)
    ratios = tuple(sorted({float(r) for r in ratios}))
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise ValueError(f"sweep ratios must lie in (0, 1), got {list(ratios)}")
    x_test, y_test = _test_tensors(run, task)
    calib = _calibration(run, task) if quantize or criterion in DATA_CRITERIA else None
    original = run.model.eval()
    models: dict[str, nn.Module] = {}
    same_as: dict[str, str] = {}
    points = (0.0, *ratios)
    with tempfile.TemporaryDirectory() as tmp, tqdm(
            total=len(points), desc="compress sweep", unit="point",
            disable=None if progress is None else not progress, leave=False) as bar:
        for ratio in points:
            name = "original" if ratio == 0 else f"prune {ratio:g}"
            m = original
            if ratio:
                m = prune_model(original, ratio, criterion, example_inputs=x_test[:1],
                                data=_criterion_data(calib, criterion))
                if finetune:
                    folder = claim_run_folder(tmp, f"p{ratio:g}", next_free=False)
                    m = _finetune(run, m, folder, finetune, False)
            models[name] = m.eval()
            if quantize:
                models[f"{name} int8"] = quantize_model(m, calib[0], observer=observer)
                same_as[f"{name} int8"] = name
            bar.update(1)
        rows = _measure(task, models, x_test, y_test, run.preprocess.input_size, same_as)
    front = pareto_front(rows, gain=task.metric, higher_is_better=task.higher_is_better)
    for name, r in rows.items():
        r["pareto"] = name in front
    result = {"run": str(run.path), "task": task.name, "metric": task.metric,
              "higher_is_better": task.higher_is_better, "criterion": criterion,
              "finetune": finetune, "observer": observer if quantize else None,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average": load_average(), "noise_spread": NOISE_SPREAD,
              "test_samples": len(y_test), "rows": rows, "pareto": front}
    result = json.loads(json.dumps(result))
    _write_sweep(Path(run.path), result)
    return result


def _write_sweep(root: Path, result: dict[str, Any]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, front, metric = result["rows"], result["pareto"], result["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "latency_b32", "batch-32 latency (ms)"),
                           (axes[1], "bytes", "file size (MB)")):
        scale = 1e3 if key == "latency_b32" else 1e-6
        for name, r in rows.items():
            int8 = name.endswith("int8")
            color = "#dd8452" if int8 else "#4c72b0"
            noisy = key == "latency_b32" and r["noisy_b32"]  # hollow: too busy to tell
            ax.scatter(r[key] * scale, r[metric], marker="s" if int8 else "o", zorder=3,
                       facecolors="none" if noisy else color, edgecolors=color)
            ax.annotate(name + (" (noisy)" if noisy else ""), (r[key] * scale, r[metric]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "latency_b32":
            ax.plot([rows[n][key] * scale for n in front], [rows[n][metric] for n in front],
                    color="#55a868", lw=1.5, zorder=2, label="Pareto front")
            ax.legend(fontsize=8)
        ax.set(xscale="log", xlabel=f"{label}, log scale", ylabel=f"test {metric}")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{metric} vs speed (circles float, squares int8; hollow: noisy)",
                      fontsize=9)
    axes[1].set_title(f"{metric} vs size", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    png = buf.getvalue()
    write_json(root / "compress_sweep.json", result)
    atomic_write(root / "compress_sweep.png", png)
    cols = [(metric, metric, "{:.4f}"), ("params", "params", "{:,}"),
            ("macs", "MACs", "{:,}"), ("bytes", "MB", "{:.3f}"),
            ("latency_b1", "b1 ms", "{:.3f}"), ("latency_b32", "b32 ms", "{:.2f}"),
            ("spread_b32", "b32 spread", "{:.0%}"), ("speedup_b32", "speed-up b32", "{:.2f}x")]
    scale = {"bytes": 1e-6, "latency_b1": 1e3, "latency_b32": 1e3}
    head = ("<th>model</th>" + "".join(f"<th>{t}</th>" for _, t, _ in cols)
            + "<th>95% interval</th><th>Pareto</th>")

    def cells(r: dict[str, Any]) -> str:
        lo, hi = r["speedup_b32_interval"]
        flag = "yes" if r["pareto"] else f"noisy: {r['noisy_b32']}" if r["noisy_b32"] else ""
        return ("".join("<td>" + (f.format(r[k] * scale.get(k, 1)) if r[k] is not None
                                  else "-") + "</td>" for k, _, f in cols)
                + f"<td>{lo:.2f}x-{hi:.2f}x</td><td>{html.escape(flag)}</td>")

    body = "".join(f"<tr><td>{html.escape(n)}</td>{cells(r)}</tr>" for n, r in rows.items())
    src = base64.b64encode(png).decode("ascii")
    tuned = f", fine-tuned {result['finetune']} epochs" if result["finetune"] else ""
    kinds = " and int8" if result["observer"] else ""
    put_section(root / "report.html", "compress-sweep", (
        "<h2>Compression sweep</h2>\n"
        f"<p>Structured pruning ({html.escape(result['criterion'])} criterion"
        f"{tuned}){kinds}, measured side by side on this machine ({result['threads']} threads, "
        f"{result['test_samples']} test samples; {_load_words(result)}). Latencies are "
        "medians of interleaved rounds; a batch-32 latency whose spread (interquartile range "
        f"over median) exceeds {result['noise_spread']:.0%}, or whose speed-up's 95% interval "
        "contains 1x, is noisy: the machine was too busy to tell, and the point is kept off "
        f"the front. The Pareto front: no other point has both a better {html.escape(metric)} "
        "and a lower batch-32 latency.</p>\n"
        f"<table><tr>{head}</tr>{body}</table>\n"
        f"<img alt='Compression sweep' src='data:image/png;base64,{src}'>"))


def _load_words(result: dict[str, Any]) -> str:
    load = result.get("load_average")
    return (f"load average {load:.2f} on {result['cpus']} CPUs" if load is not None
            else "load average unknown")
