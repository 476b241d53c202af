"""``cnnkit bench``: what this machine does, and how close cnnkit's training gets to it.

One run measures, on the CPU or a CUDA GPU:

* the peak: large square matmuls and a representative 3x3 convolution, fp32 and bf16
  (``peak.py``);
* training samples/s and model FLOP utilisation of the Trainer in eager mode, the Trainer
  in fast mode and a hand-written PyTorch loop (``plain.py``), interleaved round by round
  (``training.py``);
* inference latency at batch 1 and 32, eager fp32 against the fast path (``latency.py``);
* peak memory of each training configuration, each in a fresh process (``memory.py``);

and reports tables, goals and a ``docs/benchmarks.md`` section (``report.py``). The
configuration is a :class:`BenchConfig` (``config.py``); :func:`run_bench` (``run.py``)
runs it all.

Example:
    >>> from cnnkit.workflows.bench import BenchConfig, format_tables, run_bench
    >>> cfg = BenchConfig(models=("tinyvgg",), quick=True, threads=1, memory=False,
    ...                   compile=False)
    >>> result = run_bench(cfg, progress=False)  # seconds; `cnnkit bench` takes minutes
    >>> [(t["model"], t["mode"]) for t in result["training"]]
    [('tinyvgg', 'trainer_eager'), ('tinyvgg', 'trainer_fast'), ('tinyvgg', 'plain')]
    >>> print(format_tables(result))  # the numbers are this machine's
    | peak | float32 TFLOP/s | bfloat16 TFLOP/s |
    ...
    | model | configuration | dtype | steps x batch | samples/s | x plain (paired IQR) | ...
    |---|---|---|---|---:|---:|---:|---:|---:|---|
    | tinyvgg | Trainer eager | float32 | 1 x 2 | ...
    | tinyvgg | plain loop | float32 | 1 x 2 | ... | **1.00** (1.00-1.00) | ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnkit._lazy import lazy_attributes

# Imported on first use: the CLI reads the PyTorch-free BenchConfig (config.py) to build
# `cnnkit bench --help` without PyTorch, which the other modules import.
_EXPORTS = {"BenchConfig": "config", "DEFAULT_MODELS": "config", "MODES": "config",
            "docs_section": "report", "format_tables": "report", "write_section": "report",
            "run_bench": "run"}

__all__ = ["BenchConfig", "run_bench", "format_tables", "docs_section", "write_section",
           "DEFAULT_MODELS", "MODES"]

if TYPE_CHECKING:
    from .config import DEFAULT_MODELS, MODES, BenchConfig
    from .report import docs_section, format_tables, write_section
    from .run import run_bench


__getattr__ = lazy_attributes(__name__, _EXPORTS, globals())
