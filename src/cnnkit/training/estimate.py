"""How long will this run take? Said once, up front, when the answer is "long".

A run started on a machine too slow for its model (a 31 M-parameter U-Net on two CPU
cores) used to run for a quarter of an hour without finishing an epoch and without a
word. After its first steps the run is timed: the first step pays the warm-up (allocator,
kernel selection, compilation), so the steps after it are measured (a few on the CPU; on
a GPU, up to the step whose non-finite check synchronises, so the time is the device's,
not the queue's). The estimate is the remaining training steps at that pace plus the
evaluation (validation after every epoch, the test once), counted as forward passes at a
third of a training step's cost (the backward pass costs about twice the forward). Above
``CNNKIT_LONG_RUN_MINUTES`` (10 by default) one line on stderr says how long, why (the
model's parameters and multiply-accumulates per sample) and what is faster: the task's
default model when it is cheaper, fewer epochs, a smaller input or a GPU.

Multiply-accumulates are counted from the operator registry (:mod:`cnnkit.layers.ops`,
the facts the model summary reads), on the ``meta`` device: no memory, no arithmetic,
and only when the line is printed.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

from cnnkit.layers.ops import UnknownOperator, function_facts, tensors
from cnnkit.models import create_model

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["LONG_RUN_ENV", "FORWARD_SHARE", "long_run_minutes", "estimate_seconds",
           "count_macs", "long_run_message", "RunEstimate"]

LONG_RUN_ENV = "CNNKIT_LONG_RUN_MINUTES"
DEFAULT_LONG_RUN_MINUTES = 10.0
# An evaluation batch costs a forward pass: about a third of a training step.
FORWARD_SHARE = 1 / 3
# A model is suggested instead when it needs at most this share of the run model's MACs.
CHEAPER = 0.8


def long_run_minutes() -> float:
    """The estimate above which a run says it is long: ``CNNKIT_LONG_RUN_MINUTES``, else 10.

    Raises:
        ValueError: the variable is not a non-negative number.
    """
    text = os.environ.get(LONG_RUN_ENV, "").strip()
    if not text:
        return DEFAULT_LONG_RUN_MINUTES
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise ValueError(f"{LONG_RUN_ENV}={text!r} is not a number of minutes; give one such as "
                         f"{LONG_RUN_ENV}=30, or unset it for the default "
                         f"({DEFAULT_LONG_RUN_MINUTES:g})")
    return value


def estimate_seconds(step_s: float, train_steps: int, eval_batches: int,
                     forward_share: float = FORWARD_SHARE) -> float:
    """Seconds of ``train_steps`` training steps of ``step_s`` each, plus ``eval_batches``
    forward-only batches of the same size at ``forward_share`` of a step.

    Example:
        >>> estimate_seconds(2.0, train_steps=100, eval_batches=30)
        220.0
    """
    return step_s * (train_steps + forward_share * eval_batches)


class _MacCounter(TorchFunctionMode):
    """Multiply-accumulates of the operators applied to values that depend on the input,
    by their registry facts (as the model summary counts them)."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.macs = 0
        self._live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._live[x] = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = list(tensors(out))
        if outs and any(t in self._live for t in tensors((args, kwargs))):
            facts = function_facts(getattr(func, "__name__", repr(func)), "the run estimate")
            if facts.macs is not None:
                self.macs += facts.macs(args, kwargs, outs[0])
            for t in outs:
                self._live[t] = True
        return out


def count_macs(model: nn.Module | Callable[[], nn.Module], input_size: Sequence[int]
               ) -> int | None:
    """Multiply-accumulates of one forward pass of ``model`` (or of ``model()``, built on the
    ``meta`` device) on one sample of ``input_size`` (``(C, *spatial)``), run on the ``meta``
    device (a given model is copied there; it is left as it is); None if the model cannot
    run there or uses an operator the registry does not know (the line then has no MACs).

    Example:
        >>> count_macs(lambda: nn.Linear(4, 3), (4,))
        12
    """
    try:
        if isinstance(model, nn.Module):
            model = copy.deepcopy(model)
        else:
            with torch.device("meta"):
                model = model()
        model = model.to("meta").eval()
        x = torch.empty(1, *input_size, device="meta")
        with torch.no_grad(), _MacCounter(x) as counter:
            model(x)
    except (RuntimeError, NotImplementedError, TypeError, UnknownOperator):
        return None  # no count: the line says what it knows
    return int(counter.macs)


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes >= 90:
        return f"{minutes / 60:.1f} h"
    return f"{minutes:.0f} min" if minutes >= 1.5 else f"{seconds:.0f} s"


