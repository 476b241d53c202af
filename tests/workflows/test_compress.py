"""The compression pipeline's pure parts: the Pareto front."""

from cnnkit.workflows.sweep import pareto_front


def test_pareto_front_hand_case():
    rows = {"a": dict(latency_b32=1.0, accuracy=0.5), "b": dict(latency_b32=2.0, accuracy=0.9),
            "c": dict(latency_b32=3.0, accuracy=0.8),   # slower and worse than b
            "d": dict(latency_b32=2.0, accuracy=0.7),   # as fast as b, worse
            "e": dict(latency_b32=4.0, accuracy=0.95)}
    assert pareto_front(rows) == ["a", "b", "e"]
    assert pareto_front({"x": dict(latency_b32=1.0, accuracy=0.5),
                         "y": dict(latency_b32=1.0, accuracy=0.5)}) == ["x", "y"]  # ties stay
