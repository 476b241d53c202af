"""Synchronised batch normalisation: batch statistics over every rank's share of the batch.

Batch normalisation (Ioffe and Szegedy 2015) normalises by the statistics of the batch;
under data parallelism each rank sees only ``batch / W`` samples, so plain BatchNorm
normalises by smaller, noisier batches than a single process would. Synchronised BN
(Peng et al. 2018, "MegDet: A Large Mini-Batch Object Detector"; Zhang et al. 2018,
"Context Encoding for Semantic Segmentation") all-reduces the statistics, so W processes
normalise exactly as one process with the whole batch.

On CUDA this is PyTorch's ``nn.SyncBatchNorm``. PyTorch's module refuses CPU tensors,
so on the CPU (the gloo backend) :class:`SyncBatchNorm` does the same with two
differentiable all-reduces per layer (the sum, then the centred sum of squares);
autograd all-reduces their gradients on the way back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over any number of spatial dimensions with statistics shared by all ranks.

    In training mode within a process group of more than one rank, the mean and the
    (biased) variance normalising the batch are those of all ranks' batches together,
    and the running statistics are updated with them (unbiased variance, as
    ``nn.BatchNorm2d``). Otherwise it is ``nn.BatchNorm``. Its parameters and buffers
    have BatchNorm's names, so state dicts are interchangeable.

    Example:
        >>> import torch
        >>> from cnnkit.training.sync_bn import SyncBatchNorm
        >>> bn = SyncBatchNorm(4)
        >>> bn(torch.randn(2, 4, 3, 3)).shape  # one process: plain BatchNorm
        torch.Size([2, 4, 3, 3])
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [N, C, ...], got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()  # statistics in fp32 under autocast, as BatchNorm computes them
        count = torch.full((1,), x.numel() // c, dtype=torch.float32, device=x.device)
        sums = differentiable_all_reduce(torch.cat([xf.sum(dims), count]))
        n = sums[-1].detach()
        if n < 2:
            raise ValueError(f"batch normalisation needs more than one value per channel; "
                             f"got {int(n)} over all ranks: use a larger batch")
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)
        var = differentiable_all_reduce((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), f)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), f)
        return y.to(x.dtype)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm,
                                                                  nn.SyncBatchNorm)):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias  # the same Parameters
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm of ``model`` by a synchronised one sharing its parameters and
    buffers: ``nn.SyncBatchNorm`` on CUDA, :class:`SyncBatchNorm` elsewhere.

    State-dict keys do not change, so checkpoints load into the plain model.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)
