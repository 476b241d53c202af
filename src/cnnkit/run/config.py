"""The training configuration: one typed dataclass, the source of truth.

The CLI is generated from it: each field's :class:`~cnnkit.run.fields.Option` (help,
flag, choices, bounds) is read by :mod:`cnnkit.cli.generate`, so an option is defined once,
here. The resolved config is written as ``config.yaml`` beside every run and read back by
``--resume`` and :func:`cnnkit.load_run` (with ``yaml.safe_load``: no code is executed;
``--config`` files: :mod:`.config_file`). This module imports no PyTorch (the task
registry is looked up when a config is built), so ``cnnkit train --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cnnkit.plugins import load_plugins, split_names

from .fields import check_choices, check_types, option

__all__ = ["TrainConfig", "RESUME_OPTIONS"]

# What a resumed run may change: how long and how fast it learns, and where it runs; never
# what it learns from or what it is (data, split, model, optimizer, seed), which the saved
# state depends on. A NaN loss names two of these as the fix (--lr, --grad-clip).
RESUME_OPTIONS = ("epochs", "lr", "grad_clip", "early_stopping", "amp", "device", "compile",
                  "channels_last", "fast", "checkpoint_minutes")


@dataclass
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
        task: a registered task (:func:`cnnkit.tasks.list_tasks`): ``"classify"`` (a
            class per sample), ``"segment"`` (a class per pixel), ``"superres"`` (a
            ``scale`` times larger image) or ``"regress"`` (values per sample).
        model: registry name (``cnnkit models`` lists them); per task default
            (the task's :class:`~cnnkit.tasks.TaskDefaults`) when None.
        model_kwargs: extra builder options, e.g. ``{"attn": "eca", "width": 32}``.
        data: a built-in data set name or a folder / ``.csv`` / ``.npz`` path; per task
            default when None.
        data_options: options of the data set (``{"n": 3000}`` for ``shapes``).
        image_size: resize user images to this size; the data set's own size when None.
        channels: force 1 or 3 input channels for user images.
        split: train/val/test fractions of the stratified split.
        augment: augmentation policy, ``"auto"`` for the data set's default.
        epochs: passes over the training split; per task default when None.
        batch_size: samples per optimisation step; per task default when None. Under
            several processes (torchrun) this is the global batch: each of W processes
            takes ``batch_size / W`` of it (``cnnkit.training.distributed``).
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``; per task default
            (SGD for segmentation, else AdamW) when None.
        lr: peak learning rate; ``None`` picks 0.1 x batch/256 for SGD (0.05 for
            segmentation) and 2e-3 for AdamW.
        momentum: SGD momentum.
        weight_decay: applied to weights only, never to norms and biases; ``None``
            picks 5e-4 for SGD and 0.05 for AdamW.
        schedule: ``"cosine"`` (linear warm-up then cosine to zero), ``"onecycle"``
            (Smith and Topin 2019) or ``"constant"`` after warm-up.
        warmup_epochs: linear warm-up length in epochs (may be fractional).
        label_smoothing: Szegedy et al. 2016 label smoothing (classification only).
        loss: ``"auto"`` (the task's default) or, for segmentation, ``"ce"``,
            ``"dice"``, ``"focal"``, ``"ce+dice"``, ``"focal+dice"`` (the sum); for
            super-resolution ``"mse"`` (as ESPCN) or ``"l1"``.
        scale: super-resolution factor (2, 3, 4 ...).
        grad_clip: clip the global gradient norm to this value (None: off).
        amp: mixed precision: ``"auto"`` (bf16 or fp16 on CUDA, bf16 on CPUs with native
            bf16, else off), ``"off"``,
            ``"bf16"`` (autocast on CPUs with AVX-512 BF16 and on CUDA), ``"fp16"`` (CUDA).
        channels_last: NHWC memory format for model and inputs.
        compile: compile the training step's model with ``torch.compile`` (opt-in: the
            first step pays the compilation); if compilation fails the run goes on
            eagerly after a one-line warning (``cnnkit.training.fast``).
        fast: the preset of the fast paths that pay on the device: ``channels_last``, and
            with ``amp="auto"`` (the default) bf16 autocast on CUDA and on CPUs with AVX-512
            BF16/AMX; ``compile`` on CUDA only, unless set explicitly (measured by
            ``cnnkit bench`` on a 2-core CPU: compilation was neutral for resnet18 and
            mobilenet_v2 and cost tinyvgg a third of its speed, and costs 30-140 s a
            model). The fused optimiser step is used wherever PyTorch has one, fast or not.
        sync_bn: in a multi-process run (torchrun), normalise BatchNorm layers by the
            statistics of the whole global batch (``cnnkit.training.sync_bn``); no effect in
            one process.
        early_stopping: stop after this many epochs without a better validation accuracy.
        ema: keep an exponential moving average of the weights for evaluation.
        ema_decay: decay of that average per step.
        device: ``"auto"`` (cuda, then mps, then cpu) or a torch device string.
        seed: seeds data split, initialisation, shuffling and augmentation.
        deterministic: deterministic algorithms, so that a resumed run equals an
            uninterrupted one.
        checkpoint_minutes: save the training state also within an epoch whenever this
            many minutes passed since the last save, so an interrupted run (Ctrl-C, a killed
            job) loses at most that and ``--resume`` continues from the saved step to the
            uninterrupted run's result; 0: only at the end of each epoch.
        name: run name; ``<model>-<data>`` (made unique) when None.
        runs_dir: where runs are written.
        strict: fail on unreadable images instead of skipping them.
        loggers: where each epoch's metrics go besides ``metrics.jsonl`` (the logger registry
            of :mod:`cnnkit.training.loggers`: ``"csv"``, ``"tensorboard"``, ``"mlflow"``,
            ``"wandb"``).
        plugins: modules imported before anything is looked up in a registry
            (:mod:`cnnkit.plugins`): the ``--plugin`` modules, and the modules outside cnnkit
            that registered the run's model or task, added when the config is built; every
            reader of ``config.yaml`` imports them first.
    """

    task: str = option("classify", "what the model predicts (see `cnnkit tasks`): classify, "
                       "segment (a class per pixel), superres or regress (values)")
    model: str | None = option(None, "model name (see `cnnkit models`); default: the task's "
                               "(tinyvgg_wide for classify)")
    model_kwargs: dict[str, Any] = option(
        help="model option, e.g. --model-opt attn=eca (repeatable)", flags=("--model-opt",),
        default_factory=dict)
    data: str | None = option(None, "built-in data set (see `cnnkit datasets`) or a folder, .csv "
                              "or .npz path; default digits (shapes for segment and superres)")
    data_options: dict[str, Any] = option(
        help="data set option, e.g. --data-opt n=5000 (repeatable)", flags=("--data-opt",),
        default_factory=dict)
    image_size: int | None = option(None, "resize your images to this size", bounds="positive")
    channels: int | None = option(None, "force grey or colour input", choices=(1, 3))
    split: tuple[float, float, float] = option((0.8, 0.1, 0.1), cli=False)
    augment: str = option("auto", "augmentation policy; auto: the data set's own")
    epochs: int | None = option(None, "passes over the training split (default: the task's)",
                                bounds="positive")
    batch_size: int | None = option(None, "samples per step, the global batch under --nproc "
                                    "(default: the task's)", bounds="positive")
    optimizer: str | None = option(None, "default: the task's (adamw; sgd for segment)",
                                   choices=("sgd", "adamw"))
    lr: float | None = option(None, "peak learning rate (default: scaled to the batch)",
                              bounds="positive")
    momentum: float = option(0.9, cli=False)
    weight_decay: float | None = option(None, "on weights, never on norms and biases "
                                        "(default 5e-4 for sgd, 0.05 for adamw)",
                                        bounds="non-negative")
    schedule: str = option("onecycle", "learning-rate schedule",
                           choices=("cosine", "onecycle", "constant"))
    warmup_epochs: float = option(1.0, cli=False)
    label_smoothing: float = option(0.1, "classify: label smoothing", bounds="fraction")
    loss: str = option("auto", "auto: the task's; segment: ce, dice, focal, ce+dice (its "
                       "default), focal+dice; superres: mse (its default) or l1")
    scale: int = option(3, "superres: upscaling factor", bounds="positive")
    grad_clip: float | None = option(None, "clip the global gradient norm to this value",
                                     bounds="positive")
    amp: str = option("auto", "mixed precision; auto: bf16 or fp16 where the device has it",
                      choices=("auto", "off", "bf16", "fp16"))
    channels_last: bool = option(False, "NHWC memory format for model and inputs")
    compile: bool | None = option(None, "compile the training step with torch.compile (falls "
                                  "back to eager with a warning if compilation fails); "
                                  "--no-compile: not even with --fast")
    fast: bool = option(False, "every fast path: channels_last, torch.compile and (with --amp "
                        "auto) bf16 autocast where the CPU or GPU supports it")
    sync_bn: bool = option(False, "with several processes: BatchNorm statistics over the "
                           "global batch")
    early_stopping: int | None = option(None, "stop after PATIENCE epochs without a better "
                                        "validation metric", bounds="positive",
                                        metavar="PATIENCE")
    ema: bool = option(False, "evaluate an EMA of weights")
    ema_decay: float = option(0.999, cli=False)
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    seed: int = option(0, "seeds the split, initialisation, shuffling and augmentation")
    deterministic: bool = option(True, cli=False)
    checkpoint_minutes: float = option(
        10.0, "save the training state within an epoch too, every this many minutes, so an "
        "interrupted run loses at most that and --resume continues from there; 0: only at "
        "epoch ends", bounds="non-negative", metavar="MINUTES")
    name: str | None = option(None, "run name (default <model>-<data>)")
    runs_dir: str = option("runs", "where runs are written")
    strict: bool = option(False, "fail on unreadable images instead of skipping them")
    loggers: tuple[str, ...] = option(
        (), "log each epoch's metrics also to csv (metrics.csv in the run folder), tensorboard, "
        "mlflow or wandb; repeatable or a comma list", flags=("--logger",), metavar="NAME")
    plugins: tuple[str, ...] = option((), cli=False)

    def __post_init__(self) -> None:
        check_types(self)
        _check_name(self.name)
        self.plugins = load_plugins(self.plugins, "plugins of the training config")
        task = _task_class(self.task)
        defaults = task.defaults
        self.model = self.model or defaults.model
        self.data = self.data or defaults.data
        if not self.data:
            raise ValueError(f"task {self.task} has no built-in data set; give your data with "
                             "--data PATH (see `cnnkit datasets`)")
        recipe = _recipe(self.data, self.task)  # the data set's own, then the task's
        self.optimizer = self.optimizer or recipe.get("optimizer") or defaults.optimizer
        if self.optimizer == recipe.get("optimizer", defaults.optimizer):
            for key in ("lr", "weight_decay"):  # a recipe's rates go with its optimizer
                if getattr(self, key) is None and key in recipe:
                    setattr(self, key, recipe[key])
        if self.epochs is None:
            self.epochs = recipe.get("epochs", defaults.epochs)
        if self.batch_size is None:
            self.batch_size = recipe.get("batch_size", defaults.batch_size)
        if self.fast:  # the preset: resolved here, so config.yaml records what ran
            self.channels_last = True
            if self.compile is None:
                self.compile = _on_cuda(self.device)
        self.compile = bool(self.compile)
        losses = task.losses
        if self.loss == "auto":
            self.loss = defaults.loss
        if self.loss not in losses:
            raise ValueError(f"loss {self.loss!r} does not fit task {self.task}; choose from "
                             f"{', '.join(losses)}")
        if int(self.scale) < 2:
            raise ValueError(f"scale must be an integer >= 2, got {self.scale}")
        check_choices(self)
        for key in ("epochs", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.lr is not None and not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for key in ("grad_clip", "weight_decay"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < float("inf"):
                raise ValueError(f"{key} must be a non-negative number or None, got {value}")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise ValueError("early_stopping is a patience in epochs (>= 1) or None to turn it "
                             f"off, got {self.early_stopping}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.checkpoint_minutes < 0:
            raise ValueError("checkpoint_minutes must be a number of minutes >= 0 (0: save "
                             f"only at epoch ends), got {self.checkpoint_minutes}")
        split = tuple(float(f) for f in self.split)
        if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1) > 1e-6:
            raise ValueError("split must be three positive fractions summing to 1, "
                             f"got {self.split}")
        self.split = split  # type: ignore[assignment]
        self.loggers = split_names(self.loggers)
        self.plugins = (*self.plugins, *_defining_modules(self.model, task,
                                                          self.plugins))

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        own = _task_class(self.task).defaults
        if self.optimizer == own.optimizer and own.lr is not None:
            return own.lr
        return 0.1 * self.batch_size / 256 if self.optimizer == "sgd" else 2e-3

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        own = _task_class(self.task).defaults
        if self.optimizer == own.optimizer and own.weight_decay is not None:
            return own.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.05

    def with_overrides(self, overrides: dict[str, Any]) -> tuple[TrainConfig, dict[str, list]]:
        """This config with :data:`RESUME_OPTIONS` changed (for ``--resume``), validated as
        a whole; returns it and ``{key: [old, new]}`` for the keys that changed.

        Raises:
            ValueError: a key outside :data:`RESUME_OPTIONS`, or an invalid value.
        """
        fixed = sorted(set(overrides) - set(RESUME_OPTIONS))
        if fixed:
            raise ValueError(f"a resumed run keeps its data, model and recipe, so "
                             f"{', '.join(fixed)} cannot change; it may change "
                             f"{', '.join(RESUME_OPTIONS)} (or start a new run)")
        new = TrainConfig.from_dict({**self.to_dict(), **overrides})
        changed = {k: [getattr(self, k), getattr(new, k)] for k in self.to_dict()
                   if getattr(self, k) != getattr(new, k)}
        return new, changed

    def to_dict(self) -> dict[str, Any]:
        """A YAML/JSON-safe dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, naming unknown keys instead of ignoring them; every value is
        checked against its field's type (:func:`~cnnkit.run.fields.check_types`) and range."""
        if not isinstance(d, dict):
            raise TypeError(f"a training configuration is a mapping of options, got "
                            f"{type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(unknown)}; "
                             f"valid options: {', '.join(sorted(names))}")
        return cls(**d)


def _check_name(name: str | None) -> None:
    if name is not None and (not name.strip() or name in (".", "..") or "\0" in name
                             or any(s in name for s in ("/", "\\"))):
        raise ValueError(f"key 'name' must be a folder name (no / or \\, not . or ..), got "
                         f"{name!r}")


def _recipe(data: str, task: str) -> dict[str, Any]:
    """The training settings a built-in data set gives for ``task`` (none for a path)."""
    from cnnkit.data import dataset_recipe  # lazy: cli start-up

    return dataset_recipe(data, task)


def _task_class(name: str) -> type:
    """The registered task ``name``. The task registry imports PyTorch, so it is read when a
    config is built, not when this module is imported (``cnnkit train --help``).

    Raises:
        ValueError: ``name`` is not a registered task; the message lists them.
    """
    from cnnkit.tasks import list_tasks, task_class  # lazy: cli start-up

    if name not in list_tasks():
        raise ValueError(f"task must be one of {', '.join(list_tasks())}, got {name!r}")
    return task_class(name)


def _on_cuda(device: str) -> bool:
    """Whether ``device`` ("auto", "cuda:1", ...) means a CUDA GPU here."""
    import torch  # lazy: cli start-up

    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


def _defining_modules(model: str, task: type, known: tuple[str, ...]) -> tuple[str, ...]:
    """The importable modules outside cnnkit that registered ``model`` and ``task`` and are
    not in ``known``: the plugins a reader of this config must import first (a model
    defined in a script, ``__main__``, cannot be imported again and is left out)."""
    from cnnkit.models import list_models, model_info  # lazy: cli start-up

    modules = [task.__module__]
    if model in list_models():
        modules.append(model_info(model).builder.__module__)
    return tuple(dict.fromkeys(m for m in modules if m.split(".")[0] not in ("cnnkit",
                                                                               "__main__")
                               and m not in known))
