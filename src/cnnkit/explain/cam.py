"""Class activation maps: CAM, Grad-CAM, Grad-CAM++, Smooth Grad-CAM++, Layer-CAM.

Every gradient method here reads one layer's activation ``A`` ``[B, C, *s]`` and the
gradients ``G`` ``[B, K, C, *s]`` of the K target logits with respect to it, from ONE
forward (:meth:`Explainer.capture`) and ONE batched backward (:meth:`Explainer.grads`).
:class:`_GradCamBase` owns that; a variant overrides one small method, ``combine``, which
turns ``(A, G)`` into maps ``[B, K, *s]`` (the pytorch-grad-cam design). ``s`` is the
layer's spatial shape, of 1, 2 or 3 dims like the input's: averages and sums "over space"
run over every spatial axis. Maps are ReLU'd as in the papers; CAM, which the paper
leaves signed, is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnkit.layers.nd import CONVS

from ._base import Explainer, TargetScores, register_method, resolve_layer

__all__ = ["CAM", "GradCAM", "GradCAMPlusPlus", "SmoothGradCAMPlusPlus", "LayerCAM",
           "layer_gradients", "gradcampp_weights", "channel_sum"]


def layer_gradients(explainer: Explainer, x: torch.Tensor, targets: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, G)``: the explainer's layer activation ``[B, C, *s]`` (detached) and the
    gradients ``[B, K, C, *s]`` of ``model(x)[b, targets[b, k]]`` with respect to it,
    from one forward and one batched backward."""
    # The input must require grad, or with frozen parameters the activation has no graph.
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), explainer.capture() as store:
        scores = explainer.select(explainer.model(x), targets)
        if "activation" not in store:
            raise ValueError(f"layer {explainer.layer!r} was not called in the forward pass; "
                             "pass layer= with a module the model uses")
        act = store["activation"]
        (grads,) = explainer.grads(scores, [act])
    return act.detach(), grads


