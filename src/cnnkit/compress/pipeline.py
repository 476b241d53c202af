"""``cnnkit compress RUN``: prune, fine-tune and quantise a trained run, and measure it.

The result is judged by what it changes on this machine, measured side by side in one
process: test accuracy, parameters, MACs, file size and CPU latency at batch 1 and 32
(the median of interleaved repeats, so a change of load hits both models alike).
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
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["compress_run", "measure_latency", "file_bytes"]


@torch.no_grad()
def measure_latency(models: dict[str, nn.Module], x: torch.Tensor, repeats: int = 15
                    ) -> dict[str, float]:
    """Median seconds per forward of each model on ``x``, the models interleaved per repeat."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up: first calls allocate and pick kernels
        m(x)
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def file_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as cnnkit stores them: safetensors for a float model;
    for an int8 one, :func:`~cnnkit.compress.quantize.save_quantized`'s file."""
    from safetensors.torch import save

    from .quantize import quantized_bytes

    state = model.state_dict()
    if all(isinstance(v, torch.Tensor) and not v.is_quantized for v in state.values()):
        return len(save({k: v.contiguous() for k, v in state.items()}))
    return len(quantized_bytes(model))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        preds = torch.cat([model(b).argmax(1) for b in x.split(256)])
    return float((preds == y).float().mean())


def _facts(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, Any]:
    from cnnkit.analysis import summary

    s = summary(model, input_size)
    return {"params": s.total_params, "macs": s.total_macs}


def compress_run(run: Any, out: str | os.PathLike, *, prune: float | None = None,
                 criterion: str = "l1", global_ranking: bool = False, finetune: int = 0,
                 quantize: str | None = None, observer: str = "minmax",
                 progress: bool | None = None) -> dict[str, Any]:
    """Compress a classification run into a new run folder and measure both.

    Args:
        run: a run folder or a :class:`cnnkit.train.run.Run`.
        out: the new run folder (must not exist).
        prune: fraction of channels to remove per group (structured, see
            :func:`cnnkit.compress.prune.prune`), or None.
        criterion: pruning criterion (``l1``, ``l2``, ``bn_scale``, ``random`` ...).
        global_ranking: one threshold over all groups instead of a ratio per group.
        finetune: epochs of fine-tuning after pruning (the run's own recipe, a tenth of
            its learning rate).
        quantize: ``"int8"`` for post-training static quantisation, or None.
        observer: activation calibration for int8: ``minmax``, ``percentile``, ``entropy``.

    Returns:
        The ``compress.json`` contents: one row per model (``original``, ``pruned``,
        ``int8``) with accuracy, params, MACs, bytes and latency, and the speed-ups.
    """
    from cnnkit.train import TrainConfig, Trainer, load_run
    from cnnkit.train.checkpoint import save_weights
    from cnnkit.train.evaluation import run_test_data
    from cnnkit.train.run import RunPaths, write_json

    from .prune import prune as prune_model

    run = run if hasattr(run, "preprocess") else load_run(run)
    if run.preprocess.task != "classify":
        raise ValueError(f"cnnkit compress works on classification runs so far; {run.path} is "
                         f"a {run.preprocess.task} run")
    if prune is None and quantize is None:
        raise ValueError("nothing to do: give --prune RATIO and/or --quantize int8")
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown --quantize {quantize!r}; the supported one is int8")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; give a new folder with --out")
    if finetune and prune is None:
        raise ValueError("--finetune fine-tunes a pruned model; give --prune too")
    test = run_test_data(run)
    prep = run.preprocess
    x_test = torch.stack([prep.normalize(img.float() / 255) for img in test.images])
    y_test = test.labels
    c, h, w = prep.input_size
    original = run.model.eval()
    models: dict[str, nn.Module] = {"original": original}
    current = original
    if prune is not None:
        pruned = prune_model(original, prune, criterion, example_inputs=x_test[:1],
                             global_ranking=global_ranking)
        if finetune:
            cfg = TrainConfig.from_dict({**run.config.to_dict(), "epochs": finetune,
                                         "lr": run.config.resolved_lr / 10,
                                         "warmup_epochs": 0.0, "name": out.name,
                                         "runs_dir": str(out.parent)})
            trainer = Trainer(cfg, model=pruned, progress=progress)
            trainer.paths = RunPaths(out)
            trainer.fit()
            pruned = load_run(out).model
        else:
            out.mkdir(parents=True)
            shutil.copy(RunPaths(run.path).config, RunPaths(out).config)
            meta = {"model": run.config.model, "model_kwargs": run.config.model_kwargs,
                    **prep.to_dict(), "pruning_history": pruned.pruning_history}
            save_weights(RunPaths(out).weights, pruned.state_dict(), meta)
        models["pruned"] = current = pruned.eval()
    else:
        out.mkdir(parents=True)
        shutil.copy(RunPaths(run.path).config, RunPaths(out).config)
        save_weights(RunPaths(out).weights, original.state_dict(),
                     {"model": run.config.model, "model_kwargs": run.config.model_kwargs,
                      **prep.to_dict()})
    if quantize == "int8":
        from cnnkit.data import load_data, split_indices

        from .quantize import quantize as quantize_model
        from .quantize import save_quantized

        cfg = run.config
        data = load_data(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                         strict=cfg.strict, seed=cfg.seed, **cfg.data_options)
        train_idx = split_indices(data.labels, cfg.split, seed=cfg.seed)[0][:512]
        calib = torch.stack([prep.normalize(img.float() / 255) for img in data.images[train_idx]])
        models["int8"] = quantize_model(current, calib, observer=observer)
        save_quantized(models["int8"], RunPaths(out).int8)
    rows: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        if name == "int8":  # the same multiply-adds, in int8
            prev = rows["pruned" if "pruned" in rows else "original"]
            facts = {"params": prev["params"], "macs": prev["macs"]}
        else:
            facts = _facts(m, (c, h, w))
        rows[name] = {"accuracy": _accuracy(m, x_test, y_test), **facts,
                      "bytes": file_bytes(m)}
    for batch in (1, 32):
        x = x_test[:batch] if len(x_test) >= batch else x_test[:1].expand(batch, -1, -1, -1)
        for name, t in measure_latency(models, x.contiguous()).items():
            rows[name][f"latency_b{batch}"] = t
    base = rows["original"]
    for r in rows.values():
        r["speedup_b1"] = base["latency_b1"] / r["latency_b1"]
        r["speedup_b32"] = base["latency_b32"] / r["latency_b32"]
        r["params_ratio"] = base["params"] / r["params"]
        r["bytes_ratio"] = base["bytes"] / r["bytes"]
    result = {"run": str(run.path), "out": str(out), "prune": prune, "criterion": criterion,
              "global_ranking": global_ranking, "finetune": finetune, "quantize": quantize,
              "observer": observer if quantize else None, "threads": torch.get_num_threads(),
              "test_images": len(y_test), "models": rows}
    write_json(out / "compress.json", result)
    if not (out / "summary.json").exists():  # fine-tuning wrote one; else the measured row
        kept = rows["pruned" if "pruned" in rows else "original"]
        write_json(out / "summary.json", {"model": run.config.model,
                                          "compressed_from": str(run.path),
                                          "test_accuracy": kept["accuracy"]})
    return json.loads(json.dumps(result))
