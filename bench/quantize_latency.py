"""Int8 post-training quantisation on this CPU: latency, file size and accuracy vs fp32.

Latency: fp32 eager vs int8 (cnnkit.compress.quantize, x86 engine), both as the FX
GraphModule and frozen with TorchScript by freeze_quantized, on resnet18 (small stem, 32x32,
10 classes) and tinyvgg_wide (8x8, 1 channel, 10 classes) at batch 1 and 32, with 2 and 1
threads; each repeat times the three back to back (interleaved) and the ratio of the medians
is reported, since the machine is shared and absolute times drift.
Size: fp32 state_dict as safetensors vs :func:`save_quantized` (int8 codes, safetensors).
Accuracy: ``cnnkit.training`` runs of tinyvgg_wide on digits (10 epochs) and resnet18 (small
stem) on 1000 shapes images at 32x32 (tinyvgg_wide stayed at chance there in 8 epochs, with
SGD or AdamW); every calibration setting of :func:`search_calibration`, on the run's test
split, calibrated on (up to) 512 training images.
Goals: int8 >= 2x faster, <= 1 point accuracy drop, file >= 3.5x smaller.

Usage: python bench/quantize_latency.py [--reps 30] [--epochs-shapes 5] [--runs-dir DIR]
       [--skip-latency] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import cnnkit
from cnnkit.compress.quantize import freeze_quantized, quantize, search_calibration
from cnnkit.compress.quantized_file import save_quantized
from cnnkit.data import load_data, split_indices
from cnnkit.models import create_model
from cnnkit.workflows.latency import measure_latency

LATENCY_MODELS = {
    "resnet18 32x32": ("resnet18", dict(num_classes=10, img_size=32, stem="small"), (3, 32, 32)),
    "tinyvgg_wide 8x8": ("tinyvgg_wide", dict(num_classes=10, img_size=8, in_chans=1), (1, 8, 8)),
}


def latency_and_size(reps: int) -> None:
    print("## latency (fp32 eager / int8, interleaved medians) and file size")
    print("| model | threads | batch | fp32 ms | int8 ms | speed-up | int8 frozen ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    sizes = []
    for label, (name, kw, shape) in LATENCY_MODELS.items():
        torch.manual_seed(0)
        model = create_model(name, **kw).eval()
        qmodel = quantize(model, torch.randn(64, *shape))
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for batch in (1, 32):
                x = torch.randn(batch, *shape)
                frozen = freeze_quantized(qmodel, x)
                med = measure_latency({"fp32": model, "int8": qmodel, "jit": frozen}, x, reps)
                print(f"| {label} | {threads} | {batch} | {med['fp32'] * 1e3:.2f} | "
                      f"{med['int8'] * 1e3:.2f} | {med['fp32'] / med['int8']:.2f}x | "
                      f"{med['jit'] * 1e3:.2f} | {med['fp32'] / med['jit']:.2f}x |")
        with tempfile.TemporaryDirectory() as tmp:
            f32, i8 = Path(tmp, "f.safetensors"), Path(tmp, "q.safetensors")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(f32))
            save_quantized(qmodel, i8)
            sizes.append((label, f32.stat().st_size, i8.stat().st_size))
    torch.set_num_threads(2)
    print("\n| model | fp32 bytes | int8 bytes | ratio |\n|---|---|---|---|")
    for label, a, b in sizes:
        print(f"| {label} | {a} | {b} | {a / b:.2f}x |")


def accuracy(runs_dir: Path, model: str, data: str, epochs: int, **options) -> None:
    name = f"{model}-{data}"
    summary = cnnkit.train(model=model, data=data, epochs=epochs, runs_dir=str(runs_dir),
                           name=name, progress=False, **options)
    run = cnnkit.load_run(runs_dir / name)
    cfg = run.config
    ds = load_data(cfg.data, image_size=cfg.image_size, channels=cfg.channels, seed=cfg.seed,
                   **cfg.data_options)
    train_idx, _, test_idx = split_indices(ds.labels, cfg.split, seed=cfg.seed)

    def prep(idx: torch.Tensor) -> torch.Tensor:
        return run.preprocess.normalize(ds.images[idx].float() / 255)

    calib = prep(train_idx[:512])
    x, y = prep(test_idx), ds.labels[test_idx]
    _, table = search_calibration(run.model, calib, (x, y))
    base = table[0]["accuracy"]
    print(f"\n## accuracy: {model} on {data}, {epochs} epochs "
          f"(train summary test_accuracy {summary['test_accuracy']:.4f}, n_test={len(y)})")
    print("| setting | per-channel | accuracy | drop (points) |\n|---|---|---|---|")
    for row in table:
        print(f"| {row['observer']} | {row['per_channel']} | {row['accuracy']:.4f} | "
              f"{100 * (base - row['accuracy']):+.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--epochs-shapes", type=int, default=5)
    parser.add_argument("--runs-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "cnnkit-bench-quantize")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-shapes", action="store_true",
                        help="accuracy on digits only (shapes classification needs long training)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, engine {torch.backends.quantized.engine}")
    if not args.skip_latency:
        latency_and_size(args.reps)
    if not args.skip_accuracy:
        accuracy(args.runs_dir, "tinyvgg_wide", "digits", 10)
        if not args.skip_shapes:
            accuracy(args.runs_dir, "resnet18", "shapes", args.epochs_shapes,
                     data_options=dict(n=1000, size=32))


if __name__ == "__main__":
    main()
