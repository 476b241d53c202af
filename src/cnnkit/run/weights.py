"""A run's weights files, checked before they are trusted: metadata, ownership, shapes.

Every weights file cnnkit writes carries, in its safetensors header, what rebuilds its
model: the registered name and options, input size, classes, normalisation and any
pruning / low-rank history (:meth:`cnnkit.training.Trainer.meta`). Reading one back, in
this order, before any memory is spent on the model:

1. the metadata must have the fields and types cnnkit writes (:func:`check_meta`);
2. it must describe the run's own model, as its ``config.yaml`` says
   (:func:`check_belongs`): a file of another run dropped into a run folder is refused,
   not silently evaluated as if it were the run's;
3. the model it describes is built on PyTorch's ``meta`` device (no memory) and its
   parameter shapes compared with the file's tensor shapes (:func:`build_model`), so
   weights of another architecture get one line naming both, not a traceback, and no
   metadata can make cnnkit allocate more than the file holds;
4. only then is the real model built and the tensors loaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from cnnkit._limits import require_memory
from cnnkit.layers.lowrank import apply_lowrank_history
from cnnkit.models import create_model
from cnnkit.models._surgery import apply_history
from cnnkit.tasks import create_task, list_tasks

from .checkpoint import load_weights, read_header
from .config import TrainConfig

__all__ = ["check_meta", "check_belongs", "build_model", "load_checked", "run_meta",
           "check_rebuildable", "model_kwargs"]

def _fail(path: str | os.PathLike, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; the file was not written by cnnkit or was damaged: "
                      "restore the run's own file or retrain the run")


def check_meta(meta: dict[str, Any], path: str | os.PathLike) -> None:
    """Check that a weights file's metadata has the fields and types cnnkit writes.

    Raises:
        ValueError: naming the file and the first field that is missing or malformed.
    """
    if not meta:
        raise ValueError(f"{path} carries no cnnkit metadata, so it was not written by cnnkit "
                         "(a torchvision .pth or another tool's file?); a run folder needs the "
                         "weights `cnnkit train` saved")
    size = meta.get("input_size")
    checks = {
        "model": isinstance(meta.get("model"), str),
        "model_kwargs": isinstance(meta.get("model_kwargs", {}), dict),
        "task": meta.get("task", "classify") in list_tasks(),
        # (C, L), (C, H, W) or (C, D, H, W): 1 to 3 spatial dims
        "input_size": isinstance(size, list) and len(size) in (2, 3, 4) and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v for v in size),
        "classes": isinstance(meta.get("classes"), list) and all(
            isinstance(c, str) for c in meta["classes"]),
        "pruning_history": isinstance(meta.get("pruning_history", []), list),
        "lowrank_history": isinstance(meta.get("lowrank_history", []), list),
    }
    for key in ("mean", "std"):
        v = meta.get(key)
        checks[key] = isinstance(v, list) and isinstance(size, list) and len(v) == size[0] and \
            all(isinstance(x, (int, float)) and math.isfinite(x) for x in v) and \
            (key == "mean" or all(x > 0 for x in v))
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise _fail(path, f"its cnnkit metadata has a missing or malformed {bad[0]!r}")


def model_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The builder options a run's weights record: the config's, plus the task's own (the
    scale of a super-resolution model)."""
    return {**config.model_kwargs, **create_task(config.task, config).builder_options()}


def check_belongs(meta: dict[str, Any], config: TrainConfig, path: str | os.PathLike,
                  config_path: str | os.PathLike) -> None:
    """Check that the weights at ``path`` are of the model the run's config describes.

    Raises:
        ValueError: one line naming both files and what differs.
    """
    theirs = (meta["model"], meta.get("model_kwargs", {}), meta.get("task", "classify"))
    ours = (config.model, model_kwargs(config), config.task)
    if theirs != ours:
        def describe(name: str, kwargs: dict, task: str) -> str:
            options = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
            return f"a {task} {name!r}" + (f" ({options})" if options else "")

        raise ValueError(f"{path} holds {describe(*theirs)} but {config_path} describes "
                         f"{describe(*ours)}: the weights do not belong to this run; restore "
                         "the run's own weights file or retrain the run")


def _build(meta: dict[str, Any], history: bool = True) -> nn.Module:
    """The model ``meta`` describes: the registered architecture, then (``history``) the
    pruning and low-rank factorisation it went through."""

    kwargs = dict(meta.get("model_kwargs", {}))
    # The starting weights (`--model-opt weights=FILE`) are a training input: the run's own
    # file replaces them, so rebuilding never reads (or needs) that file again.
    kwargs.pop("weights", None)
    task = create_task(meta.get("task", "classify"), SimpleNamespace(**kwargs))
    # what the task derives from the data (classes, channels, size), as at training time
    like = SimpleNamespace(input_size=tuple(meta["input_size"]), classes=meta["classes"],
                           mask_classes=meta["classes"])
    model = create_model(meta["model"], **{**task.model_kwargs(like), **kwargs})
    if history and meta.get("pruning_history"):
        model = apply_history(model, meta["pruning_history"])
    if history and meta.get("lowrank_history"):
        model = apply_lowrank_history(model, meta["lowrank_history"])
    return model


