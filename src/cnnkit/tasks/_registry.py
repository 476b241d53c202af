"""The task registry: one decorator to register a task, one function to look one up.

A task (:class:`~cnnkit.tasks.Task`) is everything that differs between, say,
classification and segmentation: targets, loss, metrics and the one that picks the best
checkpoint, evaluation, what an explanation explains, the report's sections, the CLI's
choices and defaults. Everything above this layer (trainer, explain, compress, CLI, web)
asks the registry and never compares a task's name with a string, so a new task is one
new file with one ``@register_task``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._base import Task

__all__ = ["register_task", "task_class", "create_task", "list_tasks"]

# Filled by the package's __init__, which imports every built-in module and which Python
# runs to its end before code outside the package can call this module's functions.
_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Register a :class:`Task` subclass under its ``name``.

    Raises:
        ValueError: a task of that name is registered already.
    """
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice ({cls.__module__} and "
                         f"{_TASKS[cls.name].__module__}); rename one of them")
    _TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted.

    Example:
        >>> from cnnkit.tasks import list_tasks
        >>> list_tasks()
        ['classify', 'regress', 'segment', 'superres']
    """
    return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
    """The :class:`Task` subclass registered as ``name``.

    Raises:
        ValueError: no such task (naming the registered ones).
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(_TASKS)}")
    return _TASKS[name]


def create_task(name: str, options: Any = None) -> Task:
    """The task ``name`` with its options (a :class:`~cnnkit.training.TrainConfig`, or any
    object with the attributes the task reads: ``loss``, ``label_smoothing``, ``scale``)."""
    return task_class(name)(options)
