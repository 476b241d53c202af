"""The Trainer: from a :class:`TrainConfig` to a finished run folder.

The loop (one epoch: :mod:`cnnkit.training.epoch`) is a plain PyTorch loop with nothing on
its hot path that a hand-written loop would not have; batches come from in-memory
tensors (``cnnkit.data.TensorLoader``). ``bench/train_throughput.py`` measures it
against a hand-written loop. Resuming: :mod:`cnnkit.training.resume`; the end of a run
(testing, ``summary.json``, the report): :mod:`cnnkit.training.finish`.

The same loop runs data-parallel under torchrun (``cnnkit.training.distributed``): the
training step calls the model through ``DistributedDataParallel``, each rank takes its
share of every global batch, metrics are reduced across ranks, and rank 0 alone writes
the run folder. The fast paths (``cnnkit.training.fast``: ``torch.compile`` with an eager
fallback, channels_last, bf16 autocast, fused optimiser steps) are options of the config.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cnnkit._files import atomic_write
from cnnkit.data import Samples, TensorLoader, channel_stats, load_data, split_indices
from cnnkit.data.arrays import IN_MEMORY
from cnnkit.models import create_model, model_info
from cnnkit.run import (
    Preprocess,
    RunFolder,
    RunPaths,
    TrainConfig,
    claim_run_folder,
    open_run_folder,
    write_yaml,
)
from cnnkit.run.checkpoint import save_state, save_weights
from cnnkit.run.weights import build_model, check_belongs, check_meta, check_rebuildable, run_meta
from cnnkit.tasks import create_task
from cnnkit.tasks.classify import evaluate_classify

from . import distributed as ddp
from .budget import check_run_memory
from .device import resolve_amp
from .epoch import NonFiniteLossError, train_epoch
from .estimate import RunEstimate
from .fast import try_compile
from .finish import finish_run
from .loggers import check_loggers, open_loggers
from .optim import ModelEma, build_optimizer, build_scheduler
from .resume import (
    capture,
    deterministic_algorithms,
    restore,
    resume_config,
    saved_header,
    seed_everything,
)
from .sync_bn import convert_sync_batchnorm

__all__ = ["Trainer", "NonFiniteLossError", "evaluate"]


def evaluate(model: nn.Module, loader, device: torch.device, amp: torch.dtype | None = None,
             label_smoothing: float = 0.0) -> dict[str, Any]:
    """Loss, accuracy, predictions, probabilities and targets of a classifier over ``loader``."""
    return evaluate_classify(model, loader, device, amp, label_smoothing)


class Trainer:
    """Train a registered model on a built-in or user data set.

    Args:
        config: the run's configuration.
        resume: a run folder to continue; its saved config is used, changed only by
            ``overrides`` (a run that never finished an epoch simply starts).
        progress: show a progress bar (None: only when stderr is a terminal).
        callbacks: functions ``f(trainer, epoch, metrics)`` called after each epoch.
        model: start from this model instead of a fresh ``create_model(config.model)``
            (fine-tuning a pruned model: its ``pruning_history`` is saved with its
            weights, so :func:`cnnkit.load_run` rebuilds it without pickling).
        regularizer: ``f(model) -> scalar tensor`` added to every training step's loss
            (and so to the logged ``train_loss``), e.g. a
            :class:`cnnkit.compress.schedule.MaskSparsity` penalty.
        overrides: with ``resume``, options of :data:`~cnnkit.run.config.RESUME_OPTIONS`
            to change (``{"lr": 0.01, "grad_clip": 1.0}`` after a NaN loss); the changes
            are written to ``config.yaml`` and listed in the state and ``summary.json``
            under ``resumes``.
        run_folder: a folder the caller created and locked for this run (``cnnkit
            compress --out``); by default the Trainer claims ``runs_dir/name`` (or the
            next free name) itself.
        data: train on these samples (``cnnkit.train(data=(x, y))``, made by
            :func:`cnnkit.data.arrays.samples_from`) instead of loading ``config.data``,
            which is then ``"<in-memory>"``.

    Attributes:
        model: the model itself: evaluated, averaged (EMA) and saved.
        train_model: what the training step calls: ``model``, wrapped in
            ``DistributedDataParallel`` under several processes, compiled with
            ``compile=True``.
        dist: this process's rank and the number of processes
            (:class:`cnnkit.training.distributed.DistInfo`).

    Under torchrun every process builds a Trainer with the same arguments; callbacks
    run on every rank, with the reduced metrics.

    Example:
        >>> from cnnkit.training import Trainer, TrainConfig
        >>> cfg = TrainConfig(model="lenet5", data="digits", epochs=1, runs_dir="/tmp/r")
        >>> summary = Trainer(cfg, progress=False).fit()  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig | None = None, *, resume: str | Path | None = None,
                 progress: bool | None = None,
                 callbacks: list[Callable[[Trainer, int, dict], None]] | None = None,
                 model: nn.Module | None = None,
                 regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
                 overrides: dict[str, Any] | None = None,
                 run_folder: RunFolder | None = None, data: Samples | None = None) -> None:
        self.folder: RunFolder | None = None  # the locked run folder (rank 0 only)
        self.changes: dict[str, list] = {}
        if resume is not None:
            root, config, self.changes = resume_config(resume, config, overrides)
            self.paths = RunPaths(root)
            self.dist, self.device = ddp.setup(config.device)
            if self.dist.is_main:
                self.folder = open_run_folder(root)
        else:
            if overrides:
                raise ValueError("overrides= changes a resumed run; give a new run's options "
                                 "in its TrainConfig")
            config = config or TrainConfig()
            self.dist, self.device = ddp.setup(config.device)
            if self.dist.is_main:  # rank 0 claims the folder; the others learn its name
                stem = "memory" if config.data == IN_MEMORY else Path(config.data).stem
                name = config.name or f"{config.model}-{stem or 'data'}"
                self.folder = run_folder or claim_run_folder(config.runs_dir, name)
            root = str(self.folder.path) if self.folder is not None else ""
            self.paths = RunPaths(Path(ddp.broadcast_text(root)))
        self.config = config
        # A run killed before its first epoch has no state: resuming it starts it.
        self.resuming = resume is not None and self.paths.state.is_file()
        self.progress = progress
        self.callbacks = list(callbacks or [])
        self._init_model = model
        self._init_data = data
        self.regularizer = regularizer
        try:
            self._setup()
        except BaseException:
            if self.folder is not None and resume is None and run_folder is None:
                self.folder.abandon()
            self.release()
            raise

    def release(self) -> None:
        """Give up the run folder's lock (done by :meth:`fit` when it ends)."""
        if self.folder is not None:
            self.folder.release()

    # -- setup -----------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.config
        check_loggers(cfg.loggers)  # a missing package is news before the data loads
        task = self.task = create_task(cfg.task, cfg)
        info = model_info(cfg.model)
        if info.task != task.models:
            raise ValueError(f"model {cfg.model!r} is a {info.task} model but the task is "
                             f"{task.name}; pass --task {info.task}, or pick a {task.models} model "
                             f"(`cnnkit models --task {task.models}`)")
        seed_everything(cfg.seed)
        if cfg.image_size is not None and self._init_model is None:  # before any data
            s = cfg.image_size  # a stand-in of the data's size: the model and batch fit?
            check_run_memory(cfg, task, SimpleNamespace(input_size=(cfg.channels or 1, s, s),
                                                        classes=["a", "b"],
                                                        mask_classes=["a", "b"]))
        data = self._init_data if self._init_data is not None else load_data(
            cfg.data, image_size=cfg.image_size, channels=cfg.channels, strict=cfg.strict,
            seed=cfg.seed, targets=task.data_targets, **cfg.data_options)
        self.data = data
        self.amp = resolve_amp(cfg.amp, self.device, len(data.input_size) - 1)
        self.split = split_indices(data.labels, cfg.split, seed=cfg.seed)
        train_idx, val_idx, test_idx = self.split
        if min(len(train_idx), len(val_idx), len(test_idx)) == 0:
            raise ValueError(f"data {cfg.data!r} has {len(data)} samples, too few to split into "
                             f"training, validation and test sets ({len(train_idx)}, "
                             f"{len(val_idx)}, {len(test_idx)}); give at least 3 samples of every "
                             "class (dozens to learn anything)")
        world = self.dist.world_size
        if world > 1 and min(len(val_idx), len(test_idx)) < world:
            raise ValueError(f"the validation or test split has fewer images ({len(val_idx)}, "
                             f"{len(test_idx)}) than the {world} processes; use fewer processes")
        mean, std = channel_stats(data.images[train_idx])
        std = [s if s > 0 else 1.0 for s in std]  # a constant channel: centre it, do not scale
        self.preprocess = Preprocess(tuple(data.input_size), mean, std, task.classes(data),
                                     task.name)
        augment = task.augment(data) if cfg.augment == "auto" else cfg.augment
        if self._init_model is None and self.resuming:  # a compressed run resumes compressed
            shapes, meta = saved_header(self.paths)
            check_meta(meta, self.paths.last)
            check_belongs(meta, cfg, self.paths.last, self.paths.config)
            if meta.get("pruning_history") or meta.get("lowrank_history"):
                self._init_model = build_model(meta, shapes, self.paths.last)
        if self._init_model is not None:
            self.model = self._init_model.to(self.device)
            check_rebuildable(self.model, self.meta)
        else:
            check_run_memory(cfg, task, data)
            self.model = create_model(cfg.model, **task.model_kwargs(data),
                                      **cfg.model_kwargs).to(self.device)
        # Dense models take sizes that are multiples of their stride: pad (or crop) once.
        shaped = task.prepare(data, getattr(self.model, "size_multiple", 1))
        targets = task.targets(shaped)

        def loader(idx: torch.Tensor, train: bool) -> TensorLoader:
            return TensorLoader(shaped.images[idx], targets[idx], cfg.batch_size,
                                shuffle=train, drop_last=train and len(idx) > cfg.batch_size,
                                mean=mean, std=std, augment=augment if train else "none",
                                seed=cfg.seed, device=self.device,
                                channels_last=cfg.channels_last, rank=self.dist.rank,
                                world_size=world, **task.loader_kwargs())

        self.train_loader = loader(train_idx, True)
        self.val_loader, self.test_loader = loader(val_idx, False), loader(test_idx, False)
        if cfg.channels_last:  # the loaders hand out channels_last batches to match
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.dist.enabled:
            self.model = convert_sync_batchnorm(self.model, self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema else None
        self.criterion = task.criterion()
        self.epoch, self.history, self.resumes = 0, [], []
        self.best_score, self.best_epoch, self.bad_epochs = None, 0, 0
        self.partial: dict[str, Any] | None = None  # a state saved within an epoch, restored
        self.estimate: RunEstimate | None = None  # the run's length, timed by fit()
        if self.resuming:
            restore(self)
        # DDP broadcasts rank 0's weights at wrapping; compile wraps the DDP module, so
        # graph breaks fall at DDP's gradient buckets (TorchDynamo's DDPOptimizer).
        self._eager_model = ddp.wrap_ddp(self.model, self.device)
        self.train_model = self._eager_model
        compiled = try_compile(self._eager_model) if cfg.compile else None
        self._compile_pending = compiled is not None
        if compiled is not None:
            self.train_model = compiled

    @property
    def meta(self) -> dict[str, Any]:
        """Metadata saved inside every weights file: enough to rebuild the model."""
        return run_meta(self.config, self.preprocess, self.model)

    # -- state for resume (cnnkit.training.resume) ---------------------------------------------

    def _eval_weights(self) -> dict[str, torch.Tensor]:
        return self.ema.state if self.ema is not None else self.model.state_dict()

    def _train_epoch(self, bar: tqdm) -> dict[str, float]:
        """One epoch (:func:`cnnkit.training.epoch.train_epoch`); a method, so a benchmark can
        time it on one trainer."""
        return train_epoch(self, bar)

    def _evaluate(self, loader) -> dict[str, Any]:
        if self.dist.enabled:
            # Each rank's forward updated its own BatchNorm statistics; all evaluate (and
            # rank 0 saves) rank 0's, as DDP itself broadcasts them before each forward.
            ddp.broadcast_(self.model.buffers())
            if self.ema is not None:
                ddp.broadcast_(self.ema.state.values())
        if self.ema is None:
            return self.task.evaluate(self.model, loader, self.device, self.amp)
        live = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema.state)
        try:
            return self.task.evaluate(self.model, loader, self.device, self.amp)
        finally:
            self.model.load_state_dict(live)

    def fit(self) -> dict[str, Any]:
        """Train (or continue) to the configured number of epochs; test the best weights.

        Returns:
            The contents of ``summary.json``.
        """
        try:
            return self._fit()
        finally:
            self.release()
            # Drop the DistributedDataParallel wrapper now, while its process group lives: a
            # Reducer freed after destroy_process_group() can deadlock the process's exit
            # (gloo's thread waits for the GIL the freeing thread holds).
            self.train_model = self._eager_model = self.model

    def _fit(self) -> dict[str, Any]:
        cfg, paths, main = self.config, self.paths, self.dist.is_main
        if main:  # rank 0 alone writes the run folder (claimed in __init__) and logs
            write_yaml(paths.config, cfg.to_dict())
        steps = len(self.train_loader)
        done = self.epoch * steps + (self.partial["step"] if self.partial else 0)
        bar = tqdm(total=cfg.epochs * steps, initial=done, unit="step",
                   disable=True if not main else None if self.progress is None
                   else not self.progress, dynamic_ncols=True, leave=False)
        log = bar.write if main else lambda *args, **kwargs: None
        if main:  # a long run says so after its first steps (estimate.py)
            self.estimate = RunEstimate(self, lambda line: log(line, file=sys.stderr))
        loggers = open_loggers(cfg.loggers, paths.root, self.history) if main else \
            contextlib.nullcontext()
        with deterministic_algorithms(cfg.deterministic), contextlib.closing(bar), \
                loggers as log_metrics:
            while self.epoch < cfg.epochs:
                bar.set_description(f"epoch {self.epoch + 1}/{cfg.epochs}")
                metrics = self._train_epoch(bar)
                val = self._evaluate(self.val_loader)
                self.epoch += 1
                key = self.task.metric
                metrics = {"epoch": self.epoch, **metrics, "val_loss": val["loss"],
                           f"val_{key}": val[key], "lr": self.optimizer.param_groups[0]["lr"]}
                self.history.append(metrics)
                improved = self.task.improved(val[key], self.best_score)
                if improved:
                    self.best_score, self.best_epoch, self.bad_epochs = val[key], self.epoch, 0
                else:
                    self.bad_epochs += 1
                if main:
                    if improved:
                        save_weights(paths.weights, self._eval_weights(), self.meta)
                    save_weights(paths.last, self._eval_weights(), self.meta)
                    save_state(paths.state, capture(self))
                    atomic_write(paths.metrics,
                                 "".join(json.dumps(m) + "\n" for m in self.history))
                    log_metrics(metrics)
                ddp.barrier()  # the epoch is on disk before any rank goes on (or stops)
                train_key = next(k for k in metrics if k.startswith("train_") and
                                 k != "train_loss")
                log(f"epoch {self.epoch:3d}/{cfg.epochs}  loss {metrics['train_loss']:.4f}  "
                    f"{train_key[6:]} {metrics[train_key]:.4f}  val_{key} {val[key]:.4f}  "
                    f"{metrics['samples_per_s']:.0f} samples/s", file=sys.stderr)
                for cb in self.callbacks:
                    cb(self, self.epoch, metrics)
                if cfg.early_stopping and self.bad_epochs >= cfg.early_stopping:
                    log(f"early stopping: no better val_{key} for {self.bad_epochs} epochs",
                        file=sys.stderr)
                    break
            bar.close()
            return finish_run(self)
