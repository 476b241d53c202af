"""Metric loggers: each epoch's metrics, besides ``metrics.jsonl``, to the tools users watch.

A logger is registered under a name (``--logger NAME``, ``TrainConfig.loggers``) with the
module it needs, if any. The Trainer checks every named logger before it loads any data
(:func:`check_loggers`: an unknown name or a missing package is one line with the install
command), opens them on rank 0 when the epochs start (:func:`open_loggers`, given the
epochs already run so a resumed run's files are whole) and hands each the dict it writes
to ``metrics.jsonl``, once per epoch.

=============  ==========================================================================
``csv``        ``metrics.csv`` in the run folder, one row per epoch (written atomically)
``tensorboard`` ``RUN/tensorboard/`` event files (``torch.utils.tensorboard``; needs the
               ``tensorboard`` package: ``pip install -e ".[loggers]"``)
``mlflow``     an MLflow run named after the run folder (``pip install mlflow``)
``wandb``      a Weights & Biases run named after the run folder (``pip install wandb``)
=============  ==========================================================================

Example:
    >>> from cnnkit.training.loggers import open_loggers
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> with open_loggers(["csv"], folder) as log:
    ...     log({"epoch": 1, "train_loss": 0.5})
    >>> (folder / "metrics.csv").read_text().splitlines()
    ['epoch,train_loss', '1,0.5']
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cnnkit._files import atomic_write

__all__ = ["MetricLogger", "register_logger", "list_loggers", "check_loggers", "open_loggers"]


class MetricLogger(Protocol):
    """What a registered logger's factory returns."""

    def log(self, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Entry:
    factory: Callable[[Path, list[dict]], MetricLogger]
    requires: str | None  # the module it imports (the package of the logger's name)
    install: str | None  # how to install it


_LOGGERS: dict[str, _Entry] = {}


def register_logger(name: str, *, requires: str | None = None, install: str | None = None):
    """Register a logger factory ``f(run_folder, history) -> MetricLogger`` under ``name``
    (``history``: the metrics of the epochs already run, for a resumed run).

    Raises:
        ValueError: ``name`` is registered already.
    """

    def deco(factory: Callable[[Path, list[dict]], MetricLogger]):
        if name in _LOGGERS:
            raise ValueError(f"logger {name!r} is registered twice; rename one of them")
        _LOGGERS[name] = _Entry(factory, requires, install)
        return factory

    return deco


def list_loggers() -> list[str]:
    """The registered logger names, sorted.

    Example:
        >>> from cnnkit.training.loggers import list_loggers
        >>> list_loggers()
        ['csv', 'mlflow', 'tensorboard', 'wandb']
    """
    return sorted(_LOGGERS)


def check_loggers(names: Sequence[str]) -> None:
    """Refuse an unknown logger, or one whose package is not installed, before a run starts.

    Raises:
        ValueError: one line naming the logger and the fix (the valid names, or the
            install command).
    """
    for name in names:
        if name not in _LOGGERS:
            raise ValueError(f"unknown logger {name!r}; choose from {', '.join(list_loggers())} "
                             "(--logger NAME, repeatable)")
        entry = _LOGGERS[name]
        if entry.requires is None:
            continue
        try:
            importlib.import_module(entry.requires)  # lazy: optional dependency
        except ImportError as e:
            raise ValueError(f"--logger {name} needs the {name} package, which cannot be "
                             f"imported ({' '.join(str(e).split())}); install it "
                             f"({entry.install}) or drop --logger {name}") from None


@contextlib.contextmanager
def open_loggers(names: Sequence[str], folder: Path,
                 history: list[dict] | None = None) -> Iterator[Callable[[dict], None]]:
    """The loggers ``names`` writing for the run in ``folder``, as one function of an
    epoch's metrics; all closed when the block ends."""
    check_loggers(names)
    opened: list[MetricLogger] = []
    try:
        for name in names:
            opened.append(_LOGGERS[name].factory(Path(folder), list(history or [])))

        def log(metrics: dict[str, Any]) -> None:
            for logger in opened:
                logger.log(metrics)

        yield log
    finally:
        for logger in opened:
            logger.close()


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of an epoch's metrics, without the epoch itself."""
    return {k: float(v) for k, v in metrics.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


@register_logger("csv")
class _Csv:
    """``metrics.csv``: a header of every key seen so far, one row per epoch; rewritten
    whole and atomically each epoch, as ``metrics.jsonl`` is."""

    def __init__(self, folder: Path, history: list[dict]) -> None:
        self.path, self.rows = folder / "metrics.csv", list(history)

    def log(self, metrics: dict[str, Any]) -> None:
        self.rows.append(dict(metrics))
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, out.getvalue())

    def close(self) -> None:
        pass


@register_logger("tensorboard", requires="torch.utils.tensorboard",
                 install='pip install -e ".[loggers]"')
class _TensorBoard:
    """Scalars under ``RUN/tensorboard`` (``tensorboard --logdir runs``)."""

    def __init__(self, folder: Path, history: list[dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def log(self, metrics: dict[str, Any]) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, int(metrics["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@register_logger("mlflow", requires="mlflow", install="pip install mlflow")
class _MLflow:
    """An MLflow run (its tracking URI from ``MLFLOW_TRACKING_URI``, else ``./mlruns``)."""

    def __init__(self, folder: Path, history: list[dict]) -> None:
        self.mlflow = importlib.import_module("mlflow")  # lazy: optional dependency
        self.run = self.mlflow.start_run(run_name=folder.name)
        self.mlflow.log_param("run_folder", str(folder))

    def log(self, metrics: dict[str, Any]) -> None:
        self.mlflow.log_metrics(_scalars(metrics), step=int(metrics["epoch"]))

    def close(self) -> None:
        self.mlflow.end_run()


@register_logger("wandb", requires="wandb", install="pip install wandb")
class _Wandb:
    """A Weights & Biases run in project ``cnnkit`` (``WANDB_PROJECT`` to change)."""

    def __init__(self, folder: Path, history: list[dict]) -> None:
        wandb = importlib.import_module("wandb")  # lazy: optional dependency
        self.run = wandb.init(project="cnnkit", name=folder.name, dir=str(folder),
                              config={"run_folder": str(folder)})

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log(_scalars(metrics), step=int(metrics["epoch"]))

    def close(self) -> None:
        self.run.finish()
