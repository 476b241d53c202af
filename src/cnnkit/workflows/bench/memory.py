"""Peak memory of each training configuration, each measured in a fresh process.

A high-water mark cannot be taken per configuration inside the benchmark's own process:
the configurations run interleaved there, and memory freed by one stays resident for the
next. So a worker interpreter (``python -m cnnkit.workflows.bench.memory``) imports torch
and cnnkit, builds nothing, and forks one child per configuration. Each child builds the
configuration (synthetic data, model, optimiser, the compiled graph in fast mode), trains
one warm-up round and one more, and reports:

* on the CPU, its resident-set high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``):
  everything the process held at its peak, the interpreter and the torch libraries
  included; ``base_bytes``, its resident set when it starts, before it builds anything,
  is that fixed part (a forked child shares the worker's pages but counts only those it
  touches, so it starts below the worker's own resident set);
* on CUDA, ``torch.cuda.max_memory_allocated()``: the tensors (model, gradients, optimiser
  state, activations, data) at their peak, without the CUDA context and caching slack.

Forking from a worker that has run nothing is what makes a fresh process per
configuration cheap (importing torch takes seconds) and safe (no thread pool or CUDA
context exists yet to be broken by the fork). On CUDA, and where ``fork`` is unavailable,
children are spawned instead (slower: each imports torch again).
Linux's ``ru_maxrss`` of the worker itself would be useless here: it carries the mark of
the process that started it (the benchmark) across ``exec``; a forked child's starts
afresh.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cnnkit

__all__ = ["MemoryResult", "measure_memory"]

_TAG = "cnnkit-bench-memory "


@dataclass
class MemoryResult:
    """Peak memory of one configuration; ``kind`` is ``"rss"`` or ``"cuda_max_allocated"``."""

    model: str
    mode: str
    kind: str
    peak_bytes: int | None
    base_bytes: int
    error: str | None = None


def _max_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _rss_bytes() -> int:
    """The resident set now (Linux); elsewhere the high-water mark, which in a process
    that has only imported modules is close to it."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return _max_rss_bytes()
    return pages * os.sysconf("SC_PAGE_SIZE")


def _child(conn, model: str, mode: str, steps: int, cfg_dict: dict, device_name: str) -> None:
    import torch  # lazy: subprocess

    from .config import BenchConfig  # lazy: subprocess
    from .training import build_runners, timed_round  # lazy: subprocess

    base = _rss_bytes()
    try:
        cfg = BenchConfig(**cfg_dict)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = torch.device(device_name)
        if device.type == "cuda":
            base = 0  # nothing of this process is on the GPU yet
            torch.cuda.reset_peak_memory_stats(device)
        with tempfile.TemporaryDirectory(prefix="cnnkit-bench-mem-") as runs_dir, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the main process already reported them
            runner = build_runners(model, cfg, device, steps, runs_dir, modes=(mode,))[mode]
            for _ in range(2):
                timed_round(runner, device)
        cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        conn.send({"peak_bytes": cuda if cuda is not None else _max_rss_bytes(),
                   "base_bytes": base, "error": None})
    except Exception as e:  # reported to the parent, which shows it in the result
        conn.send({"peak_bytes": None, "base_bytes": base,
                   "error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _worker(request: dict) -> Iterator[dict]:
    """Run each job of ``request`` in its own child process; yield its result."""
    # Everything the children import, loaded once here and inherited by every forked child.
    import torch  # lazy: subprocess
    import torch._dynamo  # noqa: F401  # lazy: subprocess (the optimisers import it at their first step)

    import cnnkit.data  # lazy: subprocess
    import cnnkit.models  # lazy: subprocess
    import cnnkit.training  # lazy: subprocess

    from . import plain, training  # noqa: F401  # lazy: subprocess

    cnnkit.models.list_models()  # registries fill on first use
    cnnkit.data.list_datasets()
    if request["config"]["compile"]:
        import torch._inductor.compile_fx  # noqa: F401  # lazy: subprocess

    cuda = torch.device(request["device"]).type == "cuda"
    # CUDA cannot be used in a child forked after anything touched it, and a library may
    # touch it on import: children measuring a GPU are spawned.
    fork = "fork" in multiprocessing.get_all_start_methods() and not cuda
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    for model, mode, steps in request["jobs"]:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(send, model, mode, steps, request["config"],
                                                request["device"]))
        proc.start()
        send.close()
        try:
            got = recv.recv()
        except EOFError:  # the child died without a word (killed, out of memory)
            got = {"peak_bytes": None, "base_bytes": 0, "error": "the measuring process died"}
        proc.join()
        yield {"model": model, "mode": mode, "kind": "cuda_max_allocated" if cuda else "rss",
               **got}


def measure_memory(jobs: list[tuple[str, str, int]], cfg_dict: dict, device: str,
                   progress=None) -> list[MemoryResult]:
    """Peak memory of each ``(model, mode, steps)`` job, each in a fresh process.

    Args:
        jobs: the configurations; ``steps`` batches per round.
        cfg_dict: :meth:`BenchConfig.to_dict` of the run.
        device: the torch device name.
        progress: a tqdm bar updated once per finished job, or None.
    """
    request = json.dumps({"jobs": jobs, "config": cfg_dict, "device": device})
    env = dict(os.environ)
    src = str(Path(cnnkit.__file__).resolve().parents[1])  # this cnnkit, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    results = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cnnkit.workflows.bench.memory"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env)
        proc.stdin.write(request)
        proc.stdin.close()
        for line in proc.stdout:
            if line.startswith(_TAG):
                results.append(MemoryResult(**json.loads(line[len(_TAG):])))
                if progress is not None:
                    progress.update(1)
        if proc.wait() != 0 or len(results) != len(jobs):
            err.seek(0)
            tail = " ".join(err.read().strip().splitlines()[-1:]) or f"exit code {proc.returncode}"
            raise RuntimeError(f"the memory worker failed ({tail}); run with memory=False "
                               "(cnnkit bench --no-memory) to skip the memory measurement")
    return results


if __name__ == "__main__":
    # The worker's functions under the module's own name, so that spawned children (which
    # pickle their target by name) find them.
    from cnnkit.workflows.bench.memory import _worker as worker

    for result in worker(json.loads(sys.stdin.read())):
        print(_TAG + json.dumps(result), flush=True)
