"""Input-gradient explanations: saliency, gradient x input, SmoothGrad, Integrated Gradients.

All four read the gradient of a target logit with respect to the input elements (samples
of a signal, pixels, voxels: inputs ``[B, C, *spatial]`` with 1, 2 or 3 spatial dims).
The gradients of the ``K`` targets of an input come from one forward and one batched
backward (:meth:`Explainer.grads`). A map has no channel axis, so each method says how it
reduces the ``C`` input channels:

* ``saliency`` and ``smoothgrad``: ``max_c |grad_c|`` by default (Simonyan et al. 2014),
  with ``abs`` and ``reduce`` ("max", "sum", "mean") as options;
* ``gradient_x_input`` and ``integrated_gradients``: the sum over channels, so an
  element's value is the sum of its channels' attributions and IG's completeness holds
  for the map.

:func:`input_gradients` returns the unreduced ``[B, K, C, *spatial]`` gradients.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ._base import Explainer, register_method

__all__ = ["input_gradients", "reduce_channels", "Saliency", "GradientXInput", "SmoothGrad",
           "IntegratedGradients"]

_REDUCTIONS = ("max", "sum", "mean")


def input_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Gradients ``[B, K, C, *spatial]`` of ``model(x)[b, targets[b, k]]`` w.r.t. ``x``.

    One forward and one batched backward for all K targets. The model should be in eval
    mode (batch statistics would couple the images of the batch).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = Explainer.select(model(x), targets)
        return Explainer.grads(scores, x)[0]


def reduce_channels(grads: torch.Tensor, abs: bool = True, reduce: str = "max") -> torch.Tensor:
    """``[B, K, C, *spatial]`` -> ``[B, K, *spatial]``: optionally ``|.|``, then
    max/sum/mean over C."""
    if reduce not in _REDUCTIONS:
        raise ValueError(f"unknown channel reduction {reduce!r}; choose from {_REDUCTIONS}")
    g = grads.abs() if abs else grads
    if reduce == "max":
        return g.amax(2)
    return g.sum(2) if reduce == "sum" else g.mean(2)


def _check_batch_size(n: int) -> int:
    if n < 1:
        raise ValueError(f"internal_batch_size must be a positive int, got {n}")
    return int(n)


@register_method("saliency")
class Saliency(Explainer):
    """Vanilla gradient saliency: how much each input element moves the target logit.

    Simonyan, Vedaldi and Zisserman (2014), "Deep Inside Convolutional Networks:
    Visualising Image Classification Models and Saliency Maps", ICLR workshop. The map
    is ``max_c |d S_c / d x|`` over the colour channels, as in the paper (Sec. 3.1).

    Args:
        model: the classifier.
        layer: ignored (an input-gradient method).
        abs: take the gradient's absolute value before reducing the channels.
        reduce: channel reduction, "max" (the paper), "sum" or "mean".

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> cnnkit.explain.create("saliency", model)(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 16, 16])
        >>> signal = cnnkit.create_model("resnet18", num_classes=3, input_size=(2, 64))
        >>> cnnkit.explain.create("saliency", signal)(torch.rand(2, 2, 64)).shape
        torch.Size([2, 64])
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None,
                 abs: bool = True, reduce: str = "max") -> None:
        super().__init__(model, layer)
        if reduce not in _REDUCTIONS:
            raise ValueError(f"unknown channel reduction {reduce!r}; choose from {_REDUCTIONS}")
        self.abs, self.reduce = abs, reduce

    def gradients(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[B, K, C, *spatial]`` input gradients; guided backprop and DeconvNet change
        this."""
        return input_gradients(self.model, x, targets)

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return reduce_channels(self.gradients(x, targets), self.abs, self.reduce)


@register_method("gradient_x_input")
class GradientXInput(Explainer):
    """Gradient times input, summed over channels.

    Shrikumar, Greenside, Shcherbina and Kundaje (2016), "Not Just a Black Box: Learning
    Important Features Through Propagating Activation Differences", arXiv:1605.01713;
    discussed as a baseline in Shrikumar, Greenside and Kundaje (2017), "Learning Important
    Features Through Propagating Activation Differences" (DeepLIFT), ICML. For a linear
    model ``w.x + b`` it is exactly ``w * x``.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> cnnkit.explain.create("gradient_x_input", model)(torch.rand(1, 3, 16, 16)).shape
        torch.Size([1, 16, 16])
    """

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (input_gradients(self.model, x, targets) * x[:, None]).sum(2)


@register_method("smoothgrad")
class SmoothGrad(Explainer):
    """SmoothGrad: the gradient averaged over noisy copies of the input.

    Smilkov, Thorat, Kim, Viegas and Wattenberg (2017), "SmoothGrad: removing noise by
    adding noise", arXiv:1706.03825. As in the paper (Eq. 3) the raw gradients of
    ``n_samples`` copies ``x + N(0, sigma^2)`` are averaged, with
    ``sigma = noise * (max(x) - min(x))`` for each input on its own (the paper's noise
    level, Sec. 3.2: 10-20% of the input's range works best; the default 0.15), so the
    noise adapts to the input's scale: a [0, 255] image, a normalised one and a signal in
    millivolts get the same relative noise. The mean gradient is then reduced like
    :class:`Saliency`. The noisy copies
    go through the network ``internal_batch_size`` at a time.

    Args:
        model: the classifier.
        layer: ignored.
        n_samples: number of noisy copies per input (paper: 50; 25 is usually enough).
        noise: noise std as a fraction of each input's value range ``max - min``.
        seed: seeds a private generator so the map is deterministic; None uses torch's
            global generator.
        abs: as in :class:`Saliency`.
        reduce: as in :class:`Saliency`.
        internal_batch_size: inputs per forward/backward.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> sg = cnnkit.explain.create("smoothgrad", model, n_samples=8, seed=0)
        >>> sg(torch.rand(1, 3, 16, 16), target=[[0, 2]]).shape
        torch.Size([1, 2, 16, 16])
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None,
                 n_samples: int = 25, noise: float = 0.15, seed: int | None = 0,
                 abs: bool = True, reduce: str = "max", internal_batch_size: int = 32) -> None:
        super().__init__(model, layer)
        if n_samples < 1 or noise < 0:
            raise ValueError(f"need n_samples >= 1 and noise >= 0, got {n_samples}, {noise}")
        if reduce not in _REDUCTIONS:
            raise ValueError(f"unknown channel reduction {reduce!r}; choose from {_REDUCTIONS}")
        self.n_samples, self.noise, self.seed = int(n_samples), float(noise), seed
        self.abs, self.reduce = abs, reduce
        self.internal_batch_size = _check_batch_size(internal_batch_size)

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.n_samples
        # Noise is drawn on the CPU from a private generator: the same seed gives the same
        # map on every device and leaves torch's global random state untouched.
        gen = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        eps = torch.randn((b, n, *x.shape[1:]), generator=gen, dtype=x.dtype)
        flat = x.flatten(1)
        sigma = self.noise * (flat.amax(1) - flat.amin(1))  # [B]
        noisy = (x[:, None] + eps.to(x.device) * sigma.view(b, *[1] * x.ndim)).flatten(0, 1)
        tg = targets.repeat_interleave(n, 0)
        total = torch.zeros((b, targets.shape[1], *x.shape[1:]), dtype=x.dtype, device=x.device)
        owner = torch.arange(b, device=x.device).repeat_interleave(n)
        for i in range(0, b * n, self.internal_batch_size):
            sl = slice(i, i + self.internal_batch_size)
            total.index_add_(0, owner[sl], input_gradients(self.model, noisy[sl], tg[sl]))
        return reduce_channels(total / n, self.abs, self.reduce)


def _path_rule(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``alpha`` in [0, 1] and weights of the path integral's quadrature rule."""
    if method == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return alphas, weights
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
        return (nodes + 1) / 2, weights / 2
    raise ValueError(f"unknown integration method {method!r}; choose 'riemann_trapezoid' "
                     "or 'gausslegendre'")


@register_method("integrated_gradients")
class IntegratedGradients(Explainer):
    """Integrated Gradients along the straight path from a baseline, summed over channels.

    Sundararajan, Taly and Yan (2017), "Axiomatic Attribution for Deep Networks", ICML.
    ``IG_i = (x_i - x'_i) * integral_0^1 dS(x' + a (x - x')) / dx_i da``, approximated with
    ``steps`` points of the trapezoid rule or of Gauss-Legendre quadrature. Completeness:
    the map sums to ``S(x) - S(x')`` up to the quadrature error. The ``B x steps``
    interpolated inputs go through the network ``internal_batch_size`` at a time, so
    peak memory is that of one such batch whatever ``steps`` is.

    **Adaptive steps** (``steps=None``, the default): the rule starts with 17 points and
    doubles the intervals (17, 33, 65 ... up to ``max_steps`` points) until every map's
    completeness error ``|sum(IG) - (S(x) - S(x'))|`` is at most ``tolerance`` times
    ``|S(x) - S(x')|`` (plus 1e-6 of the scores' size for rounding), the check the paper
    recommends (Sec. 4: the attributions should add up to within 5% of the difference).
    Each input is refined on its own (one hard input does not cost the batch), and the
    trapezoid rule's points are nested, so each doubling evaluates only the new midpoints;
    Gauss-Legendre recomputes. ``steps_used`` holds the most points an input of the last
    call took; if ``max_steps`` is not enough a warning says so.

    Args:
        model: the classifier.
        layer: ignored.
        baseline: the reference input x': None (zeros), a number, or a tensor
            broadcastable to the input ``[B, C, *spatial]`` (e.g. ``[C, *spatial]``).
        steps: number of points on the path (the paper uses 20 to 300); None: adapted to
            each call until the completeness error is below ``tolerance``.
        method: "riemann_trapezoid" or "gausslegendre".
        tolerance: with ``steps=None``, the completeness error allowed, relative to
            ``|S(x) - S(x')|`` (default 5%, the paper's).
        max_steps: with ``steps=None``, the most points tried.
        internal_batch_size: interpolated inputs per forward/backward.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> ig = cnnkit.explain.create("integrated_gradients", model, steps=16)
        >>> ig(torch.rand(2, 3, 16, 16), target=1).shape
        torch.Size([2, 16, 16])
        >>> volume = cnnkit.create_model("resnet18", num_classes=3, input_size=(1, 8, 16, 16))
        >>> ig = cnnkit.explain.create("integrated_gradients", volume, steps=4)
        >>> ig(torch.rand(1, 1, 8, 16, 16), target=lambda y: y[:, 2]).shape
        torch.Size([1, 8, 16, 16])
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None,
                 baseline: torch.Tensor | float | None = None, steps: int | None = None,
                 method: str = "riemann_trapezoid", internal_batch_size: int = 32,
                 tolerance: float = 0.05, max_steps: int = 513) -> None:
        super().__init__(model, layer)
        if steps is not None and steps < 2:
            raise ValueError(f"steps must be at least 2 (or None: adaptive), got {steps}")
        if not tolerance > 0 or max_steps < 2:
            raise ValueError(f"need tolerance > 0 and max_steps >= 2, got {tolerance}, "
                             f"{max_steps}")
        _path_rule(method, 2)  # validates the name early
        self.baseline, self.method = baseline, method
        self.steps = None if steps is None else int(steps)
        self.tolerance, self.max_steps = float(tolerance), int(max_steps)
        self.internal_batch_size = _check_batch_size(internal_batch_size)
        self.steps_used: int | None = None

    def resolve_baseline(self, x: torch.Tensor) -> torch.Tensor:
        """The baseline as a ``[B, C, *spatial]`` tensor like ``x``."""
        if self.baseline is None:
            return torch.zeros_like(x)
        base = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device)
        try:
            return base.expand_as(x)
        except RuntimeError:
            raise ValueError(f"baseline of shape {tuple(base.shape)} does not broadcast to the "
                             f"input {tuple(x.shape)}; give [C, *spatial], [B, C, *spatial] "
                             "or a number"
                             ) from None

    def path_sum(self, base: torch.Tensor, delta: torch.Tensor, targets: torch.Tensor,
                 alphas: np.ndarray, weights: np.ndarray) -> torch.Tensor:
        """``sum_j weights[j] * grad S(base + alphas[j] * delta)``, ``[B, K, C, *spatial]``."""
        b, n = base.shape[0], len(alphas)
        alphas = torch.as_tensor(alphas, dtype=base.dtype, device=base.device)
        weights = torch.as_tensor(weights, dtype=base.dtype, device=base.device)
        # Enumerate the (input, step) pairs and build each chunk's inputs on the fly, so no
        # tensor of all B x steps inputs is ever materialised.
        img = torch.arange(b, device=base.device).repeat_interleave(n)
        step = torch.arange(n, device=base.device).repeat(b)
        total = torch.zeros((b, targets.shape[1], *base.shape[1:]), dtype=base.dtype,
                            device=base.device)
        for i in range(0, b * n, self.internal_batch_size):
            im, st = img[i:i + self.internal_batch_size], step[i:i + self.internal_batch_size]
            a = alphas[st].view(-1, *[1] * (base.ndim - 1))
            g = input_gradients(self.model, base[im] + a * delta[im], targets[im])
            total.index_add_(0, im, g * weights[st].view(-1, *[1] * base.ndim))
        return total

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        base = self.resolve_baseline(x)
        delta = x - base
        if self.steps is not None:
            self.steps_used = self.steps
            total = self.path_sum(base, delta, targets, *_path_rule(self.method, self.steps))
            return (total * delta[:, None]).sum(2)
        return self.adaptive(x, base, delta, targets)

    def adaptive(self, x: torch.Tensor, base: torch.Tensor, delta: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
        """Integrated gradients with points doubled until completeness holds (class doc);
        each input is refined on its own, so one hard input does not cost the batch."""
        with torch.no_grad():
            s_x, s_base = (self.select(self.model(v), targets) for v in (x, base))
        want = s_x - s_base  # [B, K]
        allowed = self.tolerance * want.abs() + 1e-6 * (s_x.abs() + s_base.abs() + 1)
        trapezoid = self.method == "riemann_trapezoid"
        n = min(17, self.max_steps)
        steps = torch.full((x.shape[0],), n)
        maps = torch.zeros((x.shape[0], targets.shape[1], *x.shape[2:]), dtype=x.dtype,
                           device=x.device)
        todo = torch.arange(x.shape[0], device=x.device)  # the inputs not yet converged
        ends = inner = None
        while True:
            b, d, t = base[todo], delta[todo], targets[todo]
            if trapezoid:  # nested points: only the new ones are evaluated
                if ends is None:
                    ends = self.path_sum(b, d, t, np.array([0.0, 1.0]), np.ones(2))
                    inner = self.path_sum(b, d, t, np.linspace(0, 1, n)[1:-1], np.ones(n - 2))
                else:
                    new = np.linspace(0, 1, n)[1::2]
                    inner = inner + self.path_sum(b, d, t, new, np.ones(len(new)))
                total = (ends / 2 + inner) / (n - 1)
            else:
                total = self.path_sum(b, d, t, *_path_rule(self.method, n))
            maps[todo] = (total * d[:, None]).sum(2)
            steps[todo.cpu()] = n
            error = (maps[todo].flatten(2).sum(2) - want[todo]).abs()
            left = ~(error <= allowed[todo]).all(1)
            if not bool(left.any()) or 2 * n - 1 > self.max_steps:
                break
            todo, n = todo[left], 2 * n - 1
            if trapezoid:
                ends, inner = ends[left], inner[left]
        self.steps_used = int(steps.max())
        if bool(left.any()):
            worst = float((error / want[todo].abs().clamp_min(1e-12)).max())
            warnings.warn(f"integrated_gradients: completeness error {worst:.3g} after {n} "
                          f"steps (tolerance {self.tolerance:g}); give --opt max_steps="
                          f"{2 * n - 1} or a larger tolerance", UserWarning, stacklevel=4)
        return maps
