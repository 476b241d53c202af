"""The forward tracer: one torch-function mode that follows every tensor of a forward pass.

Module hooks only see module boundaries, but the arithmetic that makes a network branched
(a ResNet addition, a DenseNet concatenation, the merge of Inception branches) happens
between modules, in plain torch functions. A :class:`~torch.overrides.TorchFunctionMode`
sees every call, so the tracer can, for any graph:

* propagate a :class:`~cnnkit.analysis.receptive_field.ReceptiveField` per tensor
  (convolutions, pools, padding and resampling by their recurrences, everything else by
  the union of its inputs);
* count multiply-accumulates of convolutions and linear layers;
* measure the live activation memory (storages of tensors produced in the pass, counted
  once per storage while a tensor still refers to it) and its peak.

Per-tensor state lives in weak-keyed dictionaries, so a tensor freed by the forward pass
takes its entry with it and a recycled ``id`` can never pick up a stale field.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from cnnkit.layers.ops import arg, ntuple, tensors

from .receptive_field import ReceptiveField, adaptive_window

__all__ = ["ForwardTracer"]

_CONV = re.compile(r"^conv([123])d$")
_CONV_T = re.compile(r"^conv_transpose([123])d$")
_MAX_POOL = re.compile(r"^_?max_pool([123])d(_with_indices)?$")
_AVG_POOL = re.compile(r"^avg_pool([123])d$")
_LP_POOL = re.compile(r"^lp_pool([123])d$")
_ADAPTIVE = re.compile(r"^_?adaptive_(avg|max)_pool([123])d(_with_indices)?$")
_MAX_UNPOOL = re.compile(r"^max_unpool([123])d$")
# F.interpolate and its deprecated aliases; the value is the mode an alias fixes.
_RESAMPLE = {"interpolate": None, "upsample": None, "upsample_nearest": "nearest",
             "upsample_bilinear": "bilinear"}
# Input pixels that feed one output pixel along a dim, per interpolation mode.
_TAPS = {"nearest": 1, "nearest-exact": 1, "linear": 2, "bilinear": 2, "trilinear": 2,
         "bicubic": 4}
# Ops whose output sees the whole input whatever its shape.
_GLOBAL = {"linear", "bilinear"}


_NORMS = frozenset({"batch_norm", "group_norm", "layer_norm", "instance_norm"})


def _macs(name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    """Multiply-accumulates of one call: convolutions, linear layers and normalisations.

    A convolution weight is ``[C_out, C_in / groups, *kernel]``, so every output element
    costs ``prod(weight.shape[1:])``; a transposed convolution's weight is
    ``[C_in, C_out / groups, *kernel]`` and the same product is paid per *input* element.
    A normalisation layer at inference is the affine map ``x * scale + shift``: one
    multiply-accumulate per output element.
    """
    if _CONV.match(name):
        return out.numel() * math.prod(arg(args, kwargs, 1, "weight").shape[1:])
    if _CONV_T.match(name):
        x = arg(args, kwargs, 0, "input")
        return x.numel() * math.prod(arg(args, kwargs, 1, "weight").shape[1:])
    if name == "linear":
        return out.numel() * arg(args, kwargs, 1, "weight").shape[-1]
    if name in _NORMS:
        return out.numel()
    return 0


def _spatial_rule(name: str, args: tuple, kwargs: dict, field: ReceptiveField,
                  extent: tuple[int, ...]) -> ReceptiveField | None:
    """The field after a layer that acts on the spatial dims, or None for other ops.

    ``field`` belongs to the op's first input, whose spatial shape it describes.
    """
    n = len(field.extent or ())
    ones = (1,) * n
    if (m := _CONV.match(name)) and int(m[1]) == n:
        kernel = tuple(arg(args, kwargs, 1, "weight").shape[2:])
        stride = ntuple(arg(args, kwargs, 3, "stride", 1), n)
        dilation = ntuple(arg(args, kwargs, 5, "dilation", 1), n)
        padding = arg(args, kwargs, 4, "padding", 0)
        if isinstance(padding, str):
            # "valid" is no padding; "same" puts d(k-1)//2 first (an odd pixel goes last).
            padding = tuple(0 if padding == "valid" else d * (k - 1) // 2
                            for k, d in zip(kernel, dilation, strict=True))
        return field.window(kernel, stride, ntuple(padding, n), dilation, extent)
    if (m := _CONV_T.match(name)) and int(m[1]) == n:
        kernel = tuple(arg(args, kwargs, 1, "weight").shape[2:])
        return field.transposed(kernel, ntuple(arg(args, kwargs, 3, "stride", 1), n),
                                ntuple(arg(args, kwargs, 4, "padding", 0), n),
                                ntuple(arg(args, kwargs, 7, "dilation", 1), n), extent)
    if (m := _MAX_POOL.match(name) or _AVG_POOL.match(name)) and int(m[1]) == n:
        kernel = ntuple(arg(args, kwargs, 1, "kernel_size"), n)
        stride = ntuple(arg(args, kwargs, 2, "stride") or kernel, n)
        padding = ntuple(arg(args, kwargs, 3, "padding", 0), n)
        dilation = ones
        if name.lstrip("_").startswith("max"):
            dilation = ntuple(arg(args, kwargs, 4, "dilation", 1), n)
        return field.window(kernel, stride, padding, dilation, extent)
    if (m := _LP_POOL.match(name)) and int(m[1]) == n:
        kernel = ntuple(arg(args, kwargs, 2, "kernel_size"), n)
        stride = ntuple(arg(args, kwargs, 3, "stride") or kernel, n)
        return field.window(kernel, stride, (0,) * n, ones, extent)
    if (m := _ADAPTIVE.match(name)) and int(m[2]) == n:
        return _adaptive(field, extent)
    if name in _RESAMPLE:
        mode = _RESAMPLE[name] or arg(args, kwargs, 3, "mode", "nearest")
        if mode == "area":  # area interpolation is adaptive average pooling
            return _adaptive(field, extent)
        taps = _TAPS.get(mode, 1)
        align = arg(args, kwargs, 4, "align_corners", name == "upsample_bilinear")
        # Linear modes without align_corners centre output pixel 0 at input (0.5 n/m - 0.5).
        offset = tuple(max(0.0, 0.5 * a / b - 0.5) if taps > 1 and not align else 0.0
                       for a, b in zip(field.extent or (), extent, strict=True))
        return field.resampled(extent, taps, offset)
    if name == "pad":
        pads = list(arg(args, kwargs, 1, "pad"))
        # F.pad lists (before, after) pairs from the last dim backwards.
        before = [pads[2 * (n - 1 - i)] if 2 * (n - 1 - i) < len(pads) else 0
                  for i in range(n)]
        return field.shifted(before, extent)
    if (m := _MAX_UNPOOL.match(name)) and int(m[1]) == n:
        # Each output pixel holds one pooled value (or zero): nearest-neighbour upsampling.
        return field.resampled(extent, 1, (0.0,) * n)
    if name == "__getitem__":
        return _sliced(args[1], field, extent, args[0].ndim)
    if name == "pixel_unshuffle":
        r = int(arg(args, kwargs, 1, "downscale_factor"))
        return field.window((r,) * n, (r,) * n, (0,) * n, ones, extent)
    if name == "pixel_shuffle":
        r = int(arg(args, kwargs, 1, "upscale_factor"))
        return field.resampled(extent, 1, (-(r - 1) / (2 * r),) * n)
    return None


def _sliced(index: Any, field: ReceptiveField, extent: tuple[int, ...], ndim: int
            ) -> ReceptiveField | None:
    """``x[..., a:b, c:d]`` (a crop) shifts pixel 0 to ``(a, c)``; other indexing: None."""
    n = len(extent)
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        spatial = index[index.index(Ellipsis) + 1:]
    elif len(index) > ndim - n:  # x[:, :, a:b, c:d]: the spatial part starts at ndim - n
        spatial = index[ndim - n:]
    else:
        return None
    if len(spatial) > n or not all(isinstance(i, slice) and i.step in (None, 1)
                                   for i in spatial):
        return None
    spatial = (slice(None),) * (n - len(spatial)) + tuple(spatial)
    starts = [slice_start(i, size) for i, size in zip(spatial, field.extent or (), strict=True)]
    return field.shifted([-s for s in starts], extent)


def slice_start(index: slice, size: int) -> int:
    start = index.start or 0
    return start + size if start < 0 else start


def _adaptive(field: ReceptiveField, extent: tuple[int, ...]) -> ReceptiveField:
    windows = [adaptive_window(a, b) for a, b in zip(field.extent or (), extent, strict=True)]
    kernel, stride, padding = (tuple(w[i] for w in windows) for i in range(3))
    return field.window(kernel, stride, padding, (1,) * len(extent), extent)


class ForwardTracer(TorchFunctionMode):
    """Torch-function mode recording receptive fields, MACs and live activation memory.

    Args:
        spatial_dims: number of trailing spatial dims of the model input (2 for images).

    Use as a context manager around one forward pass, after :meth:`watch_input`; call
    :meth:`close` afterwards so pending finalizers stop referring to the tracer.
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.macs = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self._fields: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._storage_refs: dict[int, int] = {}
        self._storage_bytes: dict[int, int] = {}
        self._finalizers: list[weakref.finalize] = []

    def watch_input(self, x: torch.Tensor) -> None:
        """Declare ``x`` the model input: its pixels are the unit of every field."""
        self._fields[x] = ReceptiveField.identity(x.shape[-self.spatial_dims:])
        self._track(x)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def field(self, t: torch.Tensor) -> ReceptiveField | None:
        """Receptive field of ``t``, or None if it does not depend on the input."""
        return self._fields[t] if t in self._fields else None

    def close(self) -> None:
        for fin in self._finalizers:
            fin.detach()
        self._finalizers.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = list(tensors(out))
        if outs:  # skip calls returning no tensor (.shape, .dim(), .item() ...)
            name = getattr(func, "__name__", "")
            self.macs += _macs(name, args, kwargs, outs[0])
            self._propagate(name, args, kwargs, outs)
            for t in outs:
                self._track(t)
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    def _extent(self, t: torch.Tensor) -> tuple[int, ...] | None:
        # A tensor keeps a spatial layout while it has a dim besides the spatial ones.
        n = self.spatial_dims
        return tuple(t.shape[-n:]) if t.dim() > n else None

    def _propagate(self, name: str, args: tuple, kwargs: dict,
                   outs: Sequence[torch.Tensor]) -> None:
        fields = [self._fields[t] for t in tensors((args, kwargs)) if t in self._fields]
        if not fields:
            return
        x = arg(args, kwargs, 0, "input")
        first = self.field(x) if isinstance(x, torch.Tensor) else None
        spatial = (first is not None and first.extent is not None
                   and first.extent == self._extent(x))
        for t in outs:
            extent = self._extent(t)
            if name in _GLOBAL:
                self._fields[t] = ReceptiveField.union(fields, None)
                continue
            rule = None
            if spatial and extent is not None:
                rule = _spatial_rule(name, args, kwargs, first, extent)
            self._fields[t] = rule if rule is not None else ReceptiveField.union(fields, extent)

    def _track(self, t: torch.Tensor) -> None:
        if t in self._seen or t.layout != torch.strided or t.device.type == "meta":
            return
        self._seen[t] = True
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        if key not in self._storage_refs:  # a view or in-place result shares its storage
            self._storage_refs[key] = 0
            self._storage_bytes[key] = nbytes
            self.live_bytes += nbytes
        self._storage_refs[key] += 1
        self._finalizers.append(weakref.finalize(t, self._release, key))

    def _release(self, key: int) -> None:
        self._storage_refs[key] -= 1
        if self._storage_refs[key] == 0:
            del self._storage_refs[key]
            self.live_bytes -= self._storage_bytes.pop(key)
