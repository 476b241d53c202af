"""An int8 model as a file: its state as safetensors, no pickle, rebuilt on load.

The graph is not stored. :func:`save_quantized` writes the state (int8 codes, scales, zero
points, the float parts) and the ``quant_config`` that made it; :func:`load_quantized`
rebuilds the int8 graph from the float architecture, by :func:`~cnnkit.compress.quantize.quantize`
or, for a model with ``quant_config["qat"]``, by the QAT path of :mod:`cnnkit.compress.qat`,
and fills it. Both kinds of model are read here, above the two modules that make them.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import fx, nn

from cnnkit._files import atomic_write

from .qat import _rebuild
from .quantize import quantize

__all__ = ["load_quantized", "quantized_bytes", "save_quantized"]


def save_quantized(qmodel: fx.GraphModule, path: str | Path) -> Path:
    """Save an int8 model's state as safetensors (int8 codes, scales, zero points), no pickle,
    written atomically.

    The graph is not stored: :func:`load_quantized` rebuilds it from the float architecture
    (through :func:`quantize`, or :func:`cnnkit.compress.qat.prepare_qat` for a model with
    ``quant_config["qat"]``).
    """
    path = Path(path)
    atomic_write(path, quantized_bytes(qmodel))
    return path


def quantized_bytes(qmodel: fx.GraphModule) -> bytes:
    """The safetensors bytes :func:`save_quantized` writes."""
    tensors: dict[str, torch.Tensor] = {}
    spec: dict[str, dict] = {}

    def put(key: str, value: object) -> dict:
        if value is None:
            return dict(kind="none")
        if isinstance(value, torch.dtype):
            return dict(kind="dtype", value=str(value).removeprefix("torch."))
        if isinstance(value, tuple | list):
            return dict(kind="tuple", items=[put(f"{key}::{i}", v) for i, v in enumerate(value)])
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"cannot save state entry {key!r} of type {type(value).__name__}")
        value = value.detach()
        if not value.is_quantized:
            tensors[key] = value.contiguous().clone()
            return dict(kind="tensor")
        tensors[key] = value.int_repr().contiguous()
        dtype = str(value.dtype).removeprefix("torch.")
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            tensors[f"{key}::scales"] = value.q_per_channel_scales().contiguous()
            tensors[f"{key}::zero_points"] = value.q_per_channel_zero_points().contiguous()
            return dict(kind="per_channel", dtype=dtype, axis=value.q_per_channel_axis())
        return dict(kind="per_tensor", dtype=dtype, scale=value.q_scale(),
                    zero_point=value.q_zero_point())

    for key, value in qmodel.state_dict().items():
        spec[key] = put(key, value)
    meta = dict(spec=spec, quant_config=getattr(qmodel, "quant_config", {}))
    return save(tensors, metadata={"cnnkit_quantized": json.dumps(meta)})


def load_quantized(path: str | Path, model: nn.Module,
                   example_inputs: torch.Tensor) -> fx.GraphModule:
    """Load :func:`save_quantized` output into the int8 graph of ``model``'s architecture.

    Args:
        path: the ``.safetensors`` file.
        model: a float model of the same architecture (its weights are not used).
        example_inputs: one input batch of the right shape (traces and builds the graph).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantised model at {path}; save one with save_quantized")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("cnnkit_quantized")
            tensors = {k: f.get_tensor(k) for k in f.keys()} if raw is not None else {}
        meta = json.loads(raw) if raw is not None else None
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); make the int8 model "
                         "again with cnnkit compress --quantize int8") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} was not written by save_quantized; re-save the model")
    try:
        return _load_quantized(meta, tensors, model, example_inputs)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise ValueError(f"{path} does not hold an int8 model of this run's architecture "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); make it again "
                         "with cnnkit compress --quantize int8") from e


def _load_quantized(meta: dict, tensors: dict[str, torch.Tensor], model: nn.Module,
                    example_inputs: torch.Tensor) -> fx.GraphModule:
    def get(key: str, s: dict) -> object:
        kind = s["kind"]
        if kind == "none":
            return None
        if kind == "dtype":
            dtype = getattr(torch, s["value"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{s['value']!r} is not a torch dtype")
            return dtype
        if kind == "tuple":
            return tuple(get(f"{key}::{i}", item) for i, item in enumerate(s["items"]))
        if kind == "tensor":
            return tensors[key]
        if kind == "per_channel":
            return torch._make_per_channel_quantized_tensor(
                tensors[key], tensors[f"{key}::scales"], tensors[f"{key}::zero_points"],
                s["axis"])
        return torch._make_per_tensor_quantized_tensor(tensors[key], s["scale"], s["zero_point"])

    cfg = meta["quant_config"]
    if cfg.get("qat"):  # torch's QAT fusion, not fold_batchnorm, shaped that graph
        qmodel = _rebuild(model, example_inputs, cfg)
    else:
        qmodel = quantize(model, example_inputs, backend=cfg.get("backend", "auto"),
                          per_channel=cfg.get("per_channel", True))
    state = collections.OrderedDict((k, get(k, s)) for k, s in meta["spec"].items())
    # torch's quantised modules read their format version from the state's _metadata
    state._metadata = qmodel.state_dict()._metadata  # type: ignore[attr-defined]
    qmodel.load_state_dict(state)
    qmodel.quant_config = cfg
    return qmodel
