"""Receptive-field arithmetic: the recurrences, one method per kind of layer.

A spatial value is described per spatial dimension by three numbers (Araujo, Norris
and Sim 2019, "Computing Receptive Fields of Convolutional Neural Networks", Distill;
Dumoulin and Visin 2016, "A guide to convolution arithmetic for deep learning"):

* ``size`` r: how many input pixels one output pixel sees;
* ``jump`` j: the distance, in input pixels, between two neighbouring output pixels
  (the product of the strides so far);
* ``start`` s: the input coordinate of the centre of the first output pixel's field
  (input pixel ``i`` sits at coordinate ``i``).

A window (convolution or pooling) with kernel k, stride t, padding p and dilation d maps
them to ``r' = r + (k-1) d j``, ``j' = j t``, ``s' = s + ((k-1) d / 2 - p) j``.
A value whose spatial layout is gone (flattened, fed to a linear layer, globally pooled)
is *global*: it sees its whole input map, ``r' = r + (n-1) j`` for a map of n pixels.
Several inputs (ResNet additions, DenseNet concatenations, Inception branches) combine by
the union (the hull) of their fields, so branched networks get the exact size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cnnkit.layers.op_rules import adaptive_window

__all__ = ["ReceptiveField", "adaptive_window"]


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of every pixel of a tensor w.r.t. the model input, per spatial dim.

    Attributes:
        size: field size in input pixels.
        jump: distance in input pixels between neighbouring pixels of this tensor.
        start: input coordinate of the centre of the first pixel's field.
        extent: spatial shape of the tensor these numbers describe; None when the value is
            global (its spatial layout is gone).
    """

    size: tuple[float, ...]
    jump: tuple[float, ...]
    start: tuple[float, ...]
    extent: tuple[int, ...] | None

    @classmethod
    def identity(cls, spatial_shape: Sequence[int]) -> ReceptiveField:
        """The model input: every pixel sees itself."""
        n = len(spatial_shape)
        return cls((1.0,) * n, (1.0,) * n, (0.0,) * n, tuple(int(s) for s in spatial_shape))

    def whole(self) -> ReceptiveField:
        """Field of a value that sees this entire map (global pooling, flatten, linear)."""
        if self.extent is None:
            return self
        dims = list(zip(self.size, self.jump, self.start, self.extent, strict=True))
        size = tuple(r + (n - 1) * j for r, j, _, n in dims)
        start = tuple(s + (n - 1) / 2 * j for _, j, s, n in dims)
        jump = tuple(j * n for _, j, _, n in dims)
        return ReceptiveField(size, jump, start, None)

    def window(self, kernel: Sequence[float], stride: Sequence[float],
               padding: Sequence[float], dilation: Sequence[float],
               extent: tuple[int, ...]) -> ReceptiveField:
        """A convolution or pooling window (the standard recurrences)."""
        size, jump, start = [], [], []
        for r, j, s, k, t, p, d in zip(self.size, self.jump, self.start,
                                       kernel, stride, padding, dilation, strict=True):
            size.append(r + (k - 1) * d * j)
            jump.append(j * t)
            start.append(s + ((k - 1) * d / 2 - p) * j)
        return ReceptiveField(tuple(size), tuple(jump), tuple(start), extent)

    def transposed(self, kernel: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int],
                   extent: tuple[int, ...]) -> ReceptiveField:
        """A transposed convolution: output ``o`` gets input ``i`` where ``o = i t - p + kk d``.

        The number of inputs feeding one output depends on ``o mod t``; the size is the
        largest span over the residues (exact, by enumeration of the k x t cases).
        """
        size, jump, start = [], [], []
        for r, j, s, k, t, p, d in zip(self.size, self.jump, self.start,
                                       kernel, stride, padding, dilation, strict=True):
            spans, first = [], None
            for o in range(t):
                ins = [(o + p - kk * d) // t for kk in range(k) if (o + p - kk * d) % t == 0]
                if ins:
                    spans.append(max(ins) - min(ins))
                    if o == 0:
                        first = (max(ins) + min(ins)) / 2
            size.append(r + max(spans, default=0) * j)
            jump.append(j / t)
            start.append(s + (first if first is not None else (p - (k - 1) * d / 2) / t) * j)
        return ReceptiveField(tuple(size), tuple(jump), tuple(start), extent)

    def resampled(self, extent: tuple[int, ...], taps: int, offset: Sequence[float]
                  ) -> ReceptiveField:
        """Interpolation to ``extent``: jump scales by ``n_in / n_out``; ``taps`` input pixels
        feed one output (1 nearest, 2 linear, 4 cubic); ``offset`` is the input coordinate,
        in input pixels, that output pixel 0 is centred on."""
        assert self.extent is not None
        size = tuple(r + (taps - 1) * j for r, j in zip(self.size, self.jump, strict=True))
        jump = tuple(j * n / m for j, n, m in zip(self.jump, self.extent, extent, strict=True))
        start = tuple(s + o * j for s, o, j in zip(self.start, offset, self.jump, strict=True))
        return ReceptiveField(size, jump, start, extent)

    def shifted(self, before: Sequence[int], extent: tuple[int, ...]) -> ReceptiveField:
        """Padding by ``before`` pixels at the start of each dim: the field is unchanged,
        pixel 0 moves ``before`` pixels to the left."""
        start = tuple(s - b * j for s, b, j in zip(self.start, before, self.jump, strict=True))
        return ReceptiveField(self.size, self.jump, start, extent)

    @staticmethod
    def union(fields: Sequence[ReceptiveField], extent: tuple[int, ...] | None
              ) -> ReceptiveField:
        """Combine the inputs of an op (add, mul, cat ...) into the field of its output.

        Inputs laid out like the output (same spatial shape) keep their per-pixel field;
        the others (a squeeze-excitation gate, a flattened vector) count as global. The
        output field is the hull of the inputs' fields, so a sum of a 3x3 branch and a
        7x7 branch sees 7x7, and two branches whose fields are offset see their union.
        """
        is_local = [extent is not None and f.extent == extent for f in fields]
        local = [f for f, keep in zip(fields, is_local, strict=True) if keep]
        every = [f if keep else f.whole() for f, keep in zip(fields, is_local, strict=True)]
        ndim = len(every[0].size)
        lo = [min(f.start[i] - (f.size[i] - 1) / 2 for f in every) for i in range(ndim)]
        hi = [max(f.start[i] + (f.size[i] - 1) / 2 for f in every) for i in range(ndim)]
        size = tuple(h - lo_ + 1 for lo_, h in zip(lo, hi, strict=True))
        start = tuple((lo_ + h) / 2 for lo_, h in zip(lo, hi, strict=True))
        jump = tuple(min(f.jump[i] for f in (local or every)) for i in range(ndim))
        return ReceptiveField(size, jump, start, extent if local else None)
