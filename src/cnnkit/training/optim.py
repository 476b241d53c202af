"""Optimisers, learning-rate schedules and the weight EMA.

Weight decay goes on weights only: normalisation scales and biases (every
parameter with fewer than two dimensions) are excluded, as in Goyal et al. 2017,
"Accurate, Large Minibatch SGD", which also motivates the linear warm-up.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnkit.run import TrainConfig

__all__ = ["param_groups", "build_optimizer", "fused_supported", "lr_factor", "build_scheduler",
           "ModelEma"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; norms and biases (ndim <= 1) without."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW, over :func:`param_groups`.

    The update runs as one fused kernel per parameter group where PyTorch has one for
    the parameters' device (CUDA; the CPU too in recent versions), else as
    the foreach implementation (one multi-tensor op per group instead of a Python loop
    over tensors). Both compute the per-tensor loop's update, up to rounding.

    Args:
        fused: True or False to force the choice (True raises where PyTorch has no fused
            kernel); None: fused where supported, else foreach.

    Example:
        >>> from torch import nn
        >>> from cnnkit.training import TrainConfig
        >>> from cnnkit.training.optim import build_optimizer
        >>> opt = build_optimizer(nn.Linear(2, 2), TrainConfig(optimizer="sgd", batch_size=256))
        >>> type(opt).__name__, opt.defaults["lr"], opt.defaults["nesterov"]  # lr 0.1 x B/256
        ('SGD', 0.1, True)
        >>> [group["weight_decay"] for group in opt.param_groups]  # none on the bias
        [0.0005, 0.0]
        >>> opt.defaults["fused"] or opt.defaults["foreach"]
        True
    """
    groups = param_groups(model, cfg.resolved_weight_decay)
    if cfg.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": cfg.momentum, "nesterov": cfg.momentum > 0}
    else:
        cls, kwargs = torch.optim.AdamW, {"betas": (0.9, 0.999)}
    params = [p for g in groups for p in g["params"]]
    if fused or (fused is None and fused_supported(cls, params, **kwargs)):
        return cls(groups, lr=cfg.resolved_lr, fused=True, **kwargs)
    return cls(groups, lr=cfg.resolved_lr, foreach=True, **kwargs)


def fused_supported(cls: type[torch.optim.Optimizer], params: list[torch.Tensor],
                    **kwargs) -> bool:
    """Whether ``cls(params, fused=True, **kwargs)`` can step: tried on a one-element
    tensor per device and dtype of ``params`` (PyTorch checks only at the first step;
    which devices have fused kernels depends on its version)."""
    try:
        for device, dtype in {(p.device, p.dtype) for p in params}:
            probe = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
            probe.grad = torch.zeros_like(probe)
            cls([probe], lr=0.0, fused=True, **kwargs).step()
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimisation ``step`` (0-based).

    ``cosine``: linear warm-up from 0, then half a cosine to 0 (Loshchilov and
    Hutter 2017, "SGDR"). ``onecycle``: linear warm-up, then linear decay to 0
    (Smith and Topin 2019, "Super-Convergence", in its linear form as used by
    fast CIFAR training). ``constant``: warm-up, then 1.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR over :func:`lr_factor`."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule))


class ModelEma:
    """Exponential moving average of a model's parameters and buffers.

    Polyak and Juditsky 1992, "Acceleration of stochastic approximation by
    averaging"; the per-step form ``ema = d * ema + (1 - d) * w`` with a warm-up
    ``d_t = min(decay, (1 + t) / (10 + t))`` so early averages are not dominated by
    the random initialisation. Integer buffers (BatchNorm's counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats_ema, floats_new = [], []
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                floats_ema.append(self.state[k])
                floats_new.append(v.detach())
            else:
                self.state[k].copy_(v)
        torch._foreach_lerp_(floats_ema, floats_new, 1.0 - d)
