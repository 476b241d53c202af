"""bf16 autocast against fp32 for training steps on this CPU, side by side in one run.

Why ``amp="auto"`` is off on CPU: this measures the time of one training step
(forward, backward, SGD step) in fp32 and under ``torch.autocast("cpu", bfloat16)``,
interleaved (ABAB...) so machine noise hits both alike, and prints the median ratio.

    python bench/amp_cpu.py [--steps 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cnnkit.models import create_model
from cnnkit.training.device import _cpu_has_bf16

CONFIGS = [  # (model, in_chans, size, batch)
    ("tinyvgg_wide", 1, 8, 64),
    ("resnet18", 3, 32, 64),
    ("mobilenet_v2", 3, 32, 64),
]


def step_time(model, x, y, opt, dtype) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not _cpu_has_bf16():
        raise SystemExit("this CPU has no native bf16: nothing to compare")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} interleaved steps")
    print(f"{'model':<14} {'input':<10} {'fp32 ms':>8} {'bf16 ms':>8} {'bf16 speed-up':>14}")
    for name, c, s, b in CONFIGS:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_chans=c, img_size=s)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(b, c, s, s), torch.randint(0, 10, (b,))
        for dtype in (None, torch.bfloat16, None, torch.bfloat16):  # warm-up
            step_time(model, x, y, opt, dtype)
        fp32, bf16 = [], []
        for _ in range(args.steps):
            fp32.append(step_time(model, x, y, opt, None))
            bf16.append(step_time(model, x, y, opt, torch.bfloat16))
        a, m = statistics.median(fp32), statistics.median(bf16)
        print(f"{name:<14} {f'{c}x{s}x{s}':<10} {a * 1e3:8.2f} {m * 1e3:8.2f} {a / m:13.2f}x")


if __name__ == "__main__":
    main()
