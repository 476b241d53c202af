"""The end of a training run, after its last epoch: the best weights tested and the run
folder completed (``summary.json``, ``report.html``). :meth:`cnnkit.training.Trainer.fit`
calls it; under several processes every rank tests, and rank 0 alone writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnnkit.run import write_json
from cnnkit.run.checkpoint import load_weights
from cnnkit.run.report import write_report

from . import distributed as ddp

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["finish_run"]


def finish_run(trainer: Trainer) -> dict[str, Any]:
    """The end of a run: the best weights (rank 0's, on every rank) tested at full precision,
    then ``summary.json`` and ``report.html`` written by rank 0; returns the summary."""
    t, task, prep, split = trainer, trainer.task, trainer.preprocess, trainer.split
    if t.dist.is_main:
        best, _ = load_weights(t.paths.weights)
        t.model.load_state_dict(best)
    ddp.broadcast_(t.model.state_dict().values())  # the other ranks: from rank 0
    # The reference number is full precision, as `cnnkit eval` and users compute it.
    test = task.evaluate(t.model, t.test_loader, t.device)
    summary = {
        "model": t.config.model, "data": t.config.data, "task": task.name,
        **task.summary(test),
        f"best_val_{task.metric}": t.best_score, "best_epoch": t.best_epoch,
        "epochs_run": t.epoch, "stopped_early": t.epoch < t.config.epochs,
        "input_size": list(prep.input_size),
        "num_classes": len(prep.classes),
        "classes": prep.classes,
        "num_samples": {"train": len(split[0]), "val": len(split[1]), "test": len(split[2])},
        "skipped_files": t.data.skipped,
        "params": sum(p.numel() for p in t.model.parameters()),
        "train_time_s": sum(m["epoch_time_s"] for m in t.history),
        "device": str(t.device), "processes": t.dist.world_size,
    }
    if t.resumes:
        summary["resumes"] = t.resumes
    if t.dist.is_main:
        write_json(t.paths.summary, summary)
        write_report(t.paths, task, summary, t.history, test, t.data, split[2])
    ddp.barrier()  # every rank returns with the run folder complete
    return summary
