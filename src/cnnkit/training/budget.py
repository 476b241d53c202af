"""Will a training run fit in memory? Checked before the model or a batch is allocated.

The estimate is taken on PyTorch's ``meta`` device, where tensors have shapes but no
storage, so it costs milliseconds and no memory: the model is built there and one
sample is passed through it. Training holds, at least,

* the weights, their gradients and up to two optimizer moments: ``4 x`` the parameters;
* for each sample of a batch, the outputs of the layers kept for the backward pass:
  every leaf module's output counted once.

It is a lower bound of what PyTorch allocates (workspaces, the allocator's rounding and
the input batch come on top), so a run it refuses could never have fitted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from cnnkit._limits import require_memory
from cnnkit.models import create_model

__all__ = ["training_bytes", "require_training_memory", "check_run_memory"]


def training_bytes(build: Callable[[], nn.Module], input_size: Sequence[int],
                   batch_size: int) -> int | None:
    """Bytes a training step needs at least (see the module docstring), from a meta-device
    build of ``build()`` and one meta sample of ``input_size``; None if the model cannot
    run on the meta device (an operation without a meta kernel)."""
    outputs = [0]

    def count(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs[0] += output.numel() * output.element_size()

    try:
        with torch.device("meta"):
            model = build()
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        handles = [m.register_forward_hook(count) for m in model.modules()
                   if not any(True for _ in m.children())]
        try:
            model.train()(torch.empty(1, *input_size, device="meta"))
        finally:
            for h in handles:
                h.remove()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None  # no estimate: the run goes ahead, as it did before this check
    return 4 * params + batch_size * outputs[0]


def require_training_memory(build: Callable[[], nn.Module], model: str,
                            input_size: Sequence[int], batch_size: int, fix: str,
                            num_classes: int = 0) -> None:
    """Refuse a training run that cannot fit in memory, before anything is allocated;
    ``num_classes`` adds the evaluation's confusion matrix (``K x K`` 64-bit counts).

    Raises:
        cnnkit._limits.MemoryLimitError: naming the model, the input, the batch and ``fix``.
    """
    need = training_bytes(build, input_size, batch_size)
    if need is None:
        return
    need += 8 * num_classes**2
    size = "x".join(str(v) for v in input_size)
    require_memory(need, f"training {model} on {size} inputs in batches of {batch_size}", fix)


def check_run_memory(config: Any, task: Any, data: Any) -> None:
    """:func:`require_training_memory` for a run: its model, options, batch and task
    (``task.model_kwargs(data)``: the input size and classes ``data`` implies; ``data`` is
    the loaded data or a stand-in with ``input_size``, ``classes`` and ``mask_classes``)."""
    kwargs = {**task.model_kwargs(data), **config.model_kwargs}
    fix = ("give a smaller --image-size" if config.image_size else "resize the images with "
           "--image-size") + f", a smaller --batch-size (now {config.batch_size}) or a smaller "\
        "model, or use a machine with more memory"
    require_training_memory(lambda: create_model(config.model, **kwargs), config.model,
                            (kwargs["in_chans"], *kwargs["img_size"]), config.batch_size, fix,
                            num_classes=len(task.classes(data)))
