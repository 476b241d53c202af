"""Weights from a file into a zoo model, adapted to its classes and input channels.

``create_model(name, weights=PATH)`` reads a torchvision ``.pth``/``.pt`` state dict
(``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary
pickled objects) or a ``.safetensors`` file, and loads it by torchvision's key names:

* a classifier of another size (``num_classes != 1000``) keeps its fresh initialisation;
* a first convolution of other input channels is adapted as timm does
  (``adapt_input_conv``): for one channel the RGB kernels are summed (a grey image
  ``g`` repeated as RGB gives the same response), for ``C > 3`` the RGB kernels are
  repeated and scaled by ``3 / C`` (the response to a grey image stays that of RGB);
* any other key missing, unexpected or of another shape is refused in one line: the file
  holds weights of another architecture.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

__all__ = ["read_state_dict", "load_pretrained", "adapt_input_conv"]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth``/``.pt`` state dict or a ``.safetensors`` file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: another format, a damaged file, or a file that is not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; give the path of "
                                "a torchvision .pth or a .safetensors file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"weights file {str(path)!r} is neither .pth/.pt nor .safetensors; "
                             "save it as one of those")
    except (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"weights file {str(path)!r} cannot be read as weights "
                         f"({' '.join(str(e).split())[:160]}); it is damaged or holds more than "
                         "tensors (save model.state_dict() only)") from None
    if isinstance(state, dict) and set(state) in ({"state_dict"}, {"model"}):
        state = next(iter(state.values()))  # a common wrapper: {"state_dict": {...}}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ValueError(f"weights file {str(path)!r} is not a state dict of tensors; save "
                         "model.state_dict()")
    return state


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB kernels ``[O, 3, *k]`` for ``in_chans`` input channels (see the module).

    Example:
        >>> import torch
        >>> from cnnkit.models._pretrained import adapt_input_conv
        >>> w = torch.ones(2, 3, 1, 1)
        >>> adapt_input_conv(w, 1)[0, :, 0, 0].tolist(), adapt_input_conv(w, 6)[0, :, 0, 0].tolist()
        ([3.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    """
    if weight.shape[1] == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    repeats = math.ceil(in_chans / weight.shape[1])
    tiled = weight.repeat(1, repeats, *[1] * (weight.ndim - 2))[:, :in_chans]
    return tiled * (weight.shape[1] / in_chans)


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` in place, adapting the classifier and the first
    convolution (see the module); raises ValueError naming the first keys that do not fit."""
    own = model.state_dict()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_keys = {f"{name}.{p}" for name, m in model.named_modules() if m is head
                 for p in m.state_dict()} if head is not None else set()
    first_conv = next((f"{n}.weight" for n, m in model.named_modules()
                       if isinstance(m, nn.modules.conv._ConvNd)), None)
    missing = sorted(set(own) - set(state) - head_keys)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = [f"{len(missing)} keys missing ({', '.join(missing[:3])} ...)" if missing else "",
                 f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])} ...)"
                 if unexpected else ""]
        raise ValueError(f"{source} does not hold weights of this {type(model).__name__}: "
                         f"{'; '.join(p for p in parts if p)}; give weights of the same "
                         "architecture (torchvision's key names)")
    loaded = {}
    for key, value in state.items():
        if key == first_conv and value.ndim >= 3 and value.shape[1] != own[key].shape[1]:
            value = adapt_input_conv(value, own[key].shape[1])
        if value.shape != own[key].shape:
            if key in head_keys:
                continue  # another number of classes: the head keeps its fresh init
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, this model's is "
                             f"{tuple(own[key].shape)}; the file holds weights of another "
                             "architecture or width")
        loaded[key] = value.to(own[key].dtype)
    model.load_state_dict(loaded, strict=False)
