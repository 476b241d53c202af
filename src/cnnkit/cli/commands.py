"""The subcommands. Each imports what it needs when it runs (PyTorch included); ``train``
and ``bench`` get their config back from the options generated from it (:mod:`.generate`)."""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from cnnkit._files import make_folder, refuse_existing
from cnnkit.run.config import RESUME_OPTIONS

from .generate import config_from_args, given_options, option_flag

# Errors that mean "bad input or a stopped run", shown as one line with exit code 2.
# NonFiniteLossError is a FloatingPointError; missing files are OSErrors.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError)


@contextlib.contextmanager
def output_folder(out: str | None, default: Path, force: bool) -> Iterator[Path]:
    """Where a command writes its files: ``default`` or, if taken, ``default-2``,
    ``default-3`` ... (created atomically, so two commands never share one); a given
    ``--out`` must be new, unless ``--force`` lets the command write into it. A folder
    made here and left empty by a failing command is removed."""
    if out is None:
        path = made = make_folder(default, next_free=True)
    elif force:
        path, made = Path(out), None if Path(out).is_dir() else Path(out)
        path.mkdir(parents=True, exist_ok=True)
    else:
        try:
            path = made = make_folder(out)
        except FileExistsError:
            raise ValueError(f"{out} exists; give a new --out folder, or add --force to write "
                             "into it (replacing files of the same names)") from None
    try:
        yield path
    except BaseException:
        if made is not None and not any(made.iterdir()):
            made.rmdir()
        raise


def one_line(e: BaseException) -> str:
    text = str(e).strip().replace("\n", " ")
    if isinstance(e, FileNotFoundError) and e.filename and not text.startswith("["):
        return text
    return text or type(e).__name__


def _resume_args(args: argparse.Namespace) -> tuple[Path, dict]:
    """The run folder and the options to change (``RESUME_OPTIONS``) for ``--resume``."""
    from cnnkit.run import resolve_run  # lazy: cli start-up

    cls = args.config_class
    given = given_options(cls, args)
    runs_dir = given.pop("runs_dir", cls.runs_dir)  # where RUN is, not an option of the run
    fixed = sorted(option_flag(cls, k) for k in given if k not in RESUME_OPTIONS)
    if fixed:
        allowed = ", ".join(option_flag(cls, k) for k in RESUME_OPTIONS)
        raise ValueError(f"--resume continues a run with its saved data, model and recipe, so "
                         f"{', '.join(fixed)} cannot be given with it; drop them (a resume may "
                         f"change {allowed}), or start a new run without --resume")
    return resolve_run(args.resume, runs_dir), given


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N`` (and argparse's prefixes of it)."""
    out, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 4 and "--nproc".startswith(name):
            skip = "=" not in token
        else:
            out.append(token)
    return out


def _launch(args: argparse.Namespace, config, resume: Path | None) -> int:
    """``cnnkit train --nproc N``: the same command under torchrun, N processes."""
    from cnnkit.run import RunPaths, read_config  # lazy: cli start-up
    from cnnkit.training import distributed  # lazy: cli start-up

    batch = (read_config(RunPaths(resume).config) if resume is not None else config).batch_size
    if batch % args.nproc:
        raise ValueError(f"the batch size {batch} is the global batch, split evenly over "
                         f"{args.nproc} processes; give a multiple of {args.nproc}")
    cnnkit_args = _without_nproc(args.argv)
    print(f"cnnkit train: {args.nproc} processes: torchrun --standalone --nproc_per_node "
          f"{args.nproc} -m cnnkit {' '.join(cnnkit_args)}", file=sys.stderr)
    return distributed.launch(args.nproc, cnnkit_args)


def train(args: argparse.Namespace) -> int:
    from cnnkit.models import model_info  # lazy: cli start-up
    from cnnkit.training import Trainer, distributed  # lazy: cli start-up

    if args.nproc is not None and distributed.under_torchrun():
        raise ValueError("--nproc starts torchrun itself; under torchrun leave it out "
                         "(torchrun's --nproc_per_node sets the number of processes)")
    overrides: dict = {}
    if args.resume is not None:
        resume, overrides = _resume_args(args)
        config = None
    else:
        resume, config = None, config_from_args(args.config_class, args)
        model_info(config.model)  # fail on a bad name before any data is loaded
        runs_dir = Path(config.runs_dir)
        if runs_dir.exists() and not runs_dir.is_dir():
            raise ValueError(f"--runs-dir {str(runs_dir)!r} is a file, not a folder; give a "
                             "folder (it is created if missing)")
    if args.nproc is not None and args.nproc > 1:
        return _launch(args, config, resume)
    main = distributed.current().is_main  # under torchrun, rank 0 alone talks
    if not main:
        warnings.simplefilter("ignore")  # main() scopes this to the command
    try:
        trainer = Trainer(config, resume=resume, overrides=overrides or None,
                          progress=False if args.no_progress else None)
        if main:
            print(f"run {trainer.paths.root}: {trainer.config.model} on {trainer.config.data} "
                  f"({trainer.train_loader.num_samples} train samples, {trainer.device}"
                  + (f" x {trainer.dist.world_size} processes" if trainer.dist.enabled else "")
                  + ")", file=sys.stderr)
        try:
            # Per-epoch lines are progress, not results: stdout keeps only the final line or
            # the JSON, so `cnnkit train --json | jq` works.
            with contextlib.redirect_stdout(sys.stderr):
                summary = trainer.fit()
        except KeyboardInterrupt:
            if main:
                print(f"cnnkit train: interrupted; continue with `cnnkit train --resume "
                      f"{trainer.paths.root}`", file=sys.stderr)
            return 130
    finally:
        distributed.shutdown()
    if not main:
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{_headline(summary)} ({summary['num_samples']['test']} test samples); run saved "
              f"in {trainer.paths.root} (report.html)")
    return 0


