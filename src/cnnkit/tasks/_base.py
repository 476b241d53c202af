"""The :class:`Task` contract: what a task supplies to the trainer, the evaluator, the
explainers, the report and the CLI.

The training loop is the same for every task; a task supplies the rest: which targets
the data must hold and how they are shaped for the model, the model's outputs, the loss
and its choices, the running training statistic, the evaluation and its headline metric
with the direction in which it improves (which picks the best checkpoint), the one-line
summary and the report's sections, and what an explanation method explains.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Task", "TaskDefaults", "ReportParts", "autocast", "eval_outputs"]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op when it is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def eval_outputs(model: nn.Module, loader: Any, device: torch.device,
                 amp: torch.dtype | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(outputs, targets)`` of ``model`` over ``loader``: eval mode, no gradients, the
    outputs in float32 (after autocast); the model's train/eval mode is restored after.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from cnnkit.tasks._base import eval_outputs
        >>> m = nn.Linear(2, 3).train()
        >>> [o.shape for o, _ in eval_outputs(m, [(torch.ones(4, 2), torch.zeros(4))],
        ...                                   torch.device("cpu"))], m.training
        ([torch.Size([4, 3])], True)
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                with autocast(device, amp):
                    out = model(x)
                yield out.float(), y
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class TaskDefaults:
    """What a bare ``cnnkit train --task T`` uses. ``lr``/``weight_decay`` apply to the
    task's own optimizer; None means the generic formula (``TrainConfig.resolved_lr``)."""

    model: str
    data: str
    loss: str
    epochs: int
    batch_size: int
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class ReportParts:
    """A task's part of ``report.html``: the headline (HTML), figures as ``(title,
    base64 PNG)`` and extra HTML (tables)."""

    headline: str
    figures: list[tuple[str, str]] = field(default_factory=list)
    extra: str = ""


