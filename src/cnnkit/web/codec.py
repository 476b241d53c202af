"""Arrays for the browser: float32 little-endian bytes in base64, decoded there by a
``Float32Array`` view, so the numbers the page shows are the model's float32 values
bit for bit (JSON floats of float32 would round-trip too, but cost 3-4x the bytes and
the parse time)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

__all__ = ["pack", "unpack"]


def pack(t: torch.Tensor) -> dict[str, Any]:
    """``{"shape": [...], "data": base64}`` of ``t`` as float32 little-endian.

    Example:
        >>> import torch
        >>> from cnnkit.web.codec import pack
        >>> pack(torch.tensor([1.0, -2.0]))
        {'shape': [2], 'data': 'AACAPwAAAMA='}
    """
    a = t.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4", copy=False)
    return {"shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def unpack(d: dict[str, Any]) -> np.ndarray:
    """The inverse of :func:`pack` (for tests and clients in Python).

    Example:
        >>> import torch
        >>> from cnnkit.web.codec import pack, unpack
        >>> unpack(pack(torch.tensor([[1.5, 2.0]]))).tolist()
        [[1.5, 2.0]]
    """
    flat = np.frombuffer(base64.b64decode(d["data"]), dtype="<f4")
    return flat.reshape(d["shape"])
