"""The forward tracer: one torch-function mode that follows every tensor of a forward pass.

Module hooks only see module boundaries, but the arithmetic that makes a network branched
(a ResNet addition, a DenseNet concatenation, the merge of Inception branches) happens
between modules, in plain torch functions. A :class:`~torch.overrides.TorchFunctionMode`
sees every call, so the tracer can, for any graph:

* propagate a :class:`~cnnkit.analysis.receptive_field.ReceptiveField` per tensor
  (convolutions, pools, padding and resampling by their recurrences, everything else by
  the union of its inputs), in any number of spatial dims;
* count multiply-accumulates of convolutions, linear layers and norms;
* measure the live activation memory (storages of tensors produced in the pass, counted
  once per storage while a tensor still refers to it) and its peak.

What an operator costs and does to the spatial axes are its facts in the operator
registry (:mod:`cnnkit.layers.ops`: ``macs``, ``field``, ``dims``); an operator applied to
a value that depends on the input and unknown to the registry stops the pass with one
line (:class:`~cnnkit.layers.ops.UnknownOperator`). Calls on constants only (weights,
fresh tensors) are followed for memory but are not the network's operators.

Per-tensor state lives in weak-keyed dictionaries, so a tensor freed by the forward pass
takes its entry with it and a recycled ``id`` can never pick up a stale field.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from cnnkit.layers.ops import (
    GLOBAL,
    OpFacts,
    Resample,
    Shift,
    Transposed,
    Window,
    arg,
    function_facts,
    tensors,
)

from .receptive_field import ReceptiveField

__all__ = ["ForwardTracer"]


def _apply(rule: object, field: ReceptiveField, extent: tuple[int, ...]) -> ReceptiveField | None:
    """The field after a spatial map of the registry (None: not a spatial map)."""
    if isinstance(rule, Window):
        return field.window(rule.kernel, rule.stride, rule.padding, rule.dilation, extent)
    if isinstance(rule, Transposed):
        return field.transposed(rule.kernel, rule.stride, rule.padding, rule.dilation, extent)
    if isinstance(rule, Resample):
        return field.resampled(extent, rule.taps, rule.offset)
    if isinstance(rule, Shift):
        return field.shifted(rule.before, extent)
    return None


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
            fields = [self._fields[t] for t in tensors((args, kwargs)) if t in self._fields]
            if fields:  # an operator of the network: the registry must know it
                facts = function_facts(getattr(func, "__name__", repr(func)), "the summary")
                if facts.macs is not None:
                    self.macs += facts.macs(args, kwargs, outs[0])
                self._propagate(facts, fields, args, kwargs, outs)
            for t in outs:
                self._track(t)
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    def _extent(self, t: torch.Tensor) -> tuple[int, ...] | None:
        # A tensor keeps a spatial layout while it has a dim besides the spatial ones.
        n = self.spatial_dims
        return tuple(t.shape[-n:]) if t.dim() > n else None

    def _propagate(self, facts: OpFacts, fields: Sequence[ReceptiveField], args: tuple,
                   kwargs: dict, outs: Sequence[torch.Tensor]) -> None:
        x = arg(args, kwargs, 0, "input")
        first = self.field(x) if isinstance(x, torch.Tensor) else None
        # The operator's spatial map applies when its first input keeps its layout and the
        # operator acts on as many axes as the input has (ECA's Conv1d over the channels of
        # a 2D map does not).
        spatial = (first is not None and first.extent is not None
                   and first.extent == self._extent(x)
                   and facts.dims in (None, self.spatial_dims))
        for t in outs:
            extent = self._extent(t)
            if facts.field == GLOBAL:
                self._fields[t] = ReceptiveField.union(fields, None)
                continue
            field = None
            if spatial and extent is not None and callable(facts.field):
                field = _apply(facts.field(args, kwargs, first.extent, extent), first, extent)
            self._fields[t] = field if field is not None else ReceptiveField.union(fields,
                                                                                   extent)

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
