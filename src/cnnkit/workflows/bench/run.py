"""``run_bench``: every measurement of ``cnnkit bench`` in one run, as one JSON-safe dict."""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from cnnkit.training.device import resolve_amp, resolve_device

from . import latency, memory, peak, training
from .config import MODES, BenchConfig
from .report import goals, load_average, machine

__all__ = ["run_bench"]


def _paired(times: list[float], plain: list[float]) -> list[float]:
    # Rounds run side by side share the machine's momentary load: their ratios are less
    # noisy than a ratio of medians when the load drifts.
    return [p / t for p, t in zip(plain, times, strict=True)]


def _iqr(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def run_bench(cfg: BenchConfig | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Measure peak FLOP/s, convolution FLOP/s, training throughput and MFU, inference
    latency and peak memory on this machine (see :mod:`cnnkit.workflows.bench`).

    Args:
        cfg: what to measure; the defaults when None.
        progress: progress bars on stderr (None: when stderr is a terminal).

    Returns:
        A JSON-safe dict with the keys ``date``, ``seconds``, ``machine`` (cpu, cores,
        threads, cpu_bf16, torch, python, system, device, gpu), ``load_before``,
        ``load_after``, ``config``, ``peak`` (``matmul_tflops``, ``conv_tflops`` and
        ``peak_tflops``, the faster of the two, per dtype; ``matmul_n``, ``conv``),
        ``training`` (one row per model and mode: model, mode, dtype, steps, batch_size,
        samples_per_s, ratio_to_plain, paired_iqr, achieved_tflops, mfu,
        flops_per_sample, compile, warmup_s, round_s, loss, memory_kind,
        peak_memory_bytes, memory_base_bytes, memory_error), ``inference`` (model, mode,
        batch, latency_ms, dtype, compile) and ``goals`` (mode, goal, ratios per model,
        worst, met).

    With ``compile``, TorchDynamo's caches are reset (``torch._dynamo.reset()``) before
    each model: compiled modules of the calling process recompile at their next call.

    Raises:
        ValueError: a device that is not the CPU or an available CUDA GPU.

    Example:
        >>> from cnnkit.workflows.bench import BenchConfig, run_bench
        >>> r = run_bench(BenchConfig(models=("tinyvgg",), quick=True, threads=1, memory=False,
        ...                           compile=False), progress=False)
        >>> eager = r["training"][0]
        >>> eager["mode"], eager["samples_per_s"] > 0, 0 < eager["mfu"] <= 1
        ('trainer_eager', True, True)
    """
    cfg = cfg or BenchConfig()
    device = resolve_device(cfg.device)
    if cfg.compile is None:  # the fast preset's own choice on this device
        cfg = dataclasses.replace(cfg, compile=device.type == "cuda")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"cnnkit bench measures the CPU or a CUDA GPU, not {device.type}; "
                         "give --device cpu or cuda")
    show = sys.stderr.isatty() if progress is None else progress
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        load_before, t0 = load_average(), time.perf_counter()
        fast_dtype = resolve_amp("auto", device) or torch.float32
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        dtypes[str(fast_dtype).removeprefix("torch.")] = fast_dtype
        with tqdm(total=2 * len(dtypes), desc="peak FLOP/s", disable=not show,
                  leave=False) as bar:
            matmul, conv = {}, {}
            for name, dtype in dtypes.items():
                matmul[name] = peak.measure_matmul(dtype, device, cfg.quick)
                bar.update(1)
                conv[name] = peak.measure_conv(dtype, device, cfg.quick)
                bar.update(1)
        peaks = {k: max(matmul[k], conv[k]) for k in matmul}
        amp = None if fast_dtype == torch.float32 else fast_dtype
        trained, inference = [], []
        for model in cfg.models:
            if cfg.compile:
                # Every zoo model runs the same forward function, and TorchDynamo caps the
                # graphs kept per function (8): past it, calls silently run eagerly. Each
                # model starts afresh, as it would in a process of its own.
                import torch._dynamo as dynamo

                dynamo.reset()
            trained += training.measure_training(model, cfg, device, peaks, show)
            inference += latency.measure_latencies(model, cfg, device, amp,
                                                   repeats=2 if cfg.quick else 10,
                                                   progress=show)
        mem: dict[tuple[str, str], memory.MemoryResult] = {}
        if cfg.memory:
            # Two steps a round: memory does not grow with the steps after the first.
            jobs = [(r.model, r.mode, min(2, r.steps)) for r in trained]
            with tqdm(total=len(jobs), desc="peak memory (fresh processes)", disable=not show,
                      leave=False) as bar:
                for m in memory.measure_memory(jobs, cfg.to_dict(), str(device), bar):
                    mem[(m.model, m.mode)] = m
        seconds, load_after = time.perf_counter() - t0, load_average()
        info = machine(device)
    finally:
        torch.set_num_threads(threads)

    plain = {r.model: r for r in trained if r.mode == "plain"}
    rows = []
    for r in trained:
        m = mem.get((r.model, r.mode))
        ref = plain[r.model]
        rows.append({
            "model": r.model, "mode": r.mode, "dtype": r.dtype, "steps": r.steps,
            "batch_size": r.batch_size, "samples_per_s": r.samples_per_s,
            "ratio_to_plain": r.samples_per_s / ref.samples_per_s,
            "paired_iqr": _iqr(_paired(r.round_s, ref.round_s)),
            "achieved_tflops": r.samples_per_s * r.flops_per_sample / 1e12, "mfu": r.mfu,
            "flops_per_sample": r.flops_per_sample, "compile": r.compile,
            "warmup_s": r.warmup_s, "round_s": r.round_s, "loss": r.loss,
            "memory_kind": None if m is None else m.kind,
            "peak_memory_bytes": None if m is None else m.peak_bytes,
            "memory_base_bytes": None if m is None else m.base_bytes,
            "memory_error": None if m is None else m.error})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": seconds, "machine": info, "load_before": load_before,
        "load_after": load_after, "config": cfg.to_dict(),
        "peak": {"matmul_tflops": {k: v / 1e12 for k, v in matmul.items()},
                 "conv_tflops": {k: v / 1e12 for k, v in conv.items()},
                 "peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
                 "matmul_n": peak.matmul_size(device, cfg.quick),
                 "conv": _conv_text(peak.conv_shape(device, cfg.quick))},
        "training": rows,
        "inference": [{"model": r.model, "mode": r.mode, "batch": r.batch,
                       "latency_ms": r.seconds * 1e3, "dtype": r.dtype, "compile": r.compile}
                      for r in inference],
        "goals": goals(rows),
        "modes": list(MODES),
    }


def _conv_text(s) -> str:
    return f"{s.batch}x{s.channels}x{s.size}x{s.size} -> {s.channels} channels"
