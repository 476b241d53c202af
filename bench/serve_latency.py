"""``cnnkit serve``: latency of the activations endpoint for one input of a TinyVGG run.

What a page waits for when a user picks an input: ``GET /api/activations?input=test:i``
over real HTTP (uvicorn on a local port, one persistent connection), i.e. the forward
pass with a hook on every layer, the outputs packed as float32, the PNG of the input and
the JSON. "Cold" requests cycle through more test images than the server's trace cache
holds, so every one runs the model; "warm" ones repeat one image (cache hit: packing and
HTTP only). The baseline is the least any such endpoint must do: the same model's
forward with a hook on every layer that clones its output, in-process, no HTTP. Each
repeat times the three back to back, so a change of load hits all alike; medians and the
ratio of the medians are reported. Goal (issue 6): cold < 100 ms.

Two TinyVGG runs: the quick one on digits (8x8 grey, padded convolutions, the
`cnnkit train --model tinyvgg` default data) and CNN Explainer's own size (64x64 RGB,
unpadded 3x3 convolutions, 62x62 maps) trained briefly on `shapes`.

Usage: python bench/serve_latency.py [--reps 50] [--runs-dir DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

import cnnkit
from cnnkit.web import create_app, load_explorer, running
from cnnkit.web.layers import layer_modules

RUNS = (
    ("tinyvgg digits 1x8x8", dict(model="tinyvgg", data="digits", epochs=1)),
    ("tinyvgg shapes 3x64x64", dict(model="tinyvgg", data="shapes", epochs=1,
                                    data_options=dict(n=400, size=64))),
)


def train(runs_dir: Path, name: str, options: dict) -> Path:
    path = runs_dir / name.replace(" ", "-")
    if not (path / "model.safetensors").is_file():
        cnnkit.train(runs_dir=str(runs_dir), name=path.name, progress=False, **options)
    return path


def hooked_forward(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The baseline: a forward pass keeping a clone of every layer's output."""
    outs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().clone()))
               for _, m in layer_modules(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def measure(path: Path, reps: int) -> dict[str, float]:
    explorer = load_explorer(path)
    n_inputs = explorer.cache_size + 3  # more than the cache holds: every cold request computes
    x = explorer.run.preprocess(explorer.inputs.get("test:0")[0])[None]
    cold, warm, base, size = [], [], [], 0
    with running(create_app(explorer)) as url:
        where = urlparse(url)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)

        def get(key: str) -> float:
            nonlocal size
            t = time.perf_counter()
            conn.request("GET", f"/api/activations?input={key}")
            body = conn.getresponse().read()
            size = len(body)
            return time.perf_counter() - t

        for i in range(n_inputs + 3):  # warm up: imports, allocator, the connection
            get(f"test:{i % n_inputs}")
            hooked_forward(explorer.model, x)
        for i in range(reps):
            cold.append(get(f"test:{i % n_inputs}"))
            warm.append(get(f"test:{i % n_inputs}"))  # the one just computed: cached
            t = time.perf_counter()
            hooked_forward(explorer.model, x)
            base.append(time.perf_counter() - t)
        conn.close()
    cold_ms, warm_ms, base_ms = (1e3 * statistics.median(v) for v in (cold, warm, base))
    return {"cold": cold_ms, "warm": warm_ms, "base": base_ms, "bytes": size,
            "layers": len(explorer.layers), "p90": 1e3 * statistics.quantiles(cold, n=10)[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--runs-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "cnnkit-bench-serve")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load:.2f} before")
    print("| run | layers | answer KB | cold ms (p90) | warm ms | hooked forward ms | "
          "cold / forward |")
    print("|---|---|---|---|---|---|---|")
    for name, options in RUNS:
        r = measure(train(args.runs_dir, name, options), args.reps)
        print(f"| {name} | {r['layers']} | {r['bytes'] / 1e3:.1f} | {r['cold']:.2f} "
              f"({r['p90']:.2f}) | {r['warm']:.2f} | {r['base']:.2f} | "
              f"{r['cold'] / r['base']:.1f}x |")
    print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
