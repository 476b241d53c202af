"""``cnnkit compress RUN``: prune, fine-tune and quantise a trained run, and measure it.

Any task, any number of spatial axes: the result is judged by what it changes on this
machine, measured side by side in one process: the task's test metric (accuracy, mIoU,
PSNR, MSE), parameters, MACs, file size and CPU latency at batch 1 and 32 (timed
round-robin, with its spread, speed-up interval and ``noisy`` flag: :mod:`.latency`).
A pruned run is written as a normal run folder whose weights carry the base
architecture and the pruning history (:func:`cnnkit.load_run` replays it; nothing is
unpickled); an int8 model goes beside it as ``model_int8.safetensors`` (int8 codes,
scales and zero points; ``load_run(path, weights="int8")``); ``compress.json`` holds the
before/after table.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from cnnkit.analysis import summary
from cnnkit.compress.lowrank import decompose
from cnnkit.compress.prune import prune as prune_model
from cnnkit.compress.qat import quantize_aware_train
from cnnkit.compress.quantize import quantize as quantize_model
from cnnkit.compress.quantized_file import quantized_bytes, save_quantized
from cnnkit.data import TensorLoader, load_data, split_indices
from cnnkit.run import RunPaths, claim_run_folder, load_run, run_test_data, write_json
from cnnkit.run.checkpoint import save_weights
from cnnkit.run.weights import run_meta
from cnnkit.tasks import Task, create_task
from cnnkit.training import TrainConfig, Trainer

from .latency import NOISE_SPREAD, latency_samples, latency_stats, load_average

__all__ = ["compress_run", "file_bytes"]


def file_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as cnnkit stores them: safetensors for a float model;
    for an int8 one, :func:`~cnnkit.compress.quantized_file.save_quantized`'s file."""
    state = model.state_dict()
    if all(isinstance(v, torch.Tensor) and not v.is_quantized for v in state.values()):
        return len(save({k: v.contiguous() for k, v in state.items()}))
    return len(quantized_bytes(model))