def _headline(result: dict) -> str:
    """The task's test metrics on one line."""
    from cnnkit.tasks import create_task  # lazy: cli start-up

    return create_task(result["task"], result).headline(result)


def evaluate(args: argparse.Namespace) -> int:
    from cnnkit.workflows.evaluate import evaluate_run  # lazy: cli start-up

    result = evaluate_run(args.run, data=args.data, weights=args.weights)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{_headline(result)}  test_loss {result['test_loss']:.4f}"
              f"  ({result['num_samples']} samples of {result['data']})")
    return 0


def input_files(items: list[str]) -> list[str]:
    """The files that ``cnnkit predict`` and ``cnnkit explain`` read, from what the user
    gave: files as they are; a folder: every image or volume file directly inside it
    (not in subfolders, hidden files left out), sorted by name; a glob pattern (``*``,
    ``?``, ``[...]``, quoted so the shell passes it on): its matching files, sorted. Each
    file once, in the order given.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a folder without image or volume files, or a pattern matching no file.
    """
    from cnnkit.data._decode import image_extensions  # lazy: cli start-up
    from cnnkit.data.volumes import VOLUME_SUFFIXES  # lazy: cli start-up

    def readable(path: Path) -> bool:
        name = path.name.lower()
        return (path.is_file() and not name.startswith(".")
                and (path.suffix.lower() in image_extensions() or name.endswith(VOLUME_SUFFIXES)))

    found: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            inside = sorted(str(p) for p in path.iterdir() if readable(p))
            if not inside:
                raise ValueError(f"{item!r} is a folder with no image or volume files in it "
                                 "(subfolders are not searched); give image files, a folder "
                                 f"of them, or a pattern such as '{item.rstrip('/')}/*.png'")
            found += inside
        elif path.exists():
            found.append(item)
        elif glob.has_magic(item):
            matches = sorted(m for m in glob.glob(item) if Path(m).is_file())
            if not matches:
                raise ValueError(f"the pattern {item!r} matches no files; check it (quote it, "
                                 "as in 'photos/*.jpg', so that cnnkit expands it)")
            found += matches
        else:
            raise FileNotFoundError(f"image file {item!r} does not exist; check the path "
                                    "(give image files, folders or quoted patterns)")
    return list(dict.fromkeys(found))


