"""One training epoch: forward, loss, backward and step over the training split, with the
running metrics, the progress bar and the NaN / infinite loss check.

Nothing is on the hot path that a hand-written loop would not have: one scalar is read
per step on the CPU and one per 32 steps on GPUs (the non-finite check), and the bar
redraws at most twice a second. Under several processes the sums are all-reduced at the
end of the epoch, and a non-finite loss on any rank stops all of them together.

Every ``checkpoint_minutes`` the training state is saved within the epoch too
(:func:`cnnkit.training.resume.save_within_epoch`), so an interrupted run loses at most
that; the clock is read once per step, and under several processes rank 0's clock decides
every 64 steps (one small all-reduce), so every rank saves at the same step.
"""

from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as ddp
from .device import autocast
from .fast import first_step_with_fallback
from .resume import rank_share, save_due, save_within_epoch

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["NonFiniteLossError", "train_epoch", "forward_backward"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run folder keeps the last good checkpoint."""


def forward_backward(trainer: Trainer, x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's forward pass, loss (plus any regulariser) and backward pass."""
    with autocast(trainer.device, trainer.amp):
        out = trainer.train_model(x)
        loss = trainer.criterion(out, y)
        if trainer.regularizer is not None:
            loss = loss + trainer.regularizer(trainer.model)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scaler.scale(loss).backward()
    return out, loss


def train_epoch(trainer: Trainer, bar: tqdm) -> dict[str, float]:
    """Train ``trainer``'s model for one epoch; returns the epoch's training metrics
    (reduced over the processes under data parallelism).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (on any rank: all raise).
    """
    cfg, model, device, dist = trainer.config, trainer.model, trainer.device, trainer.dist
    model.train()
    partial, trainer.partial = trainer.partial, None  # a run resumed within this epoch
    mine = rank_share(partial, dist.rank, dist.world_size) if partial else {}
    start = partial["step"] if partial else 0
    trainer.train_loader.set_epoch(trainer.epoch, start, mine.get("augment"))
    if "rng" in mine:  # where this rank's dropout & co. were when the state was saved
        torch.set_rng_state(mine["rng"])
        if "cuda_rng" in mine and device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], device)
    elif dist.enabled:  # dropout & co.: a per-rank stream, a pure function of the epoch
        torch.manual_seed(ddp.rank_seed(cfg.seed, trainer.epoch, dist.rank))
    check_every = 1 if device.type == "cpu" else 32
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen, counted, t0, last_draw, bad_step = 0, 0, time.perf_counter(), 0.0, math.inf
    if partial:  # the epoch's sums so far, exactly as they were
        loss_sum = mine["loss_sum"].to(device=device, dtype=loss_sum.dtype, copy=True)
        correct = mine["correct"].to(device=device, dtype=correct.dtype, copy=True)
        seen, counted, t0 = int(mine["seen"]), int(mine["counted"]), t0 - mine["elapsed"]
    save_every, saved_at = cfg.checkpoint_minutes * 60, time.perf_counter()
    sync_every, steps = 64 if dist.enabled else 1, len(trainer.train_loader)
    tag = trainer.task.progress_tag
    for step, (x, y) in enumerate(trainer.train_loader, start):
        if trainer._compile_pending:
            out, loss = first_step_with_fallback(
                functools.partial(forward_backward, trainer, x, y), model,
                lambda: setattr(trainer, "train_model", trainer._eager_model))
            trainer._compile_pending = False
        else:
            out, loss = forward_backward(trainer, x, y)
        if cfg.grad_clip:
            trainer.scaler.unscale_(trainer.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        trainer.scheduler.step()
        if trainer.ema is not None:
            trainer.ema.update(model)
        loss_sum += loss.detach() * len(y)
        score, count = trainer.task.batch_score(out, y)
        correct += score
        counted += count
        seen += len(y)
        if (step + 1) % check_every == 0 and bad_step == math.inf and \
                not math.isfinite(float(loss_sum)):
            if not dist.enabled:
                nonfinite(trainer, step)
            bad_step = step  # raised below on every rank at once, or a rank would hang
        bar.update(1)
        now = time.perf_counter()
        if trainer.estimate is not None:
            trainer.estimate.step(now, x)
        if save_every and (step + 1) % sync_every == 0 and step + 1 < steps and save_due(
                now - saved_at >= save_every, lambda b=bad_step, s=loss_sum: b < math.inf or
                not math.isfinite(float(s)), trainer):  # (a GPU checks only every 32 steps)
            save_within_epoch(trainer, step + 1, {"loss_sum": loss_sum, "correct": correct,
                                                  "seen": seen, "counted": counted,
                                                  "elapsed": now - t0})
            saved_at = time.perf_counter()
        if now - last_draw > 0.5:
            last_draw = now
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}",
                            **{tag: f"{float(correct) / max(1, counted):.3f}"},
                            sps=f"{seen / (now - t0):.0f}", refresh=False)
    if dist.enabled:  # global sums, and the first bad step of any rank
        totals = ddp.all_reduce_sum(torch.stack([
            loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device,
                                                              dtype=torch.float64),
            torch.tensor(float(counted), device=device, dtype=torch.float64)]))
        loss_sum, correct, seen, counted = totals[0], totals[1], int(totals[2]), int(totals[3])
        bad_step = float(ddp.all_reduce_min(torch.tensor(float(bad_step), device=device,
                                                         dtype=torch.float64)))
    if bad_step < math.inf:
        nonfinite(trainer, int(bad_step))
    if not math.isfinite(float(loss_sum)):
        nonfinite(trainer, len(trainer.train_loader) - 1)
    elapsed = time.perf_counter() - t0
    train_score = f"train_{trainer.task.train_metric}"
    return {"train_loss": float(loss_sum) / max(1, seen),
            train_score: float(correct) / max(1, counted),
            "samples_per_s": seen / elapsed, "epoch_time_s": elapsed}


def nonfinite(trainer: Trainer, step: int) -> None:
    """Raise the NaN-loss error of ``step`` (this epoch), saying what was kept and how to
    continue."""
    global_step = trainer.epoch * len(trainer.train_loader) + step + 1
    kept = ("the last good checkpoint is kept in " + str(trainer.paths.last)
            if trainer.paths.last.exists() else "no epoch had finished, so no checkpoint exists")
    lr = trainer.config.resolved_lr / 10
    raise NonFiniteLossError(
        f"loss became NaN or infinite at epoch {trainer.epoch + 1}, step {step + 1} "
        f"(global step {global_step}); {kept}; continue with a lower learning rate or clipped "
        f"gradients: cnnkit train --resume {trainer.paths.root} --lr {lr:.3g} --grad-clip 1")
