"""Record torchvision's state_dict layouts and logits as the fixture reference.json.

cnnkit promises that its resnet / wide_resnet / vgg / densenet / mobilenet_v2 models have
torchvision's state_dict keys, shapes and parameter counts at 1000 classes, so that
torchvision checkpoints load with ``strict=True`` and give the same outputs.
torchvision is no dependency of cnnkit (nor installable beside the torch the project
pins), so this script is run by hand, once, in a separate environment, and its output is
committed; ``tests/models/test_torchvision_compat.py`` compares cnnkit against it.

How to run (a few minutes; about 5.5 GB of venv)::

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tvenv/bin/python tests/models/torchvision_ref/make_reference.py

For every architecture it builds ``torchvision.models.<name>(weights=None,
num_classes=1000)`` and records:

* ``state_dict``: the ordered ``[key, shape, dtype]`` of every state_dict entry;
* ``num_params``: the parameter count, checked against the ``num_params`` torchvision
  publishes in the metadata of the architecture's pretrained weights;
* ``logits``: after :func:`deterministic.fill_deterministic`, in eval mode, the logits on
  :func:`deterministic.reference_input` (``[2, 3, 64, 64]``): the first 50 of each image
  to 7 significant digits, and the sum and the sum of squares of all 1000 per image.

Rerun it only when the architecture list or ``deterministic.py`` changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torchvision
from torchvision import models as tvm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # deterministic.py sits beside this script

from deterministic import fill_deterministic, probe, reference_input  # noqa: E402

ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "densenet121", "densenet169", "densenet201",
    "mobilenet_v2",
)
NUM_LOGITS_KEPT = 50


def _sig7(value: float) -> float:
    return float(f"{value:.7g}")


def record(name: str) -> dict:
    """The reference entry of one torchvision architecture."""
    model = getattr(tvm, name)(weights=None, num_classes=1000)
    num_params = sum(p.numel() for p in model.parameters())
    published = tvm.get_model_weights(name).DEFAULT.meta["num_params"]
    if num_params != published:
        raise ValueError(f"{name}: torchvision builds {num_params} parameters but publishes "
                         f"{published}; check the torchvision install")
    layout = [[key, list(t.shape), str(t.dtype).removeprefix("torch.")]
              for key, t in model.state_dict().items()]
    fill_deterministic(model).eval()
    with torch.no_grad():
        logits = model(reference_input()).double()
    return {
        "num_params": num_params,
        "state_dict": layout,
        "logits": {
            "first": [[_sig7(v) for v in row[:NUM_LOGITS_KEPT].tolist()] for row in logits],
            "sum": [_sig7(v) for v in logits.sum(1).tolist()],
            "sumsq": [_sig7(v) for v in logits.pow(2).sum(1).tolist()],
        },
    }


def to_json(reference: dict) -> str:
    """JSON with one line per state_dict entry and per logit row: small, and readable in diffs."""
    def dumps(obj: object) -> str:
        return json.dumps(obj, separators=(",", ":"))

    out = ["{", f' "meta": {json.dumps(reference["meta"])},', ' "models": {']
    names = list(reference["models"])
    for i, name in enumerate(names):
        entry = reference["models"][name]
        out += [f"  {dumps(name)}: {{", f'   "num_params": {entry["num_params"]},',
                '   "state_dict": [']
        out += [f"    {dumps(item)}," for item in entry["state_dict"]]
        out[-1] = out[-1].rstrip(",")
        logits = entry["logits"]
        out += ["   ],", '   "logits": {',
                f'    "first": [{dumps(logits["first"][0])},',
                f'              {dumps(logits["first"][1])}],',
                f'    "sum": {dumps(logits["sum"])},',
                f'    "sumsq": {dumps(logits["sumsq"])}',
                "   }", "  }" + ("," if i < len(names) - 1 else "")]
    out += [" }", "}"]
    return "\n".join(out) + "\n"


def main() -> None:
    reference = {
        "meta": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "input": "deterministic.reference_input(0), shape [2, 3, 64, 64]",
            "probe": probe(),
        },
        "models": {},
    }
    for name in ARCHS:
        reference["models"][name] = record(name)
        print(f"{name}: {reference['models'][name]['num_params']} parameters", flush=True)
    text = to_json(reference)
    if json.loads(text) != reference:  # the hand-made layout must still say the same
        raise RuntimeError("to_json lost information; fix the formatter")
    (HERE / "reference.json").write_text(text)
    print(f"wrote {HERE / 'reference.json'} ({len(text) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
