"""The hand-written PyTorch training loop that the Trainer is measured against.

It is what a user writes without cnnkit: per epoch one ``torch.randperm``; per batch
(the last partial batch dropped, as the Trainer does) index the uint8 images and labels,
``float() / 255``, the augmentation policy (``cnnkit.data.Augment``, the very ops the
Trainer runs, so augmentation costs the same on both sides), ``(x - mean) / std``,
forward, cross-entropy with the configured label smoothing, ``zero_grad(set_to_none=True)``,
backward, the one-cycle learning rate written into the param groups, ``SGD.step``
(Nesterov momentum, weight decay on weights only; fused or foreach, the implementation
the Trainer picked, so only the loop around the step differs) and a running loss sum on
the device, read once at the end of the epoch. fp32, NCHW, no compilation: plain PyTorch.

``bench/train_throughput.py`` and ``cnnkit bench`` both time this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from cnnkit.data import Augment
from cnnkit.models import create_model

if TYPE_CHECKING:
    from cnnkit.training import TrainConfig, Trainer

__all__ = ["PlainLoop"]


class PlainLoop:
    """A model trained by a plain PyTorch loop with a :class:`TrainConfig`'s hyper-parameters.

    Args:
        cfg: the hyper-parameters (batch size, learning rate, momentum, weight decay,
            warm-up, label smoothing, seed). The loop implements SGD with Nesterov momentum
            and the one-cycle schedule, no EMA, no clipping, NCHW: other settings raise.
        model: the model to train (on ``device``).
        images: uint8 ``[N, C, H, W]`` training images.
        labels: int ``[N]`` class indices.
        mean, std: per-channel normalisation on the [0, 1] scale.
        augment: augmentation policy name (``"none"`` for none).
        epochs: epochs of the learning-rate schedule.
        fused: use PyTorch's fused SGD step, else the foreach one.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from cnnkit.training import TrainConfig
        >>> from cnnkit.workflows.bench.plain import PlainLoop
        >>> cfg = TrainConfig(batch_size=4, optimizer="sgd")
        >>> loop = PlainLoop(cfg, nn.Sequential(nn.Flatten(), nn.Linear(4, 2)),
        ...                  torch.zeros(8, 1, 2, 2, dtype=torch.uint8),
        ...                  torch.tensor([0, 1] * 4), [0.5], [0.25], "none", epochs=1)
        >>> loop.steps, loop.epoch(0) > 0
        (2, True)
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, images: torch.Tensor,
                 labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: str, epochs: int, fused: bool = False) -> None:
        if (cfg.optimizer, cfg.schedule, cfg.ema, cfg.grad_clip, cfg.channels_last) != (
                "sgd", "onecycle", False, None, False) or cfg.momentum <= 0:
            raise ValueError("the hand-written loop implements SGD with Nesterov momentum, the "
                             "one-cycle schedule, no EMA, no clipping, NCHW: keep those defaults")
        self.model = model
        self.device = device = next(model.parameters()).device
        c = images.shape[1]
        self.images, self.labels = images.to(device), labels.to(device)
        self.mean = torch.tensor(list(mean), device=device).view(1, c, 1, 1)
        self.std = torch.tensor(list(std), device=device).view(1, c, 1, 1)
        self.policy = augment
        self.batch_size, self.seed = cfg.batch_size, cfg.seed
        # The same hyper-parameters, read from the config; the structure is written here.
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        self.peak_lr = cfg.resolved_lr
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": cfg.resolved_weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.peak_lr, momentum=cfg.momentum, nesterov=True,
            **({"fused": True} if fused else {"foreach": True}))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.steps = len(self.labels) // self.batch_size
        if self.steps == 0:
            raise ValueError(f"{len(self.labels)} training images make no batch of "
                             f"{self.batch_size}; use a smaller batch size or more images")
        self.total_steps = epochs * self.steps
        self.warmup_steps = min(self.total_steps - 1, round(cfg.warmup_epochs * self.steps))
        self.step_count = 0

    @classmethod
    def from_trainer(cls, trainer: Trainer, epochs: int) -> PlainLoop:
        """A loop over ``trainer``'s training split with its hyper-parameters, statistics,
        augmentation policy and optimiser implementation, starting from a copy of its
        current weights; the trainer must train in fp32 and without compilation."""
        cfg, data = trainer.config, trainer.data
        if trainer.amp is not None or cfg.compile:
            raise ValueError("the hand-written loop is plain fp32 PyTorch: compare it with a "
                             "Trainer with amp='off' and compile=False")
        c, h, w = data.input_size
        model = create_model(cfg.model, num_classes=len(data.classes), in_chans=c,
                             img_size=(h, w), **cfg.model_kwargs).to(trainer.device)
        model.load_state_dict(trainer.model.state_dict())
        train_idx = trainer.split[0]
        return cls(cfg, model, data.images[train_idx], data.labels[train_idx],
                   trainer.preprocess.mean, trainer.preprocess.std,
                   data.augment if cfg.augment == "auto" else cfg.augment, epochs,
                   fused=bool(trainer.optimizer.defaults.get("fused")))

    def lr(self, step: int) -> float:
        """One-cycle in its linear form: warm up over one epoch, then decay linearly to 0."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decayed = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.peak_lr * (1.0 - min(1.0, decayed))

    def epoch(self, epoch: int) -> float:
        """Train one epoch; returns the mean training loss."""
        self.model.train()
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.labels), generator=gen).to(self.device)
        augment = Augment(self.policy, gen)
        loss_sum = torch.zeros((), device=self.device)
        for i in range(self.steps):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = augment(self.images[idx].float().div_(255))
            x = (x - self.mean) / self.std
            loss = self.criterion(self.model(x), self.labels[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr(self.step_count)
            self.optimizer.step()
            self.step_count += 1
            loss_sum += loss.detach()
        return float(loss_sum) / self.steps