def predict(args: argparse.Namespace) -> int:
    from cnnkit.tasks import create_task  # lazy: cli start-up
    from cnnkit.workflows.evaluate import predict_files  # lazy: cli start-up

    args.files = input_files(args.files)
    if Path(args.run).suffix.lower() == ".onnx":  # an exported file: ONNX Runtime runs it
        from cnnkit.workflows.onnx_predict import load_onnx, predict_onnx  # lazy: cli start-up

        if args.out or args.crf:
            raise ValueError(f"{'--out' if args.out else '--crf'} is for runs that write their "
                             "predictions as files; an .onnx file's are printed (use --json)")
        model = load_onnx(args.run)
        results = predict_onnx(model, args.files, topk=args.topk)
        task = create_task(model.preprocess.task)
        print(json.dumps(results, indent=2) if args.json
              else "\n".join(task.prediction_line(r) for r in results))
        return 0
    from cnnkit.workflows.load import load_run  # lazy: cli start-up

    run = load_run(args.run)
    task = create_task(run.config.task, run.config)
    if task.writes_predictions:
        return _predict_files(run, task, args)
    if args.out or args.crf:
        raise ValueError(f"{'--out' if args.out else '--crf'} is for runs that write their "
                         f"predictions as files; a {task.name} run's are printed (use --json to "
                         "save them)")
    results = predict_files(run, args.files, topk=args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(task.prediction_line(r))
    return 0


def _predict_files(run, task, args: argparse.Namespace) -> int:
    from cnnkit.workflows.evaluate import predict_dense_files  # lazy: cli start-up

    with output_folder(args.out, run.path / "predictions", args.force) as out:
        results = predict_dense_files(run, args.files, out, crf=args.crf, overwrite=args.force)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(task.prediction_line(r))
    return 0


def _size_text(size) -> str:
    return "x".join(str(v) for v in size)


def summary(args: argparse.Namespace) -> int:
    from cnnkit.analysis import summary as model_summary  # lazy: cli start-up

    target = args.target
    if (Path(target) / "config.yaml").is_file():
        from cnnkit.workflows.load import load_run  # lazy: cli start-up

        run = load_run(target)
        native = run.preprocess.input_size
        if args.input and args.input[0] != native[0]:
            raise ValueError(f"run {target!r} takes {native[0]}-channel images, got --input "
                             f"{_size_text(args.input)}; give --input {native[0]}xHxW or omit it "
                             f"for {_size_text(native)}")
        model, size = run.model, args.input or native
    else:
        from cnnkit.models import create_model, model_info  # lazy: cli start-up

        model_info(target)
        kwargs = {}
        if args.num_classes:
            kwargs["num_classes"] = args.num_classes
        if args.input:
            kwargs["input_size"] = args.input
        model = create_model(target, **kwargs)  # a size it cannot take: one line, its own
        size = args.input or model.default_cfg["input_size"]
    try:
        result = model_summary(model, tuple(size))
    except RuntimeError as e:
        # The pass on zeros fails only on shapes: an input too small for the downsampling,
        # or (for a run) a size its classifier was not built for.
        reason = str(e).strip().split("\n")[0]
        raise ValueError(f"{target} cannot take input {_size_text(size)} ({reason}); give "
                         "another --input (larger, or the size it was built for) or omit it"
                         ) from e
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


def bench(args: argparse.Namespace) -> int:
    from cnnkit.workflows.bench import docs_section, format_tables, run_bench  # lazy: cli start-up
    from cnnkit.workflows.bench.report import machine_text, write_section  # lazy: cli start-up

    result = run_bench(config_from_args(args.config_class, args),
                       progress=False if args.no_progress else None)
    result["command"] = "cnnkit bench " + " ".join(args.argv[1:])
    notes = [f"{r['model']} fast mode: torch.compile {r['compile']}"
             for r in result["training"] if r["compile"].startswith("fell back")]
    notes += [f"{r['model']} {r['mode']}: memory not measured ({r['memory_error']})"
              for r in result["training"] if r["memory_error"]]
    if args.write_docs:
        device = result["machine"]["device"].split(":")[0]
        write_section(args.write_docs, f"cnnkit bench {device}",
                      docs_section(result, "".join(f"- {n}\n" for n in notes)))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{machine_text(result['machine'])}\nload average {result['load_before']} before, "
              f"{result['load_after']} after ({result['seconds'] / 60:.1f} min)\n\n"
              f"{format_tables(result)}")
        for note in notes:
            print(f"note: {note}")
    if args.write_docs:
        print(f"wrote the cnnkit bench section of {args.write_docs}", file=sys.stderr)
    return 0


def models(args: argparse.Namespace) -> int:
    from cnnkit.models import list_models, model_info  # lazy: cli start-up
    from cnnkit.tasks import task_class  # lazy: cli start-up

    if args.task is not None:
        task_class(args.task)  # an unknown task: one line naming the registered ones
    names = list_models(args.pattern, task=args.task)
    if not names:
        kind = f"{args.task} " if args.task else ""
        raise ValueError(f"no {kind}model matches {args.pattern!r}; run `cnnkit models` to list "
                         "all")
    width = max(len(n) for n in names)
    for n in names:
        print(f"{n:<{width}}  {model_info(n).doc}")
    return 0


