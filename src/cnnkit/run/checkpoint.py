"""Atomic, pickle-free files: weights and full training state in safetensors.

Every write goes through :func:`cnnkit._files.atomic_write`: a temporary file in the
target folder, flushed to disk and renamed over the target, so a crash leaves either
the old file or the new one, never half of one.

Nothing here calls ``torch.load`` or ``pickle``: weights are safetensors, and the
training state (optimizer, scheduler, EMA, RNG, history) is flattened into
safetensors tensors plus a JSON skeleton stored in the file's metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cnnkit._files import atomic_write

__all__ = ["atomic_write", "save_weights", "load_weights", "read_header", "save_state",
           "load_state"]


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """Save a state_dict as safetensors, with ``metadata`` as JSON under key ``cnnkit``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {"cnnkit": json.dumps(metadata)} if metadata is not None else None
    atomic_write(path, st_save(tensors, metadata=meta))


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator[Any]:
    """``safe_open`` with cnnkit's errors: a missing file, or a file that is not
    safetensors (a pickle under its name, a truncated copy), named in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; "
                                "check the run folder or train it first")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file ({e}); "
                         "it may be truncated: use the run's other checkpoint or retrain") from e


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with _opened(path) as f:
        return st_load(Path(path).read_bytes()), f.metadata() or {}


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """The tensor shapes and the cnnkit metadata of a weights file, without reading its
    tensors (so a file can be checked before anything is allocated for it).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, or metadata that is not cnnkit's JSON object.
    """
    with _opened(path) as f:
        meta = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return shapes, _metadata(meta, path)


def _metadata(meta: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    if "cnnkit" not in meta:
        return {}
    try:
        data = json.loads(meta["cnnkit"])
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {str(path)!r} has damaged cnnkit metadata (not a JSON "
                         "object); use the run's other checkpoint or retrain")
    return data


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load safetensors weights and the cnnkit metadata saved with them."""
    tensors, meta = _read(path)
    return tensors, _metadata(meta, path)


# -- nested state <-> (tensors, JSON skeleton) -------------------------------------------

def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        # Pairs keep non-string keys (the optimizer's integer parameter ids).
        return {"__dict__": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state at {prefix!r}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            if obj["__tensor__"] not in tensors:
                raise ValueError(f"it names a tensor {obj['__tensor__']!r} it does not hold")
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            pairs = obj["__dict__"]
            if not isinstance(pairs, list) or not all(
                    isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], (str, int))
                    for kv in pairs):
                raise ValueError("a mapping in it is not a list of [key, value] pairs")
            return {k: _unflatten(v, tensors) for k, v in pairs}
        if "__list__" in obj:
            if not isinstance(obj["__list__"], list):
                raise ValueError("a list in it is not a JSON array")
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        raise ValueError(f"it holds an object of unknown kind (keys {sorted(obj)[:3]})")
    if isinstance(obj, list):  # written as {"__list__": ...}; a bare array is not ours
        raise ValueError("it holds a bare JSON array")
    return obj


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a nested dict of tensors, numbers, strings, lists and dicts atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, "s")
    atomic_write(path, st_save(tensors, metadata={"state": json.dumps(skeleton)}))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Inverse of :func:`save_state`.

    Raises:
        ValueError: the file is not a training state written by :func:`save_state` (its
            JSON skeleton is damaged or names tensors it does not hold).
    """
    tensors, meta = _read(path)
    if "state" not in meta:
        raise ValueError(f"{str(path)!r} holds no training state; resume from a run folder "
                         "written by `cnnkit train`")
    try:
        state = _unflatten(json.loads(meta["state"]), tensors)
        if not isinstance(state, dict):
            raise ValueError("its top level is not a mapping")
    except (ValueError, RecursionError) as e:
        raise ValueError(f"training state {str(path)!r} is damaged ({e}); resume cannot use it: "
                         "restore the file or start the run again") from e
    return state
