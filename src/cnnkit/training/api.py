"""``cnnkit.train(...)``: one function call from options (or arrays) to a finished run."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from cnnkit.data.arrays import IN_MEMORY, samples_from
from cnnkit.run import RunPaths, read_config, resolve_run
from cnnkit.run.config import TrainConfig
from cnnkit.tasks import task_class

from .trainer import Trainer

__all__ = ["train", "TrainResult"]


class TrainResult(dict):
    """What :func:`train` returns: the run's summary (``summary.json``: ``result[
    "test_accuracy"]`` ...) that also knows the run folder: ``result.path``, or the
    result itself wherever a path is taken (``cnnkit.load_run(result)``, ``Path(result)``).
    ``result["run_dir"]`` is the folder too, though not a key of the summary (the dict
    equals ``summary.json``).

    Example:
        >>> import os
        >>> from cnnkit.training.api import TrainResult
        >>> r = TrainResult({"test_accuracy": 0.9}, "runs/lenet5-digits")
        >>> r["test_accuracy"], r.path.name, os.fspath(r), r["run_dir"]
        (0.9, 'lenet5-digits', 'runs/lenet5-digits', 'runs/lenet5-digits')
    """

    def __init__(self, summary: dict[str, Any], path: str | os.PathLike) -> None:
        super().__init__(summary)
        self.path = Path(path)

    def __missing__(self, key: str) -> Any:
        if key == "run_dir":
            return str(self.path)
        raise KeyError(key)

    def __fspath__(self) -> str:
        return str(self.path)


def train(config: TrainConfig | None = None, **options: Any) -> TrainResult:
    """Train a model; return its summary with the run folder (:class:`TrainResult`).

    Args:
        config: a full configuration; or leave it None and pass options by name.
        **options: :class:`TrainConfig` fields, plus ``progress`` and ``resume`` (a run
            folder to continue; then only :data:`~cnnkit.run.config.RESUME_OPTIONS` may
            be given, to change them). ``data`` is a data set name or a path, or data held
            in memory: arrays ``(x, y)`` (NumPy or torch; ``x`` alone for ``superres``) or a
            ``torch.utils.data.Dataset`` of ``(x, y)`` pairs, read as
            :mod:`cnnkit.data.arrays` describes (``y``: labels, masks or values, by
            ``task``). Such a run's ``config.yaml`` records ``data: <in-memory>``: the
            arrays are not saved, so ``cnnkit eval RUN`` needs ``--data PATH``.

    Example:
        >>> import torch
        >>> import cnnkit
        >>> r = cnnkit.train(data="digits", epochs=2, lr=0.01, progress=False)  # 2 s on a CPU
        >>> r.path.as_posix(), r["num_samples"], r["test_accuracy"] > 0.9
        ('runs/tinyvgg_wide-digits', {'train': 1438, 'val': 180, 'test': 179}, True)
        >>> cnnkit.load_run(r).classes[:3]  # the run folder, read back
        ['0', '1', '2']
        >>> x, y = torch.rand(64, 1, 8, 8), torch.arange(64) % 2  # data held in memory
        >>> cnnkit.train(data=(x, y), model="lenet5", epochs=1, progress=False).path.name
        'lenet5-memory'
    """
    progress = options.pop("progress", None)
    resume = options.pop("resume", None)
    arrays = options.pop("data") if _in_memory(options.get("data")) else None
    if arrays is not None:
        options["data"] = IN_MEMORY
    elif isinstance(options.get("data"), os.PathLike):
        options["data"] = os.fspath(options["data"])
    if isinstance(options.get("runs_dir"), os.PathLike):
        options["runs_dir"] = os.fspath(options["runs_dir"])
    if resume is not None:
        # A resumed run keeps its saved config, but for the options a resume may change.
        if config is not None:
            raise ValueError("resume continues a run with its saved config; give the options "
                             "to change by name (epochs=, lr= ...), not a TrainConfig")
        if arrays is not None:  # the arrays again, for a run trained from memory
            options.pop("data")
        trainer = Trainer(resume=resume, progress=progress, overrides=options,
                          data=_samples(arrays, _resumed_config(resume)))
        return TrainResult(trainer.fit(), trainer.paths.root)
    if config is None:
        config = TrainConfig.from_dict(options)
    elif set(options) - {"data"}:
        raise ValueError("pass either a TrainConfig or options by name, not both")
    elif arrays is not None:
        config = dataclasses.replace(config, data=IN_MEMORY)
    trainer = Trainer(config, progress=progress, data=_samples(arrays, config))
    return TrainResult(trainer.fit(), trainer.paths.root)


def _in_memory(data: Any) -> bool:
    """Whether ``data=`` is data itself rather than a name or a path."""
    return data is not None and not isinstance(data, (str, os.PathLike))


def _samples(arrays: Any, config: TrainConfig | None):
    if arrays is None or config is None:
        return None
    return samples_from(arrays, task_class(config.task).data_targets,
                        image_size=config.image_size, channels=config.channels)


def _resumed_config(resume: str | os.PathLike) -> TrainConfig:
    return read_config(RunPaths(resolve_run(resume)).config)
