"""Activation-range observers for int8 calibration that clip outliers.

``"percentile"`` (a percentile of ``|x|``; McKinstry et al. 2019 / Wu, Judd, Zhang, Isaev and
Micikevicius 2020, "Integer Quantization for Deep Learning Inference: Principles and Empirical
Evaluation") and ``"entropy"`` (the threshold minimising the KL divergence between the clipped
and the quantised histogram: Migacz 2017, "8-bit Inference with TensorRT", GTC); ``"minmax"``
is torch's own ``MinMaxObserver``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.ao.quantization.observer import UniformQuantizationObserverBase

__all__ = ["OBSERVERS", "EntropyObserver", "PercentileObserver"]

OBSERVERS = ("minmax", "percentile", "entropy")


class _AbsHistogramObserver(UniformQuantizationObserverBase):
    """Keeps a histogram of ``|x|`` on ``[0, abs_max]``; subclasses pick a threshold ``T``.

    The activation range is the observed ``[min, max]`` clipped to ``[-T, T]``.
    """

    def __init__(self, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None, bins: int = 2048,
                 **kwargs) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range,
                         quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("abs_max", torch.tensor(0.0))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().float()
        self.min_val = torch.minimum(self.min_val, x.min())
        self.max_val = torch.maximum(self.max_val, x.max())
        a = x.abs().flatten()
        new_max = a.max()
        if new_max > self.abs_max:
            if self.histogram.sum() > 0:  # rebin the old counts (by bin centre) onto the new range
                centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.abs_max
                idx = (centres / new_max).mul(self.bins).long().clamp_(max=self.bins - 1)
                self.histogram = torch.zeros_like(self.histogram).index_add_(0, idx,
                                                                             self.histogram)
            self.abs_max = new_max.clone()
        if self.abs_max == 0:
            self.histogram[0] += a.numel()
        else:
            idx = (a / self.abs_max * self.bins).long().clamp_(max=self.bins - 1)
            self.histogram += torch.bincount(idx, minlength=self.bins).double()
        return x_orig

    def threshold(self) -> float:
        """The clipping threshold ``T`` on ``|x|``."""
        raise NotImplementedError

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.histogram.sum() == 0:
            raise ValueError(f"{type(self).__name__} saw no data; pass calibration batches")
        t = torch.tensor(self.threshold())
        lo = torch.maximum(self.min_val, -t)
        hi = torch.minimum(self.max_val, t)
        return self._calculate_qparams(lo, hi)

    def _levels(self) -> int:
        """Quantisation levels available on one side of zero (all of them if ``x >= 0``)."""
        levels = int(self.quant_max) - int(self.quant_min) + 1
        return levels if float(self.min_val) >= 0 else levels // 2

    def extra_repr(self) -> str:
        return f"bins={self.bins}, abs_max={float(self.abs_max):.4g}"


class PercentileObserver(_AbsHistogramObserver):
    """Clips activations at the ``percentile``-th percentile of ``|x|`` (default 99.99).

    Wu, Judd, Zhang, Isaev and Micikevicius (2020), "Integer Quantization for Deep Learning
    Inference: Principles and Empirical Evaluation" (percentile calibration).
    """

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def threshold(self) -> float:
        cdf = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        i = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100, dtype=cdf.dtype)))
        return min(i + 1, self.bins) * float(self.abs_max) / self.bins


class EntropyObserver(_AbsHistogramObserver):
    """KL-divergence ("entropy") calibration of Migacz (2017), "8-bit Inference with TensorRT".

    For every candidate threshold of ``i`` histogram bins (from the number of quantisation
    levels up to all bins), the reference ``P`` is the histogram clipped at ``i`` with the
    outliers added to its last bin, and ``Q`` is the first ``i`` bins merged into as many
    groups as there are quantisation levels and expanded back (each group's count spread
    evenly over its non-empty bins). The threshold with the smallest ``KL(P || Q)`` wins.
    The number of levels is the quantised range (128 with the x86 engine's 7-bit
    activations, 256 otherwise), halved when the tensor has negative values since the range
    is then split around zero. Unlike the paper's 8-bit symmetric int8 (128 positive levels),
    torch's activations are affine uint8. This is not torch's ``HistogramObserver``, which
    minimises an L2 quantisation error (Norm-minimisation search), not a KL divergence.
    """

    def threshold(self) -> float:
        # convert_fx asks twice per observer; the O(bins^2) search is worth remembering
        key = (float(self.histogram.sum()), float(self.abs_max), float(self.min_val))
        if getattr(self, "_cache", (None,))[0] != key:
            self._cache = (key, self._search())
        return self._cache[1]

    def _search(self) -> float:
        hist = self.histogram.numpy()
        levels = self._levels()
        if levels >= self.bins:  # no clipping can help with as many levels as bins
            return float(self.abs_max)
        best_i, best_kl = self.bins, float("inf")
        total = hist.sum()
        tail = total - np.cumsum(hist)  # counts beyond bin i-1, indexed by i-1
        for i in range(levels, self.bins + 1):
            kept = hist[:i]
            p = kept.copy()
            p[-1] += tail[i - 1]
            nonzero = p > 0
            group = np.arange(i) * levels // i
            sums = np.bincount(group, weights=kept, minlength=levels)
            counts = np.bincount(group, weights=nonzero, minlength=levels)
            q = np.where(nonzero, sums[group] / np.maximum(counts[group], 1), 0.0)
            p_n, q_n = p[nonzero] / total, q[nonzero] / max(q.sum(), 1e-12)
            kl = float(np.sum(p_n * np.log(p_n / np.maximum(q_n, 1e-12))))
            if kl < best_kl:
                best_i, best_kl = i, kl
        return best_i * float(self.abs_max) / self.bins
