"""Regression: ``K`` real values per sample, scored by mean squared error.

Target ``[N, K]`` values (a ``y`` of floats in an npz, a numeric label column in a csv);
the model has ``K`` outputs; loss MSE or MAE (L1). The headline metric is the MSE, which
improves *downwards*; MAE and the coefficient of determination R^2 (per output, then
averaged) are reported beside it. The report plots predicted against true values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnkit.data.shards import all_reduce_sum, gather_shards, is_sharded

from ._base import ReportParts, Task, TaskDefaults, eval_outputs
from ._registry import register_task
from .figures import png, table

__all__ = ["Regress", "regression_scores"]


def regression_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """MSE, MAE and R^2 of ``pred`` against ``target`` (``[N, K]``), per output and averaged.

    ``R^2 = 1 - SS_res / SS_tot`` per output, with ``SS_tot`` about the output's mean over
    these samples (the usual definition, scikit-learn's ``r2_score`` with uniform
    averaging); an output with no variance gets R^2 = 0 unless it is predicted exactly (1).

    Example:
        >>> import torch
        >>> from cnnkit.tasks.regress import regression_scores
        >>> t = torch.tensor([[1.0], [2.0], [3.0]])
        >>> regression_scores(t + 1, t)["mse"], regression_scores(t, t)["r2"]
        (1.0, 1.0)
    """
    pred, target = pred.double().reshape(len(pred), -1), target.double().reshape(len(target), -1)
    err = pred - target
    ss_res = (err ** 2).sum(0)
    ss_tot = ((target - target.mean(0)) ** 2).sum(0)
    exact = ss_res == 0
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp(min=1e-300),
                     torch.where(exact, 1.0, 0.0).double())
    return {"mse": float((err ** 2).mean()), "mae": float(err.abs().mean()),
            "r2": float(r2.mean()), "r2_per_output": r2.tolist()}


@register_task
class Regress(Task):
    """Regression: real values per sample, scored by mean squared error (lower is better)."""

    name = "regress"
    description = "real values per sample"
    metric = "mse"
    higher_is_better = False
    losses = ("mse", "l1")
    defaults = TaskDefaults(model="tinyvgg_wide", data="", loss="mse", epochs=30,
                            batch_size=64, optimizer="adamw", lr=1e-3)
    data_targets = "values"
    output_kind = "values"
    models = "classify"  # any classifier: K outputs, without the softmax
    train_metric, progress_tag = "mse", "mse"

    def targets(self, data: Any) -> torch.Tensor:
        return data.values

    def classes(self, data: Any) -> list[str]:
        return list(data.classes)  # the names of the values

    def align(self, data: Any, outputs: list[str], name: str) -> Any:
        if data.values.shape[1] != len(outputs):
            raise ValueError(f"data {name!r} has {data.values.shape[1]} values per sample but "
                             f"the run's model predicts {len(outputs)}; evaluate on data with "
                             "the run's outputs")
        return data

    def criterion(self) -> nn.Module:
        return nn.MSELoss() if self.cfg.loss == "mse" else nn.L1Loss()

    def batch_score(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        return ((out.detach().float() - y) ** 2).sum(), y.numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 amp: torch.dtype | None = None) -> dict[str, Any]:
        """MSE, MAE, R^2 and loss over ``loader``; predictions and targets kept."""
        crit = self.criterion()
        loss, n, preds, targets = torch.zeros((), device=device), 0, [], []
        for out, y in eval_outputs(model, loader, device, amp):
            loss += crit(out, y) * len(y)
            n += len(y)
            preds.append(out.cpu())
            targets.append(y.cpu())
        pred_t, target_t = torch.cat(preds), torch.cat(targets)
        if is_sharded(loader):
            loss, n = all_reduce_sum(torch.stack([loss, torch.tensor(float(n), device=device)]))
            pred_t, target_t = gather_shards(pred_t), gather_shards(target_t)
        return {"loss": float(loss) / max(1, float(n)), **regression_scores(pred_t, target_t),
                "preds": pred_t, "targets": target_t}

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        return {"test_mse": test["mse"], "test_mae": test["mae"], "test_r2": test["r2"],
                "test_r2_per_output": test["r2_per_output"], "test_loss": test["loss"]}

    def headline(self, result: dict[str, Any]) -> str:
        return (f"test_mse {result['test_mse']:.4g}  test_mae {result['test_mae']:.4g}  "
                f"test_r2 {result['test_r2']:.4f}")

    @classmethod
    def predicted(cls, scorer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An explanation explains the first output by default (no forward needed); a
        given target ``j`` explains output ``j``, a function ``lambda y: ...`` any value."""
        return torch.zeros(len(x), dtype=torch.long, device=x.device)

    @classmethod
    def confidence(cls, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x).float()  # the values themselves

    @classmethod
    def confidence_text(cls, value: float) -> str:
        return f"(value {value:.4g})"

    def predict_row(self, out: torch.Tensor, outputs: list[str], topk: int) -> dict[str, Any]:
        return {"values": {name: float(v) for name, v in zip(outputs, out.tolist(),
                                                               strict=True)}}

    def prediction_line(self, result: dict[str, Any]) -> str:
        return f"{result['file']}: " + ", ".join(f"{k} {v:.4g}"
                                                 for k, v in result["values"].items())

    def report(self, summary: dict[str, Any], test: dict[str, Any], data: Any,
               test_idx: torch.Tensor) -> ReportParts:
        names = summary["classes"]
        rows = [[name, r2] for name, r2 in zip(names, summary["test_r2_per_output"],
                                               strict=True)]
        return ReportParts(
            f"Test MSE <b>{summary['test_mse']:.4g}</b> (MAE {summary['test_mae']:.4g}, "
            f"R<sup>2</sup> {summary['test_r2']:.4f}) on {len(test_idx)} held-out samples.",
            [("Predicted against true values", _scatter(test["preds"], test["targets"], names))],
            table("Per-output test R²", ["output", "R²"], rows))


def _scatter(pred: torch.Tensor, target: torch.Tensor, names: list[str]) -> str:
    import matplotlib.pyplot as plt

    k = min(len(names), 6)
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.2), squeeze=False)
    for j, ax in enumerate(axes[0]):
        t, p = target[:, j].numpy(), pred[:, j].numpy()
        ax.scatter(t, p, s=8, alpha=0.6)
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="y = x")
        ax.set(xlabel=f"true {names[j]}", ylabel=f"predicted {names[j]}")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Test samples: predicted against true values (on the dashed line: exact)",
                 fontsize=9)
    return png(fig)
