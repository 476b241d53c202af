"""Run folders: what a training writes, and :func:`load_run` to read it back.

A run folder ``runs/<name>/`` holds:

* ``config.yaml``: the resolved :class:`TrainConfig`;
* ``model.safetensors``: the best weights (by validation accuracy), with the model's
  name, options, classes and preprocessing in the safetensors metadata;
* ``model_last.safetensors``: the weights after the last finished epoch;
* ``train_state.safetensors``: optimizer, schedule, EMA, RNG and history, for ``--resume``;
* ``metrics.jsonl``: one JSON line per epoch;
* ``summary.json``: final test metrics (``test_accuracy``) and ``input_size`` [C, H, W];
* ``report.html``: curves, confusion matrix and sample predictions, self-contained.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .checkpoint import atomic_write, load_weights
from .config import TrainConfig

__all__ = ["RunPaths", "Preprocess", "Run", "load_run", "read_config", "resolve_run",
           "unique_run_dir"]


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


def unique_run_dir(runs_dir: str | os.PathLike, name: str) -> Path:
    """``runs_dir/name``, or ``name-2``, ``name-3`` ... if taken."""
    base = Path(runs_dir) / name
    path, i = base, 2
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def resolve_run(run: str | os.PathLike, runs_dir: str | os.PathLike = "runs") -> Path:
    """A run folder from a path or a name inside ``runs_dir``; FileNotFoundError otherwise."""
    for cand in (Path(run), Path(runs_dir) / str(run)):
        if (cand / "config.yaml").is_file():
            return cand
    hint = "it has no config.yaml" if Path(run).is_dir() else "no such folder"
    raise FileNotFoundError(f"run {str(run)!r} not found ({hint}); give the folder that "
                            "`cnnkit train` wrote, e.g. runs/<name>")


def read_config(path: Path) -> TrainConfig:
    """A run's ``config.yaml`` (``yaml.safe_load``: no code runs), with a clear error if broken."""
    try:
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"expected a mapping, found {type(data).__name__}")
        return TrainConfig.from_dict(data)
    except (yaml.YAMLError, TypeError) as e:
        raise ValueError(f"{path} is not a valid cnnkit config ({one_line(e)}); restore it "
                         "from a backup or retrain the run") from e


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def write_yaml(path: Path, data: dict) -> None:
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")


@dataclass
class Preprocess:
    """How a run's model expects its input: size, channels, normalisation and classes.

    Calling it on an image file, a PIL image or a ``[C, H, W]`` tensor in [0, 1]
    returns the normalised float tensor ``[C, H, W]`` the model was trained on.
    """

    input_size: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    classes: list[str] = field(default_factory=list)
    task: str = "classify"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    def __call__(self, image: Any) -> torch.Tensor:
        from cnnkit.data import load_image

        c, h, w = self.input_size
        if not isinstance(image, torch.Tensor):
            image = load_image(image, size=(h, w), channels=c)
        if image.dtype == torch.uint8:
            image = image.float() / 255
        return self.normalize(image)

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "mean": list(self.mean),
                "std": list(self.std), "classes": list(self.classes), "task": self.task}


@dataclass
class Run:
    """A trained run, read back by :func:`load_run`."""

    path: Path
    model: nn.Module
    config: TrainConfig
    preprocess: Preprocess
    summary: dict[str, Any] | None

    @property
    def classes(self) -> list[str]:
        return self.preprocess.classes


def build_model(meta: dict[str, Any]) -> nn.Module:
    """Rebuild a model from the metadata stored in its safetensors file: the registered
    architecture, then the pruning and low-rank factorisation it went through (replayed,
    never unpickled)."""
    from cnnkit.models import create_model

    c, h, w = meta["input_size"]
    kwargs = dict(meta.get("model_kwargs", {}))
    if meta.get("task", "classify") == "superres":  # the image size is the low-res input's
        s = kwargs["scale"]
        model = create_model(meta["model"], in_chans=c, img_size=(h // s, w // s), **kwargs)
    else:
        model = create_model(meta["model"], num_classes=len(meta["classes"]), in_chans=c,
                             img_size=(h, w), **kwargs)
    if meta.get("pruning_history"):
        from cnnkit.compress.prune import apply_history

        model = apply_history(model, meta["pruning_history"])
    if meta.get("lowrank_history"):
        from cnnkit.compress.lowrank import apply_lowrank_history

        model = apply_lowrank_history(model, meta["lowrank_history"])
    return model


def load_run(path: str | os.PathLike, weights: str = "best", device: str = "cpu") -> Run:
    """Load a run folder: its model (in eval mode), config and preprocessing.

    Only YAML, JSON and safetensors are read, so loading never executes code.

    Args:
        path: the run folder (or its name inside ``runs/``).
        weights: ``"best"`` (by validation accuracy), ``"last"``, or ``"int8"``: the
            int8 model ``cnnkit compress --quantize int8`` wrote (CPU only).
        device: where to put the model.

    Example:
        >>> run = load_run("runs/tinyvgg_wide-digits")  # doctest: +SKIP
        >>> run.model(run.preprocess("digit.png")[None]).argmax()  # doctest: +SKIP
    """
    root = resolve_run(path)
    paths = RunPaths(root)
    if weights not in ("best", "last", "int8"):
        raise ValueError(f"weights must be 'best', 'last' or 'int8', got {weights!r}")
    if weights == "int8" and not paths.int8.is_file():
        raise ValueError(f"{root} has no int8 model; make one with `cnnkit compress {root} "
                         "--quantize int8 --out NEW_RUN`")
    if weights == "int8" and torch.device(device).type != "cpu":
        raise ValueError("int8 models run on the CPU only; use --device cpu")
    config = read_config(paths.config)
    state, meta = load_weights(paths.last if weights == "last" else paths.weights)
    if not meta:
        raise ValueError(f"{paths.weights} carries no cnnkit metadata; "
                         "it was not written by cnnkit")
    model = build_model(meta)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    prep = Preprocess(tuple(meta["input_size"]), meta["mean"], meta["std"], meta["classes"],
                      meta.get("task", "classify"))
    if weights == "int8":
        from cnnkit.compress.quantize import load_quantized

        model = load_quantized(paths.int8, model, torch.zeros(1, *prep.input_size))
    summary = json.loads(paths.summary.read_text()) if paths.summary.is_file() else None
    return Run(root, model, config, prep, summary)
