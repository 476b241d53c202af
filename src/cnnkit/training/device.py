"""Device and mixed-precision resolution."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["resolve_device", "resolve_amp", "autocast"]


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; anything else is validated."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return device


def _cpu_has_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def resolve_amp(amp: str, device: torch.device, spatial_dims: int = 2) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for full precision.

    ``auto`` means bf16 on CUDA GPUs that support it, fp16 on older ones, bf16 on CPUs
    with native bf16 (AVX-512 BF16 or AMX: training steps run 1.5-2x faster there, see
    ``bench/amp_cpu.py`` and docs/benchmarks.md) for inputs of up to two spatial axes, and
    off on other CPUs, on MPS and for volumes on the CPU: oneDNN's bf16 ``conv3d`` weight
    gradients turned NaN within two epochs of a 3D U-Net on shapes3d (torch 2.13, an
    AVX-512 BF16 EPYC), from finite inputs and output gradients, and not reproducibly
    (the same tensors replayed give finite gradients). ``--amp bf16`` still asks for it.

    Example:
        >>> import torch
        >>> from cnnkit.training.device import resolve_amp
        >>> resolve_amp("auto", torch.device("cpu"), spatial_dims=3) is None
        True
    """
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        if amp == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if amp == "auto":
        cpu_bf16 = device.type == "cpu" and _cpu_has_bf16() and spatial_dims < 3
        return torch.bfloat16 if cpu_bf16 else None
    if amp == "fp16":
        raise ValueError("fp16 autocast needs a CUDA GPU; use --amp bf16 or --amp off on CPU")
    if device.type == "cpu" and not _cpu_has_bf16():
        raise ValueError("this CPU has no native bf16 (AVX-512 BF16/AMX); use --amp off")
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op when it is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