def gradcampp_weights(act: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                      d3: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel weights ``[B, K, C]`` from first/second/third derivatives.

    ``alpha_kij = d2 / (2 d2 + sum_ab A_kab * d3)`` (Chattopadhay et al. 2018, Eq. 19;
    0 where the denominator vanishes) and ``w_k = sum_ij alpha_kij ReLU(d1_kij)``, the
    sums running over every spatial position. ``act`` is ``[B, C, *s]`` (or
    ``[B, K, C, *s]``), the derivatives ``[B, K, C, *s]``.
    """
    act = act if act.ndim == d1.ndim else act[:, None]
    space = tuple(range(3, d1.ndim))
    denom = 2 * d2 + act.sum(space, keepdim=True) * d3
    ok = denom != 0
    alpha = torch.where(ok, d2 / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
    return (alpha * d1.clamp_min(0)).sum(space)


def channel_sum(weights: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k A_k``: weights ``[B, K, C]``, act ``[B, C, *s]`` -> ``[B, K, *s]`` (one
    batched matrix product over the flattened positions, whatever the spatial dims)."""
    out = torch.einsum("bkc,bcs->bks", weights, act.flatten(2))
    return out.view(*out.shape[:2], *act.shape[2:])


def _weighted_sum(weights: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_k w_k A_k)``: weights ``[B, K, C]``, act ``[B, C, *s]`` -> ``[B, K, *s]``."""
    return channel_sum(weights, act).clamp_min(0)


def _conv_dims(model: nn.Module) -> int | None:
    """The spatial dims of the model's convolutions when they all agree, else None."""
    dims = {CONVS.index(type(m)) + 1 for m in model.modules() if type(m) in CONVS}
    return dims.pop() if len(dims) == 1 else None


def _check_channels(channels: Sequence[int] | None) -> list[int] | None:
    if channels is None:
        return None
    channels = [int(c) for c in channels]
    if not channels or min(channels) < 0:
        raise ValueError(f"channels must be a non-empty list of channel indices, got {channels}")
    return channels


class _GradCamBase(Explainer):
    """One forward, one batched backward to the layer; subclasses override :meth:`combine`."""

    uses_layer = True

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        act, grads = layer_gradients(self, x, targets)
        return self.combine(act, grads)

    def combine(self, act: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, K, *s]`` from ``A`` ``[B, C, *s]`` and ``G`` ``[B, K, C, *s]``."""
        raise NotImplementedError


@register_method("gradcam")
class GradCAM(_GradCamBase):
    """Grad-CAM: the layer's channels weighted by their spatially averaged gradients.

    Selvaraju, Cogswell, Das, Vedantam, Parikh and Batra (2017), "Grad-CAM: Visual
    Explanations from Deep Networks via Gradient-based Localization", ICCV.
    ``alpha_k = mean_ij dY_c/dA_kij`` and the map is ``ReLU(sum_k alpha_k A_k)`` (Eqs. 1-2);
    the mean runs over every spatial axis of the layer (length, height x width, or depth x
    height x width).

    Args:
        model: the classifier.
        layer: the layer to read (a module or its name); the model's ``cam_layer`` if None.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> cnnkit.explain.create("gradcam", model)(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 16, 16])
        >>> volume = cnnkit.create_model("resnet18", num_classes=3, input_size=(1, 8, 16, 16))
        >>> cnnkit.explain.create("gradcam", volume)(torch.rand(2, 1, 8, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def combine(self, act: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return _weighted_sum(grads.mean(tuple(range(3, grads.ndim))), act)


@register_method("gradcam++")
class GradCAMPlusPlus(_GradCamBase):
    """Grad-CAM++: pixel-weighted positive gradients, for several instances of a class.

    Chattopadhay, Sarkar, Howlader and Balasubramanian (2018), "Grad-CAM++: Generalized
    Gradient-based Visual Explanations for Deep Convolutional Networks", WACV. With the
    class score passed through ``exp``, the 2nd and 3rd derivatives are the powers of the
    first (Eqs. 17-19): ``alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)``,
    ``w_k = sum_ij alpha_kij ReLU(g_kij)`` and the map is ``ReLU(sum_k w_k A_k)``. As in
    the authors' and pytorch-grad-cam's code the gradients are those of the logit: the
    positive factor ``exp(Y_c)`` the derivation multiplies in only rescales the map.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> cnnkit.explain.create("gradcam++", model)(torch.rand(1, 3, 16, 16), [[0, 1]]).shape
        torch.Size([1, 2, 16, 16])
    """

    def combine(self, act: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        g2 = grads * grads
        return _weighted_sum(gradcampp_weights(act, grads, g2, g2 * grads), act)


@register_method("layercam")
class LayerCAM(_GradCamBase):
    """Layer-CAM: each activation weighted by its own positive gradient.

    Jiang, Zhang, Hou, Cheng and Wei (2021), "LayerCAM: Exploring Hierarchical Class
    Activation Maps for Localization", IEEE TIP. The map is
    ``ReLU(sum_k ReLU(g_kij) * A_kij)`` (Eqs. 5-6), reliable at shallow layers too.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> cnnkit.explain.create("layercam", model, layer="features.relu_1_1")(
        ...     torch.rand(1, 3, 16, 16)).shape
        torch.Size([1, 16, 16])
    """

    def combine(self, act: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return (grads.clamp_min(0) * act[:, None]).sum(2).clamp_min(0)


@register_method("smoothgradcam++")
class SmoothGradCAMPlusPlus(Explainer):
    """Smooth Grad-CAM++: Grad-CAM++ with derivatives averaged over noisy copies.

    Omeiza, Speakman, Cintas and Weldemariam (2019), "Smooth Grad-CAM++: An Enhanced
    Inference Level Visualization Technique for Deep Convolutional Neural Network Models",
    arXiv:1908.01224. For ``n_samples`` copies ``x + N(0, sigma^2)`` the first, second and
    third derivatives (``g``, ``g^2``, ``g^3``, Grad-CAM++'s exponential-score forms) and
    the activations are averaged (the paper's ``D^1, D^2, D^3``), then Grad-CAM++'s alphas
    and weights are formed from the averages. ``channels`` restricts the sum to a subset of
    feature maps (the paper's per-feature-map visualisation). ``sigma`` is
    ``noise * (max(x) - min(x))`` per image, as in SmoothGrad.

    Neurons (the paper's "subset of neurons" visualisation): with
    ``neurons=[(c, i, j), ...]`` the explained score is not a class logit but the sum of
    the activations ``N[c, i, j]`` of those neurons of ``neuron_layer`` (a neuron is its
    channel then one index per spatial axis: ``(c, t)`` in 1D, ``(c, z, i, j)`` in 3D; the
    model's
    ``cam_layer`` by default), and the derivatives are taken with respect to the feature
    maps of ``layer``, which must run *before* ``neuron_layer``; the rest (noise averaging,
    Grad-CAM++ alphas and weights, ReLU) is unchanged. Our reading of the paper: its
    neuron visualisation replaces ``Y^c`` by the chosen neurons' activation, so the map
    shows where in the earlier layer's maps those neurons look. The target class is then
    irrelevant: every requested target gets the same map.

    Args:
        model: the classifier.
        layer: the layer to read; the model's ``cam_layer`` if None.
        n_samples: noisy copies per image.
        noise: noise std as a fraction of the input's value range.
        seed: seeds a private generator (deterministic maps); None uses torch's global one.
        channels: feature-map indices to keep in the weighted sum; None keeps all.
        internal_batch_size: noisy inputs per forward/backward.
        neurons: ``(channel, *position)`` neurons of ``neuron_layer`` to explain
            (``(channel, row, col)`` in 2D); None explains the target class.
        neuron_layer: the layer holding ``neurons`` (module or name); the model's
            ``cam_layer`` if None.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> cnnkit.explain.create("smoothgradcam++", model, n_samples=4)(
        ...     torch.rand(1, 3, 16, 16)).shape
        torch.Size([1, 16, 16])
    """

    uses_layer = True

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None,
                 n_samples: int = 16, noise: float = 0.15, seed: int | None = 0,
                 channels: Sequence[int] | None = None, internal_batch_size: int = 32,
                 neurons: Sequence[tuple[int, ...]] | None = None,
                 neuron_layer: str | nn.Module | None = None) -> None:
        super().__init__(model, layer)
        self.neurons, self.neuron_layer = None, None
        if neurons is not None:
            self.neurons = [tuple(int(v) for v in n) for n in neurons]
            dims = _conv_dims(model)  # None: known at the first call
            sizes = {1 + dims} if dims else {2, 3, 4}
            if not self.neurons or any(len(n) not in sizes or min(n) < 0 or
                                       len(n) != len(self.neurons[0]) for n in self.neurons):
                what = "(channel, *position)" if dims is None else \
                    ("(channel, position)", "(channel, row, col)",
                     "(channel, depth, row, col)")[dims - 1]
                raise ValueError(f"neurons must be a non-empty list of {what} non-negative "
                                 f"indices, got {neurons}")
            self.neuron_layer = resolve_layer(model, neuron_layer)
            if self.neuron_layer is self.layer:
                raise ValueError("neuron_layer is the explained layer itself; pass layer= an "
                                 "earlier layer whose feature maps explain the neurons")
        if n_samples < 1 or noise < 0 or internal_batch_size < 1:
            raise ValueError("need n_samples >= 1, noise >= 0 and internal_batch_size >= 1, "
                             f"got {n_samples}, {noise}, {internal_batch_size}")
        self.n_samples, self.noise, self.seed = int(n_samples), float(noise), seed
        self.channels = _check_channels(channels)
        self.internal_batch_size = int(internal_batch_size)

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.n_samples
        # Noise drawn on the CPU from a private generator: the same seed gives the same map
        # on every device and torch's global random state is left alone.
        gen = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        eps = torch.randn((b, n, *x.shape[1:]), generator=gen, dtype=x.dtype).to(x.device)
        flat = x.flatten(1)
        sigma = self.noise * (flat.amax(1) - flat.amin(1))
        noisy = (x[:, None] + eps * sigma.view(b, *[1] * x.ndim)).flatten(0, 1)
        tg = targets.repeat_interleave(n, 0)
        owner = torch.arange(b, device=x.device).repeat_interleave(n)
        sums: list[torch.Tensor] | None = None
        for i in range(0, b * n, self.internal_batch_size):
            sl = slice(i, i + self.internal_batch_size)
            act, g = self._gradients(noisy[sl], tg[sl])
            g2 = g * g
            parts = [act, g, g2, g2 * g]
            if sums is None:
                sums = [torch.zeros((b, *p.shape[1:]), dtype=p.dtype, device=p.device)
                        for p in parts]
            for s, p in zip(sums, parts, strict=True):
                s.index_add_(0, owner[sl], p)
        act, d1, d2, d3 = (s / n for s in sums)
        if self.channels is not None:
            if max(self.channels) >= act.shape[1]:
                raise ValueError(f"channels {self.channels} out of range: the layer has "
                                 f"{act.shape[1]} channels")
            keep, dims = torch.tensor(self.channels, device=act.device), act.ndim - 2
            act, d1, d2, d3 = (t.index_select(t.ndim - dims - 1, keep)  # the channel axis
                               for t in (act, d1, d2, d3))
        return _weighted_sum(gradcampp_weights(act, d1, d2, d3), act)

    def _gradients(self, x: torch.Tensor, targets: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, G)`` as :func:`layer_gradients`; with ``neurons`` G is the gradient of the
        neurons' summed activation, repeated for the K targets."""
        if self.neurons is None:
            return layer_gradients(self, x, targets)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), self.capture() as store, \
                self.capture(self.neuron_layer) as nstore:
            self.model(x)
            if "activation" not in store or "activation" not in nstore:
                raise ValueError("layer or neuron_layer was not called in the forward pass; "
                                 "pass modules the model uses")
            act, out = store["activation"], nstore["activation"]
            if any(len(n) != out.ndim - 1 or any(v >= size for v, size in
                                                 zip(n, out.shape[1:], strict=False))
                   for n in self.neurons):
                raise ValueError(f"neurons {self.neurons} out of range for neuron_layer "
                                 f"output of shape {tuple(out.shape[1:])}: give (channel, "
                                 f"and {out.ndim - 2} position indices) inside it")
            score = sum(out[(slice(None), *n)] for n in self.neurons)
            try:
                (grads,) = self.grads(score[:, None], [act])
            except RuntimeError:  # act is not in the neurons' graph
                raise ValueError("the neurons do not depend on layer; pass layer= a layer "
                                 "that runs before neuron_layer") from None
        return act.detach(), grads.expand(-1, targets.shape[1], *grads.shape[2:])


@register_method("cam")
class CAM(Explainer):
    """CAM: the final linear layer's class weights applied to the last feature maps.

    Zhou, Khosla, Lapedriza, Oliva and Torralba (2016), "Learning Deep Features for
    Discriminative Localization", CVPR. For a network ending in global average pooling
    and a linear classifier, ``M_c = sum_k w_ck A_k`` with ``A = model.forward_features(x)``
    and ``w = model.get_classifier().weight`` (Eq. 2; signed, as in the paper), for feature
    maps of any spatial dims. The layer is fixed by the architecture, so ``layer`` is
    ignored. Any other head raises. A target function ``fn`` of the logits gets the map of
    the classifier rows weighted by ``d fn / d logits`` (its linearisation at the model's
    output; exact for a class, a sum or a difference of classes, where CAM is linear).

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("resnet18", num_classes=3, img_size=32)
        >>> cnnkit.explain.create("cam", model)(torch.rand(1, 3, 32, 32)).shape
        torch.Size([1, 32, 32])
        >>> signal = cnnkit.create_model("resnet18", num_classes=3, input_size=(2, 64))
        >>> cnnkit.explain.create("cam", signal)(torch.rand(1, 2, 64), lambda y: y[:, 2]).shape
        torch.Size([1, 64])
    """

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scored = self.model if isinstance(self.model, TargetScores) else None
        model = self.model if scored is None else scored.model
        for attr in ("forward_features", "forward_head", "get_classifier"):
            if not callable(getattr(model, attr, None)):
                raise ValueError(f"CAM needs a model with {attr}() (the cnnkit Classifier "
                                 "contract); use gradcam for other models")
        fc = model.get_classifier()
        with torch.no_grad():
            feats = model.forward_features(x)
            if (feats.ndim < 3 or not isinstance(fc, nn.Linear)
                    or fc.in_features != feats.shape[1]):
                raise ValueError("CAM needs a head of global average pooling + one nn.Linear; "
                                 "use gradcam for this model")
            # The head must be exactly linear(mean(features)): probe on these features.
            logits = model.forward_head(feats)
            if not torch.allclose(logits, fc(feats.mean(tuple(range(2, feats.ndim)))),
                                  rtol=1e-4, atol=1e-5):
                raise ValueError(f"{type(model).__name__}'s head is not global average "
                                 "pooling + linear, so CAM is undefined; use gradcam")
            if scored is None:
                w = fc.weight[targets]  # [B, K, C]
            else:  # the rows combined by the target function's gradient: [B, 1, C]
                with torch.enable_grad():
                    y = logits.detach().requires_grad_(True)
                    (v,) = torch.autograd.grad(scored.score(y).sum(), y)
                w = (v.to(fc.weight.dtype) @ fc.weight)[:, None]
            return channel_sum(w, feats)
