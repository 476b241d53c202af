"""The machine, the tables and the goals of a benchmark result, and its docs section.

Benchmark scripts (``bench/*.py``) and ``cnnkit bench`` describe the machine and the
load the same way, and write their sections of ``docs/benchmarks.md`` through
:func:`write_section`: between two marker comments, so a re-run replaces its own section
and leaves every other one as it was.
"""

from __future__ import annotations

import contextlib
import os
import platform
import textwrap
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine", "machine_text", "load_average", "goals", "format_tables", "docs_section",
           "write_section", "GOALS", "DOCS_INTRO"]

DOCS_INTRO = ("# Benchmarks\n\nSpeed claims are benchmarks: each ratio below is measured side "
              "by side in one run by the command shown; absolute times from different runs are "
              "never compared.\n")
# (mode, goal): samples/s of the mode over the plain loop's, for every model.
GOALS = (("trainer_eager", 0.97), ("trainer_fast", 1.5))
_MODE_NAMES = {"trainer_eager": "Trainer eager", "trainer_fast": "Trainer fast",
               "plain": "plain loop"}


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model, cores, threads, versions and (on CUDA) the GPU, as a JSON-safe dict."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_bf16": bool(probe and probe()), "torch": torch.__version__,
            "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}",
            "device": str(device) if device is not None else "cpu", "gpu": None}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        # PyTorch's defaults: fp32 convolutions may use TF32 tensor cores, matmuls do not.
        info["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def machine_text(info: dict[str, Any] | None = None) -> str:
    """One line: ``AMD EPYC ..., 2 logical cores, torch 2.x with 2 intra-op thread(s) ...``."""
    m = info or machine()
    text = (f"{m['cpu']}{' (AVX-512 BF16)' if m['cpu_bf16'] else ''}, {m['cores']} logical "
            f"cores, torch {m['torch']} with {m['threads']} intra-op thread(s), Python "
            f"{m['python']}, {m['system']}")
    return text + (f"; GPU: {m['gpu']}" if m.get("gpu") else "")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages as ``"a / b / c"`` (``"n/a"`` where unknown)."""
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def goals(training: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of :data:`GOALS` per model, the worst model's ratio, and whether it is met."""
    out = []
    for mode, goal in GOALS:
        ratios = {r["model"]: r["ratio_to_plain"] for r in training if r["mode"] == mode}
        if ratios:
            worst = min(ratios.values())
            out.append({"mode": mode, "goal": goal, "ratios": ratios, "worst": worst,
                        "met": worst >= goal})
    return out


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.0f} MB"


