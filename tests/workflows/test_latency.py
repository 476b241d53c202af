"""Latency of `cnnkit compress`: interleaved rounds, medians with their spread, speed-ups with
an interval, and the "noisy" flag that keeps a figure off the Pareto front. The statistics
are pure functions of the timing samples, tested here on injected timings."""

import pytest
import torch
from torch import nn

from cnnkit.workflows.latency import (
    NOISE_SPREAD,
    latency_samples,
    latency_stats,
    load_average,
    median_interval,
)
from cnnkit.workflows.sweep import pareto_front


def test_rounds_are_interleaved_and_rotated():
    calls = []
    models = {k: (lambda x, k=k: calls.append(k)) for k in "abc"}
    samples = latency_samples(models, torch.zeros(1), rounds=4, warmup=2)
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert calls[:6] == list("aabbcc")  # warm-up, untimed
    # every round calls every model once, each round starting one model further
    assert calls[6:] == list("abc" "bca" "cab" "abc")


@pytest.mark.parametrize("n,ranks", [(5, (1, 5)), (6, (1, 6)), (8, (1, 8)), (9, (2, 8)),
                                     (12, (3, 10)), (15, (4, 12)), (20, (6, 15))])
def test_median_interval_is_the_sign_test_interval(n, ranks):
    # ranks of the 95% interval of a median from the binomial table (Conover 1999, table A3)
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
    assert median_interval(values) == (float(ranks[0]), float(ranks[1]))


def _jitter(center: float, n: int = 15, rel: float = 0.02) -> list[float]:
    """n deterministic times within +-rel of center (a quiet machine)."""
    return [center * (1 + rel * ((i * 7) % 5 - 2) / 2) for i in range(n)]


def test_a_clear_speed_up_is_not_noisy():
    stats = latency_stats({"original": _jitter(10e-3), "pruned": _jitter(2e-3)}, "original")
    assert stats["original"] == {"latency": pytest.approx(10e-3, rel=0.03),
                                 "spread": pytest.approx(stats["original"]["spread"]),
                                 "speedup": 1.0, "interval": [1.0, 1.0], "noisy": None}
    s = stats["pruned"]
    assert s["speedup"] == pytest.approx(5.0, rel=0.05) and s["noisy"] is None
    assert 4.5 < s["interval"][0] <= s["speedup"] <= s["interval"][1] < 5.5
    assert s["spread"] < NOISE_SPREAD


def test_a_busy_machine_is_flagged_by_the_spread():
    # load hits both models in the same rounds: the paired speed-up is still exact (2x),
    # but the spread says the medians cannot be trusted
    busy = [1e-3 if i % 3 else 9e-3 for i in range(15)]
    stats = latency_stats({"original": busy, "fast": [t / 2 for t in busy]}, "original")
    assert stats["fast"]["speedup"] == 2.0 and stats["fast"]["interval"] == [2.0, 2.0]
    for name in ("original", "fast"):
        assert stats[name]["spread"] > NOISE_SPREAD
        assert "spread" in stats[name]["noisy"] and "1x" not in stats[name]["noisy"]
    assert latency_stats({"original": busy}, "original", spread_limit=100)["original"][
        "noisy"] is None


def test_a_speed_up_whose_interval_holds_1x_is_flagged():
    # as fast as the original, round by round within +-4%: no speed-up to tell
    base = _jitter(5e-3)
    alike = [t * (0.96, 1.04, 0.98, 1.02, 1.0)[i % 5] for i, t in enumerate(base)]
    stats = latency_stats({"original": base, "pruned": alike}, "original")
    lo, hi = stats["pruned"]["interval"]
    assert lo <= 1 <= hi and "contains 1x" in stats["pruned"]["noisy"]
    assert stats["original"]["noisy"] is None  # the base is only judged by its own spread


def test_latency_stats_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="one per round"):
        latency_stats({"original": [1.0, 1.0], "pruned": [1.0]}, "original")


def test_noisy_points_stay_off_the_pareto_front():
    rows = {"original": dict(latency_b32=10.0, accuracy=0.9, noisy_b32=None),
            "prune 0.5": dict(latency_b32=5.0, accuracy=0.85, noisy_b32=None),
            # would dominate prune 0.5 and original, but its latency was not measurable
            "prune 0.25": dict(latency_b32=1.0, accuracy=0.95, noisy_b32="spread 80% > 20%"),
            "int8": dict(latency_b32=4.0, accuracy=0.5, noisy_b32=None)}
    assert pareto_front(rows) == ["int8", "prune 0.5", "original"]
    assert pareto_front(rows, noisy=None) == ["prune 0.25"]  # what a busy machine made of it
    assert pareto_front({n: {**r, "noisy_b32": "busy"} for n, r in rows.items()}) == []


def test_a_real_measurement_has_the_structure():
    torch.manual_seed(0)
    models = {"original": nn.Conv2d(3, 8, 3).eval(), "small": nn.Conv2d(3, 2, 3).eval()}
    samples = latency_samples(models, torch.randn(2, 3, 16, 16), rounds=5, warmup=1)
    assert all(len(v) == 5 and all(t > 0 for t in v) for v in samples.values())
    stats = latency_stats(samples, "original")
    assert set(stats) == set(models)
    for s in stats.values():
        assert set(s) == {"latency", "spread", "speedup", "interval", "noisy"}
        assert s["latency"] > 0 and s["spread"] >= 0
        assert s["interval"][0] <= s["speedup"] <= s["interval"][1]
        assert s["noisy"] is None or isinstance(s["noisy"], str)
    assert stats["original"]["speedup"] == 1.0
    load = load_average()
    assert load is None or load >= 0
