"""CPU latency measured side by side, and its statistics: what ``cnnkit compress`` and
``--sweep`` report of every model.

Latency is timed round-robin (:func:`latency_samples`: every round calls every model, each
round starting at the next one, so a change of load hits them alike) and reported as the
median with its interquartile spread and the speed-up over a base model with a 95%
sign-test interval (:func:`latency_stats`); a figure whose spread exceeds
``NOISE_SPREAD`` or whose speed-up interval contains 1x is flagged ``noisy`` (the machine
was too busy to tell), and the load average (:func:`load_average`) is recorded beside.
:func:`measure_latency` is the plain timer (medians only) that ``cnnkit bench`` and the
scripts of ``bench/`` use.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["latency_samples", "measure_latency", "median_interval", "latency_stats",
           "load_average", "NOISE_SPREAD", "CONFIDENCE"]


# A latency is "noisy" when its interquartile range exceeds this fraction of its median
# (the machine was too busy to time it: on an idle CPU small models stay within a few %),
# or, for a speed-up, when its 95% interval contains 1x (no difference told apart).
NOISE_SPREAD = 0.2
CONFIDENCE = 0.95


def latency_samples(models: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor,
                    rounds: int = 15, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each model on ``x``, ``rounds`` samples each, measured
    round-robin: every round calls all the models back to back, each round starting at
    the next model (so none is always first after a pause), so a change of machine load
    hits them alike and sample ``i`` of two models can be compared pairwise.
    ``warmup`` untimed calls per model first (allocation, kernel choice)."""
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(warmup):
                m(x)
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                models[k](x)
                times[k].append(time.perf_counter() - t0)
    return times


def measure_latency(models: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor,
                    repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each model on ``x`` over interleaved rounds
    (:func:`latency_samples`)."""
    return {k: statistics.median(v)
            for k, v in latency_samples(models, x, repeats, warmup).items()}


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free interval of the median: the order statistics ``x_(k)`` and
    ``x_(n+1-k)`` with ``k`` the largest for which ``P(Binomial(n, 1/2) < k)`` stays
    within ``(1 - confidence) / 2`` (the sign-test interval, Conover 1999, *Practical
    Nonparametric Statistics*, 3.2); the whole range where ``n`` is too small for that.

    Example:
        >>> from cnnkit.workflows.latency import median_interval
        >>> median_interval([float(v) for v in range(1, 16)])
        (4.0, 12.0)
    """
    xs, n = sorted(values), len(values)
    tail, k, below = (1 - confidence) / 2, 1, 0.0
    while k < (n + 1) // 2:
        below += math.comb(n, k - 1) / 2**n  # P(B = k - 1) added: P(B < k)
        if below + math.comb(n, k) / 2**n > tail:
            break
        k += 1
    return xs[k - 1], xs[n - k]


def latency_stats(samples: dict[str, list[float]], base: str,
                  spread_limit: float = NOISE_SPREAD,
                  confidence: float = CONFIDENCE) -> dict[str, dict[str, Any]]:
    """Median, spread, speed-up over ``base`` and a noise flag of each model's timings.

    ``samples`` are :func:`latency_samples`' rounds: sample ``i`` of every model was taken
    in the same round, so the speed-up is the median of the per-round ratios
    ``base_i / model_i`` (a load that slows one round slows both), with its
    :func:`median_interval`. ``spread`` is the interquartile range over the median.

    Returns:
        ``{name: {"latency", "spread", "speedup", "interval": [lo, hi], "noisy"}}``;
        ``noisy`` is None or why the figure cannot be trusted: a spread above
        ``spread_limit``, or (not for ``base``) a speed-up interval containing 1x.

    Example:
        >>> from cnnkit.workflows.latency import latency_stats
        >>> s = latency_stats({"a": [2.0, 2.2, 2.0, 2.0], "b": [1.0, 1.1, 1.0, 1.0]}, "a")
        >>> s["b"]["speedup"], s["b"]["interval"], s["b"]["noisy"]
        (2.0, [2.0, 2.0], None)
    """
    ref = samples[base]
    stats: dict[str, dict[str, Any]] = {}
    for name, t in samples.items():
        if len(t) != len(ref) or not t or min(t) <= 0:
            raise ValueError(f"latency samples of {name!r} must be {len(ref)} positive times, "
                             "one per round, as those of the base model")
        median = statistics.median(t)
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else t * 3
        ratios = [b / a for a, b in zip(t, ref, strict=True)]
        lo, hi = median_interval(ratios, confidence)
        reasons = []
        if (q3 - q1) / median > spread_limit:
            reasons.append(f"spread {(q3 - q1) / median:.0%} > {spread_limit:.0%}")
        if name != base and lo <= 1 <= hi:
            reasons.append(f"speed-up interval {lo:.2f}x-{hi:.2f}x contains 1x")
        stats[name] = {"latency": median, "spread": (q3 - q1) / median,
                       "speedup": statistics.median(ratios), "interval": [lo, hi],
                       "noisy": "; ".join(reasons) or None}
    return stats


def load_average() -> float | None:
    """The 1-minute load average (runnable processes; above the CPU count, timings wait
    for a core), None where the system has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
