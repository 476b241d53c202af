"""Peak memory of Integrated Gradients: bounded by the internal batch, not by the steps.

Integrated Gradients (Sundararajan, Taly and Yan 2017, "Axiomatic Attribution for Deep
Networks", ICML) needs ``B x steps`` forward/backward passes; cnnkit's
``integrated_gradients`` runs them ``internal_batch_size`` images at a time, so its peak
memory should be that of one such batch whatever ``steps`` and ``B`` are. The issue asks
that resnet50 at 224x224 with 64 steps fit comfortably in this machine's memory.

Each configuration runs in a fresh subprocess (so peaks do not mix) that builds the model
(random weights, eval mode, float32), runs it, and reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) together with its resident size just
before the measured call (``VmRSS`` of ``/proc/self/status``; the model and torch):

* ``forward``: the model alone, one forward pass without gradients (the baseline);
* ``ig``: ``integrated_gradients`` with ``steps`` Gauss-Legendre steps and the given
  ``internal_batch_size`` (the default, then all the steps of an image in one batch).

Usage::

    OMP_NUM_THREADS=2 python bench/explain_memory.py            # resnet50 224, ~5 min
    python bench/explain_memory.py --model resnet18 --size 64   # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def rss_mib() -> float:
    """Current resident set size in MiB (Linux ``/proc``; 0 elsewhere)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return 0.0
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def child(cfg: dict) -> dict:
    """Run one configuration in this (fresh) process; return its measurements."""
    import torch

    import cnnkit.explain
    from cnnkit.models import create_model

    torch.manual_seed(0)
    model = create_model(cfg["model"]).eval()
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"])
    target = torch.arange(cfg["batch"]) % model.get_classifier().out_features
    with torch.no_grad():
        model(x[:1])  # allocator and kernels warmed outside the measured call
    before = rss_mib()
    t0 = time.perf_counter()
    if cfg["kind"] == "forward":
        with torch.no_grad():
            model(x)
    else:
        ig = cnnkit.explain.create("integrated_gradients", model, steps=cfg["steps"],
                                   method="gausslegendre", **(
                                       {"internal_batch_size": cfg["chunk"]}
                                       if cfg["chunk"] else {}))
        maps = ig(x, target)
        assert torch.isfinite(maps).all()
    return {"before_mib": before, "peak_mib": peak_mib(), "seconds": time.perf_counter() - t0}


def configs(args: argparse.Namespace) -> list[dict]:
    base = {"model": args.model, "size": args.size, "steps": args.steps}
    out = []
    for batch in (1, 4):
        out.append({**base, "kind": "forward", "batch": batch, "chunk": None})
        out.append({**base, "kind": "ig", "batch": batch, "chunk": None})  # the default
        out.append({**base, "kind": "ig", "batch": batch, "chunk": args.steps})
    return out


def describe(cfg: dict, default_chunk: int) -> str:
    if cfg["kind"] == "forward":
        return "model alone: forward, no grad"
    if cfg["chunk"] is None:
        return f"integrated_gradients, default internal_batch_size={default_chunk}"
    return f"integrated_gradients, internal_batch_size={cfg['chunk']} (all steps at once)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON config: run one, print
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import inspect

    from cnnkit.explain.gradient import IntegratedGradients

    default_chunk = inspect.signature(IntegratedGradients).parameters[
        "internal_batch_size"].default
    rows = []
    for cfg in configs(args):
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"configuration {cfg} failed:\n{proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((cfg, res))
        print(f"  {cfg}: {res}", file=sys.stderr, flush=True)

    import torch

    print(f"\n{args.model} {args.size}x{args.size}, {args.steps} Gauss-Legendre steps, "
          f"float32, torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("| batch | configuration | RSS before call (MiB) | peak RSS (MiB) | peak - before "
          "(MiB) | seconds |")
    print("|---:|---|---:|---:|---:|---:|")
    for cfg, res in rows:
        print(f"| {cfg['batch']} | {describe(cfg, default_chunk)} | {res['before_mib']:,.0f} "
              f"| {res['peak_mib']:,.0f} | {res['peak_mib'] - res['before_mib']:,.0f} "
              f"| {res['seconds']:.1f} |")


if __name__ == "__main__":
    main()
