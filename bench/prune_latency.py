"""Structured pruning on this CPU: parameters, MACs and latency of a 50%-channel resnet18.

resnet18 with the small stem (32x32 input, 10 classes) is pruned with
:func:`cnnkit.compress.prune.prune` (l1 filter norms, 50% of every prunable group's
channels, Li et al. 2017) into a smaller dense network. Printed: parameters and MACs
(original / pruned and their ratio; goal >= 3x fewer parameters) and batch-32 latency at 2
and 1 intra-op threads, where each repeat times the original and the pruned model back to
back (interleaved) and the ratio of the medians is reported (goal >= 2.5x), since the
machine is shared and absolute times drift. If ``torch_pruning`` (Fang et al. 2023,
"DepGraph: Towards any structural pruning") is importable, its magnitude pruner at the same
ratio (so equal MACs, which the table shows) is timed in the same loop.

Usage: python bench/prune_latency.py [--reps 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from cnnkit.analysis.summary import summary
from cnnkit.compress.prune import prune
from cnnkit.models import create_model
from cnnkit.workflows.latency import measure_latency

KWARGS = dict(num_classes=10, img_size=32, stem="small")
SHAPE = (3, 32, 32)


def torch_pruning_model(model: nn.Module, ratio: float) -> nn.Module | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    import copy

    model = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(model, torch.randn(1, *SHAPE),
                                       importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[model.fc])
    pruner.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"torch {torch.__version__}, load average before {load}")
    if load[0] > (os.cpu_count() or 1):
        print("warning: the load average exceeds the core count; 2-thread times stall on "
              "busy cores, the 1-thread ratio is the steadier one")
    torch.manual_seed(0)
    model = create_model("resnet18", **KWARGS).eval()
    models = {"original": model,
              "cnnkit l1": prune(model, args.ratio, "l1",
                                 example_inputs=torch.randn(1, *SHAPE)).eval()}
    tp_model = torch_pruning_model(model, args.ratio)
    if tp_model is not None:
        models["torch_pruning l1"] = tp_model
    else:
        print("torch_pruning is not installed: its row is skipped")

    n0 = sum(p.numel() for p in model.parameters())
    macs0 = summary(model, SHAPE).total_macs
    print(f"\n## resnet18 (small stem, 32x32, 10 classes), {args.ratio:.0%} of channels removed")
    print("| model | parameters | param ratio | MACs | MAC ratio |\n|---|---|---|---|---|")
    for k, m in models.items():
        n, macs = sum(p.numel() for p in m.parameters()), summary(m, SHAPE).total_macs
        print(f"| {k} | {n:,} | {n0 / n:.2f}x | {macs:,} | {macs0 / macs:.2f}x |")

    print(f"\n## batch-{args.batch} latency (interleaved medians of {args.reps} repeats)")
    print("| threads | " + " | ".join(f"{k} ms" for k in models)
          + " | " + " | ".join(f"speed-up {k}" for k in list(models)[1:]) + " |")
    print("|---" * (2 * len(models)) + "|")
    x = torch.randn(args.batch, *SHAPE)
    for threads in (2, 1):
        torch.set_num_threads(threads)
        med = measure_latency(models, x, args.reps)
        print(f"| {threads} | " + " | ".join(f"{v * 1e3:.1f}" for v in med.values()) + " | "
              + " | ".join(f"{med['original'] / med[k]:.2f}x" for k in list(models)[1:])
              + " |")
    print(f"\nload average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
