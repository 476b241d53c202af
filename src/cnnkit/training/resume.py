"""Reproducible and resumable runs: seeding, deterministic kernels, and the training state
a run saves after every epoch (and every ``checkpoint_minutes`` within one) so that
``--resume`` continues it to the same result.

What continuing needs beyond the weights: the optimizer's moments, the schedule's step,
the gradient scaler, the EMA, the RNG (dropout draws) and the metrics history, saved
pickle-free by :func:`cnnkit.run.checkpoint.save_state` (:func:`capture`) and put back
by :func:`restore`. The data loader's shuffling and augmentation are pure functions of
(seed, epoch), so with the RNG restored a resumed run equals an uninterrupted one.

A state saved within an epoch (:func:`save_within_epoch`) adds the ``step`` reached and, for
every rank, what the rest of the epoch continues from: the epoch's running sums, the RNG and
the loader's augmentation stream. The next epoch-end state replaces it (it has no ``step``).

A resume may also change how long and how fast the run learns (``RESUME_OPTIONS``: after
a NaN loss, the learning rate and gradient clipping its message names): the changes are
checked, applied to the restored state and recorded (``resumes`` in the state and in
``summary.json``; ``config.yaml`` holds the new values).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cnnkit.data.shards import all_reduce_sum, gather_shards
from cnnkit.run import RunPaths, TrainConfig, is_unstarted, read_config, resolve_run
from cnnkit.run.checkpoint import load_state, read_header, save_state

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["seed_everything", "deterministic_algorithms", "resume_config", "capture", "restore",
           "saved_header", "save_due", "save_within_epoch", "rank_share"]

# What each rank's share of a state saved within an epoch holds (besides its RNG streams).
_SUMS = ("loss_sum", "correct", "seen", "counted", "elapsed")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Deterministic kernels (warn-only) while training, the caller's settings afterwards:
    a process that trains and then benchmarks or quantises must not keep the slow ones."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def resume_config(resume: str | os.PathLike, config: TrainConfig | None,
                  overrides: dict[str, Any] | None) -> tuple[Path, TrainConfig, dict[str, list]]:
    """The run folder, its saved config with ``overrides`` applied, and what changed.

    ``config`` (the older way to train longer) contributes its ``epochs`` if larger.

    Raises:
        FileNotFoundError: no such run, or a run with weights but no training state.
        ValueError: a damaged config, or an option a resume may not change.
    """
    root = resolve_run(resume, config.runs_dir if config else "runs")
    saved = read_config(RunPaths(root).config)
    overrides = dict(overrides or {})
    if config is not None and config.epochs > saved.epochs:
        overrides.setdefault("epochs", config.epochs)
    if not RunPaths(root).state.is_file() and not is_unstarted(root):
        raise FileNotFoundError(f"run {str(root)!r} has weights but no train_state.safetensors, "
                                "which --resume needs; evaluate the run as it is, or start a "
                                "new run")
    config, changes = saved.with_overrides(overrides)
    return root, config, changes


def capture(trainer: Trainer) -> dict[str, Any]:
    """Everything :func:`restore` needs, as :func:`~cnnkit.run.checkpoint.save_state`
    stores it."""
    rng = {"torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.device)
    return {"epoch": trainer.epoch, "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "ema": None if trainer.ema is None else
            {"state": trainer.ema.state, "updates": trainer.ema.updates},
            "rng": rng, "history": trainer.history, "best_acc": trainer.best_score,
            "best_epoch": trainer.best_epoch, "bad_epochs": trainer.bad_epochs,
            "resumes": trainer.resumes}


def restore(trainer: Trainer) -> None:
    """Put the run's saved training state back into ``trainer`` (built from the run's
    config), then apply and record the resume's changes.

    Raises:
        ValueError: the data changed since the run started, or the state file does not fit
            the run (damaged, or from another run).
    """
    paths = trainer.paths
    # A state saved within the first epoch has no weights file beside it: it holds their
    # metadata itself.
    s = None if paths.last.is_file() else load_state(paths.state)
    meta = read_header(paths.last)[1] if s is None else s.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    prep = trainer.preprocess
    if meta.get("classes") != prep.classes or \
            list(meta.get("input_size", [])) != list(prep.input_size):
        raise ValueError(
            f"the data of run {str(paths.root)!r} changed since it started (classes "
            f"{meta.get('classes')} at {meta.get('input_size')}, now {prep.classes} at "
            f"{list(prep.input_size)}); resume needs the same data: restore it or start a new "
            "run")
    s = s if s is not None else load_state(paths.state)
    try:
        trainer.model.load_state_dict(s["model"])
        trainer.optimizer.load_state_dict(s["optimizer"])
        trainer.scheduler.load_state_dict(s["scheduler"])
        if s["scaler"] and trainer.scaler.is_enabled():
            trainer.scaler.load_state_dict(s["scaler"])
        if trainer.ema is not None and s["ema"] is not None:
            trainer.ema.state = {k: v.to(trainer.device) for k, v in s["ema"]["state"].items()}
            trainer.ema.updates = s["ema"]["updates"]
        torch.set_rng_state(s["rng"]["torch"])
        if "cuda" in s["rng"] and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(s["rng"]["cuda"], trainer.device)
        trainer.epoch, trainer.history = int(s["epoch"]), list(s["history"])
        best = s["best_acc"]  # the headline metric's best (the key kept for older states)
        trainer.best_score = None if best is None else float(best)
        trainer.best_epoch = int(s["best_epoch"])
        trainer.bad_epochs = int(s["bad_epochs"])
        trainer.resumes = list(s.get("resumes", []))
        step = int(s.get("step", 0))  # > 0: saved within the epoch, after that many steps
        trainer.partial = None
        if step:
            if not 0 < step < len(trainer.train_loader):
                raise ValueError(f"step {step} is outside an epoch of "
                                 f"{len(trainer.train_loader)} steps")
            ranks = [{k: r[k] for k in (*_SUMS, *(k for k in ("rng", "cuda_rng", "augment")
                                                    if k in r))} for r in s["ranks"]]
            trainer.partial = {"step": step, "ranks": ranks}
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ValueError(f"{paths.state} does not fit run {str(paths.root)!r} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); the file is "
                         "damaged or from another run: start the run again") from e
    if trainer.changes:
        _apply_changes(trainer)


def _apply_changes(trainer: Trainer) -> None:
    """Apply a resume's new options to the restored state and record them: a new peak
    learning rate rescales the schedule from the current step on."""
    config, scheduler = trainer.config, trainer.scheduler
    if config.epochs < trainer.epoch:
        raise ValueError(f"run {str(trainer.paths.root)!r} has trained {trainer.epoch} epochs "
                         f"already; give --epochs {trainer.epoch} or more")
    if "lr" in trainer.changes:
        lr = config.resolved_lr
        scheduler.base_lrs = [lr] * len(trainer.optimizer.param_groups)
        for group, factor in zip(trainer.optimizer.param_groups, scheduler.lr_lambdas,
                                 strict=True):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(scheduler.last_epoch)
    where = {"step": trainer.partial["step"]} if trainer.partial else {}
    trainer.resumes.append({"epoch": trainer.epoch, **where, "changed": trainer.changes})


def saved_header(paths: RunPaths) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """The tensor shapes and metadata of a run's last weights, or, for a run stopped within
    its first epoch (no weights file yet), of the model in its training state.

    Raises:
        FileNotFoundError: neither file exists.
        ValueError: a damaged file.
    """
    if paths.last.is_file() or not paths.state.is_file():
        return read_header(paths.last)
    s = load_state(paths.state)
    model, meta = s.get("model"), s.get("meta")
    if not isinstance(model, dict) or not isinstance(meta, dict) or not all(
            isinstance(v, torch.Tensor) for v in model.values()):
        raise ValueError(f"{paths.state} holds no model and metadata; the file is damaged or "
                         "from another run: start the run again")
    return {k: tuple(v.shape) for k, v in model.items()}, meta


def save_due(due: bool, bad: Callable[[], bool], trainer: Trainer) -> bool:
    """Whether to save the state within the epoch now: rank 0's clock says ``due`` and no
    rank's loss went non-finite (``bad()``, asked only when a save is due: on a GPU it waits
    for the device; a state saved after a NaN would replace the last good one). Under
    several processes a collective, which every rank calls at the same steps."""
    if not trainer.dist.enabled:
        return due and not bad()
    flags = torch.tensor([float(due and trainer.dist.is_main), float(bad())],
                         dtype=torch.float64, device=trainer.device)
    due_total, bad_total = all_reduce_sum(flags).tolist()
    return due_total > 0 and bad_total == 0


def save_within_epoch(trainer: Trainer, step: int, sums: dict[str, Any]) -> None:
    """Save the training state after ``step`` steps of the epoch in progress: what
    :func:`capture` saves, the weights' metadata, ``step`` and, for every rank, ``sums``
    (the epoch's running ``loss_sum``, ``correct``, ``seen``, ``counted`` and ``elapsed``
    seconds), its RNG and its loader's augmentation stream. A collective under several
    processes (the ranks' shares are gathered); rank 0 writes."""
    mine = {**sums, "rng": torch.get_rng_state(),
            "augment": trainer.train_loader.augment_state()}
    if trainer.device.type == "cuda":
        mine["cuda_rng"] = torch.cuda.get_rng_state(trainer.device)
    ranks = _gather(mine) if trainer.dist.enabled else [mine]
    if trainer.dist.is_main:
        save_state(trainer.paths.state, {**capture(trainer), "step": step,
                                         "meta": trainer.meta, "ranks": ranks})


def _gather(mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``mine`` (tensors and numbers of the same shapes on every rank), in rank
    order."""
    gathered = {}
    for key, value in mine.items():
        t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value),
                                                                        dtype=torch.float64)
        gathered[key] = gather_shards(t.reshape(1, -1))
    return [{k: (rows[r].reshape(v.shape) if isinstance(v, torch.Tensor) else
                 type(v)(rows[r].item())) for (k, rows), v in zip(gathered.items(),
                                                                 mine.values(), strict=True)}
            for r in range(len(next(iter(gathered.values()))))]


def rank_share(partial: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's part of a state saved within an epoch: its own share when the run
    resumes under as many processes; else the sums, all on rank 0, and no RNG streams
    (the per-rank streams differ under another process count anyway)."""
    ranks = partial["ranks"]
    if len(ranks) == world_size:
        return ranks[rank]
    if rank:
        return {"loss_sum": torch.zeros_like(ranks[0]["loss_sum"]),
                "correct": torch.zeros_like(ranks[0]["correct"]), "seen": 0, "counted": 0,
                "elapsed": ranks[0]["elapsed"]}
    total = {k: sum(r[k] for r in ranks) for k in ("loss_sum", "correct", "seen", "counted")}
    return {**total, "elapsed": ranks[0]["elapsed"]}
