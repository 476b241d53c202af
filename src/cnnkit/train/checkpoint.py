"""Atomic, pickle-free files: weights and full training state in safetensors.

Every write goes to a temporary file in the target folder, is flushed to disk and
then renamed over the target (``os.replace`` is atomic on POSIX and Windows), so a
crash leaves either the old file or the new one, never half of one.

Nothing here calls ``torch.load`` or ``pickle``: weights are safetensors, and the
training state (optimizer, scheduler, EMA, RNG, history) is flattened into
safetensors tensors plus a JSON skeleton stored in the file's metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["atomic_write", "save_weights", "load_weights", "save_state", "load_state"]


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions open() would (0666 - umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """Save a state_dict as safetensors, with ``metadata`` as JSON under key ``cnnkit``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {"cnnkit": json.dumps(metadata)} if metadata is not None else None
    atomic_write(path, st_save(tensors, metadata=meta))


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; "
                                "check the run folder or train it first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return st_load(path.read_bytes()), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file ({e}); "
                         "it may be truncated: use the run's other checkpoint or retrain") from e


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load safetensors weights and the cnnkit metadata saved with them."""
    tensors, meta = _read(path)
    return tensors, json.loads(meta["cnnkit"]) if "cnnkit" in meta else {}


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
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a nested dict of tensors, numbers, strings, lists and dicts atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, "s")
    atomic_write(path, st_save(tensors, metadata={"state": json.dumps(skeleton)}))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Inverse of :func:`save_state`."""
    tensors, meta = _read(path)
    if "state" not in meta:
        raise ValueError(f"{str(path)!r} holds no training state; resume from a run folder "
                         "written by `cnnkit train`")
    return _unflatten(json.loads(meta["state"]), tensors)
