"""The Trainer: from a :class:`TrainConfig` to a finished run folder.

The loop is a plain PyTorch loop (forward, loss, backward, step) with nothing on
its hot path that a hand-written loop would not have: batches come from in-memory
tensors (``cnnkit.data.TensorLoader``), logging reads one scalar per step on CPU
and one per 32 steps on GPUs, and the progress bar redraws at most twice a second.
``bench/train_throughput.py`` measures it against a hand-written loop.

The same loop runs data-parallel under torchrun (``cnnkit.train.distributed``): the
training step calls the model through ``DistributedDataParallel``, each rank takes its
share of every global batch, metrics are reduced across ranks, and rank 0 alone writes
the run folder. The fast paths (``cnnkit.train.fast``: ``torch.compile`` with an eager
fallback, channels_last, bf16 autocast, fused optimiser steps) are options of the config.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as ddp
from .checkpoint import atomic_write, load_state, load_weights, save_state, save_weights
from .config import TrainConfig
from .device import autocast, resolve_amp
from .fast import first_step_with_fallback, try_compile
from .optim import ModelEma, build_optimizer, build_scheduler
from .run import (
    Preprocess,
    RunPaths,
    build_model,
    read_config,
    resolve_run,
    unique_run_dir,
    write_json,
    write_yaml,
)
from .tasks import evaluate_classify, get_task

__all__ = ["Trainer", "train", "NonFiniteLossError", "evaluate"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run folder keeps the last good checkpoint."""


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


def evaluate(model: nn.Module, loader, device: torch.device, amp: torch.dtype | None = None,
             label_smoothing: float = 0.0) -> dict[str, Any]:
    """Loss, accuracy, predictions, probabilities and targets of a classifier over ``loader``."""
    return evaluate_classify(model, loader, device, amp, label_smoothing)


