"""Run folders: their layout, claiming one for a new run, locking one to resume it.

A run folder ``runs/<name>/`` holds:

* ``config.yaml``: the resolved :class:`TrainConfig`;
* ``model.safetensors``: the best weights (by validation accuracy), with the model's
  name, options, classes and preprocessing in the safetensors metadata;
* ``model_last.safetensors``: the weights after the last finished epoch;
* ``train_state.safetensors``: optimizer, schedule, EMA, RNG and history, for ``--resume``;
* ``metrics.jsonl``: one JSON line per epoch;
* ``summary.json``: final test metrics (``test_accuracy``) and ``input_size`` [C, H, W];
* ``report.html``: curves, confusion matrix and sample predictions, self-contained.

:func:`cnnkit.run.load_run` reads one back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cnnkit._files import (
    LOCK_NAME,
    FolderLock,
    exists,
    free_names,
    is_temporary,
    remove_temporaries,
)

from .checkpoint import atomic_write
from .config import TrainConfig

__all__ = ["RunPaths", "RunFolder", "claim_run_folder", "open_run_folder", "is_unstarted",
           "read_config", "resolve_run", "write_json", "write_yaml"]


@dataclass(frozen=True)
class RunPaths:
    """The files of a run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def last(self) -> Path:
        return self.root / "model_last.safetensors"

    @property
    def int8(self) -> Path:
        return self.root / "model_int8.safetensors"

    @property
    def state(self) -> Path:
        return self.root / "train_state.safetensors"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


# Files a run that died before its first epoch may have left: its folder can be taken over.
# What a run may have written before its first epoch was recorded (an epoch writes its
# weights, then train_state.safetensors, then metrics.jsonl): a folder holding no more
# than this is a run killed early, which a re-run of its name takes over and --resume
# starts afresh.
_BEFORE_FIRST_EPOCH = frozenset({"config.yaml", "model.safetensors", "model_last.safetensors",
                                 LOCK_NAME})


@dataclass
class RunFolder:
    """A run folder this process writes, with its :class:`~cnnkit._files.FolderLock` held
    until :meth:`release` (or the process's end): no second process writes into it."""

    path: Path
    lock: FolderLock
    created: tuple[Path, ...] = ()  # folders made for it (it, then missing parents)

    def release(self) -> None:
        self.lock.release()

    def abandon(self) -> None:
        """Release the folder and remove what was made for it, if the run wrote nothing
        into it (it failed while setting up): a run that never started leaves no trace."""
        if self.path.is_dir() and {p.name for p in self.path.iterdir()} <= {LOCK_NAME}:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            for folder in self.created:
                try:
                    folder.rmdir()  # only while empty: a parent with other runs stays
                except OSError:
                    break
        self.release()


def is_unstarted(path: Path) -> bool:
    """A folder holding nothing but what a run writes before its first epoch is recorded
    (or nothing): a run killed early, which a new run of the same name may take over."""
    try:
        names = {p.name for p in path.iterdir()}
    except (NotADirectoryError, FileNotFoundError):
        return False
    return all(n in _BEFORE_FIRST_EPOCH or is_temporary(n) for n in names)


def claim_run_folder(runs_dir: str | os.PathLike, name: str, *, next_free: bool = True
                     ) -> RunFolder:
    """Create (or take over) the folder of a new run, atomically, and lock it.

    ``runs_dir/name`` is created exclusively; if it exists it is taken over only when it
    holds a run that never finished an epoch and no live process writes it (its lock is
    free): what that run left is removed. Otherwise, with ``next_free``, the first free
    ``name-2``, ``name-3`` ... is taken the same way, so two runs started together with
    one name end in two folders.

    Raises:
        FileExistsError: ``next_free`` is False and the folder exists and is not free.
    """
    base = Path(runs_dir) / name
    missing = [p for p in (base.parent, *base.parent.parents) if not p.exists()]
    base.parent.mkdir(parents=True, exist_ok=True)
    for path in free_names(base):
        try:
            path.mkdir()
            created = True
        except FileExistsError:
            if not is_unstarted(path):
                if not next_free:
                    raise
                continue
            created = False
        lock = FolderLock(path)
        if lock.acquire() and (created or is_unstarted(path)):  # re-checked under the lock
            if not created:
                for p in path.iterdir():
                    if p.name != LOCK_NAME:
                        p.unlink(missing_ok=True)
            return RunFolder(path, lock, (path, *missing) if created else ())
        lock.release()
        if not next_free:
            raise exists(path)
    raise AssertionError("unreachable")  # pragma: no cover


def open_run_folder(root: Path) -> RunFolder:
    """Lock an existing run folder for ``--resume`` and remove the temporaries that a
    killed write left in it.

    Raises:
        ValueError: another process is writing the run.
    """
    lock = FolderLock(root)
    if not lock.acquire():
        raise ValueError(f"run {str(root)!r} is being written by another cnnkit process (pid "
                         f"{lock.owner() or '?'}); wait for it to end, or stop it, then resume")
    remove_temporaries(root)
    return RunFolder(root, lock)


def resolve_run(run: str | os.PathLike, runs_dir: str | os.PathLike = "runs") -> Path:
    """A run folder from a path or a name inside ``runs_dir``; FileNotFoundError otherwise."""
    for cand in (Path(run), Path(runs_dir) / str(run)):
        if (cand / "config.yaml").is_file():
            return cand
    hint = "it has no config.yaml" if Path(run).is_dir() else "no such folder"
    raise FileNotFoundError(f"run {str(run)!r} not found ({hint}); give the folder that "
                            "`cnnkit train` wrote, e.g. runs/<name>")


def read_config(path: Path) -> TrainConfig:
    """A run's ``config.yaml`` (``yaml.safe_load``: no code runs), every key checked.

    Raises:
        ValueError: not YAML (a ``!!python`` tag included), not a mapping, an unknown key,
            or a value of the wrong type or range: one line naming the file and the key.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid cnnkit config ({one_line(e)}); restore it "
                         "from a backup or retrain the run") from e
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {one_line(e)}; correct it (cnnkit train wrote the file) or "
                         "retrain the run") from e


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def write_yaml(path: Path, data: dict) -> None:
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")