def format_tables(result: dict[str, Any]) -> str:
    """The peak, training and inference tables (Markdown) and the goal lines."""
    peak = result["peak"]
    dtypes = list(peak["matmul_tflops"])
    lines = ["| peak | " + " | ".join(f"{d} TFLOP/s" for d in dtypes) + " |",
             "|---|" + "---:|" * len(dtypes),
             f"| matmul {peak['matmul_n']}x{peak['matmul_n']} (best of repeats) | "
             + " | ".join(f"{peak['matmul_tflops'][d]:.3f}" for d in dtypes) + " |",
             f"| 3x3 conv {peak['conv']}, channels_last | "
             + " | ".join(f"{peak['conv_tflops'][d]:.3f}" for d in dtypes) + " |",
             "| **peak** (the faster; the denominator of MFU) | "
             + " | ".join(f"**{peak['peak_tflops'][d]:.3f}**" for d in dtypes) + " |", ""]
    lines += ["| model | configuration | dtype | steps x batch | samples/s | x plain "
              "(paired IQR) | TFLOP/s | MFU | peak memory | compile |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["training"]:
        q1, q3 = r["paired_iqr"]
        memory = _mb(r["peak_memory_bytes"]) if r["memory_error"] is None else "failed"
        lines.append(
            f"| {r['model']} | {_MODE_NAMES[r['mode']]} | {r['dtype']} | {r['steps']} x "
            f"{r['batch_size']} | {r['samples_per_s']:,.1f} | **{r['ratio_to_plain']:.2f}** "
            f"({q1:.2f}-{q3:.2f}) | {r['achieved_tflops']:.3f} | {r['mfu']:.1%} | {memory} | "
            f"{r['compile'] if r['mode'] == 'trainer_fast' else '-'}"
            + (f" (warm-up {r['warmup_s']:.0f} s)" if r["compile"] == "compiled" else "") + " |")
    lines += ["", "| model | batch | eager fp32 ms | fast ms | fast dtype | fast speed-up | "
              "compile |", "|---|---:|---:|---:|---|---:|---|"]
    by_key = {(r["model"], r["batch"], r["mode"]): r for r in result["inference"]}
    for (model, batch, mode), fast in by_key.items():
        if mode == "fast":
            eager = by_key[(model, batch, "eager")]
            lines.append(f"| {model} | {batch} | {eager['latency_ms']:.2f} | "
                         f"{fast['latency_ms']:.2f} | {fast['dtype']} | "
                         f"{eager['latency_ms'] / fast['latency_ms']:.2f}x | {fast['compile']} |")
    lines.append("")
    for g in result["goals"]:
        per_model = ", ".join(f"{m} {v:.2f}" for m, v in g["ratios"].items())
        lines.append(f"- {_MODE_NAMES[g['mode']]} >= {g['goal']}x the plain loop: {per_model} "
                     f"-> **{'met' if g['met'] else 'missed'}**")
    lines.append("- utilisation (MFU) is reported against the measured peak of the dtype each "
                 "configuration computes in (first table)")
    return "\n".join(lines)


def docs_section(result: dict[str, Any], notes: str = "") -> str:
    """The ``docs/benchmarks.md`` section of a result: what was measured and how, the
    machine, the load, the command, the tables, the goals and ``notes``."""
    m, cfg = result["machine"], result["config"]
    bases = [r["memory_base_bytes"] for r in result["training"] if r["memory_base_bytes"]]
    memory = ("`torch.cuda.max_memory_allocated` (tensors at their peak)" if m["gpu"] else
              "the resident-set high-water mark (`ru_maxrss`), which includes the interpreter "
              f"and torch's libraries ({_mb(min(bases)) if bases else 'n/a'} before anything "
              "is built)")
    bullets = [
        "**peak**: large square matmuls and a representative 3x3 convolution "
        "(channels_last), fp32 and bf16, best of repeats; a dtype's peak is the faster of "
        "the two;",
        f"**training**: each model on an in-memory synthetic CIFAR-sized set "
        f"({cfg['image_size']}x{cfg['image_size']}, {cfg['num_classes']} classes, "
        f"`{cfg['augment']}` augmentation, batch {cfg['batch_size']}, SGD with Nesterov "
        "momentum, one-cycle schedule, label smoothing 0.1) in three configurations that "
        f"alternate round by round (ABCABC..., {cfg['rounds']} timed rounds after one untimed "
        "warm-up round each; medians): the `Trainer` in eager fp32; the `Trainer` in fast "
        "mode (`TrainConfig(fast=True)`: channels_last, bf16 autocast where the hardware has "
        "native bf16, `torch.compile`, compiled in the warm-up round, whose time is shown: "
        "with TorchInductor's on-disk cache from an earlier run it is seconds, a first "
        "compilation much longer); a hand-written PyTorch loop from the same initial weights "
        "(`cnnkit.workflows.bench.plain`). **x plain** is the median samples/s over the plain "
        "loop's; the paired IQR spans the ratios of rounds run side by side;",
        "**MFU**: training FLOP/s (3 x 2 x the forward MACs of `cnnkit.analysis.summary` per "
        "sample) over the measured peak of the dtype the configuration computes in;",
        f"**peak memory**: each configuration in a fresh process, as {memory};"
        if cfg["memory"] else "**peak memory**: not measured in this run (`--no-memory`);",
        "**inference latency**: eager fp32 against the fast path (channels_last, autocast, "
        "`torch.compile`), medians of interleaved calls.",
    ]
    if m["gpu"]:
        bullets.append(
            f"On this GPU fp32 convolutions {'may use' if m['cudnn_tf32'] else 'do not use'} "
            f"TF32 tensor cores and fp32 matmuls {'do' if m['matmul_tf32'] else 'do not'} "
            "(PyTorch's `torch.backends` settings of the run).")
    items = "\n".join(textwrap.fill(b, 90, initial_indent="- ", subsequent_indent="  ",
                                    break_long_words=False, break_on_hyphens=False)
                      for b in bullets)
    return f"""## cnnkit bench on {m['device'].split(':')[0].upper()}

`cnnkit bench` measures, in one run:

{items}

Measured {result['date']}, in {result['seconds'] / 60:.1f} minutes, on:
{machine_text(m)}.
Load average (1/5/15 min): {result['load_before']} before, {result['load_after']} after.

```bash
{result.get('command', 'cnnkit bench')}
```

{format_tables(result)}
{notes}"""


def write_section(path: str | os.PathLike, key: str, text: str,
                  legacy_heading: str | None = None) -> None:
    """Put ``text`` between the markers ``<!-- key: begin -->`` and ``<!-- key: end -->`` of
    the Markdown file ``path``, replacing what they held; keep everything else.

    Without the markers, a section that starts with the line ``legacy_heading`` (written
    before markers were used) is replaced up to the next ``## `` heading; otherwise the
    section is appended. A missing file starts with the benchmarks page's introduction.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cnnkit.workflows.bench import write_section
        >>> p = Path(tempfile.mkdtemp()) / "b.md"
        >>> write_section(p, "demo", "## Demo\\n\\nold")
        >>> write_section(p, "demo", "## Demo\\n\\nnew")
        >>> p.read_text().count("## Demo"), "new" in p.read_text(), "old" in p.read_text()
        (1, True, False)
    """
    path = Path(path)
    begin, end = f"<!-- {key}: begin -->", f"<!-- {key}: end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else DOCS_INTRO
    i = old.find(begin)
    j = old.find(end, i + len(begin)) if i >= 0 else -1
    heading = -1
    if legacy_heading is not None:
        heading = 0 if old.startswith(legacy_heading + "\n") else old.find(
            "\n" + legacy_heading + "\n") + 1 or -1
    if j >= 0:
        new = old[:i] + block + old[j + len(end):]
    elif heading >= 0:
        stop = old.find("\n## ", heading + len(legacy_heading))
        new = old[:heading] + block + ("\n" + old[stop:] if stop >= 0 else "\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