def _score(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The task's headline metric of ``model`` on normalised inputs ``x`` and targets ``y``."""
    loader = TensorLoader(x, y, 64)  # already normalised: no mean and std
    return float(task.evaluate(model, loader, torch.device("cpu"))[task.metric])


def _facts(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, Any]:
    s = summary(model, input_size)
    return {"params": s.total_params, "macs": s.total_macs}


def _normalized(prep: Any, inputs: torch.Tensor) -> torch.Tensor:
    x = inputs.float() / 255 if inputs.dtype == torch.uint8 else inputs.float()
    return prep.normalize(x)


def _test_tensors(run: Any, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's test split as normalised inputs and the task's targets (dense inputs padded
    to the model's size multiple, as evaluation pads them)."""
    test = task.prepare(run_test_data(run), getattr(run.model, "size_multiple", 1))
    return _normalized(run.preprocess, test.images), task.targets(test)


def _calibration(run: Any, task: Task, n: int | None = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` normalised training inputs of the run's own split (never test inputs)
    and the task's targets for them (labels, masks, values; dense inputs padded to the
    model's size multiple as training padded them): int8 calibration, quantisation-aware
    fine-tuning and the data-driven pruning criteria use them."""
    cfg, prep = run.config, run.preprocess
    data = load_data(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                     strict=cfg.strict, seed=cfg.seed, targets=task.data_targets,
                     **cfg.data_options)
    train_idx = torch.as_tensor(split_indices(data.labels, cfg.split, seed=cfg.seed)[0][:n])
    shaped = task.prepare(data, getattr(run.model, "size_multiple", 1))
    return _normalized(prep, shaped.images[train_idx]), task.targets(shaped)[train_idx]


# Criteria that score channels from data: they get 128 training images of the run's split.
DATA_CRITERIA = frozenset({"taylor", "beta_rank"})


def _criterion_data(calib: tuple[torch.Tensor, torch.Tensor] | None, criterion: str
                    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    if criterion not in DATA_CRITERIA or calib is None:
        return None
    images, labels = calib
    return list(zip(images[:128].split(32), labels[:128].split(32), strict=True))


def _finetune(run: Any, model: nn.Module, folder: Any, epochs: int,
              progress: bool | None) -> nn.Module:
    """Fine-tune ``model`` with the run's own recipe at a tenth of its learning rate, as the
    run folder ``folder`` (a claimed :class:`~cnnkit.run.RunFolder`); returns the
    reloaded best weights."""
    out = folder.path
    cfg = TrainConfig.from_dict({**run.config.to_dict(), "epochs": epochs,
                                 "lr": run.config.resolved_lr / 10, "warmup_epochs": 0.0,
                                 "name": out.name, "runs_dir": str(out.parent)})
    Trainer(cfg, model=model, progress=progress, run_folder=folder).fit()
    return load_run(out).model


def _measure(task: Task, models: dict[str, nn.Module], x_test: torch.Tensor,
             y_test: torch.Tensor, input_size: tuple[int, ...],
             same_as: dict[str, str] | None = None,
             base: str = "original") -> dict[str, dict[str, Any]]:
    """The task's metric (under its own name: ``accuracy``, ``miou`` ...), params, MACs,
    bytes and latency (batch 1 and 32, interleaved) of each model, with ratios against
    ``base``. ``same_as`` maps an int8 model to the float model whose parameters and MACs
    it has (the same multiply-adds, in int8)."""
    same_as = same_as or {}
    rows: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        if name in same_as:
            prev = rows[same_as[name]]
            facts = {"params": prev["params"], "macs": prev["macs"]}
        else:
            facts = _facts(m, input_size)
        rows[name] = {task.metric: _score(task, m, x_test, y_test), **facts,
                      "bytes": file_bytes(m)}
    for batch in (1, 32):
        x = x_test[:batch] if len(x_test) >= batch else x_test[:1].expand(
            batch, *x_test.shape[1:])
        stats = latency_stats(latency_samples(models, x.contiguous()), base)
        for name, st in stats.items():
            rows[name].update({f"latency_b{batch}": st["latency"],
                               f"spread_b{batch}": st["spread"],
                               f"speedup_b{batch}": st["speedup"],
                               f"speedup_b{batch}_interval": st["interval"],
                               f"noisy_b{batch}": st["noisy"]})
    ref = rows[base]
    for r in rows.values():
        r["params_ratio"] = ref["params"] / r["params"]
        r["bytes_ratio"] = ref["bytes"] / r["bytes"]
    return rows


def _check_criterion(task: Task, criterion: str) -> None:
    if criterion in DATA_CRITERIA and task.data_targets != "labels":
        raise ValueError(f"the {criterion} criterion scores channels by a classification loss; "
                         f"{task.name} runs prune with l1, l2, bn_scale or random")


def compress_run(run: Any, out: str | os.PathLike, *, prune: float | None = None,
                 criterion: str = "l1", global_ranking: bool = False, finetune: int = 0,
                 lowrank: str | float | None = None, quantize: str | None = None,
                 observer: str = "minmax", qat: int = 0,
                 progress: bool | None = None) -> dict[str, Any]:
    """Compress a run of any task into a new run folder and measure both.

    Args:
        run: a run folder or a :class:`cnnkit.run.Run`.
        out: the new run folder (must not exist).
        prune: fraction of channels to remove per group (structured, see
            :func:`cnnkit.compress.prune.prune`), or None.
        criterion: pruning criterion (``l1``, ``l2``, ``bn_scale``, ``random`` ...).
        global_ranking: one threshold over all groups instead of a ratio per group.
        lowrank: low-rank factorisation after any pruning (Tucker-2 for ``kxk``
            convolutions, SVD for linear and 1x1 layers, see
            :func:`cnnkit.compress.lowrank.decompose`): ``"energy:f"`` keeps the fraction
            ``f`` of each layer's singular-value energy, a number > 1 is the per-layer
            parameter reduction; None: no factorisation.
        finetune: epochs of fine-tuning after pruning / factorisation (the run's own
            recipe, a tenth of its learning rate).
        quantize: ``"int8"`` for post-training static quantisation, or None; the int8 engine
            is the first that runs the model (``backend`` in ``compress.json``).
        observer: activation calibration for int8: ``minmax``, ``percentile``, ``entropy``.
        qat: epochs of quantisation-aware fine-tuning on the run's training split before
            the int8 conversion (:func:`~cnnkit.compress.qat.quantize_aware_train`); 0:
            post-training quantisation only.

    Returns:
        The ``compress.json`` contents: the task's ``metric`` and whether higher is better,
        and one row per model (``original``; ``pruned``, ``lowrank`` or ``pruned+lowrank``;
        ``int8``) with that metric, params, MACs, bytes and, per batch size B of 1 and 32,
        ``latency_bB`` (median seconds), ``spread_bB`` (interquartile range / median),
        ``speedup_bB`` and ``speedup_bB_interval`` (over ``original``, 95%) and
        ``noisy_bB`` (None, or why the figure cannot be trusted: :func:`latency_stats`);
        ``load_average``, ``cpus`` and ``noise_spread`` (the threshold) beside.
    """
    run = run if hasattr(run, "preprocess") else load_run(run)
    _check_criterion(create_task(run.config.task, run.config), criterion)
    if prune is None and lowrank is None and quantize is None:
        raise ValueError("nothing to do: give --prune RATIO, --lowrank and/or --quantize int8 "
                         "(or --sweep)")
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown --quantize {quantize!r}; the supported one is int8")
    if finetune and prune is None and lowrank is None:
        raise ValueError("--finetune fine-tunes a pruned or factorised model; give --prune or "
                         "--lowrank too")
    if qat and quantize != "int8":
        raise ValueError("--qat fine-tunes for int8; give --quantize int8 too")
    out = Path(out)
    try:  # created here, atomically, and locked: no second command writes into it
        folder = claim_run_folder(out.parent, out.name, next_free=False)
    except FileExistsError:
        raise ValueError(f"{out} already exists; give a new folder with --out") from None
    try:
        return _compress(run, folder, prune=prune, criterion=criterion,
                         global_ranking=global_ranking, finetune=finetune, lowrank=lowrank,
                         quantize=quantize, observer=observer, qat=qat, progress=progress)
    except BaseException:
        folder.abandon()
        raise
    finally:
        folder.release()


def _compress(run: Any, folder: Any, *, prune: float | None, criterion: str,
              global_ranking: bool, finetune: int, lowrank: str | float | None,
              quantize: str | None, observer: str, qat: int,
              progress: bool | None) -> dict[str, Any]:
    out = folder.path
    task = create_task(run.config.task, run.config)
    x_test, y_test = _test_tensors(run, task)
    prep = run.preprocess
    original = run.model.eval()
    models: dict[str, nn.Module] = {"original": original}
    current, state = original, original.state_dict()
    calib = _calibration(run, task) if quantize or criterion in DATA_CRITERIA else None
    if prune is not None or lowrank is not None:
        small, names = original, []
        if prune is not None:
            small = prune_model(original, prune, criterion, example_inputs=x_test[:1],
                                data=_criterion_data(calib, criterion),
                                global_ranking=global_ranking)
            names.append("pruned")
        if lowrank is not None:
            rank = lowrank if isinstance(lowrank, str) else None
            small, _ = decompose(small, rank=rank,
                                 compression=None if rank else float(lowrank))
            names.append("lowrank")
        if finetune:
            small = _finetune(run, small, folder, finetune, progress)
        models["+".join(names)] = current = small.eval()
        state = small.state_dict()
    if not RunPaths(out).weights.exists():  # fine-tuning wrote a whole run folder already
        shutil.copy(RunPaths(run.path).config, RunPaths(out).config)
        save_weights(RunPaths(out).weights, state, run_meta(run.config, prep, current))
    if quantize == "int8":
        if qat:
            lr = run.config.resolved_lr / 100  # a trained model: small steps
            models["int8"] = quantize_aware_train(
                current, _calibration(run, task, n=None), epochs=qat, lr=lr,
                calibration_data=calib[0], loss=task.criterion(),
                observer="minmax" if observer == "entropy" else observer,
                freeze_bn_after=max(0, qat - 1), progress=progress)
        else:
            models["int8"] = quantize_model(current, calib[0], observer=observer)
        save_quantized(models["int8"], RunPaths(out).int8)
    smaller = next((n for n in models if n not in ("original", "int8")), "original")
    rows = _measure(task, models, x_test, y_test, prep.input_size, same_as={"int8": smaller})
    result = {"run": str(run.path), "out": str(out), "task": task.name, "metric": task.metric,
              "higher_is_better": task.higher_is_better, "prune": prune, "lowrank": lowrank,
              "criterion": criterion,
              "global_ranking": global_ranking, "finetune": finetune, "quantize": quantize,
              "observer": observer if quantize else None, "qat": qat,
              "backend": models["int8"].quant_config["backend"] if quantize else None,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average": load_average(), "noise_spread": NOISE_SPREAD,
              "test_samples": len(y_test), "models": rows}
    write_json(out / "compress.json", result)
    if not (out / "summary.json").exists():  # fine-tuning wrote one; else the measured row
        kept = rows[smaller]
        write_json(out / "summary.json", {"model": run.config.model,
                                          "compressed_from": str(run.path),
                                          f"test_{task.metric}": kept[task.metric]})
    return json.loads(json.dumps(result))