class Task:
    """Base of the tasks; a task is one subclass registered with ``@register_task``.

    Class attributes (the task's facts):
        name: the registry key (``--task NAME``).
        description: one line for ``--help``.
        metric: the key of :meth:`evaluate`'s result that picks the best checkpoint.
        higher_is_better: the direction in which ``metric`` improves.
        losses: the ``--loss`` choices, the default first.
        defaults: :class:`TaskDefaults`.
        data_targets: what :func:`cnnkit.data.load_data` must read (``targets=``):
            ``"labels"``, ``"masks"``, ``"images"`` (the inputs are the targets) or
            ``"values"``.
        train_metric: the name of the running training statistic (``train_<name>`` in
            ``metrics.jsonl``) and ``progress_tag`` its short name on the progress bar.
        models: the task key of the models it trains (``@register_model(task=...)``):
            its own name by default; regression trains the classifiers (a vector out).
        writes_predictions: ``cnnkit predict`` writes files (:meth:`prediction_names`,
            ``write_prediction``) rather than printing one line per input
            (:meth:`predict_row`).
        output_kind: what the model's output is, for a viewer (``cnnkit serve``):
            ``"probabilities"`` (K scores read through a softmax), ``"values"`` (K
            numbers as they are), ``"mask"`` (K scores per position, whose argmax is the
            position's class) or ``"image"``.

    Args:
        options: the run's :class:`~cnnkit.training.TrainConfig` (or any object with the
            attributes the task reads: ``loss``, ``label_smoothing``, ``scale``).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    losses: ClassVar[tuple[str, ...]]
    defaults: ClassVar[TaskDefaults]
    data_targets: ClassVar[str] = "labels"
    train_metric: ClassVar[str]
    progress_tag: ClassVar[str]
    writes_predictions: ClassVar[bool] = False  # predict writes files (masks, images)
    models: ClassVar[str | None] = None  # the models it trains: those registered with this task
    output_kind: ClassVar[str] = "probabilities"

    def __init__(self, options: Any = None) -> None:
        self.cfg = options

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("models") is None and "name" in cls.__dict__:
            cls.models = cls.name

    # -- data and model ---------------------------------------------------------------------

    def classes(self, data: Any) -> list[str]:
        """The names of the model's outputs, stored with its weights."""
        return list(data.classes)

    def targets(self, data: Any) -> torch.Tensor:
        """What the loader pairs with each input."""
        return data.labels

    def prepare(self, data: Any, multiple: int) -> Any:
        """Bring the data to a size the model takes (dense tasks pad or crop)."""
        return data

    def model_kwargs(self, data: Any) -> dict[str, Any]:
        """Builder options implied by the data (``data`` may be a stand-in with
        ``input_size``, ``classes`` and ``mask_classes``)."""
        c, *spatial = data.input_size
        return {"num_classes": len(self.classes(data)), "in_chans": c,
                "img_size": tuple(spatial)}

    def builder_options(self) -> dict[str, Any]:
        """Builder options that come from the task's own options (recorded with the
        weights beside the run's ``model_kwargs``): none by default."""
        return {}

    def loader_kwargs(self) -> dict[str, Any]:
        return {}

    def augment(self, data: Any) -> str:
        """The augmentation policy of ``augment="auto"``: the data set's own."""
        return data.augment

    def align(self, data: Any, outputs: list[str], name: str) -> Any:
        """Other data evaluated with a run's model: its targets put onto the model's
        ``outputs`` (the run's classes), or a one-line refusal when they cannot be."""
        return data

    # -- training and evaluation ---------------------------------------------------------------

    def criterion(self) -> nn.Module:
        raise NotImplementedError

    def batch_score(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The running training statistic of a batch: ``(sum, count)``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 amp: torch.dtype | None = None) -> dict[str, Any]:
        """``{"loss", metric, ...}`` over ``loader`` (sums reduced over the processes)."""
        raise NotImplementedError

    def improved(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of :attr:`metric` beats ``best`` (None: nothing yet)."""
        if best is None or not math.isfinite(best):
            return True
        return value > best if self.higher_is_better else value < best

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        """The ``test_*`` entries of ``summary.json``."""
        raise NotImplementedError

    def headline(self, result: dict[str, Any]) -> str:
        """The task's test metrics on one line (``cnnkit train``/``eval``)."""
        raise NotImplementedError

    def chance(self, targets: torch.Tensor, num_classes: int) -> float | None:
        """The headline metric of the best constant prediction of ``targets`` (the floor
        "it learns" is measured from), or None where the task has no such floor."""
        return None

    def report(self, summary: dict[str, Any], test: dict[str, Any], data: Any,
               test_idx: torch.Tensor) -> ReportParts:
        """The task's sections of ``report.html`` (the training curves are common)."""
        return ReportParts(self.headline(summary))

    # -- prediction ----------------------------------------------------------------------------

    def predict_row(self, out: torch.Tensor, outputs: list[str], topk: int) -> dict[str, Any]:
        """What ``cnnkit predict`` says about one input, from the model's output ``[K]``."""
        raise NotImplementedError

    def prediction_line(self, result: dict[str, Any]) -> str:
        """One printed line of a prediction (``result`` has ``file``)."""
        raise NotImplementedError

    # -- explanation ---------------------------------------------------------------------------

    @classmethod
    def explainable(cls, model: nn.Module) -> nn.Module:
        """The model seen as scores ``[B, K]`` that an explanation method attributes (one
        score per class or output); the model itself where it already is one."""
        return model

    @classmethod
    def predicted(cls, scorer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The target an explanation explains by default: per input, the predicted
        class (the index of the top score)."""
        with torch.no_grad():
            return scorer(x).argmax(1)

    @classmethod
    def confidence(cls, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Per input and class ``[B, K]``, the number an explanation's caption shows: the
        softmax probability by default."""
        with torch.no_grad():
            return model(x).float().softmax(1)

    @classmethod
    def confidence_text(cls, value: float) -> str:
        return f"(p={value:.2f})"
