"""The subcommands that take a trained run beyond training: ``compress`` (smaller and
faster), ``export`` (ONNX / TorchScript) and ``serve`` (the browser explorer). Like
:mod:`cnnkit.cli.commands`, each imports what it needs when it runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys


def compress(args: argparse.Namespace) -> int:
    from cnnkit.compress.pipeline import compress_run
    from cnnkit.compress.prune import criteria
    from cnnkit.compress.sweep import sweep_run

    if args.criterion not in criteria():
        raise ValueError(f"unknown --criterion {args.criterion!r}; choose from "
                         f"{', '.join(criteria())}")
    progress = False if args.no_progress else None
    if args.sweep:
        if args.out or args.prune is not None or args.quantize or args.qat or args.lowrank:
            raise ValueError("--sweep measures its own grid into RUN's report; drop --out, "
                             "--prune, --lowrank, --quantize and --qat (choose --ratios)")
        with contextlib.redirect_stdout(sys.stderr):
            result = sweep_run(args.run, ratios=args.ratios, criterion=args.criterion,
                               finetune=args.finetune, observer=args.observer,
                               progress=progress)
        rows, where = result["rows"], f"{result['run']} (compress_sweep.json, report.html)"
    else:
        if not args.out:
            raise ValueError("give the new run folder with --out RUN2 (or use --sweep)")
        with contextlib.redirect_stdout(sys.stderr):
            result = compress_run(args.run, args.out, prune=args.prune,
                                  criterion=args.criterion, global_ranking=args.global_ranking,
                                  lowrank=args.lowrank,
                                  finetune=args.finetune, quantize=args.quantize,
                                  observer=args.observer, qat=args.qat, progress=progress)
        rows, where = result["models"], f"{result['out']} (compress.json)"
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    width = max(9, *(len(n) for n in rows))
    print(f"{'model':<{width}} {'accuracy':>8} {'params':>10} {'MACs':>12} {'MB':>7} "
          f"{'b1 ms':>7} {'b32 ms':>8} {'speed-up b32':>12}" + ("  Pareto" if args.sweep else ""))
    for name, r in rows.items():
        macs = f"{r['macs']:,}" if r["macs"] is not None else "-"
        print(f"{name:<{width}} {r['accuracy']:>8.4f} {r['params']:>10,} {macs:>12} "
              f"{r['bytes'] / 1e6:>7.2f} {r['latency_b1'] * 1e3:>7.2f} "
              f"{r['latency_b32'] * 1e3:>8.2f} {r['speedup_b32']:>11.2f}x"
              + (("  *" if r["pareto"] else "") if args.sweep else ""))
    print(f"wrote {where}")
    return 0


def export(args: argparse.Namespace) -> int:
    import torch

    from cnnkit.compress.export import export as export_model
    from cnnkit.train import load_run

    run = load_run(args.run)
    c, h, w = run.preprocess.input_size
    scale = int(getattr(run.model, "scale", 1))
    x = torch.rand(2, c, h // scale, w // scale)
    out = args.out or run.path / ("model.onnx" if args.format == "onnx" else "model.pt")
    result = export_model(run.model, x, out, format=args.format)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        check = (f"outputs match {result['checked_with']} within {result['max_abs_diff']:.2g}"
                 if result["checked_with"] else "not run: install onnxruntime to check it")
        print(f"wrote {result['path']} ({result['bytes'] / 1e6:.2f} MB); {check}")
    return 0


def serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port} (0 picks a free port)")
    try:
        from cnnkit.web import serve as serve_explorer
    except ImportError as e:
        raise ValueError(f"cnnkit serve needs the web extra ({e}); install it with "
                         "pip install 'cnnkit[web]'") from e

    def announce(url: str) -> None:
        exposed = "" if args.host in ("127.0.0.1", "localhost", "::1") else \
            f" (listening on {args.host}: other machines can reach it)"
        print(f"cnnkit serve: {url}{exposed}; press Ctrl-C to stop", flush=True)

    serve_explorer(args.run, host=args.host, port=args.port, weights=args.weights,
                   announce=announce)
    return 0
