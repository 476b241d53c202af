"""Reading a run folder back: :func:`load_run` gives its model, config and preprocessing.

Only YAML, JSON and safetensors are read, so loading never executes code; the weights are
checked against the run's config before they are trusted (:mod:`cnnkit.run.weights`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.data import load_input

from .config import TrainConfig
from .folder import RunPaths, read_config, resolve_run
from .weights import load_checked

__all__ = ["Preprocess", "Run", "load_run", "read_summary"]


@dataclass
class Preprocess:
    """How a run's model expects its input: size, channels, normalisation and classes.

    ``input_size`` is ``(C, *spatial)``. Calling it on a file (an image, a NIfTI volume), a
    PIL image or a ``[C, *spatial]`` tensor in [0, 1] returns the normalised float tensor
    ``[C, *spatial]`` the model was trained on.
    """

    input_size: tuple[int, ...]
    mean: list[float]
    std: list[float]
    classes: list[str] = field(default_factory=list)
    task: str = "classify"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel of ``[C, *spatial]`` or ``[B, C, *spatial]``."""
        view = (-1, *[1] * (len(self.input_size) - 1))
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(view)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(view)
        return (x - mean) / std

    def load(self, source: Any, keep_size: bool = False) -> torch.Tensor:
        """A file, PIL image or tensor as the raw ``[C, *spatial]`` input, before scaling."""
        return load_input(source, self.input_size, keep_size)

    def __call__(self, image: Any) -> torch.Tensor:
        image = self.load(image)
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


def load_run(path: str | os.PathLike, weights: str = "best", device: str = "cpu") -> Run:
    """Load a run folder: its model (in eval mode), config and preprocessing.

    Only YAML, JSON and safetensors are read, so loading never executes code. The int8
    model of a compressed run is rebuilt by the compress package:
    :func:`cnnkit.load_run` (``cnnkit.workflows.load.load_run``) takes ``weights="int8"``.

    Args:
        path: the run folder (or its name inside ``runs/``).
        weights: ``"best"`` (by validation accuracy) or ``"last"``.
        device: where to put the model.

    Example:
        >>> import cnnkit
        >>> from cnnkit.run import load_run
        >>> trained = cnnkit.train(data="digits", model="lenet5", epochs=1, progress=False)
        >>> run = load_run(trained.path, weights="last")
        >>> type(run.model).__name__, run.config.epochs, run.summary["epochs_run"]
        ('LeNet5', 1, 1)
        >>> run.preprocess.input_size, len(run.preprocess.mean), run.classes[-1]
        ((1, 8, 8), 1, '9')
    """
    root = resolve_run(path)
    paths = RunPaths(root)
    if weights not in ("best", "last"):
        hint = "; int8 models load with cnnkit.load_run" if weights == "int8" else ""
        raise ValueError(f"weights must be 'best' or 'last', got {weights!r}{hint}")
    config = read_config(paths.config)
    model, meta = load_checked(paths.last if weights == "last" else paths.weights, config,
                               paths.config)
    model.to(device).eval()
    prep = Preprocess(tuple(meta["input_size"]), meta["mean"], meta["std"], meta["classes"],
                      meta.get("task", "classify"))
    return Run(root, model, config, prep, read_summary(paths.summary))


def read_summary(path: Path) -> dict[str, Any] | None:
    """A run's ``summary.json`` (None if the run has not finished).

    Raises:
        ValueError: the file is not a JSON object.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        data = e
    if not isinstance(data, dict):
        raise ValueError(f"{path} is damaged (not a JSON object); delete it and run `cnnkit "
                         f"train --resume {path.parent}` to test the run again")
    return data
