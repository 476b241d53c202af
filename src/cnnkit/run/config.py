"""The training configuration: one typed dataclass, the source of truth.

The CLI is a thin layer that fills a :class:`TrainConfig`; the resolved config is
written as ``config.yaml`` beside every run and read back by ``--resume`` and
:func:`cnnkit.load_run` (with ``yaml.safe_load``: no code is executed).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cnnkit.tasks import list_tasks, task_class

__all__ = ["TrainConfig", "RESUME_OPTIONS"]

# What a resumed run may change: how long and how fast it learns, and where it runs; never
# what it learns from or what it is (data, split, model, optimizer, seed), which the saved
# state depends on. A NaN loss names two of these as the fix (--lr, --grad-clip).
RESUME_OPTIONS = ("epochs", "lr", "grad_clip", "early_stopping", "amp", "device", "compile",
                  "channels_last", "fast")

_CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "onecycle", "constant"),
    "amp": ("auto", "off", "bf16", "fp16"),
}


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
            (AdamW for super-resolution, else SGD) when None.
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
        name: run name; ``<model>-<data>`` (made unique) when None.
        runs_dir: where runs are written.
        strict: fail on unreadable images instead of skipping them.
    """

    task: str = "classify"
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    channels: int | None = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    augment: str = "auto"
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "onecycle"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    loss: str = "auto"
    scale: int = 3
    grad_clip: float | None = None
    amp: str = "auto"
    channels_last: bool = False
    compile: bool | None = None
    fast: bool = False
    sync_bn: bool = False
    early_stopping: int | None = None
    ema: bool = False
    ema_decay: float = 0.999
    device: str = "auto"
    seed: int = 0
    deterministic: bool = True
    name: str | None = None
    runs_dir: str = "runs"
    strict: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        if self.task not in list_tasks():
            raise ValueError(f"task must be one of {', '.join(list_tasks())}, got {self.task!r}")
        defaults = task_class(self.task).defaults
        self.model = self.model or defaults.model
        self.data = self.data or defaults.data
        if not self.data:
            raise ValueError(f"task {self.task} has no built-in data set; give your data with "
                             "--data PATH (see `cnnkit datasets`)")
        self.optimizer = self.optimizer or defaults.optimizer
        self.epochs = defaults.epochs if self.epochs is None else self.epochs
        self.batch_size = defaults.batch_size if self.batch_size is None else self.batch_size
        if self.fast:  # the preset: resolved here, so config.yaml records what ran
            self.channels_last = True
            if self.compile is None:
                self.compile = _on_cuda(self.device)
        self.compile = bool(self.compile)
        losses = task_class(self.task).losses
        if self.loss == "auto":
            self.loss = defaults.loss
        if self.loss not in losses:
            raise ValueError(f"loss {self.loss!r} does not fit task {self.task}; choose from "
                             f"{', '.join(losses)}")
        if int(self.scale) < 2:
            raise ValueError(f"scale must be an integer >= 2, got {self.scale}")
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, key)!r}")
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
        split = tuple(float(f) for f in self.split)
        if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1) > 1e-6:
            raise ValueError("split must be three positive fractions summing to 1, "
                             f"got {self.split}")
        self.split = split  # type: ignore[assignment]

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        own = task_class(self.task).defaults
        if self.optimizer == own.optimizer and own.lr is not None:
            return own.lr
        return 0.1 * self.batch_size / 256 if self.optimizer == "sgd" else 2e-3

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        own = task_class(self.task).defaults
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
        d = dataclasses.asdict(self)
        d["split"] = list(self.split)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, naming unknown keys instead of ignoring them; every value is
        checked against its field's type (:func:`_check_types`) and range."""
        if not isinstance(d, dict):
            raise TypeError(f"a training configuration is a mapping of options, got "
                            f"{type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(unknown)}; "
                             f"valid options: {', '.join(sorted(names))}")
        return cls(**d)


def _kind(hint: Any) -> str:
    """What a type hint accepts, in words."""
    if hint is Any:
        return "anything"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args)
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is dict:
        return "a mapping of names to values (KEY: VALUE lines)"
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(args)} {_kind(args[0]).split(' ', 1)[1]}s"
    return {bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string"}[hint]


def _coerce(hint: Any, value: Any) -> tuple[bool, Any]:
    """``(accepted, value)``: whether ``value`` fits ``hint``, and the value converted
    (an integer where a float is expected, a list where a tuple is)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            ok, v = _coerce(a, value)
            if ok:
                return True, v
        return False, value
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, value
        items = [_coerce(a, v) for a, v in zip(args, value, strict=True)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value)
        return ok, float(value) if ok else value
    return isinstance(value, hint), value


def _check_types(config: TrainConfig) -> None:
    """Check every field against its type annotation, so a hand-edited ``config.yaml``
    (``epochs: .inf``, ``model_kwargs: 5``) or a wrong Python value fails with the key and
    the expected type, for every field, including fields added later.

    Raises:
        ValueError: naming the key, the expected type and the value found.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        ok, converted = _coerce(hints[f.name], value)
        if not ok:
            raise ValueError(f"key {f.name!r} must be {_kind(hints[f.name])}, got "
                             f"{value!r} ({type(value).__name__})")
        setattr(config, f.name, converted)
    name = config.name
    if name is not None and (not name.strip() or name in (".", "..") or "\0" in name
                             or any(s in name for s in ("/", "\\"))):
        raise ValueError(f"key 'name' must be a folder name (no / or \\, not . or ..), got "
                         f"{name!r}")


def _on_cuda(device: str) -> bool:
    """Whether ``device`` ("auto", "cuda:1", ...) means a CUDA GPU here."""
    import torch

    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")