def long_run_message(seconds: float, device: str, model: str, params: int, macs: int | None,
                     step_s: float, batch_size: int, cheaper: tuple[str, int] | None) -> str:
    """The line a long run prints: how long, why, and what is faster.

    Example:
        >>> long_run_message(2820, "cpu", "unet", 31_030_000, 3_010_000_000, 2.1, 64,
        ...                  ("unet_small", 400_000_000))  # doctest: +NORMALIZE_WHITESPACE
        'this run will take about 47 min on this cpu (unet: 31.0 M parameters, 3.01 GMACs per
        sample, 2.1 s per step of 64); faster: --model unet_small (0.4 GMACs), fewer
        --epochs, a smaller --image-size, or a GPU'
    """
    cost = f"{params / 1e6:.1f} M parameters"
    if macs is not None:
        cost += f", {macs / 1e9:.3g} GMACs per sample"
    faster = [] if cheaper is None else [f"--model {cheaper[0]} ({cheaper[1] / 1e9:.2g} GMACs)"]
    faster += ["fewer --epochs", "a smaller --image-size"]
    if device == "cpu":
        faster.append("a GPU")
    step = f"{step_s:.2g} s" if step_s < 10 else f"{step_s:.0f} s"
    return (f"this run will take about {_duration(seconds)} on this {device} ({model}: {cost}, "
            f"{step} per step of {batch_size}); faster: {', '.join(faster[:-1])}, or "
            f"{faster[-1]}")


class RunEstimate:
    """Times a run's first steps (:meth:`step`, called after each training step with the
    clock read there) and, if the rest of the run will take longer than ``minutes``, says
    so once through ``say``.

    Args:
        trainer: the run (its loaders, config, model, task and data are read).
        say: where the line goes (the trainer's log: stderr, above the progress bar).
        minutes: the threshold; :func:`long_run_minutes` when None.
        window: steps timed after the first (a GPU's step time is read at a
            synchronising step: its non-finite check).
    """

    def __init__(self, trainer: Trainer, say: Callable[[str], None] | None = None,
                 minutes: float | None = None, window: int | None = None) -> None:
        self.trainer = trainer
        self.say = say or (lambda line: tqdm.write(line, file=sys.stderr))
        self.minutes = long_run_minutes() if minutes is None else minutes
        self.window = window or (3 if trainer.device.type == "cpu" else 31)
        self.seconds: float | None = None  # the estimate, once made
        self._steps = 0
        self._first: float | None = None
        self._sample: tuple[int, ...] | None = None
        partial = trainer.partial
        self._done_before = (trainer.epoch * len(trainer.train_loader)
                             + (partial["step"] if partial else 0))

    def step(self, now: float, x: Any = None) -> None:
        """One training step ended at ``now`` (``x``: its input batch)."""
        if self.seconds is not None:
            return
        self._steps += 1
        if self._steps == 1:
            self._first = now
            if isinstance(x, torch.Tensor):
                self._sample = tuple(x.shape[1:])
            return
        if self._steps == self.window + 1:
            self.measured((now - self._first) / self.window)

    def measured(self, step_s: float) -> float:
        """Make the estimate from ``step_s`` seconds per step; say it if it is long."""
        t, cfg = self.trainer, self.trainer.config
        steps = len(t.train_loader)
        left = max(0, cfg.epochs * steps - self._done_before - 1)  # the first one is done
        epochs_left = cfg.epochs - t.epoch
        evals = epochs_left * len(t.val_loader) + len(t.test_loader)
        self.seconds = estimate_seconds(step_s, left, evals)
        if self.seconds > 60 * self.minutes:
            self.say(self.line(step_s))
        return self.seconds

    def line(self, step_s: float) -> str:
        """The long-run line for this run (counts the MACs: call only to print it)."""
        t, cfg = self.trainer, self.trainer.config
        sample = self._sample or tuple(t.train_loader.images.shape[1:])
        model, kwargs = t.model, t.task.model_kwargs(t.data)
        macs = count_macs(model if t._init_model is not None else  # a pruned model: itself
                          lambda: create_model(cfg.model, **kwargs, **cfg.model_kwargs), sample)
        default = t.task.defaults.model
        cheaper = None
        if default != cfg.model and macs:
            other = count_macs(lambda: create_model(default, **kwargs), sample)
            if other is not None and other <= CHEAPER * macs:
                cheaper = (default, other)
        params = sum(p.numel() for p in model.parameters())
        return long_run_message(self.seconds, t.device.type, cfg.model, params, macs, step_s,
                                cfg.batch_size, cheaper)