def tasks(args: argparse.Namespace) -> int:
    from cnnkit.models import list_models  # lazy: cli start-up
    from cnnkit.tasks import list_tasks, task_class  # lazy: cli start-up

    for name in list_tasks():
        cls = task_class(name)
        d = cls.defaults
        better = "higher" if cls.higher_is_better else "lower"
        print(f"{name:<9} {cls.description}; metric {cls.metric} ({better} is better); losses "
              f"{', '.join(cls.losses)}; default model {d.model}, data {d.data or '(give --data)'}"
              f"; {len(list_models(task=cls.models))} {cls.models} models")
    return 0


def datasets(args: argparse.Namespace) -> int:
    from cnnkit.data import dataset_info, list_datasets  # lazy: cli start-up

    for n in list_datasets():
        print(f"{n:<8}  {dataset_info(n)}")
    print("\nYour own data, given as --data PATH:\n"
          "  FOLDER/     one subfolder per class holding images (any format Pillow reads)\n"
          "  FILE.csv    rows of path,label (paths relative to the CSV's folder)\n"
          "  FILE.npz    arrays x (or images) [N,H,W], [N,H,W,C] or [N,C,H,W] and y (or labels)\n"
          "  FOLDER/     with --task segment: images/ and masks/ (same file names; masks are\n"
          "              index or palette PNGs, 255 = ignore), optional classes.txt\n"
          "  FOLDER/     with --task superres: any images (low resolution made by bicubic\n"
          "              downscaling)\n"
          '  FOLDER/     of NIfTI volumes (.nii, .nii.gz; pip install -e ".[volumes]"): one\n'
          "              subfolder per class, or with --task segment images/ and masks/")
    return 0


def explain(args: argparse.Namespace) -> int:

    from cnnkit.explain import list_methods  # lazy: cli start-up
    from cnnkit.explain.options import split_options  # lazy: cli start-up
    from cnnkit.workflows.explain import explain_files, resolve_methods  # lazy: cli start-up
    from cnnkit.workflows.load import load_run  # lazy: cli start-up

    methods = args.method or ["gradcam"]
    known = list_methods()
    for m in methods:
        if m not in known and m != "all":
            from cnnkit.models._registry import suggest  # lazy: cli start-up

            raise ValueError(f"unknown explanation method {m!r}{suggest(m, known)} "
                             f"(choose from {', '.join(known)}, or all)")
    options = dict(args.opt or [])
    if args.benchmark:
        return _explain_benchmark(args)
    split_options(resolve_methods(methods)[0], options)  # a bad --opt: one line, before work
    if not args.images:
        raise ValueError("give IMAGES to explain, or --benchmark to rank the methods on the "
                         "run's test split")
    files = input_files(args.images)
    run = load_run(args.run)
    with output_folder(args.out, run.path / "explanations", args.force) as out:
        written = explain_files(run, files, methods, out, target=args.target,
                                layer=args.layer, overwrite=args.force, options=options)
    print(f"wrote {len(written)} files to {out} (grid.png compares the methods)")
    return 0


def _explain_benchmark(args: argparse.Namespace) -> int:
    from cnnkit.workflows.explain_benchmark import (  # lazy: cli start-up
        benchmark_files,
        benchmark_methods,
        format_table,
        write_benchmark,
    )
    from cnnkit.workflows.load import load_run  # lazy: cli start-up

    fixed = [name for name, given in (("IMAGES", args.images), ("--target", args.target),
                                      ("--out", args.out), ("--opt", args.opt)) if given]
    if fixed:
        raise ValueError(f"--benchmark explains the run's test split (target: the true label) "
                         f"into the run folder, so {', '.join(fixed)} cannot be given with it; "
                         "drop them")
    run = load_run(args.run)
    try:  # before the work: files of an earlier benchmark are kept unless --force
        refuse_existing(benchmark_files(run.path), args.force)
    except FileExistsError as e:
        raise ValueError(f"{e.filename} exists from an earlier --benchmark; add --force to "
                         "replace it") from None
    every = not args.method or "all" in args.method
    rows = benchmark_methods(run, methods=None if every else args.method,
                             n_images=args.n_images, steps=args.steps, layer=args.layer,
                             sanity=args.sanity)
    print(format_table(rows))
    written = write_benchmark(run.path, rows, overwrite=args.force)
    print(f"wrote {', '.join(p.name for p in written)} in {run.path}")
    return 0
