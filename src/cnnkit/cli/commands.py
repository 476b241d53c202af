"""The subcommands. Each imports what it needs when it runs (PyTorch included)."""

from __future__ import annotations

import argparse
import json
import sys

# Errors that mean "bad input or a stopped run", shown as one line with exit code 2.
# NonFiniteLossError is a FloatingPointError; missing files are OSErrors.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError)


def one_line(e: BaseException) -> str:
    text = str(e).strip().replace("\n", " ")
    if isinstance(e, FileNotFoundError) and e.filename and not text.startswith("["):
        return text
    return text or type(e).__name__


def _config_from_args(args: argparse.Namespace):
    from cnnkit.train import TrainConfig

    fields = {"model": args.model, "data": args.data, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
              "schedule": args.schedule, "weight_decay": args.weight_decay,
              "label_smoothing": args.label_smoothing, "grad_clip": args.grad_clip,
              "image_size": args.image_size, "channels": args.channels,
              "augment": args.augment, "amp": args.amp, "channels_last": args.channels_last,
              "ema": args.ema, "early_stopping": args.early_stopping, "device": args.device,
              "strict": args.strict, "name": args.name, "runs_dir": args.runs_dir,
              "seed": args.seed}
    given = {k: v for k, v in fields.items() if v is not None}
    if args.model_opt:
        given["model_kwargs"] = dict(args.model_opt)
    if args.data_opt:
        given["data_options"] = dict(args.data_opt)
    return TrainConfig.from_dict(given)


def train(args: argparse.Namespace) -> int:
    from cnnkit.models import model_info
    from cnnkit.train import Trainer

    config = _config_from_args(args)
    if args.resume is None:
        model_info(config.model)  # fail on a bad name before any data is loaded
    trainer = Trainer(config, resume=args.resume, progress=False if args.no_progress else None)
    print(f"run {trainer.paths.root}: {trainer.config.model} on {trainer.config.data} "
          f"({trainer.train_loader.num_samples} train images, {trainer.device})", file=sys.stderr)
    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        print(f"cnnkit train: interrupted; continue with `cnnkit train --resume "
              f"{trainer.paths.root}`", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"test_accuracy {summary['test_accuracy']:.4f} "
              f"({summary['num_samples']['test']} test images); run saved in "
              f"{trainer.paths.root} (report.html)")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from cnnkit.train.evaluation import evaluate_run

    result = evaluate_run(args.run, data=args.data, weights=args.weights)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"test_accuracy {result['test_accuracy']:.4f}  test_loss {result['test_loss']:.4f}"
              f"  ({result['num_samples']} images of {result['data']})")
    return 0


def predict(args: argparse.Namespace) -> int:
    from cnnkit.train.evaluation import predict_files

    results = predict_files(args.run, args.files, topk=args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        ranked = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
        print(f"{r['file']}: {ranked}")
    return 0


def summary(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnkit.analysis import summary as model_summary

    target = args.target
    if (Path(target) / "config.yaml").is_file():
        from cnnkit.train import load_run

        run = load_run(target)
        model, size = run.model, args.input or run.preprocess.input_size
    else:
        from cnnkit.models import create_model, model_info

        model_info(target)
        kwargs = {}
        if args.num_classes:
            kwargs["num_classes"] = args.num_classes
        if args.input:
            kwargs.update(in_chans=args.input[0], img_size=args.input[1:])
        model = create_model(target, **kwargs)
        size = args.input or model.default_cfg["input_size"]
    result = model_summary(model, tuple(size))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


def models(args: argparse.Namespace) -> int:
    from cnnkit.models import list_models, model_info

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}; run `cnnkit models` to list all")
    width = max(len(n) for n in names)
    for n in names:
        print(f"{n:<{width}}  {model_info(n).doc}")
    return 0


def datasets(args: argparse.Namespace) -> int:
    from cnnkit.data import dataset_info, list_datasets

    for n in list_datasets():
        print(f"{n:<8}  {dataset_info(n)}")
    print("\nYour own data, given as --data PATH:\n"
          "  FOLDER/     one subfolder per class holding images (any format Pillow reads)\n"
          "  FILE.csv    rows of path,label (paths relative to the CSV's folder)\n"
          "  FILE.npz    arrays x (or images) [N,H,W], [N,H,W,C] or [N,C,H,W] and y (or labels)")
    return 0
