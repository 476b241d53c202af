"""The machine's limits: peak matmul FLOP/s and a convolution's FLOP/s, per dtype.

Peak is measured, not looked up: the best of several large square matmuls ``a @ b``
(``2 n^3`` FLOPs: ``n^2`` outputs of ``n`` multiply-adds each) and of a representative
3x3 convolution (ResNet-18's second stage at CIFAR size, channels_last, forward only).
The peak of a dtype is the faster of the two: on some CPUs the convolution library
(oneDNN) outruns the matmul library (MKL, which takes a generic path on AMD CPUs), and
a peak below what a network's convolutions reach would make utilisation exceed 1.
Model FLOP utilisation (MFU: Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with
Pathways", appendix B) is the FLOP/s a training step achieves over this measured peak of
the dtype it computes in: how far a model is from what this machine does, not from a
datasheet.

Every timing synchronises the device before the clock starts and before it stops, so
CUDA's asynchronous launches are timed to their completion.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["synchronize", "best_seconds", "matmul_flops", "conv2d_flops", "ConvShape",
           "conv_shape", "matmul_size", "measure_matmul", "measure_conv", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, which runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int,
                 inner: int = 1, warmup: int = 1) -> float:
    """The fastest of ``repeats`` timings of ``inner`` back-to-back calls of ``fn``, per call.

    The best, not the median: a peak is what the hardware can do, and load from other
    processes only ever slows a run down.
    """
    for _ in range(warmup):  # kernel selection, allocation, lazy initialisation
        fn()
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def matmul_flops(n: int) -> int:
    """FLOPs of an ``[n, n] @ [n, n]`` matmul: ``n^2`` dot products of ``n`` multiply-adds.

    Example:
        >>> from cnnkit.workflows.bench.peak import matmul_flops
        >>> matmul_flops(1024)
        2147483648
    """
    return 2 * n ** 3


@dataclass(frozen=True)
class ConvShape:
    """A 3x3 (or ``kernel``) convolution with stride 1 and 'same' padding."""

    batch: int
    channels: int  # in = out
    size: int  # H = W
    kernel: int = 3


def conv2d_flops(shape: ConvShape) -> int:
    """FLOPs (2 per multiply-accumulate) of the convolution's forward pass: every output
    element sums ``C_in x k x k`` products.

    Example:
        >>> from cnnkit.workflows.bench.peak import ConvShape, conv2d_flops
        >>> conv2d_flops(ConvShape(batch=1, channels=8, size=4, kernel=3))
        18432
    """
    outputs = shape.batch * shape.channels * shape.size * shape.size
    return 2 * outputs * shape.channels * shape.kernel * shape.kernel


def matmul_size(device: torch.device, quick: bool = False) -> int:
    """Large enough to reach the peak (a 2048 matmul runs ~0.1 s on two CPU cores); a quick
    run's is smaller but not small: a peak measured on small matrices would be no peak,
    and MFU above 1 would follow."""
    if device.type == "cuda":
        return 4096 if quick else 8192
    return 1024 if quick else 2048


def conv_shape(device: torch.device, quick: bool = False) -> ConvShape:
    """ResNet-18's second stage at CIFAR size; a larger batch on the GPU, a smaller one in
    a quick run."""
    batch = 256 if device.type == "cuda" else 64
    return ConvShape(batch=batch // 4 if quick else batch, channels=128, size=16)


def _repeats(device: torch.device, quick: bool) -> tuple[int, int]:
    """(repeats, calls per timing): GPU kernels take milliseconds, so time several at once."""
    if device.type == "cuda":
        return (3, 3) if quick else (10, 10)
    return (3, 1) if quick else (5, 1)


@torch.inference_mode()
def measure_matmul(dtype: torch.dtype, device: torch.device, quick: bool = False) -> float:
    """Best FLOP/s of a large square matmul in ``dtype`` on ``device``."""
    n = matmul_size(device, quick)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    repeats, inner = _repeats(device, quick)
    return matmul_flops(n) / best_seconds(lambda: a @ b, device, repeats, inner)


@torch.inference_mode()
def measure_conv(dtype: torch.dtype, device: torch.device, quick: bool = False) -> float:
    """Best FLOP/s of :func:`conv_shape`'s 3x3 convolution, channels_last, in ``dtype``."""
    s = conv_shape(device, quick)
    gen = torch.Generator(device="cpu").manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(s.batch, s.channels, s.size, s.size, generator=gen)
    w = torch.randn(s.channels, s.channels, s.kernel, s.kernel, generator=gen) * 0.05
    x = x.to(device, dtype).contiguous(memory_format=cl)
    w = w.to(device, dtype).contiguous(memory_format=cl)
    repeats, inner = _repeats(device, quick)
    return conv2d_flops(s) / best_seconds(lambda: F.conv2d(x, w, padding=s.kernel // 2),
                                          device, repeats, inner)