def _shape_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
                    ) -> str | None:
    """What differs between two ``{name: shape}`` tables, in words (None: nothing)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and tuple(expected[k]) != tuple(found[k])]
    if not (missing or extra or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (first {missing[0]!r})")
    if extra:
        parts.append(f"{len(extra)} unexpected (first {extra[0]!r})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of other shapes (first {k!r}: {list(found[k])} in the file, "
                     f"{list(expected[k])} in the model)")
    return ", ".join(parts)


def build_model(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None,
                path: str | os.PathLike = "the weights file") -> nn.Module:
    """Rebuild a model from the metadata stored in its safetensors file: the registered
    architecture, then the pruning and low-rank factorisation it went through (replayed,
    never unpickled).

    Args:
        meta: the file's cnnkit metadata.
        shapes: the file's tensor shapes: if given, the model is first built on the
            ``meta`` device (no memory) and must have exactly these tensors, and the
            memory of the real model is checked before it is built.
        path: the file, for messages.

    Raises:
        ValueError: the metadata names options the model does not take, or (``shapes``)
            the file's tensors are not the model's.
    """
    if shapes is None:
        return _build(meta)
    try:  # the registered architecture alone, on the meta device: no memory
        with torch.device("meta"):
            base = _build(meta, history=False)
    except (TypeError, KeyError, IndexError, ValueError, RuntimeError) as e:
        raise _fail(path, f"its metadata does not describe a buildable model "
                    f"({' '.join(str(e).split())})") from e
    # Pruning and factorisation only shrink or re-shape it: the base bounds the memory.
    nbytes = sum(p.numel() * 4 for p in base.state_dict().values())
    require_memory(2 * nbytes, f"loading {path} ({meta['model']})",
                   "free memory, or load the run on a larger machine")
    try:
        if meta.get("pruning_history") or meta.get("lowrank_history"):
            with torch.device("meta"):
                base = _build(meta)
        model = None
    except (NotImplementedError, RuntimeError):  # a history step with no meta kernel
        base = model = _build(meta)
    diff = _shape_mismatch({k: tuple(v.shape) for k, v in base.state_dict().items()}, shapes)
    if diff:
        raise ValueError(f"{path} does not hold the weights of the {meta['model']!r} its "
                         f"metadata names ({diff}): it belongs to another model; restore the "
                         "run's own weights file or retrain the run")
    return model if model is not None else _build(meta)


def load_checked(path: str | os.PathLike, config: TrainConfig | None = None,
                 config_path: str | os.PathLike = "config.yaml",
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """A run's weights file as a model with its weights loaded, and its metadata, after
    the checks of the module docstring (``config``: the run's, for the ownership check).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a cnnkit weights file, not the run's model, or damaged.
    """
    path = Path(path)
    shapes, meta = read_header(path)
    check_meta(meta, path)
    if config is not None:
        check_belongs(meta, config, path, config_path)
    model = build_model(meta, shapes, path)
    state, _ = load_weights(path)
    model.load_state_dict(state, strict=True)
    return model, meta


def run_meta(config: TrainConfig, preprocess: Any, model: nn.Module) -> dict[str, Any]:
    """The metadata saved inside a run's weights files: the registered name and options,
    the preprocessing (:meth:`cnnkit.training.run.Preprocess.to_dict`) and the compression
    history of ``model`` (how :func:`build_model` rebuilds it)."""
    meta = {"model": config.model, "model_kwargs": model_kwargs(config),
            **preprocess.to_dict()}
    for key in ("pruning_history", "lowrank_history"):
        if getattr(model, key, None):
            meta[key] = getattr(model, key)
    return meta


def check_rebuildable(model: nn.Module, meta: dict[str, Any]) -> None:
    """A model handed to a run must be one the run can rebuild from ``meta`` (registry name
    and options, then recorded pruning / low-rank history), or the saved run would not
    load: refuse it before training.

    Raises:
        ValueError: the shapes of ``model`` differ from those ``meta`` rebuilds.
    """
    try:
        ref = build_model(meta).state_dict()
    except ValueError:  # the history does not fit the named architecture
        ref = {}
    got = model.state_dict()
    if {k: tuple(v.shape) for k, v in ref.items()} != {k: tuple(v.shape) for k, v in
                                                        got.items()}:
        raise ValueError(
            f"the model given to Trainer(model=...) is not a {meta['model']!r} with options "
            f"{meta.get('model_kwargs', {})} plus its recorded compression history, so its run "
            "could not be reloaded; pass the registered model (or one made from it by "
            "cnnkit.compress.prune / decompose) and its name as config.model")
