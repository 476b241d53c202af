"""Score-CAM: channel weights from forward passes on activation-masked inputs, no gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.layers.nd import interp_mode

from ._base import Explainer, register_method
from .cam import channel_sum

__all__ = ["ScoreCAM"]


@register_method("scorecam")
class ScoreCAM(Explainer):
    """Score-CAM: each feature map weighted by how much it alone raises the target score.

    Wang, Wang, Du, Yang, Zhang, Ding, Mardziel and Hu (2020), "Score-CAM: Score-Weighted
    Visual Explanations for Convolutional Neural Networks", CVPR workshops. Each channel
    ``A_k`` of the layer is upsampled to the input size (linear, bilinear or trilinear
    interpolation for signals, images or volumes) and min-max normalised to a mask
    ``H_k`` in [0, 1]; the weight is the increase of the target logit
    ``C(A_k) = Y_c(x * H_k) - Y_c(x_b)``, softmax-normalised over the channels (Algorithm
    1). The softmax ignores the common baseline term, so ``softmax_k Y_c(x * H_k)`` is used.
    A constant channel gives the all-zero mask. The map is ``ReLU(sum_k alpha_k A_k)``.
    Costs ``B x C`` forward passes, ``batch_size`` masked inputs at a time; K targets share
    them.

    Args:
        model: the classifier.
        layer: the layer to read; the model's ``cam_layer`` if None.
        batch_size: masked inputs per forward pass.

    Example:
        >>> import torch, cnnkit
        >>> model = cnnkit.create_model("tinyvgg", num_classes=3, img_size=16)
        >>> cnnkit.explain.create("scorecam", model)(torch.rand(1, 3, 16, 16)).shape
        torch.Size([1, 16, 16])
    """

    uses_layer = True

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None,
                 batch_size: int = 64) -> None:
        super().__init__(model, layer)
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        self.batch_size = int(batch_size)

    def channel_weights(self, x: torch.Tensor, targets: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The activation ``[B, C, *s]`` and the softmax weights ``[B, K, C]``.

        Call inside :meth:`Explainer.model_state` (or on a model in eval mode).
        """
        with torch.no_grad():
            with self.capture() as store:
                self.model(x)
            if "activation" not in store:
                raise ValueError(f"layer {self.layer!r} was not called in the forward pass; "
                                 "pass layer= with a module the model uses")
            act = store["activation"].detach()
            b, c = act.shape[:2]
            size = tuple(x.shape[2:])
            up = F.interpolate(act, size=size, mode=interp_mode(len(size)),
                               align_corners=False)
            space = tuple(range(2, up.ndim))
            lo = up.amin(space, keepdim=True)
            span = up.amax(space, keepdim=True) - lo
            masks = torch.where(span > 0, (up - lo) / torch.where(span > 0, span, 1.0), 0.0)
            scores = torch.empty((b * c, targets.shape[1]), dtype=x.dtype, device=x.device)
            # Masked inputs are built one chunk of (input, channel) pairs at a time, so peak
            # memory is one chunk whatever the channel count.
            for i in range(0, b * c, self.batch_size):
                idx = torch.arange(i, min(i + self.batch_size, b * c), device=x.device)
                img, ch = idx // c, idx % c
                logits = self.model(x[img] * masks[img, ch][:, None])
                scores[idx] = logits.gather(1, targets[img]).to(x.dtype)
            weights = scores.view(b, c, -1).softmax(1).transpose(1, 2)  # [B, K, C]
        return act, weights

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        act, weights = self.channel_weights(x, targets)
        return channel_sum(weights, act).clamp_min(0)
