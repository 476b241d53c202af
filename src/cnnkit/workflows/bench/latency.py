"""Inference latency at a few batch sizes: eager fp32 against the fast path.

``eager``: the model in eval mode, fp32, NCHW. ``fast``: the same weights in channels_last
under the autocast dtype the Trainer's fast mode picks (bf16 on CPUs with native bf16 and
on CUDA), compiled with ``torch.compile(dynamic=False)`` (one static graph per batch size)
unless compilation is off or fails; a failure falls back to eager with a warning, and the
result says so. Both run under ``torch.inference_mode``; the compile happens in an untimed
first call. Each repeat calls both models back to back and the median is kept
(:func:`cnnkit.workflows.latency.measure_latency`, the timer of ``cnnkit compress``);
on CUDA every call ends with a synchronisation, so a call is timed to its completion.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from cnnkit.models import create_model
from cnnkit.training.device import autocast
from cnnkit.training.fast import first_step_with_fallback, try_compile
from cnnkit.workflows.latency import measure_latency

from .config import BenchConfig
from .peak import synchronize

__all__ = ["LatencyResult", "measure_latencies"]


@dataclass
class LatencyResult:
    """Median seconds per forward pass of one model at one batch size."""

    model: str
    mode: str  # "eager" | "fast"
    batch: int
    seconds: float
    dtype: str
    compile: str  # "off" | "compiled" | "fell back: <reason>"


def _synced(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        out = fn(x)
        synchronize(device)
        return out

    return call


def _fast_forward(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None,
                  compile: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The fast path's forward on batches like ``x`` and its compile status (``"off"``,
    ``"compiled"``, ``"fell back: <why>"``); compiles in a first, untimed call."""
    chosen = [model]

    def forward(inp: torch.Tensor) -> torch.Tensor:
        with autocast(inp.device, amp):
            return chosen[0](inp.contiguous(memory_format=torch.channels_last))

    def use_eager() -> None:
        chosen[0] = model

    if not compile:
        return forward, "off"
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        compiled = try_compile(model, dynamic=False)  # a refusal warns and gives None
        if compiled is not None:
            chosen[0] = compiled
            first_step_with_fallback(lambda: forward(x), model, use_eager)
    if chosen[0] is not model:
        return forward, "compiled"
    return forward, "fell back: " + next((str(w.message) for w in caught), "eager")


def measure_latencies(model_name: str, cfg: BenchConfig, device: torch.device,
                      amp: torch.dtype | None, repeats: int,
                      progress: bool = False) -> list[LatencyResult]:
    """Eager fp32 and fast latency of ``model_name`` at each of ``cfg.latency_batches``."""
    torch.manual_seed(cfg.seed)
    eager = create_model(model_name, num_classes=cfg.num_classes, in_chans=3,
                         img_size=cfg.image_size).to(device).eval()
    fast_model = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    fast_dtype = str(amp or torch.float32).removeprefix("torch.")
    results = []
    for batch in tqdm(cfg.latency_batches, desc=f"latency {model_name}", unit="batch size",
                      disable=not progress, leave=False):
        x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
        fast, status = _fast_forward(fast_model, x, amp, cfg.compile)
        med = measure_latency({"eager": _synced(eager, device), "fast": _synced(fast, device)},
                              x, repeats=repeats, warmup=1 if cfg.quick else 3)
        results += [LatencyResult(model_name, "eager", batch, med["eager"], "float32", "off"),
                    LatencyResult(model_name, "fast", batch, med["fast"], fast_dtype, status)]
    return results