class Trainer:
    """Train a registered model on a built-in or user data set.

    Args:
        config: the run's configuration.
        resume: a run folder to continue; its saved config is used (``epochs`` may be
            raised to train longer).
        progress: show a progress bar (None: only when stderr is a terminal).
        callbacks: functions ``f(trainer, epoch, metrics)`` called after each epoch.
        model: start from this model instead of a fresh ``create_model(config.model)``
            (fine-tuning a pruned model: its ``pruning_history`` is saved with its
            weights, so :func:`cnnkit.load_run` rebuilds it without pickling).
        regularizer: ``f(model) -> scalar tensor`` added to every training step's loss
            (and so to the logged ``train_loss``), e.g. a
            :class:`cnnkit.compress.schedule.MaskSparsity` penalty.

    Attributes:
        model: the model itself: evaluated, averaged (EMA) and saved.
        train_model: what the training step calls: ``model``, wrapped in
            ``DistributedDataParallel`` under several processes, compiled with
            ``compile=True``.
        dist: this process's rank and the number of processes
            (:class:`cnnkit.train.distributed.DistInfo`).

    Under torchrun every process builds a Trainer with the same arguments; callbacks
    run on every rank, with the reduced metrics.

    Example:
        >>> from cnnkit.train import Trainer, TrainConfig
        >>> cfg = TrainConfig(model="lenet5", data="digits", epochs=1, runs_dir="/tmp/r")
        >>> summary = Trainer(cfg, progress=False).fit()  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig | None = None, *, resume: str | Path | None = None,
                 progress: bool | None = None,
                 callbacks: list[Callable[[Trainer, int, dict], None]] | None = None,
                 model: nn.Module | None = None,
                 regularizer: Callable[[nn.Module], torch.Tensor] | None = None) -> None:
        if resume is not None:
            root = resolve_run(resume, config.runs_dir if config else "runs")
            saved = read_config(RunPaths(root).config)
            if config is not None and config.epochs > saved.epochs:
                saved.epochs = config.epochs
            config, self.paths = saved, RunPaths(root)
            if not self.paths.state.is_file():
                raise FileNotFoundError(f"run {str(root)!r} has no train_state.safetensors: it "
                                        "finished no epoch yet, so start it again without --resume")
            self.dist, self.device = ddp.setup(config.device)
        else:
            config = config or TrainConfig()
            self.dist, self.device = ddp.setup(config.device)
            name = config.name or f"{config.model}-{Path(config.data).stem or 'data'}"
            # Rank 0 picks the (unique) folder; the others must not pick "name-2".
            root = str(unique_run_dir(config.runs_dir, name)) if self.dist.is_main else ""
            self.paths = RunPaths(Path(ddp.broadcast_text(root)))
        self.config = config
        self.resuming = resume is not None
        self.progress = progress
        self.callbacks = list(callbacks or [])
        self._init_model = model
        self.regularizer = regularizer
        self._setup()

    # -- setup -----------------------------------------------------------------------------

    def _setup(self) -> None:
        from cnnkit.data import TensorLoader, channel_stats, load_data, split_indices
        from cnnkit.models import create_model, model_info

        cfg = self.config
        task = self.task = get_task(cfg)
        info = model_info(cfg.model)
        if info.task != task.name:
            raise ValueError(f"model {cfg.model!r} is a {info.task} model but the task is "
                             f"{task.name}; pass --task {info.task}, or pick a {task.name} model "
                             f"(`cnnkit models --task {task.name}`)")
        seed_everything(cfg.seed)
        self.amp = resolve_amp(cfg.amp, self.device)
        data = load_data(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                         strict=cfg.strict, seed=cfg.seed, task=task.name, **cfg.data_options)
        self.data = data
        self.split = split_indices(data.labels, cfg.split, seed=cfg.seed)
        train_idx, val_idx, test_idx = self.split
        world = self.dist.world_size
        if world > 1 and min(len(val_idx), len(test_idx)) < world:
            raise ValueError(f"the validation or test split has fewer images ({len(val_idx)}, "
                             f"{len(test_idx)}) than the {world} processes; use fewer processes")
        mean, std = channel_stats(data.images[train_idx])
        std = [s if s > 0 else 1.0 for s in std]  # a constant channel: centre it, do not scale
        c, h, w = data.input_size
        self.preprocess = Preprocess((c, h, w), mean, std, task.classes(data), task.name)
        augment = task.augment(data) if cfg.augment == "auto" else cfg.augment
        if self._init_model is None and self.resuming:  # a compressed run resumes compressed
            _, meta = load_weights(self.paths.last)
            if meta.get("pruning_history") or meta.get("lowrank_history"):
                self._init_model = build_model(meta)
        if self._init_model is not None:
            self.model = self._init_model.to(self.device)
            self._check_rebuildable()
        else:
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
            from .sync_bn import convert_sync_batchnorm

            self.model = convert_sync_batchnorm(self.model, self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema else None
        self.criterion = task.criterion()
        self.epoch, self.history = 0, []
        self.best_acc, self.best_epoch, self.bad_epochs = -1.0, 0, 0
        if self.resuming:
            self._load_state()
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
        kwargs = dict(self.config.model_kwargs)
        if self.task.name == "superres":
            kwargs["scale"] = self.config.scale
        meta = {"model": self.config.model, "model_kwargs": kwargs, **self.preprocess.to_dict()}
        for key in ("pruning_history", "lowrank_history"):  # how build_model rebuilds it
            if getattr(self.model, key, None):
                meta[key] = getattr(self.model, key)
        return meta

    def _check_rebuildable(self) -> None:
        """A model handed in must be one its run can rebuild (registry name and options, then
        recorded pruning / low-rank history), or the saved run would not load: refuse early."""
        try:
            ref = build_model(self.meta).state_dict()
        except ValueError:  # the history does not fit the named architecture
            ref = {}
        got = self.model.state_dict()
        if {k: tuple(v.shape) for k, v in ref.items()} != {k: tuple(v.shape) for k, v in
                                                            got.items()}:
            raise ValueError(
                f"the model given to Trainer(model=...) is not a {self.config.model!r} with "
                f"options {self.config.model_kwargs} plus its recorded compression history, so "
                "its run could not be reloaded; pass the registered model (or one made from it "
                "by cnnkit.compress.prune / decompose) and its name as config.model")

    # -- state for resume --------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": None if self.ema is None else
                {"state": self.ema.state, "updates": self.ema.updates},
                "rng": rng, "history": self.history, "best_acc": self.best_acc,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def _load_state(self) -> None:
        _, meta = load_weights(self.paths.last)
        if meta.get("classes") != self.preprocess.classes or \
                list(meta.get("input_size", [])) != list(self.preprocess.input_size):
            raise ValueError(
                f"the data of run {str(self.paths.root)!r} changed since it started (classes "
                f"{meta.get('classes')} at {meta.get('input_size')}, now "
                f"{self.preprocess.classes} at {list(self.preprocess.input_size)}); resume "
                "needs the same data: restore it or start a new run")
        s = load_state(self.paths.state)
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if s["scaler"]:
            self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None and s["ema"] is not None:
            self.ema.state = {k: v.to(self.device) for k, v in s["ema"]["state"].items()}
            self.ema.updates = s["ema"]["updates"]
        torch.set_rng_state(s["rng"]["torch"])
        if "cuda" in s["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["rng"]["cuda"], self.device)
        self.epoch, self.history = s["epoch"], s["history"]
        self.best_acc, self.best_epoch = s["best_acc"], s["best_epoch"]
        self.bad_epochs = s["bad_epochs"]

    def _eval_weights(self) -> dict[str, torch.Tensor]:
        return self.ema.state if self.ema is not None else self.model.state_dict()

    # -- the loop ------------------------------------------------------------------------------

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.amp):
            out = self.train_model(x)
            loss = self.criterion(out, y)
            if self.regularizer is not None:
                loss = loss + self.regularizer(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return out, loss

    def _use_eager(self) -> None:
        self.train_model = self._eager_model

    def _train_epoch(self, bar: tqdm) -> dict[str, float]:
        cfg, model, device, dist = self.config, self.model, self.device, self.dist
        model.train()
        self.train_loader.set_epoch(self.epoch)
        if dist.enabled:  # dropout & co.: a per-rank stream, a pure function of the epoch
            torch.manual_seed(ddp.rank_seed(cfg.seed, self.epoch, dist.rank))
        check_every = 1 if device.type == "cpu" else 32
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen, counted, t0, last_draw, bad_step = 0, 0, time.perf_counter(), 0.0, math.inf
        tag = {"accuracy": "acc", "miou": "pix_acc", "psnr": "psnr"}[self.task.metric]
        for step, (x, y) in enumerate(self.train_loader):
            if self._compile_pending:
                out, loss = first_step_with_fallback(
                    functools.partial(self._forward_backward, x, y), model, self._use_eager)
                self._compile_pending = False
            else:
                out, loss = self._forward_backward(x, y)
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(model)
            loss_sum += loss.detach() * len(y)
            score, count = self.task.batch_score(out, y)
            correct += score
            counted += count
            seen += len(y)
            if (step + 1) % check_every == 0 and bad_step == math.inf and \
                    not math.isfinite(float(loss_sum)):
                if not dist.enabled:
                    self._nonfinite(step)
                bad_step = step  # raised below on every rank at once, or a rank would hang
            bar.update(1)
            now = time.perf_counter()
            if now - last_draw > 0.5:
                last_draw = now
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}",
                                **{tag: f"{float(correct) / max(1, counted):.3f}"},
                                sps=f"{seen / (now - t0):.0f}", refresh=False)
        if dist.enabled:  # global sums, and the first bad step of any rank
            totals = ddp.all_reduce_sum(torch.stack([
                loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device,
                                                                  dtype=torch.float64),
                torch.tensor(float(counted), device=device, dtype=torch.float64)]))
            loss_sum, correct, seen, counted = totals[0], totals[1], int(totals[2]), int(totals[3])
            bad_step = float(ddp.all_reduce_min(torch.tensor(float(bad_step), device=device,
                                                             dtype=torch.float64)))
        if bad_step < math.inf:
            self._nonfinite(int(bad_step))
        if not math.isfinite(float(loss_sum)):
            self._nonfinite(len(self.train_loader) - 1)
        elapsed = time.perf_counter() - t0
        train_score = {"accuracy": "train_accuracy", "miou": "train_pixel_accuracy",
                       "psnr": "train_psnr"}[self.task.metric]
        return {"train_loss": float(loss_sum) / max(1, seen),
                train_score: float(correct) / max(1, counted),
                "samples_per_s": seen / elapsed, "epoch_time_s": elapsed}

    def _nonfinite(self, step: int) -> None:
        global_step = self.epoch * len(self.train_loader) + step + 1
        kept = ("the last good checkpoint is kept in " + str(self.paths.last)
                if self.paths.last.exists() else "no epoch had finished, so no checkpoint exists")
        raise NonFiniteLossError(
            f"loss became NaN or infinite at epoch {self.epoch + 1}, step {step + 1} "
            f"(global step {global_step}); {kept}; lower the learning rate (--lr) or clip "
            "gradients (--grad-clip)")

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
        cfg, paths, main = self.config, self.paths, self.dist.is_main
        if main:  # rank 0 alone writes the run folder and logs
            paths.root.mkdir(parents=True, exist_ok=True)
            write_yaml(paths.config, cfg.to_dict())
        steps = len(self.train_loader)
        bar = tqdm(total=cfg.epochs * steps, initial=self.epoch * steps, unit="step",
                   disable=True if not main else None if self.progress is None
                   else not self.progress, dynamic_ncols=True, leave=False)
        log = bar.write if main else lambda *args, **kwargs: None
        with deterministic_algorithms(cfg.deterministic), contextlib.closing(bar):
            while self.epoch < cfg.epochs:
                bar.set_description(f"epoch {self.epoch + 1}/{cfg.epochs}")
                metrics = self._train_epoch(bar)
                val = self._evaluate(self.val_loader)
                self.epoch += 1
                key = self.task.metric
                metrics = {"epoch": self.epoch, **metrics, "val_loss": val["loss"],
                           f"val_{key}": val[key], "lr": self.optimizer.param_groups[0]["lr"]}
                self.history.append(metrics)
                improved = val[key] > self.best_acc
                if improved:
                    self.best_acc, self.best_epoch, self.bad_epochs = val[key], self.epoch, 0
                else:
                    self.bad_epochs += 1
                if main:
                    if improved:
                        save_weights(paths.weights, self._eval_weights(), self.meta)
                    save_weights(paths.last, self._eval_weights(), self.meta)
                    save_state(paths.state, self._state())
                    atomic_write(paths.metrics,
                                 "".join(json.dumps(m) + "\n" for m in self.history))
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
            return self._finish()

    def _finish(self) -> dict[str, Any]:
        from .report import write_report

        if self.dist.is_main:
            best, _ = load_weights(self.paths.weights)
            self.model.load_state_dict(best)
        ddp.broadcast_(self.model.state_dict().values())  # the other ranks: from rank 0
        # The reference number is full precision, as `cnnkit eval` and users compute it.
        test = self.task.evaluate(self.model, self.test_loader, self.device)
        c, h, w = self.preprocess.input_size
        summary = {
            "model": self.config.model, "data": self.config.data, "task": self.task.name,
            **self.task.summary(test),
            f"best_val_{self.task.metric}": self.best_acc, "best_epoch": self.best_epoch,
            "epochs_run": self.epoch, "stopped_early": self.epoch < self.config.epochs,
            "input_size": [c, h, w], "num_classes": len(self.preprocess.classes),
            "classes": self.preprocess.classes,
            "num_samples": {"train": len(self.split[0]), "val": len(self.split[1]),
                            "test": len(self.split[2])},
            "skipped_files": self.data.skipped,
            "params": sum(p.numel() for p in self.model.parameters()),
            "train_time_s": sum(m["epoch_time_s"] for m in self.history),
            "device": str(self.device), "processes": self.dist.world_size,
        }
        if self.dist.is_main:
            write_json(self.paths.summary, summary)
            write_report(self.paths, summary, self.history, test, self.data, self.split[2])
        ddp.barrier()  # every rank returns with the run folder complete
        return summary


def train(config: TrainConfig | None = None, **options: Any) -> dict[str, Any]:
    """Train a model and return its summary (``summary["test_accuracy"]`` ...).

    Args:
        config: a full configuration; or leave it None and pass options by name.
        **options: :class:`TrainConfig` fields, plus ``progress`` and ``resume``.

    Example:
        >>> import cnnkit
        >>> s = cnnkit.train(model="lenet5", data="digits", epochs=2,
        ...                  runs_dir="/tmp/cnnkit-doc", progress=False)  # doctest: +SKIP
    """
    progress = options.pop("progress", None)
    resume = options.pop("resume", None)
    if resume is not None:
        # A resumed run keeps its saved config; only training longer is allowed.
        other = sorted(set(options) - {"epochs"})
        if other or config is not None:
            raise ValueError(f"resume continues a run with its saved config; only epochs may be "
                             f"given, not {', '.join(other) or 'a TrainConfig'}")
        config = TrainConfig(epochs=options["epochs"]) if "epochs" in options else None
    elif config is None:
        config = TrainConfig.from_dict(options)
    elif options:
        raise ValueError("pass either a TrainConfig or options by name, not both")
    return Trainer(config, resume=resume, progress=progress).fit()
