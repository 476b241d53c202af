"""Tasks: what a run predicts and how it is scored, as registered objects.

A task (:class:`Task`) owns its targets, loss and its choices, metrics, the headline
metric and its direction, evaluation, the explanation target, its report sections and
its CLI defaults; :func:`register_task` adds one, :func:`task_class`/:func:`create_task`
look one up, :func:`list_tasks` lists them. Built in:

========  ========================  ===============================  =================
task      target                    loss                             headline metric
========  ========================  ===============================  =================
classify  class ``[N]``             cross-entropy (label smoothing)  accuracy (higher)
segment   mask ``[N, *spatial]``    CE, Dice, focal or a sum         mIoU (higher)
superres  the input, x ``scale``    MSE (ESPCN) or L1                PSNR (higher)
regress   values ``[N, K]``         MSE or L1                        MSE (lower)
========  ========================  ===============================  =================

This package sits above ``models`` and ``data`` and below the libraries (train,
explain, compress, analysis), which see tasks only through it.
"""

from . import classify, regress, segment, superres  # noqa: F401 - registers the built-ins
from ._base import ReportParts, Task, TaskDefaults, autocast
from ._registry import create_task, list_tasks, register_task, task_class

__all__ = ["Task", "TaskDefaults", "ReportParts", "autocast", "register_task", "task_class",
           "create_task", "list_tasks"]
