"""Which models are small for a built-in data set, and what learning it means for them.

"Every small model learns every built-in data set on defaults" is a promise of the
project (``tests/workflows/test_learns.py`` checks it on shrunk data sets in CI,
``bench/learns.py`` at full size). This module says what it quantifies over:

* the pairs: each built-in data set, each registered task whose targets it holds, each
  model of that task that builds for the data set's input size and is *small* for it:
  at most :data:`MAX_PARAMS` parameters and :data:`MAX_MACS` multiply-accumulates per
  sample at that size (what trains in minutes on a laptop's CPU);
* chance: the score of the best constant prediction on the test targets, the floor
  "it learns" is measured from (the task's :meth:`~cnnkit.tasks.Task.chance`; tasks
  without one, such as regression and super-resolution, are left out);
* the bar: halfway from chance to a perfect score (:func:`learned`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch

from cnnkit.analysis import summary
from cnnkit.data import dataset_targets, list_datasets, load_data
from cnnkit.models import create_model, list_models
from cnnkit.tasks import Task, list_tasks, task_class

__all__ = ["MAX_PARAMS", "MAX_MACS", "small_models", "learning_pairs", "learned"]

MAX_PARAMS = 12_000_000
MAX_MACS = 200_000_000


@cache
def _input_size(data: str) -> tuple[int, ...]:
    return tuple(load_data(data).input_size)


def small_models(task: str, input_size: Sequence[int], num_classes: int = 10) -> list[str]:
    """The models of ``task`` that build for ``input_size`` ``(C, *spatial)`` within
    :data:`MAX_PARAMS` and :data:`MAX_MACS`, sorted by name.

    Example:
        >>> from cnnkit.workflows.learns import small_models
        >>> small_models("classify", (3, 64, 64))
        ['lenet5', 'mobilenet_v1', 'mobilenet_v2', 'resnet18', 'tinyvgg', 'tinyvgg_wide']
    """
    kind = task_class(task).models
    found = []
    for name in list_models(task=kind):
        try:
            with torch.device("meta"):
                model = create_model(name, num_classes=num_classes,
                                     input_size=tuple(input_size))
        except (ValueError, TypeError):  # not for these dims or this size
            continue
        if sum(p.numel() for p in model.parameters()) > MAX_PARAMS:
            continue
        if summary(model, tuple(input_size), device="meta").total_macs <= MAX_MACS:
            found.append(name)
    return found


def learning_pairs(data: str | None = None, task: str | None = None,
                   models: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """``(data set, task, model)`` for every built-in data set, every task whose targets
    it holds and every model small for it (:func:`small_models`), optionally filtered."""
    pairs = []
    for d in list_datasets() if data is None else [data]:
        for t in list_tasks() if task is None else [task]:
            cls = task_class(t)
            if cls.data_targets not in dataset_targets(d) or cls.chance is Task.chance:
                continue  # no targets here, or no chance level (the base's None) to beat
            pairs += [(d, t, m) for m in small_models(t, _input_size(d))
                      if models is None or m in models]
    return pairs


def learned(score: float, chance: float) -> bool:
    """Whether ``score`` is at least halfway from ``chance`` to a perfect 1."""
    return score >= chance + 0.5 * (1.0 - chance)
