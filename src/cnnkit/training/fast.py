"""Opt-in speed: ``torch.compile`` with a clean fallback to eager execution.

``TrainConfig(compile=True)`` (``cnnkit train --compile``) compiles the training step's
model with ``torch.compile`` (Ansel et al. 2024, "PyTorch 2: Faster Machine Learning
Through Dynamic Python Bytecode Transformation and Graph Compilation", ASPLOS): TorchDynamo
captures the graph and TorchInductor generates fused kernels (C++/OpenMP on the CPU, which
needs a C++ compiler; Triton on CUDA). Compilation is lazy, so it can fail at the first
call as well as at ``torch.compile`` itself (no compiler, an unsupported Python or
platform, an operator the backend lacks). Either way the run goes on eagerly after one
warning line that names the error; the first step is then run again from the state it
started in (the module's buffers and the RNG are restored), so the result is the one an
eager run gives. Only the first step is guarded: a later recompilation (a new input
shape) that fails raises. Evaluation runs eagerly (its batch sizes vary, and it is a
small share of the steps).

``TrainConfig(fast=True)`` (``--fast``) is the preset of all fast paths: channels_last,
``compile`` and ``amp="auto"`` (bf16 autocast on CUDA and on CPUs with AVX-512 BF16/AMX);
the fused optimiser step is used wherever PyTorch supports it (``optim.build_optimizer``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

__all__ = ["try_compile", "first_step_with_fallback"]

T = TypeVar("T")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no message"
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def try_compile(module: nn.Module, **options) -> nn.Module | None:
    """``torch.compile(module, **options)``, or None after a warning when PyTorch refuses
    to compile.

    Example:
        >>> import torch
        >>> from cnnkit.training.fast import try_compile
        >>> compiled = try_compile(torch.nn.Linear(2, 2))  # compiles at its first call
        >>> type(compiled).__name__, compiled._orig_mod
        ('OptimizedModule', Linear(in_features=2, out_features=2, bias=True))
    """
    try:
        return torch.compile(module, **options)
    except Exception as e:  # any refusal means: run eagerly, and say why
        warnings.warn(f"torch.compile is not available ({_reason(e)}); training eagerly",
                      RuntimeWarning, stacklevel=2)
        return None


def _snapshot(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return buffers, rng


def _restore(module: nn.Module, saved: tuple[dict[str, torch.Tensor],
                                             dict[str, torch.Tensor]]) -> None:
    buffers, rng = saved
    with torch.no_grad():
        for k, v in module.named_buffers():
            v.copy_(buffers[k])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def first_step_with_fallback(step: Callable[[], T], module: nn.Module,
                             use_eager: Callable[[], None]) -> T:
    """Run the first compiled ``step`` (forward and backward); if it raises, warn, restore
    ``module``'s buffers and the RNG, call ``use_eager`` and run ``step`` again.

    The second, eager run is not guarded: an error that is not the compiler's (a wrong
    shape, a NaN check) raises from it as it would without ``compile``.

    Args:
        step: the training step's forward and backward (no optimiser step yet: the
            parameters must be as they were if it fails).
        module: the model whose buffers (BatchNorm statistics) the step may update.
        use_eager: switches the step to the eager model.
    """
    saved = _snapshot(module)
    try:
        return step()
    except Exception as e:  # compilation failed somewhere; eager decides
        warnings.warn(f"torch.compile failed at the first step ({_reason(e)}); training eagerly",
                      RuntimeWarning, stacklevel=2)
        _restore(module, saved)
        use_eager()
        return step()
