"""Does every small model learn every built-in data set on defaults?

For each built-in data set, each task it holds targets for, and each registered model
of that task that is *small* for it (:func:`cnnkit.workflows.learns.small_models`), one
``cnnkit.train`` run with nothing but ``model``, ``data`` and ``task`` given (the data
set's recipe and the task's defaults choose the rest), then its test metric, chance
level (the best constant prediction), whether it learned (halfway from chance to
perfect) and wall time. This is the full-size version of ``tests/workflows/test_learns.py``
(which shrinks the data sets to keep CI short).

Usage::

    python bench/learns.py                              # every pair, tens of minutes
    python bench/learns.py --data digits --models lenet5,tinyvgg
    python bench/learns.py --set optimizer=adamw --set lr=2e-3   # try other settings
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import cnnkit
from cnnkit.data import load_data, split_indices
from cnnkit.tasks import create_task, task_class
from cnnkit.workflows.learns import learned, learning_pairs


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="only this data set")
    p.add_argument("--task", default=None, help="only this task")
    p.add_argument("--models", default=None, help="only these models (comma list)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig option for every run (repeatable)")
    p.add_argument("--data-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a data set option for every run (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON line per run")
    args = p.parse_args()
    options = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    data_options = {k: _value(v) for k, v in (s.split("=", 1) for s in args.data_opt)}
    models = args.models.split(",") if args.models else None
    print(f"# load average {os.getloadavg()[0]:.2f}, torch threads "
          f"{__import__('torch').get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as runs:
        for data, task, model in learning_pairs(data=args.data, task=args.task, models=models):
            t0 = time.perf_counter()
            s = cnnkit.train(model=model, data=data, task=task, runs_dir=runs, progress=False,
                             data_options=data_options, **options)
            took = time.perf_counter() - t0
            t = create_task(task)
            samples = load_data(data, targets=task_class(task).data_targets, **data_options)
            test_idx = split_indices(samples.labels, (0.8, 0.1, 0.1), seed=0)[2]
            chance = t.chance(t.targets(samples)[test_idx], len(t.classes(samples)))
            value = s[f"test_{t.metric}"]
            row = {"data": data, "task": task, "model": model, "metric": t.metric,
                   "value": round(value, 4), "chance": round(chance, 4),
                   "learned": learned(value, chance), "epochs": s["epochs_run"],
                   "seconds": round(took, 1)}
            print(json.dumps(row) if args.json else
                  f"{data:9} {task:9} {model:14} {t.metric} {value:.3f} (chance "
                  f"{chance:.3f}) {'learned' if row['learned'] else 'NOT LEARNED'}  "
                  f"{row['epochs']} epochs {took:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
